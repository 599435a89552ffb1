"""Attention experts (Mixture of Attention heads): reference, masks, layer checks."""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import ExpertConfig, MoEConfig
from dl_moe.experts import AttentionExpertBank
from tests.layer_checks import run_moe_layer_checks


def numpy_reference(layer, x, mask=None):
    """Hand-computed MoA output for the routing the layer's router picks."""
    bank = layer.experts
    w = {v.name: np.asarray(ops.convert_to_numpy(v)) for v in bank.weights}
    batch, seq, d = x.shape
    heads, head_dim = bank.num_heads, bank.head_dim
    tokens = x.reshape(-1, d)
    weights, indices, _ = layer.gating_network(tokens, training=False)
    weights, indices = ops.convert_to_numpy(weights), ops.convert_to_numpy(indices)
    keys = (x @ w["key_kernel"] + w["key_bias"]).reshape(batch, seq, heads, head_dim)
    values = (x @ w["value_kernel"] + w["value_bias"]).reshape(batch, seq, heads, head_dim)
    out = np.zeros((batch * seq, w["output_kernel"].shape[-1]), "float64")
    for t in range(batch * seq):
        b = t // seq
        if mask is not None and not mask[b, t % seq]:
            continue
        for j in range(indices.shape[1]):
            e = indices[t, j]
            q = (tokens[t] @ w["query_kernel"][e] + w["query_bias"][e]).reshape(heads, head_dim)
            heads_out = []
            for h in range(heads):
                scores = keys[b, :, h] @ q[h] / np.sqrt(head_dim)
                if mask is not None:
                    scores = np.where(mask[b], scores, -np.inf)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                heads_out.append(p @ values[b, :, h])
            y = np.concatenate(heads_out) @ w["output_kernel"][e] + w["output_bias"][e]
            out[t] += weights[t, j] * y
    return out.reshape(batch, seq, -1)


def make_layer(drop_tokens=True, **overrides):
    kwargs = dict(num_experts=4, hidden_dim=12, num_heads=2, head_dim=5, top_k=2, gating_type="linear")
    kwargs.update(overrides)
    return dl_moe.create_attention_moe(drop_tokens=drop_tokens, **kwargs)


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_matches_numpy_reference(drop_tokens):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 12)).astype("float32")
    layer = make_layer(drop_tokens=drop_tokens, output_dim=7, eval_capacity_factor=4.0)
    out = ops.convert_to_numpy(layer(x, training=False))
    assert out.shape == (3, 5, 7)
    np.testing.assert_allclose(out, numpy_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_mask_ignores_keys_and_zeroes_masked_tokens():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 6, 12)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    layer = make_layer(eval_capacity_factor=4.0)
    out = ops.convert_to_numpy(layer(x, mask=mask, training=False))
    np.testing.assert_allclose(out, numpy_reference(layer, x, mask), rtol=1e-4, atol=1e-5)
    assert np.all(out[0, 4:] == 0)
    # Changing a masked token changes nothing else.
    x2 = x.copy()
    x2[0, 4:] = 100.0
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x2, mask=mask, training=False)), out, rtol=1e-5, atol=1e-5)


def test_keras_masking_layer_propagates_mask():
    inputs = keras.Input((6, 12))
    outputs = make_layer()(keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(2).normal(size=(2, 6, 12)).astype("float32")
    x[:, -2:] = 0.0
    out = ops.convert_to_numpy(model(x))
    assert np.all(out[:, -2:] == 0) and np.any(out[:, :-2] != 0)


def test_weight_layout_and_defaults():
    layer = dl_moe.create_attention_moe(num_experts=3, hidden_dim=16, num_heads=4, top_k=1)
    layer.build((None, 5, 16))
    shapes = {v.name: tuple(v.shape) for v in layer.experts.weights}
    assert shapes["query_kernel"] == (3, 16, 16) and shapes["output_kernel"] == (3, 16, 16)
    assert shapes["key_kernel"] == (16, 16) and shapes["value_kernel"] == (16, 16)
    assert isinstance(layer.experts, AttentionExpertBank) and layer.experts.head_dim == 4
    assert layer.config.gating_config.gating_type == "cosine"


def test_rejects_wrong_rank_and_misplaced_fields():
    with pytest.raises(ValueError, match="rank 3"):
        make_layer().build((None, 12))
    with pytest.raises(ValueError, match="num_heads"):
        ExpertConfig(expert_type="ffn", num_heads=4)
    with pytest.raises(ValueError, match="head_dim"):
        ExpertConfig(expert_type="attention", head_dim=0)
    with pytest.raises(ValueError, match="softmoe"):
        MoEConfig(expert_config=ExpertConfig(expert_type="attention"), gating_config={"gating_type": "softmoe"})


def test_layer_checks(tmp_path):
    # Dropless mode is covered by the reference test; one battery keeps the suite fast.
    run_moe_layer_checks(lambda: make_layer(gating_type="cosine"), (6, 12), tmp_path)
