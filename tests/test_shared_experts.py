"""Shared experts (DeepSeekMoE): a dense FFN path added to the routed output."""

import numpy as np
import pytest
from keras import ops

import dl_moe
from tests.layer_checks import run_moe_layer_checks


def make_layer(shared, **overrides):
    kwargs = dict(num_experts=4, hidden_dim=6, top_k=2, intermediate_size=5, ffn_type="swiglu",
                  eval_capacity_factor=4.0, num_shared_experts=shared)
    kwargs.update(overrides)
    return dl_moe.create_ffn_moe(**kwargs)


def swiglu(x, bank, e=0):
    w = {v.name: ops.convert_to_numpy(v)[e] for v in bank.weights}
    gate = x @ w["gate_kernel"] + w["gate_bias"]
    up = x @ w["up_kernel"] + w["up_bias"]
    return (gate / (1 + np.exp(-gate)) * up) @ w["down_kernel"] + w["down_bias"]


@pytest.mark.parametrize("gating_type", ["linear", "softmoe"])
def test_output_is_routed_plus_shared(gating_type):
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    layer = make_layer(2, gating_type=gating_type)
    out = ops.convert_to_numpy(layer(x, mask=mask, training=False))
    bank = layer.shared_experts
    assert tuple(bank.up_kernel.shape) == (1, 6, 10)  # 2 shared experts of width 5
    routed = make_layer(0, gating_type=gating_type)
    routed.build(x.shape)
    for source, target in zip(layer.experts.weights, routed.experts.weights):
        target.assign(source)
    for source, target in zip(layer.gating_network.weights, routed.gating_network.weights):
        target.assign(source)
    expected = ops.convert_to_numpy(routed(x, mask=mask, training=False)) + swiglu(x, bank) * mask[..., None]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert np.all(out[0, 3:] == 0)


def test_validation():
    with pytest.raises(ValueError, match="num_shared_experts"):
        dl_moe.MoEConfig(num_shared_experts=-1)


def test_layer_checks(tmp_path):
    run_moe_layer_checks(lambda: make_layer(1, hidden_dim=8), (6, 8), tmp_path)
