"""Compiled training for every registered router and expert type.

TensorFlow and JAX: `model.compile(jit_compile=True)` (XLA) and a few `fit` steps.
PyTorch: `jit_compile=True` means `torch.compile` of Keras's train step; it works (with
graph breaks at data-dependent scalars and Keras's `loss.backward()`, where dynamo
falls back to eager for that piece) and gives the same losses as eager training. The
test compiles with dynamo's "aot_eager" backend: same graph capture and autograd
tracing as the default "inductor", without minutes of C++ code generation on CPU.
"""

import functools

import keras
import numpy as np
import pytest

import dl_moe
from dl_moe.factories import build_config
from dl_moe.registry import EXPERT_TYPES, GATING_TYPES
from tests.layer_checks import BACKEND

# Router-specific fields a router needs to be built (everything else: defaults).
ROUTER_FIELDS = {
    "ensemble": {"ensemble_members": [{"gating_type": "linear", "weight": 2.0}, {"gating_type": "top_p"}]},
}
# Per expert type: config fields and the per-example input shape.
EXPERT_SETUPS = {
    "ffn": ({"intermediate_size": 16}, (6, 8)),
    "attention": ({"num_heads": 2}, (6, 8)),
    "conv2d": ({"filters": 4, "kernel_size": 3, "hidden_dim": 3}, (4, 4, 3)),
}
# Combinations the config rejects by design (tested below to raise, not skipped).
INVALID = {
    ("softmoe", "conv2d"): "Soft MoE mixes token positions into slots; conv experts route whole examples",
    ("softmoe", "attention"): "Soft MoE slots are not sequence positions that attention experts attend over",
}

ROUTERS = GATING_TYPES.names()
EXPERTS = EXPERT_TYPES.names()


def cases():
    """Every router with FFN experts; every expert type with token-choice, expert-choice
    and soft routers in capacity and dropless modes; hierarchical routing; shared experts."""
    out = [(router, "ffn", {}) for router in ROUTERS]
    for expert in EXPERTS:
        for router in ("linear", "expert_choice", "softmoe"):
            if (router, expert) in INVALID or (expert == "ffn" and router != "linear"):
                continue
            out.append((router, expert, {}))
        out.append(("top_p", expert, {"drop_tokens": False}))
    out.append(("linear", "ffn", {"drop_tokens": False, "ffn_type": "swiglu"}))
    out.append(("linear", "ffn", {"hierarchical_routing": True, "num_experts": 8}))
    out.append(("cosine", "ffn", {"num_shared_experts": 1}))
    return out


def case_id(case):
    router, expert, extra = case
    return "-".join([router, expert] + [f"{k}={v}" for k, v in extra.items()])


def make_model(router, expert, extra):
    fields, input_shape = EXPERT_SETUPS[expert]
    overrides = {"expert_type": expert, "gating_type": router, **fields, **ROUTER_FIELDS.get(router, {}), **extra}
    overrides.setdefault("hidden_dim", input_shape[-1])
    overrides.setdefault("num_experts", 4)
    config = build_config(**overrides)
    inputs = keras.Input(input_shape)
    x = dl_moe.MixtureOfExperts(config)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs), input_shape


def fit(model, input_shape, jit_compile, epochs=2, run_eagerly=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16,) + input_shape).astype("float32")
    y = rng.integers(0, 3, size=(16,))
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit_compile,
        run_eagerly=run_eagerly,
    )
    return model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, shuffle=False).history["loss"]


def test_cases_cover_every_registered_type():
    covered_routers = {router for router, _, _ in cases()}
    covered_experts = {expert for _, expert, _ in cases()}
    assert covered_routers == set(ROUTERS)
    assert covered_experts == set(EXPERTS)


@pytest.mark.parametrize("pair", sorted(INVALID))
def test_excluded_combinations_are_config_errors(pair):
    router, expert = pair
    with pytest.raises(ValueError, match="gating_type"):
        make_model(router, expert, {})


def is_traced(tensor):
    """True for a tensor of a compiled function being traced (not a concrete value)."""
    if BACKEND == "jax":
        import jax

        return isinstance(tensor, jax.core.Tracer)
    import tensorflow as tf

    return not tf.executing_eagerly() and tf.is_tensor(tensor)


@pytest.fixture
def moe_calls(monkeypatch):
    """Records, for each call of a MoE layer on backend tensors, whether it was traced."""
    calls = []
    original = dl_moe.MixtureOfExperts.call

    def recording_call(self, inputs, *args, **kwargs):
        if not isinstance(inputs, keras.KerasTensor):
            calls.append(is_traced(inputs))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(dl_moe.MixtureOfExperts, "call", recording_call)
    return calls


STEPS = 4  # fit(): 16 examples in batches of 8, 2 epochs


@pytest.mark.skipif(BACKEND == "torch", reason="XLA jit_compile is TF/JAX; torch.compile is tested below")
@pytest.mark.parametrize("case", cases(), ids=case_id)
def test_xla_compiled_fit(case, moe_calls):
    model, input_shape = make_model(*case)
    losses = fit(model, input_shape, jit_compile=True)
    assert model.jit_compile is True  # Keras did not fall back to non-XLA execution
    # fit ran a compiled step: the layer was traced (once per step function), not
    # called with concrete tensors at each of the steps.
    assert moe_calls and all(moe_calls) and len(moe_calls) < STEPS, moe_calls
    assert np.all(np.isfinite(losses)), losses


@pytest.mark.skipif(BACKEND == "torch", reason="XLA jit_compile is TF/JAX; torch.compile is tested below")
@pytest.mark.parametrize("case", [("linear", "ffn", {}), ("top_p", "ffn", {"drop_tokens": False})], ids=case_id)
def test_xla_compiled_fit_matches_eager(case, moe_calls):
    keras.utils.set_random_seed(7)
    eager_model, input_shape = make_model(*case)
    keras.utils.set_random_seed(7)
    compiled_model, _ = make_model(*case)
    eager = fit(eager_model, input_shape, jit_compile=False, run_eagerly=True)
    assert moe_calls.count(False) == STEPS  # eager: one concrete call per step
    compiled = fit(compiled_model, input_shape, jit_compile=True)
    # XLA fuses and reorders float32 sums: the losses of 4 steps agree to about 1e-6.
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile applies to the torch backend")
@pytest.mark.parametrize("case", [("linear", "ffn", {}), ("top_p", "ffn", {"drop_tokens": False})], ids=case_id)
def test_torch_compile_matches_eager(case, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    keras.utils.set_random_seed(7)
    eager_model, input_shape = make_model(*case)
    keras.utils.set_random_seed(7)
    compiled_model, _ = make_model(*case)
    eager = fit(eager_model, input_shape, jit_compile=False)
    compiled = fit(compiled_model, input_shape, jit_compile=True)
    assert compiled_model.jit_compile is True
    np.testing.assert_allclose(compiled, eager, rtol=1e-5, atol=1e-5)
