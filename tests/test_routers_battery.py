"""Every new router through the shared layer battery (fit, gradients, .keras round trip)."""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from tests.layer_checks import BACKEND, run_moe_layer_checks

ROUTERS = {
    "expert_choice": {},
    "top_p": {},
    "conditional": {},
    "confidence": {},
    "top_any": {},
    "resonance": {},
    "ensemble": {"ensemble_members": [{"gating_type": "linear", "weight": 2.0}, {"gating_type": "top_p"}]},
    "linear": {"balancing": "aux_free"},
}


@pytest.mark.parametrize("gating_type", sorted(ROUTERS))
def test_router_passes_layer_checks(gating_type, tmp_path):
    def factory():
        return dl_moe.create_ffn_moe(
            num_experts=4, hidden_dim=8, top_k=2, gating_type=gating_type, intermediate_size=16,
            **ROUTERS[gating_type],
        )

    run_moe_layer_checks(factory, (6, 8), tmp_path)


@pytest.mark.parametrize("gating_type", ["top_p", "conditional", "top_any", "expert_choice"])
def test_dropless_and_masked_inputs(gating_type):
    layer = dl_moe.create_ffn_moe(
        num_experts=4, hidden_dim=8, gating_type=gating_type, intermediate_size=16, drop_tokens=False,
        **ROUTERS[gating_type],
    )
    x = np.random.default_rng(1).normal(size=(3, 5, 8)).astype("float32")
    mask = np.ones((3, 5), dtype=bool)
    mask[:, 3:] = False
    out = ops.convert_to_numpy(layer(x, mask=mask, training=True))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, 3:], 0.0)
    # Masked tokens take no capacity and are not counted.
    assert layer.get_routing_stats()["tokens"] == 9
    decision = layer.route(x, mask=mask)
    assert not decision["active"].reshape(3, 5, -1)[:, 3:].any()


def test_expert_choice_fit_with_a_partial_last_batch():
    # 20 examples in batches of 8: the last batch has another token count (TF may
    # trace it with an unknown batch size).
    inputs = keras.Input((6, 8))
    x = dl_moe.create_ffn_moe(4, 8, gating_type="expert_choice", intermediate_size=16)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))
    model.compile(optimizer="adam", loss="mse", jit_compile=BACKEND != "torch")
    rng = np.random.default_rng(0)
    history = model.fit(
        rng.normal(size=(20, 6, 8)).astype("float32"), rng.normal(size=(20, 2)).astype("float32"),
        batch_size=8, epochs=2, verbose=0,
    )
    assert np.all(np.isfinite(history.history["loss"]))
