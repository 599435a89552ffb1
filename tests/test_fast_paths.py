"""Eager PyTorch's plans (`slices`, `host_slices`) give the portable plans' results.

Each case runs one layer under a portable plan (`capacity`, `blocks`, `grouped`) and
under an eager-PyTorch plan, asked for by name (`MoEConfig.dispatch`), and compares
outputs, gradients of every trainable weight and the routing counters; most are also
checked against the numpy reference. `slices` has two branches, per-expert slices
(`dispatch.plan_ragged_dispatch`) and `[E, C]` buffers sized to the batch, and the
cases construct loads that make each happen on its own: many idle experts and large
buffers make slices pay, few evenly loaded experts keep buffers.
"""

import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import backend_fast_paths, dispatch
from tests import reference
from tests.layer_checks import BACKEND, routing_counters, trainable_gradients
from tests.layer_checks import randomized_ffn_moe as randomized_layer

eager_torch_only = pytest.mark.skipif(
    BACKEND != "torch",
    reason="eager PyTorch's plan; the portable plans are checked on every backend in test_plans.py",
)




def skewed_inputs(shape, seed=0):
    """Every token nearly the same: the router sends all of them to the same k experts."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(1,) * (len(shape) - 1) + shape[-1:]) + 1e-3 * rng.normal(size=shape)).astype("float32")


def run_plans(layer, x, plans, training=True, mask=None):
    """`{plan: (outputs, gradients, counters, took_ragged_slices)}` of `layer` under each
    named plan; `took_ragged_slices` says whether the call planned per-expert slices."""
    results = {}
    ragged = []
    plan_ragged = dispatch.plan_ragged_dispatch

    def spy(*args, **kwargs):
        ragged.append(1)
        return plan_ragged(*args, **kwargs)

    for name in plans:
        layer.config.dispatch = name
        layer.reset_routing_stats()
        ragged.clear()
        dispatch.plan_ragged_dispatch = spy
        try:
            out = np.asarray(ops.convert_to_numpy(layer(x, training=training, mask=mask)))
        finally:
            dispatch.plan_ragged_dispatch = plan_ragged
        counters = routing_counters(layer)
        took_ragged = bool(ragged)
        grads = trainable_gradients(layer, x, training=training) if mask is None else None
        results[name] = (out, grads, counters, took_ragged)
    layer.config.dispatch = "auto"
    return results


def assert_same_results(portable, fast):
    (portable_out, portable_grads, portable_counters, _), (fast_out, fast_grads, fast_counters, _) = portable, fast
    np.testing.assert_allclose(fast_out, portable_out, rtol=1e-5, atol=1e-6)
    for key, value in portable_counters.items():
        np.testing.assert_array_equal(fast_counters[key], value, err_msg=key)
    if portable_grads is None:
        return
    # The plans sum the same float32 terms in a different order, so gradients agree
    # to a few ulps of the layer's largest gradient (grads reach ~10 here; some, like
    # an attention key bias, are exactly 0 in theory and pure rounding).
    scale = max(1.0, max(float(np.max(np.abs(grad))) for grad in portable_grads.values()))
    for name, grad in portable_grads.items():
        assert fast_grads[name] is not None, name
        np.testing.assert_allclose(fast_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


@eager_torch_only
@pytest.mark.parametrize(
    "ffn_type, top_k", [("swiglu", 2), ("mlp", 1)]
)
def test_eager_slices_equal_the_dropless_plans(ffn_type, top_k):
    # 72 tokens on 2 of 8 experts (k=2; k=1: on 1): buffers of the largest load would
    # be mostly padding, so `slices` cuts per-expert slices.
    x = skewed_inputs((2, 36, 8))
    layer = randomized_layer(
        x, num_experts=8, hidden_dim=8, top_k=top_k, intermediate_size=12, ffn_type=ffn_type, drop_tokens=False
    )
    results = run_plans(layer, x, ("blocks", "slices"))
    assert results["slices"][3], "the slices paid off: ragged slices"
    assert_same_results(results["blocks"], results["slices"])
    ref = reference.token_choice_moe(
        x.reshape(-1, 8), reference.weights_of(layer), num_experts=8, top_k=top_k, ffn_type=ffn_type
    )
    assert (ref["load"] == 0).sum() >= 6
    np.testing.assert_allclose(results["slices"][0].reshape(-1, 8), ref["out"], atol=1e-5)
    assert_same_results(run_plans(layer, x, ("grouped",))["grouped"], results["slices"])


@eager_torch_only
def test_eager_dropless_buffers_sized_to_the_largest_load_drop_nothing():
    # 26 tokens over 3 evenly loaded experts: too little padding for slices to pay, so
    # `slices` runs [E, C] buffers with C the batch's largest load (rounded up to 8).
    x = np.random.default_rng(6).normal(size=(2, 13, 8)).astype("float32")
    layer = randomized_layer(x, num_experts=3, hidden_dim=8, top_k=2, intermediate_size=12, drop_tokens=False)
    results = run_plans(layer, x, ("blocks", "slices"))
    assert not results["slices"][3], "evenly loaded experts: buffers"
    assert_same_results(results["blocks"], results["slices"])
    counters = results["slices"][2]
    np.testing.assert_array_equal(counters["processed_tokens_per_expert"], counters["routed_tokens_per_expert"])
    assert counters["dropped_tokens"] == 0
    ref = reference.token_choice_moe(x.reshape(-1, 8), reference.weights_of(layer), num_experts=3, top_k=2)
    np.testing.assert_allclose(results["slices"][0].reshape(-1, 8), ref["out"], atol=1e-5)


def test_dropless_buffer_capacity_holds_the_largest_load():
    from dl_moe.backend_fast_paths import dropless_buffer_capacity, concrete_expert_loads

    indices = np.array([[0, 1]] * 9 + [[2, 1]] * 4, dtype="int32")  # expert 1: 13 assignments
    active = np.ones_like(indices, dtype=bool)
    np.testing.assert_array_equal(concrete_expert_loads(indices, active, 4), [9, 13, 4, 0])
    assert dropless_buffer_capacity(concrete_expert_loads(indices, active, 4)) == 16
    active[:, 1] = False  # now expert 0 is the largest with 9
    assert dropless_buffer_capacity(concrete_expert_loads(indices, active, 4)) == 16
    active[:4] = False  # expert 0 keeps 5, expert 2 has 4
    assert dropless_buffer_capacity(concrete_expert_loads(indices, active, 4)) == 8


@eager_torch_only
@pytest.mark.parametrize("ffn_type, top_k, capacity_factor", [("swiglu", 2, 0.5), ("geglu", 1, 0.5), ("mlp", 3, 0.75)])
def test_eager_slices_equal_the_capacity_plan_with_buffers(ffn_type, top_k, capacity_factor):
    # 40 tokens over 4 experts with C = 8 rows: experts overflow, so `slices` must keep
    # and drop exactly the assignments the capacity plan does; 4 nearly full buffers
    # leave nothing for slices to skip, so it runs buffers.
    x = np.random.default_rng(3).normal(size=(4, 10, 8)).astype("float32")
    layer = randomized_layer(
        x,
        num_experts=4,
        hidden_dim=8,
        top_k=top_k,
        intermediate_size=12,
        ffn_type=ffn_type,
        train_capacity_factor=capacity_factor,
    )
    results = run_plans(layer, x, ("capacity", "slices"))
    assert not results["slices"][3]
    counters = results["capacity"][2]
    assert np.sum(counters["processed_tokens_per_expert"]) < np.sum(counters["routed_tokens_per_expert"])
    assert_same_results(results["capacity"], results["slices"])
    w = reference.weights_of(layer)
    cap = reference.capacity(40, top_k, 4, capacity_factor)
    ref = reference.token_choice_moe(x.reshape(-1, 8), w, num_experts=4, top_k=top_k, ffn_type=ffn_type, cap=cap)
    np.testing.assert_allclose(results["slices"][0].reshape(-1, 8), ref["out"], atol=1e-5)


@eager_torch_only
def test_eager_slices_equal_the_capacity_plan_with_ragged_slices_and_drops():
    # 224 tokens (k=1) all on one of 8 experts, C = 56: the expert keeps 56 and drops
    # 168, the 7 idle experts' buffers would be padding, so `slices` cuts slices.
    x = skewed_inputs((224, 8), seed=1)
    layer = randomized_layer(
        x, num_experts=8, hidden_dim=8, top_k=1, intermediate_size=12, ffn_type="swiglu", train_capacity_factor=2.0
    )
    results = run_plans(layer, x, ("capacity", "slices"))
    assert results["slices"][3], "the slices paid off: ragged slices"
    counters = results["capacity"][2]
    assert counters["dropped_tokens"] > 0
    assert_same_results(results["capacity"], results["slices"])
    cap = reference.capacity(224, 1, 8, 2.0)
    ref = reference.token_choice_moe(
        x, reference.weights_of(layer), num_experts=8, top_k=1, ffn_type="swiglu", cap=cap
    )
    np.testing.assert_allclose(results["slices"][0], ref["out"], atol=1e-5)
    np.testing.assert_array_equal(counters["processed_tokens_per_expert"], np.minimum(ref["load"], cap))
    assert_same_results(results["capacity"], run_plans(layer, x, ("grouped",))["grouped"])


@eager_torch_only
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_eager_plans_equal_portable_on_a_quantized_bank(drop_tokens):
    x = np.random.default_rng(4).normal(size=(2, 9, 8)).astype("float32")
    layer = randomized_layer(
        x, num_experts=4, hidden_dim=8, top_k=2, intermediate_size=12, ffn_type="swiglu", drop_tokens=drop_tokens
    )
    layer.quantize("int8")
    portable = "capacity" if drop_tokens else "blocks"
    # T*k = 36: host_slices needs at most 32 assignments; the first 16 tokens fit.
    results = run_plans(layer, x, (portable, "slices"), training=False)
    assert_same_results(results[portable], results["slices"])
    small = x[:1, :8]
    results = run_plans(layer, small, (portable, "host_slices"), training=False)
    assert_same_results(results[portable], results["host_slices"])


@eager_torch_only
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_eager_host_slices_equal_portable_with_gradients(drop_tokens):
    # An inference-mode call still differentiates (e.g. saliency maps). 14 tokens on
    # the same 2 experts (C = 8 rows): 6 of each expert's assignments are dropped.
    x = skewed_inputs((2, 7, 8), seed=9)
    layer = randomized_layer(
        x, num_experts=4, hidden_dim=8, top_k=2, intermediate_size=12, drop_tokens=drop_tokens,
        eval_capacity_factor=0.5,
    )
    portable = "capacity" if drop_tokens else "blocks"
    results = run_plans(layer, x, (portable, "host_slices"), training=False)
    if drop_tokens:
        assert results[portable][2]["dropped_tokens"] > 0
    assert_same_results(results[portable], results["host_slices"])


def test_capacity_slices_are_chosen_when_they_skip_more_padding_than_they_cost():
    from dl_moe.backend_fast_paths import SLICE_OVERHEAD_ROWS, capacity_slices_pay_off, concrete_expert_loads

    def pays_off(loads, capacity, inactive=0):
        # `loads[e]` active assignments of expert e, plus `inactive` masked ones.
        experts = np.repeat(np.arange(len(loads)), loads)
        indices = np.concatenate([experts, np.zeros(inactive, int)]).astype("int32")[:, None]
        active = np.arange(len(indices))[:, None] < len(experts)
        return capacity_slices_pay_off(concrete_expert_loads(indices, active, len(loads)), capacity)

    overhead = SLICE_OVERHEAD_ROWS
    # Padding rows = E*C - sum(min(load, C)); slices need more than E * overhead.
    assert pays_off([100, 100 - 2 * overhead], capacity=100) is False  # padding 2 * overhead
    assert pays_off([100, 100 - 2 * overhead - 1], capacity=100) is True
    # Overflowing assignments are dropped, so they fill no padding.
    assert pays_off([500, 100 - 2 * overhead - 1], capacity=100) is True
    # Inactive assignments (masked tokens) take no row.
    assert pays_off([100, 100], capacity=100, inactive=300) is False


def test_slice_path_is_used_exactly_on_eager_torch():
    assert backend_fast_paths.torch_eager_slices_enabled() == (BACKEND == "torch")


@eager_torch_only
@pytest.mark.parametrize("drop_tokens", [False, True])
def test_eager_slices_with_masked_tokens_and_idle_experts(drop_tokens):
    # 200 tokens, about half masked, the rest on one of 8 experts (k=1): slices pay
    # (dropless: C = that expert's load; capacity: C = 56 rows, of which one expert uses 56).
    x = skewed_inputs((1, 200, 8), seed=2)
    mask = np.random.default_rng(2).random((1, 200)) < 0.5
    layer = randomized_layer(
        x, num_experts=8, hidden_dim=8, top_k=1, intermediate_size=8, drop_tokens=drop_tokens
    )
    portable = "capacity" if drop_tokens else "blocks"
    results = run_plans(layer, x, (portable, "slices"), training=False, mask=mask)
    assert results["slices"][3], "the slices paid off: ragged slices"
    assert_same_results(results[portable], results["slices"])
    cap = reference.capacity(200, 1, 8, 2.0) if drop_tokens else None
    ref = reference.token_choice_moe(
        x[0], reference.weights_of(layer), num_experts=8, top_k=1, mask=mask[0], cap=cap
    )
    np.testing.assert_allclose(results["slices"][0][0], ref["out"], atol=1e-5)
    assert (ref["load"] == 0).sum() >= 6


@eager_torch_only
def test_eager_slices_run_other_banks_once_per_expert(monkeypatch):
    # A bank without `supports_slice_counts` (here attention experts, which also need
    # the row tokens) gets one call per expert with rows.
    x = np.random.default_rng(5).normal(size=(2, 5, 8)).astype("float32")
    layer = dl_moe.MixtureOfExperts(
        dl_moe.MoEConfig(
            num_experts=3,
            expert_config=dl_moe.ExpertConfig(expert_type="attention", hidden_dim=8, num_heads=2),
            gating_config=dl_moe.GatingConfig(top_k=2),
            train_capacity_factor=0.5,
        )
    )
    layer.build(x.shape)
    assert not layer.experts.supports_slice_counts
    results = run_plans(layer, x, ("capacity", "slices"))
    assert_same_results(results["capacity"], results["slices"])

    # Count the bank's calls on the per-expert slices: one per expert that holds rows,
    # in expert order, each with only that expert's kept rows. Expert 2 is made idle.
    # 3 experts of 8 rows are too small for slices to pay off by themselves (that needs
    # E*C rows of padding beyond E*48); this part is about the slices, so they are made to.
    monkeypatch.setattr(backend_fast_paths, "capacity_slices_pay_off", lambda *args: True)
    layer.config.dispatch = "slices"
    kernel = np.asarray(ops.convert_to_numpy(layer.gating_network.router_kernel)).copy()
    kernel[:, 2] = -10.0  # positive tokens never pick expert 2
    layer.gating_network.router_kernel.assign(kernel)
    x = np.abs(x) + 0.1
    decision = layer.route(x, training=True)
    loads = np.bincount(decision["indices"][decision["active"]], minlength=3)
    capacity = reference.capacity(10, 2, 3, 0.5)  # 8 rows: experts overflow
    assert loads.max() > capacity and loads[2] == 0
    calls = []
    bank_call = layer.experts.call

    def counting_call(inputs, group_expert=None, **kwargs):
        calls.append((np.asarray(ops.convert_to_numpy(group_expert)).tolist(), int(inputs.shape[1])))
        return bank_call(inputs, group_expert=group_expert, **kwargs)

    monkeypatch.setattr(layer.experts, "call", counting_call)
    layer(x, training=True)
    want = [([e], int(min(load, capacity))) for e, load in enumerate(loads) if load > 0]
    assert calls == want


def count_layer_calls(monkeypatch):
    """A list that gets one entry each time `keras.Layer.__call__` runs."""
    import keras

    calls = []
    layer_call = keras.Layer.__call__

    def spy(self, *args, **kwargs):
        calls.append(self)
        return layer_call(self, *args, **kwargs)

    monkeypatch.setattr(keras.Layer, "__call__", spy)
    return calls


@pytest.mark.skipif(
    BACKEND != "torch", reason="Layer.__call__ is skipped in eager PyTorch only; elsewhere call_layer is layer(...)"
)
def test_call_layer_skips_layer_call_only_where_it_changes_nothing(monkeypatch):
    import keras

    x = np.random.default_rng(0).normal(size=(5, 8)).astype("float32")
    router = randomized_layer(x, num_experts=4, hidden_dim=8, top_k=2).gating_network
    expected = router(x, training=False)
    calls = count_layer_calls(monkeypatch)

    # Eager inference, float32 throughout, no hooks: `call` directly, the same answer.
    weights, indices, info = backend_fast_paths.call_layer(router, x, training=False)
    assert calls == []
    np.testing.assert_array_equal(ops.convert_to_numpy(weights), ops.convert_to_numpy(expected[0]))
    np.testing.assert_array_equal(ops.convert_to_numpy(indices), ops.convert_to_numpy(expected[1]))
    np.testing.assert_array_equal(
        ops.convert_to_numpy(info["raw_gate_probs"]), ops.convert_to_numpy(expected[2]["raw_gate_probs"])
    )

    # Training (layers may add losses), autocast and torch hooks keep Layer.__call__.
    backend_fast_paths.call_layer(router, x, training=True)
    assert calls == [router]
    mixed = keras.layers.Dense(3, dtype="mixed_bfloat16")
    mixed.build((None, 8))
    calls.clear()
    out = backend_fast_paths.call_layer(mixed, x, training=False)
    assert calls == [mixed] and str(out.dtype) == "torch.bfloat16"
    hooked = []
    handle = router.register_forward_hook(lambda *args: hooked.append(1))
    calls.clear()
    backend_fast_paths.call_layer(router, x, training=False)
    handle.remove()
    assert calls == [router] and hooked == [1]
