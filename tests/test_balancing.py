"""Balancing modes: aux-loss, aux-free bias (inside fit on every backend), none; extra losses."""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from tests.layer_checks import BACKEND

E, D = 4, 8


def _skewed_data(n=256, seed=0):
    """Tokens sharing a large common offset: an untrained linear router sends most of
    them to the same expert."""
    rng = np.random.default_rng(seed)
    offset = 8.0 * rng.normal(size=(D,))
    x = (rng.normal(size=(n, D)) + offset).astype("float32")
    return x, rng.normal(size=(n, D)).astype("float32")


def _load_cv(layer, x):
    decision = layer.route(x)
    load = np.bincount(decision["indices"][decision["active"]], minlength=E).astype(float)
    return load.std() / load.mean()


def _fit(balancing, epochs=6, **overrides):
    keras.utils.set_random_seed(0)
    layer = dl_moe.create_ffn_moe(
        E, D, top_k=1, intermediate_size=16, balancing=balancing, aux_loss_weight=0.0, z_loss_weight=0.0,
        name="moe", **overrides,
    )
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse", jit_compile=BACKEND != "torch")
    x, y = _skewed_data()
    cv_before = _load_cv(layer, x) if layer.built else None
    history = model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    return layer, model, x, history, cv_before


def test_aux_free_bias_is_updated_inside_fit_and_balances_the_load():
    none_layer, _, x, _, _ = _fit("none")
    free_layer, _, _, history, _ = _fit("aux_free", bias_update_rate=0.01)
    bias = ops.convert_to_numpy(free_layer.gating_network.expert_bias)
    assert np.abs(bias).max() > 0, bias  # moved by 48 training steps, also under JAX's stateless fit
    # The overloaded experts got negative bias, the others positive (sum of signs ~ 0).
    assert bias.min() < 0 < bias.max()
    assert np.all(np.isfinite(history.history["loss"]))
    cv_none, cv_free = _load_cv(none_layer, x), _load_cv(free_layer, x)
    assert cv_free < 0.7 * cv_none, (cv_none, cv_free)
    # The bias is not trainable and is reported with the statistics.
    assert all("expert_bias" not in v.path for v in free_layer.trainable_variables)
    np.testing.assert_allclose(free_layer.get_routing_stats()["expert_bias"], bias)


def test_aux_free_bias_survives_save_and_load(tmp_path):
    layer, model, x, _, _ = _fit("aux_free", epochs=1, bias_update_rate=0.01)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored.layers[0].gating_network.expert_bias),
        ops.convert_to_numpy(layer.gating_network.expert_bias),
    )
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_inference_does_not_move_the_bias():
    layer = dl_moe.create_ffn_moe(E, D, intermediate_size=16, balancing="aux_free")
    x, _ = _skewed_data(32)
    layer(x, training=False)
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.gating_network.expert_bias), 0.0)
    layer(x, training=True)
    assert np.abs(ops.convert_to_numpy(layer.gating_network.expert_bias)).max() == pytest.approx(1e-3)


def _losses(layer, x):
    layer(x, training=True)
    return [float(ops.convert_to_numpy(loss)) for loss in layer.losses]


@pytest.mark.parametrize(
    "overrides, count",
    [
        ({}, 2),  # aux_loss (default): Switch loss + z-loss
        ({"balancing": "none"}, 1),  # z-loss only
        ({"balancing": "aux_free"}, 1),  # z-loss only
        ({"balancing": "none", "z_loss_weight": 0.0}, 0),
        ({"balancing": "none", "z_loss_weight": 0.0, "importance_loss_weight": 0.1}, 1),
        ({"balancing": "none", "z_loss_weight": 0.0, "entropy_loss_weight": 0.1}, 1),
        ({"gating_type": "top_p", "balancing": "none", "z_loss_weight": 0.0}, 1),  # default entropy loss
        ({"gating_type": "top_p", "balancing": "none", "z_loss_weight": 0.0, "entropy_loss_weight": 0.0}, 0),
    ],
)
def test_balancing_modes_register_the_right_losses(overrides, count):
    fields = {"gating_type": "linear", **overrides}
    layer = dl_moe.create_ffn_moe(E, D, intermediate_size=16, **fields)
    x, _ = _skewed_data(32)
    assert len(_losses(layer, x)) == count
    layer(x, training=False)
    assert len(layer.losses) == 0


@pytest.mark.parametrize("with_mask", [False, True])
def test_importance_and_entropy_losses_match_numpy(with_mask):
    # Importance (Shazeer 2017): CV^2 (population variance / mean^2) of the total routing
    # weight per expert; entropy: mean over tokens of -sum_e p_e log p_e. Padding counts
    # in neither. Both computed here from the router kernel, top-2 of p = softmax(x W).
    layer = dl_moe.create_ffn_moe(
        E, D, intermediate_size=16, top_k=2, balancing="none", z_loss_weight=0.0, importance_loss_weight=0.5,
        entropy_loss_weight=0.25,
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, D)).astype("float32")
    mask = np.ones((2, 16), bool)
    if with_mask:
        mask[1, 9:] = False
    layer.build(x.shape)
    kernel = rng.normal(size=(D, E)).astype("float32")
    layer.gating_network.router_kernel.assign(kernel)
    layer(x, training=True, mask=mask)
    losses = sorted(float(ops.convert_to_numpy(loss)) for loss in layer.losses)
    tokens = x.reshape(-1, D)[mask.reshape(-1)]
    logits = tokens @ kernel
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    top2 = np.argsort(-p, axis=-1)[:, :2]
    importance = np.zeros(E)
    for t, chosen in enumerate(top2):
        importance[chosen] += p[t, chosen]
    importance_cv2 = importance.var() / importance.mean() ** 2
    entropy = np.mean(-(p * np.log(p)).sum(-1))
    assert importance_cv2 > 0.01  # an unbalanced router, so the value tells something
    np.testing.assert_allclose(losses, sorted([0.5 * importance_cv2, 0.25 * entropy]), rtol=1e-5)
    stats = layer.get_routing_stats()
    np.testing.assert_allclose([stats["importance_loss"], stats["entropy_loss"]], [importance_cv2, entropy], rtol=1e-5)


def test_importance_loss_trains_toward_balance():
    # Same seed, same data, with and without the importance loss.
    unbalanced, _, x, _, _ = _fit("none")
    balanced, _, _, _, _ = _fit("none", importance_loss_weight=1.0)
    assert _load_cv(balanced, x) < _load_cv(unbalanced, x)
