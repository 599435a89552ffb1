"""Active-expert mask and `ExpertLifecycle` (split / retire / merge), against numpy."""

import json
import math
import os

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import MixtureOfExperts, MoEConfig
from dl_moe.lifecycle import (
    ExpertLifecycle,
    expert_similarity,
    merge_experts,
    optimizer_slots,
    retire_expert,
    split_expert,
)

BACKEND = keras.backend.backend()
D, H = 8, 16


def _layer(num_experts=6, active=6, top_k=2, gating_type="linear", **overrides):
    gating = {"gating_type": gating_type, "top_k": top_k}
    gating.update(overrides.pop("gating", {}))
    config = MoEConfig(
        num_experts=num_experts, initial_active_experts=active, drop_tokens=False,
        expert_config={"hidden_dim": D, "intermediate_size": H}, gating_config=gating, **overrides,
    )
    layer = MixtureOfExperts(config)
    layer.build((None, D))
    return layer


def _tokens(n=48, seed=0):
    return np.random.default_rng(seed).normal(size=(n, D)).astype("float32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _set_mask(layer, live, offset=None):
    router = layer.gating_network
    router.active_experts.assign(np.asarray(live, dtype="float32"))
    if offset is not None:
        router.expert_logit_offset.assign(np.asarray(offset, dtype="float32"))


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _masked_top_k(logits, live, offset, k):
    """numpy reference: logits + offset, -inf for dead experts, softmax, top-k (ties: lower index)."""
    z = np.where(live, logits + offset, -np.inf)
    probs = _softmax(z)
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    return probs, order, np.take_along_axis(probs, order, -1)


LIVE = np.array([1, 0, 1, 1, 0, 1], dtype=bool)
OFFSET = np.array([0.0, 0.0, -math.log(2.0), 0.3, 0.0, 0.0])


@pytest.mark.parametrize("gating_type", ["linear", "cosine"])
def test_mask_excludes_dead_experts_like_numpy_masked_top_k(gating_type):
    temperature = 0.7 if gating_type == "linear" else 0.5
    layer = _layer(gating_type=gating_type, gating={"temperature": temperature})
    _set_mask(layer, LIVE, OFFSET)
    x = _tokens()
    router = layer.gating_network
    if gating_type == "linear":
        logits = x @ _np(router.router_kernel) / temperature
    else:
        proj = x @ _np(router.proj_kernel)
        proj /= np.maximum(np.linalg.norm(proj, axis=-1, keepdims=True), 1e-6)
        emb = _np(router.expert_embeddings)
        emb /= np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-6)
        logits = proj @ emb.T / temperature
    probs, indices, weights = _masked_top_k(logits, LIVE, OFFSET, k=2)
    decision = layer.route(x)
    np.testing.assert_allclose(decision["probs"], probs, atol=1e-5)
    np.testing.assert_array_equal(np.sort(decision["indices"], -1), np.sort(indices, -1))
    np.testing.assert_allclose(np.sort(decision["weights"], -1), np.sort(weights, -1), atol=1e-5)
    # Training calls route nothing to dead experts and keep the losses finite.
    layer(x, training=True)
    stats = layer.get_routing_stats()
    assert np.all(stats["expert_fraction"][~LIVE] == 0) and np.all(stats["expert_fraction"][LIVE] > 0)
    np.testing.assert_array_equal(stats["active_experts"], LIVE)
    assert np.isfinite(stats["aux_loss"]) and np.isfinite(stats["z_loss"])


def test_top_p_and_top_k_above_the_live_count_never_use_dead_experts():
    x = _tokens()
    top_p = _layer(gating_type="top_p", top_k=1, gating={"top_p_threshold": 0.9})
    _set_mask(top_p, LIVE)
    top_k = _layer(top_k=6)  # k = E with 4 live experts: two slots per token go unused
    _set_mask(top_k, LIVE)
    for layer in (top_p, top_k):
        decision = layer.route(x)
        assert not np.any(decision["active"] & ~LIVE[decision["indices"]])
        assert np.all(decision["probs"][:, ~LIVE] == 0)
        layer(x, training=True)
        assert np.all(layer.get_routing_stats()["expert_fraction"][~LIVE] == 0)
    # top_k = E over 4 live experts: 4 computed assignments per token.
    assert top_k.get_routing_stats()["avg_experts_per_token"] == pytest.approx(4.0)


