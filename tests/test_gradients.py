"""Analytical gradients of the layer against float64 finite differences of the reference."""

import numpy as np
import pytest
from keras import ops

import dl_moe
from tests import reference
from tests.autodiff import gradients


def analytic_gradients(layer, x, probe):
    """{"inputs" or weight name: d/d(x, weights) of sum(layer(x) * probe)} via autodiff."""
    variables = layer.trainable_variables
    probe = ops.convert_to_tensor(probe)
    grads = gradients(lambda inputs: ops.sum(layer(inputs) * probe), x, variables=variables)
    names = ["inputs"] + [v.path.split("/")[-1] for v in variables]
    return {n: np.asarray(g, dtype="float64") for n, g in zip(names, grads)}


def numeric_gradient(f, value, eps=1e-5):
    grad = np.zeros_like(value)
    for i in np.ndindex(value.shape):
        old = value[i]
        value[i] = old + eps
        up = f()
        value[i] = old - eps
        down = f()
        value[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("ffn_type, drop_tokens", [("swiglu", False), ("mlp", True), ("geglu", True)])
def test_gradients_match_finite_differences(ffn_type, drop_tokens):
    # 24 tokens, 3 experts, top-2: C = ceil(0.5 * 24 * 2 / 3) = 8 rows of about 16
    # assignments per expert, so capacity mode drops about half of them.
    num_tokens, num_experts, dim = 24, 3, 4
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_tokens, dim)).astype("float32")
    layer = dl_moe.create_ffn_moe(
        num_experts, dim, top_k=2, intermediate_size=5, ffn_type=ffn_type, drop_tokens=drop_tokens,
        eval_capacity_factor=0.5, normalize_top_k=True,
    )
    layer.build(x.shape)
    for v in layer.trainable_variables:
        v.assign(rng.normal(scale=0.5, size=v.shape).astype("float32"))
    probe = rng.normal(size=(num_tokens, dim)).astype("float32")
    analytic = analytic_gradients(layer, x, probe)

    weights = {k: v.astype("float64") for k, v in reference.weights_of(layer).items()}
    x64 = x.astype("float64")
    cap = reference.capacity(num_tokens, 2, num_experts, 0.5) if drop_tokens else None

    def run():
        return reference.token_choice_moe(
            x64, weights, num_experts=num_experts, top_k=2, ffn_type=ffn_type, normalize=True, cap=cap
        )

    kept = run()["kept"]
    if drop_tokens:
        assert cap == 8 and 0.3 < 1 - kept.mean() < 0.7  # some assignments were dropped
        layer.reset_routing_stats()
        layer(x)
        assert layer.get_routing_stats()["dropped_fraction"] == 1 - kept.mean()

    def loss():
        return float(np.sum(run()["out"] * probe))

    trainable = [v.path.split("/")[-1] for v in layer.trainable_variables]
    assert set(trainable) <= set(weights) and len(trainable) == (7 if ffn_type != "mlp" else 5)
    checks = {"inputs": x64, **{name: weights[name] for name in trainable}}
    for name, value in checks.items():
        np.testing.assert_allclose(analytic[name], numeric_gradient(loss, value), rtol=2e-3, atol=2e-4, err_msg=name)
