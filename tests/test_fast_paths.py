"""Each backend fast path gives the same result as the portable path.

The eager slice path is plain eager code, so it is forced on (and off) with a
monkeypatch and checked on every backend, not only on PyTorch, which uses it.
"""

import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import backend_fast_paths, dispatch
from tests import reference
from tests.layer_checks import BACKEND, routing_counters, trainable_gradients
from tests.layer_checks import randomized_ffn_moe as randomized_layer

SLICES_SWITCH = "dl_moe.forward.token_choice.torch_eager_slices_enabled"
CAPACITY_SLICES_SWITCH = "dl_moe.forward.token_choice.capacity_slices_pay_off"

# The slices are taken in eager PyTorch only. Forcing them on TensorFlow as well checks
# the same code on a second backend; on JAX, where their gradients cannot be taken
# (autodiff traces the layer), eager op-by-op dispatch made these the suite's slowest.
not_on_jax = pytest.mark.skipif(
    BACKEND == "jax", reason="the slice fast path runs in eager PyTorch only; checked on torch and TensorFlow"
)


def run_both_paths(layer, x, monkeypatch, training=True, slices_pay_off=True):
    """Outputs, gradients and counters of the portable path, then of the slice path."""
    results = []
    # Small test layers would keep [E, C] buffers on torch (too little padding to skip).
    monkeypatch.setattr(CAPACITY_SLICES_SWITCH, lambda *args: slices_pay_off)
    slice_plans = []
    plan_slices = dispatch.plan_ragged_dispatch
    monkeypatch.setattr(dispatch, "plan_ragged_dispatch", lambda *a, **k: slice_plans.append(1) or plan_slices(*a, **k))
    for slices in (False, True):
        monkeypatch.setattr(SLICES_SWITCH, lambda slices=slices: slices)
        layer.reset_routing_stats()
        slice_plans.clear()
        out = np.asarray(ops.convert_to_numpy(layer(x, training=training)))
        assert bool(slice_plans) == (slices and slices_pay_off)  # the path under test was taken
        counters = routing_counters(layer)
        grads = trainable_gradients(layer, x, training=training)
        results.append((out, grads, counters))
    return results


def assert_same_results(portable, fast):
    (portable_out, portable_grads, portable_counters), (fast_out, fast_grads, fast_counters) = portable, fast
    np.testing.assert_allclose(fast_out, portable_out, rtol=1e-5, atol=1e-6)
    for key, value in portable_counters.items():
        np.testing.assert_array_equal(fast_counters[key], value, err_msg=key)
    # The two paths sum the same float32 terms in a different order, so gradients
    # agree to a few ulps of the layer's largest gradient (grads reach ~10 here;
    # some, like an attention key bias, are exactly 0 in theory and pure rounding).
    scale = max(1.0, max(float(np.max(np.abs(grad))) for grad in portable_grads.values()))
    for name, grad in portable_grads.items():
        np.testing.assert_allclose(fast_grads[name], grad, rtol=1e-5, atol=1e-6 * scale, err_msg=name)


@not_on_jax
@pytest.mark.parametrize("ffn_type, top_k", [("swiglu", 2), ("mlp", 3)])
def test_eager_slices_equal_portable_dropless_blocks(ffn_type, top_k, monkeypatch):
    x = np.random.default_rng(0).normal(size=(3, 11, 8)).astype("float32")
    layer = randomized_layer(
        x, num_experts=6, hidden_dim=8, top_k=top_k, intermediate_size=12, ffn_type=ffn_type, drop_tokens=False
    )
    portable, fast = run_both_paths(layer, x, monkeypatch)
    assert_same_results(portable, fast)
    ref = reference.token_choice_moe(
        x.reshape(-1, 8), reference.weights_of(layer), num_experts=6, top_k=top_k, ffn_type=ffn_type
    )
    np.testing.assert_allclose(portable[0].reshape(-1, 8), ref["out"], atol=1e-5)