def test_balancing_losses_and_aux_free_bias_count_live_experts_only():
    layer = _layer(top_k=1, gating={"aux_loss_weight": 0.01, "importance_loss_weight": 0.01})
    _set_mask(layer, LIVE)
    x = _tokens()
    layer(x, training=True)
    decision = layer.route(x)
    counts = np.bincount(decision["indices"][:, 0], minlength=6)
    # Switch loss with E = live experts (4): 4 * sum_e f_e P_e.
    expected_aux = 4 * np.sum(counts / counts.sum() * decision["probs"].mean(0))
    assert layer.get_routing_stats()["aux_loss"] == pytest.approx(expected_aux, rel=1e-5)
    importance = np.bincount(decision["indices"][:, 0], weights=decision["weights"][:, 0], minlength=6)[LIVE]
    assert layer.get_routing_stats()["importance_loss"] == pytest.approx(importance.var() / importance.mean() ** 2, rel=1e-4)

    rate = 0.1
    free = _layer(top_k=1, gating={"balancing": "aux_free", "bias_update_rate": rate})
    _set_mask(free, LIVE)
    counts = np.bincount(free.route(x)["indices"][:, 0], minlength=6)
    free(x, training=True)
    live_mean = counts[LIVE].mean()
    expected_bias = np.where(LIVE, rate * np.sign(live_mean - counts), 0.0)
    np.testing.assert_allclose(free.get_routing_stats()["expert_bias"], expected_bias, atol=1e-6)


def _expert_outputs(layer, x):
    """f_e(x) for every expert: `[E, T, o]`."""
    stacked = np.broadcast_to(x, (layer.config.num_experts,) + x.shape).copy()
    return _np(layer.experts(ops.convert_to_tensor(stacked)))


def test_split_leaves_tokens_of_other_experts_unchanged():
    layer = _layer(num_experts=4, active=2, top_k=1)
    x = _tokens(64)
    before, chosen = _np(layer(x)), layer.route(x)["indices"][:, 0]
    source = 0
    target = split_expert(layer, source, noise=0.05)
    assert target == 2
    np.testing.assert_array_equal(layer.get_active_experts(), [True, True, True, False])
    np.testing.assert_allclose(_np(layer.gating_network.expert_logit_offset), [-math.log(2), 0, -math.log(2), 0])
    after = _np(layer(x))
    others = chosen != source
    assert others.any() and (~others).any()
    np.testing.assert_allclose(after[others], before[others], atol=1e-5)


def test_split_under_dense_routing_changes_outputs_by_the_perturbation_only():
    # top_k = E = 4 with 3 live experts: each token mixes every live expert.
    layer = _layer(num_experts=4, active=3, top_k=4)
    x = _tokens(64)
    before, probs = _np(layer(x)), layer.route(x)["probs"]
    source = 1
    target = split_expert(layer, source, noise=0.05, rng=np.random.default_rng(3))
    after = _np(layer(x))
    f = _expert_outputs(layer, x)
    # dy = p_s / 2 * (f_t - f_s), so ||dy|| <= p_s / 2 * ||f_t - f_s||.
    expected = probs[:, source:source + 1] / 2 * (f[target] - f[source])
    np.testing.assert_allclose(after - before, expected, atol=1e-5)
    bound = probs[:, source] / 2 * np.linalg.norm(f[target] - f[source], axis=-1)
    assert np.all(np.linalg.norm(after - before, axis=-1) <= bound + 1e-5)
    # The perturbation is small: 5% of the weights' scale moves outputs by a few %.
    assert np.linalg.norm(after - before) < 0.1 * np.linalg.norm(before)


def test_router_noise_divides_top1_tokens_between_halves_within_the_cosh_bound():
    layer = _layer(num_experts=4, active=2, top_k=1)
    x = _tokens(256)
    before, decision = _np(layer(x)), layer.route(x)
    source = 0
    target = split_expert(layer, source, noise=0.0, router_noise=0.3, rng=np.random.default_rng(1))
    after = layer.route(x)
    was_source = decision["indices"][:, 0] == source
    # Tokens of the split expert now go to both halves.
    assert np.sum(after["indices"][was_source, 0] == target) > 0
    assert np.sum(after["indices"][was_source, 0] == source) > 0
    # Other tokens with |d| < log 2, d = x . (w_s - w_t) / 2 the halves' logit shift:
    # same expert, y' = y * Z / Z' with Z' / Z = 1 + p_s (cosh(d) - 1).
    kernel = _np(layer.gating_network.router_kernel)
    d = x @ (kernel[:, source] - kernel[:, target]) / 2
    others = ~was_source & (np.abs(d) < math.log(2))
    assert others.sum() > 0.4 * len(x)
    np.testing.assert_array_equal(after["indices"][others, 0], decision["indices"][others, 0])
    scale = 1 / (1 + decision["probs"][:, source] * (np.cosh(d) - 1))
    np.testing.assert_allclose(_np(layer(x))[others], before[others] * scale[others, None], atol=1e-5)


