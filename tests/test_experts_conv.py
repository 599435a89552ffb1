"""Conv experts: per-example routing, equality with keras Conv2D, layer checks."""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import ExpertConfig, MoEConfig
from tests.layer_checks import run_moe_layer_checks


def conv_reference(layer, x):
    """Each example through its chosen experts' keras.layers.Conv2D, weighted."""
    bank = layer.experts
    kernel = ops.convert_to_numpy(bank.kernel)
    bias = ops.convert_to_numpy(bank.bias)
    pooled = x.mean(axis=(1, 2))
    weights, indices, _ = layer.gating_network(pooled, training=False)
    weights, indices = ops.convert_to_numpy(weights), ops.convert_to_numpy(indices)
    outs = []
    for b in range(x.shape[0]):
        total = 0.0
        for j in range(indices.shape[1]):
            e = indices[b, j]
            conv = keras.layers.Conv2D(
                bank.filters, bank.kernel_size, strides=bank.strides, padding=bank.padding, activation=bank.activation
            )
            conv.build((None,) + x.shape[1:])
            conv.set_weights([kernel[e], bias[e]])
            total = total + weights[b, j] * ops.convert_to_numpy(conv(x[b : b + 1]))[0]
        outs.append(total)
    return np.stack(outs)


@pytest.mark.parametrize(
    "kernel_size,strides,padding,drop_tokens",
    [(3, 1, "same", True), ((3, 2), 2, "same", False), (2, (2, 1), "valid", True)],
)
def test_matches_keras_conv2d(kernel_size, strides, padding, drop_tokens):
    x = np.random.default_rng(0).normal(size=(5, 7, 6, 3)).astype("float32")
    layer = dl_moe.create_conv_moe(
        num_experts=4, filters=4, kernel_size=kernel_size, strides=strides, padding=padding, top_k=2,
        drop_tokens=drop_tokens, eval_capacity_factor=4.0,
    )
    out = ops.convert_to_numpy(layer(x, training=False))
    assert out.shape == tuple(layer.compute_output_shape(x.shape))
    np.testing.assert_allclose(out, conv_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_routes_whole_examples_from_pooled_features():
    x = np.random.default_rng(1).normal(size=(6, 4, 4, 3)).astype("float32")
    layer = dl_moe.create_conv_moe(num_experts=4, filters=5, top_k=1)
    layer(x, training=False)
    stats = layer.get_routing_stats()
    assert stats["tokens"] == 6  # one token per example
    assert layer.experts.kernel.shape == (4, 3, 3, 3, 5)
    assert layer.config.expert_config.hidden_dim == 3  # taken from the input


def test_residual_for_dropped_examples_when_shapes_match():
    # 16 examples, capacity 8 per expert; force every example to expert 0.
    x = np.abs(np.random.default_rng(2).normal(size=(16, 4, 4, 3))).astype("float32") + 0.1
    layer = dl_moe.create_conv_moe(num_experts=2, filters=3, top_k=1, eval_capacity_factor=0.5)
    layer.build(x.shape)
    router = layer.gating_network
    router.router_kernel.assign(np.array([[5.0, -5.0]] * 3, "float32"))
    out = ops.convert_to_numpy(layer(x, training=False))
    assert layer.get_routing_stats()["dropped_token_fraction"] == 0.5
    np.testing.assert_allclose(out[8:], x[8:])  # dropped examples pass through


def test_config_validation():
    with pytest.raises(ValueError, match="kernel_size"):
        ExpertConfig(expert_type="conv2d", kernel_size=(3, 0))
    with pytest.raises(ValueError, match="padding"):
        ExpertConfig(expert_type="conv2d", padding="causal")
    with pytest.raises(ValueError, match="filters"):
        ExpertConfig(expert_type="ffn", filters=8)
    with pytest.raises(ValueError, match="num_shared_experts"):
        MoEConfig(expert_config=ExpertConfig(expert_type="conv2d"), num_shared_experts=1)
    with pytest.raises(ValueError, match="rank 4"):
        dl_moe.create_conv_moe(num_experts=2, filters=2).build((None, 4, 3))
    assert ExpertConfig.from_dict(ExpertConfig(expert_type="conv2d", kernel_size=[3, 1]).to_dict()).kernel_size == (3, 1)


def test_layer_checks(tmp_path):
    # Dropless mode is covered by the reference test; one battery keeps the suite fast.
    run_moe_layer_checks(
        lambda: dl_moe.create_conv_moe(num_experts=4, filters=4, kernel_size=3, top_k=2, drop_tokens=False),
        (5, 5, 3),
        tmp_path,
    )