@not_on_jax
def test_eager_dropless_buffers_sized_to_the_largest_load_drop_nothing(monkeypatch):
    # When slices do not pay off, eager dropless runs [E, C] buffers with C the
    # batch's largest load (rounded up to 8): same result as the portable blocks.
    x = np.random.default_rng(6).normal(size=(2, 13, 8)).astype("float32")
    layer = randomized_layer(x, num_experts=3, hidden_dim=8, top_k=2, intermediate_size=12, drop_tokens=False)
    portable, fast = run_both_paths(layer, x, monkeypatch, slices_pay_off=False)
    assert_same_results(portable, fast)
    counters = fast[2]
    np.testing.assert_array_equal(counters["processed_tokens_per_expert"], counters["routed_tokens_per_expert"])
    assert counters["dropped_tokens"] == 0
    ref = reference.token_choice_moe(x.reshape(-1, 8), reference.weights_of(layer), num_experts=3, top_k=2)
    np.testing.assert_allclose(fast[0].reshape(-1, 8), ref["out"], atol=1e-5)


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


@not_on_jax
@pytest.mark.parametrize("ffn_type, top_k, capacity_factor", [("swiglu", 2, 0.5), ("geglu", 1, 0.5), ("mlp", 3, 0.75)])
def test_eager_slices_equal_portable_capacity_buffers(ffn_type, top_k, capacity_factor, monkeypatch):
    # 40 tokens over 4 experts with C = 8 rows: experts overflow, so the slice path must
    # keep and drop exactly the assignments the [E, C] buffers do.
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
    portable, fast = run_both_paths(layer, x, monkeypatch)
    counters = portable[2]
    assert np.sum(counters["processed_tokens_per_expert"]) < np.sum(counters["routed_tokens_per_expert"])
    assert_same_results(portable, fast)
    w = reference.weights_of(layer)
    cap = reference.capacity(40, top_k, 4, capacity_factor)
    ref = reference.token_choice_moe(x.reshape(-1, 8), w, num_experts=4, top_k=top_k, ffn_type=ffn_type, cap=cap)
    np.testing.assert_allclose(fast[0].reshape(-1, 8), ref["out"], atol=1e-5)
@not_on_jax
def test_eager_slices_equal_portable_quantized_bank(monkeypatch):
    x = np.random.default_rng(4).normal(size=(2, 9, 8)).astype("float32")
    layer = randomized_layer(x, num_experts=4, hidden_dim=8, top_k=2, intermediate_size=12, ffn_type="swiglu")
    layer.quantize("int8")
    portable, fast = run_both_paths(layer, x, monkeypatch, training=False)
    assert_same_results(portable, fast)


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


@not_on_jax
@pytest.mark.parametrize("drop_tokens", [False, True])
def test_slice_path_with_masked_tokens_and_idle_experts(drop_tokens, monkeypatch):
    monkeypatch.setattr(SLICES_SWITCH, lambda: True)
    monkeypatch.setattr(CAPACITY_SLICES_SWITCH, lambda *args: True)
    # An inference call this small would be planned on the host (test_small_batch).
    monkeypatch.setattr(backend_fast_paths, "MAX_HOST_PLANNED_ASSIGNMENTS", 0)
    x = np.random.default_rng(2).normal(size=(1, 6, 8)).astype("float32")
    mask = np.array([[True, True, False, True, False, False]])
    layer = dl_moe.create_ffn_moe(8, 8, top_k=1, intermediate_size=8, drop_tokens=drop_tokens)
    slice_plans = []
    plan_slices = dispatch.plan_ragged_dispatch
    monkeypatch.setattr(dispatch, "plan_ragged_dispatch", lambda *a, **k: slice_plans.append(1) or plan_slices(*a, **k))
    out = np.asarray(ops.convert_to_numpy(layer(x, mask=mask)))
    assert slice_plans == [1]  # the slice path ran
    ref = reference.token_choice_moe(x[0], reference.weights_of(layer), num_experts=8, top_k=1, mask=mask[0])
    np.testing.assert_allclose(out[0], ref["out"], atol=1e-5)
@not_on_jax
def test_slice_path_runs_other_banks_once_per_expert(monkeypatch):
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
    portable, fast = run_both_paths(layer, x, monkeypatch)
    assert_same_results(portable, fast)

    # Count the bank's calls on the slice path: one per expert that holds rows, in
    # expert order, each with only that expert's kept rows. Expert 2 is made idle.
    monkeypatch.setattr(SLICES_SWITCH, lambda: True)
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