def test_retire_and_merge():
    layer = _layer(num_experts=4, active=3, top_k=2)
    x = _tokens()
    before = _np(layer(x))
    # An exact split (noise 0) merged back is the original layer.
    target = split_expert(layer, 1, noise=0.0)
    assert expert_similarity(layer, 1, target) == pytest.approx((1.0, 1.0))
    merge_experts(layer, 1, target)
    np.testing.assert_array_equal(layer.get_active_experts(), [True, True, True, False])
    np.testing.assert_allclose(_np(layer.gating_network.expert_logit_offset), 0.0, atol=1e-6)
    np.testing.assert_allclose(_np(layer(x)), before, atol=1e-5)
    # Merging two different experts averages their rows.
    kernel = _np(layer.experts.up_kernel)
    merge_experts(layer, 0, 2)
    np.testing.assert_allclose(_np(layer.experts.up_kernel)[0], (kernel[0] + kernel[2]) / 2, atol=1e-6)
    np.testing.assert_array_equal(layer.get_active_experts(), [True, True, False, False])
    retire_expert(layer, 0)
    decision = layer.route(x)
    assert set(np.unique(decision["indices"][decision["active"]])) == {1}
    with pytest.raises(ValueError, match="last live expert"):
        retire_expert(layer, 1)
    with pytest.raises(ValueError, match="source must be a live expert"):
        split_expert(layer, 0)


def _model(active=2, num_experts=4, top_k=1, extra=None):
    inputs = keras.Input((D,))
    x = keras.layers.Dense(D)(inputs)
    if extra is not None:
        x = extra(x)
    x = dl_moe.create_ffn_moe(
        num_experts=num_experts, hidden_dim=D, top_k=top_k, intermediate_size=H, drop_tokens=False,
        initial_active_experts=active, name="moe",
    )(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    return model


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, D)).astype("float32"), rng.integers(0, 3, size=(n,))


def test_split_copies_the_optimizer_slots_of_the_source_rows():
    model = _model()
    x, y = _data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    layer = model.get_layer("moe")
    target = split_expert(layer, 0, optimizer=model.optimizer)
    slots = optimizer_slots(model.optimizer, layer.experts.up_kernel)
    assert len(slots) == 2  # Adam's momentum and velocity
    for slot in slots:
        values = _np(slot)
        np.testing.assert_array_equal(values[target], values[0])
        assert np.any(values[0] != 0)
    router_slots = optimizer_slots(model.optimizer, layer.gating_network.router_kernel)
    for slot in router_slots:
        np.testing.assert_array_equal(_np(slot)[:, target], _np(slot)[:, 0])


