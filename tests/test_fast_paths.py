"""Each backend fast path gives the same result as the portable path."""

import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import backend_fast_paths
from tests import reference
from tests.layer_checks import BACKEND, trainable_gradients


def outputs_and_gradients(layer, x):
    out = np.asarray(ops.convert_to_numpy(layer(x, training=True)))
    return out, trainable_gradients(layer, x)


@pytest.mark.parametrize("ffn_type, top_k", [("swiglu", 2), ("mlp", 3)])
def test_eager_slices_equal_portable_dropless_blocks(ffn_type, top_k, monkeypatch):
    x = np.random.default_rng(0).normal(size=(3, 11, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(6, 8, top_k=top_k, intermediate_size=12, ffn_type=ffn_type, drop_tokens=False)
    layer.build(x.shape)
    rng = np.random.default_rng(1)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=0.4, size=v.shape).astype("float32"))
    # Portable path (forced off), then the slice path (forced on: it is plain eager
    # code, so it can be checked on every backend, not only the one that uses it).
    monkeypatch.setattr("dl_moe.layer.torch_eager_dropless_enabled", lambda: False)
    portable_out, portable_grads = outputs_and_gradients(layer, x)
    if BACKEND != "jax":  # JAX gradients trace the layer, where slices are not possible
        monkeypatch.setattr("dl_moe.layer.torch_eager_dropless_enabled", lambda: True)
        fast_out = np.asarray(ops.convert_to_numpy(layer(x, training=True)))
        np.testing.assert_allclose(fast_out, portable_out, rtol=1e-5, atol=1e-6)
        fast_grads = trainable_gradients(layer, x)
        for name, grad in portable_grads.items():
            np.testing.assert_allclose(fast_grads[name], grad, rtol=1e-5, atol=1e-6, err_msg=name)
    ref = reference.token_choice_moe(
        x.reshape(-1, 8), reference.weights_of(layer), num_experts=6, top_k=top_k, ffn_type=ffn_type
    )
    np.testing.assert_allclose(portable_out.reshape(-1, 8), ref["out"], atol=1e-5)


def test_slice_path_is_used_exactly_on_eager_torch():
    assert backend_fast_paths.torch_eager_dropless_enabled() == (BACKEND == "torch")


def test_slice_path_with_masked_tokens_and_idle_experts(monkeypatch):
    monkeypatch.setattr("dl_moe.layer.torch_eager_dropless_enabled", lambda: True)
    x = np.random.default_rng(2).normal(size=(1, 6, 8)).astype("float32")
    mask = np.array([[True, True, False, True, False, False]])
    layer = dl_moe.create_ffn_moe(8, 8, top_k=1, intermediate_size=8, drop_tokens=False)
    out = np.asarray(ops.convert_to_numpy(layer(x, mask=mask)))
    ref = reference.token_choice_moe(x[0], reference.weights_of(layer), num_experts=8, top_k=1, mask=mask[0])
    np.testing.assert_allclose(out[0], ref["out"], atol=1e-5)