class _TraceCounter(keras.layers.Layer):
    """Identity that counts its Python calls (once per trace in a compiled step)."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


def test_fit_keeps_running_after_lifecycle_events():
    _TraceCounter.calls = 0
    model = _model(extra=_TraceCounter())
    x, y = _data(128)
    lifecycle = ExpertLifecycle(every_n_steps=2, split_threshold=0.3, retire_threshold=None, seed=0)
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[lifecycle])
    assert np.all(np.isfinite(history.history["loss"]))
    layer = model.get_layer("moe")
    live = [entry["live"]["moe"] for entry in lifecycle.history]
    assert live[0] == 2 and live[-1] > 2 and live == sorted(live)
    assert [e["action"] for e in lifecycle.events] == ["split"] * (live[-1] - 2)
    assert layer.get_active_experts().sum() == live[-1]
    # The experts born in a split were trained on: their load is non-zero afterwards.
    layer.reset_routing_stats()
    layer(ops.convert_to_tensor(x))
    first_target = lifecycle.events[0]["experts"][1]
    assert layer.get_routing_stats()["expert_fraction"][first_target] > 0
    if BACKEND != "torch":
        # 16 steps, a few events, and the compiled step was traced only a few times
        # (build + train step + predict), not once per step or per event.
        assert _TraceCounter.calls <= 4, _TraceCounter.calls


def test_callback_retires_idle_experts_and_merges_converged_ones():
    model = _model(active=3, top_k=1)
    layer = model.get_layer("moe")
    # Expert 2 never wins: its router column is very negative along every input.
    split_expert(layer, 0, noise=0.0)  # experts 0 and 3 identical: a merge candidate
    kernel = _np(layer.gating_network.router_kernel)
    offset = _np(layer.gating_network.expert_logit_offset)
    offset[2] = -50.0
    layer.gating_network.expert_logit_offset.assign(offset.astype("float32"))
    x, y = _data(32)
    lifecycle = ExpertLifecycle(
        every_n_steps=2, split_threshold=None, retire_threshold=0.01, merge_threshold=0.999, seed=0
    )
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=model.loss, jit_compile=BACKEND != "torch")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[lifecycle])
    actions = sorted((e["action"], tuple(e["experts"])) for e in lifecycle.events)
    assert actions == [("merge", (0, 3)), ("retire", (2,))]
    np.testing.assert_array_equal(layer.get_active_experts(), [True, True, False, False])
    np.testing.assert_allclose(_np(layer.gating_network.router_kernel), kernel, atol=1e-6)  # SGD(0): no update
    assert lifecycle.history[-1]["live"] == {"moe": 2}


def test_keras_round_trip_keeps_a_partially_active_mask(tmp_path):
    model = _model(active=2, num_experts=4)
    layer = model.get_layer("moe")
    split_expert(layer, 1, noise=0.05, router_noise=0.05)
    x, _ = _data(16)
    expected = _np(model(x))
    path = os.path.join(tmp_path, "lifecycle.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_layer = loaded.get_layer("moe")
    np.testing.assert_array_equal(loaded_layer.get_active_experts(), [True, True, True, False])
    np.testing.assert_allclose(
        _np(loaded_layer.gating_network.expert_logit_offset), _np(layer.gating_network.expert_logit_offset)
    )
    assert loaded_layer.config.initial_active_experts == 2
    np.testing.assert_allclose(_np(loaded(x)), expected, atol=1e-5)


def test_callback_config_round_trips_through_json():
    callback = ExpertLifecycle(every_n_steps=7, split_threshold=0.4, merge_threshold=0.95, layers=["moe"], seed=3)
    config = json.loads(json.dumps(callback.get_config()))
    assert ExpertLifecycle.from_config(config).get_config() == callback.get_config()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"split_threshold": 1.5}, "split_threshold"),
        ({"retire_threshold": -0.1}, "retire_threshold"),
        ({"split_threshold": 0.2, "retire_threshold": 0.3}, "retire_threshold must be below"),
        ({"merge_threshold": 2}, "merge_threshold"),
        ({"patience": 0}, "patience"),
        ({"noise": -1}, "noise"),
        ({"router_noise": "a"}, "router_noise"),
        ({"min_active_experts": 0}, "min_active_experts"),
        ({"min_active_experts": 3, "max_active_experts": 2}, "max_active_experts"),
        ({"layers": "moe"}, "layers"),
    ],
)
def test_callback_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExpertLifecycle(**kwargs)


def test_callback_needs_a_masked_layer():
    inputs = keras.Input((D,))
    outputs = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=D, top_k=1, intermediate_size=H)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="initial_active_experts"):
        model.fit(np.zeros((8, D)), np.zeros((8, D)), verbose=0, callbacks=[ExpertLifecycle()])
    with pytest.raises(ValueError, match="ExpertLifecycle.layers names"):
        _model().fit(*_data(16), verbose=0, callbacks=[ExpertLifecycle(layers=["nope"])])


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"gating_config": {"gating_type": "expert_choice"}}, r"gating_type in \['cosine', 'linear', 'rmsnorm_linear', 'top_p'\]"),
        ({"gating_config": {"gating_type": "softmoe"}}, "gating_type in"),
        ({"initial_active_experts": 5}, r"initial_active_experts must be in \[1, num_experts=4\]"),
        ({"initial_active_experts": 0}, "initial_active_experts"),
        ({"hierarchical_routing": True}, "hierarchical_routing"),
    ],
)
def test_config_rejects_masks_it_cannot_apply(overrides, match):
    fields = {"num_experts": 4, "initial_active_experts": 2, "expert_config": {"hidden_dim": D}}
    fields.update(overrides)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**fields).validate()
