"""The small-batch plans (decode-sized inference batches) equal the buffered plans.

Two plans: the gathered plan (`dispatch.plan_gathered_dispatch`, every backend) and,
in eager PyTorch, host-planned slices (`backend_fast_paths.run_host_planned_slices`).
Every case runs the same layer twice in inference, with the small-batch plans forced
off (capacity or dropless buffers) and one of them on, and compares outputs and
routing counters; the linear-router cases are also checked against the numpy
reference, and compiled (XLA on JAX and TensorFlow) against eager.
"""

import numpy as np
import pytest
from keras import ops

from dl_moe import backend_fast_paths, dispatch
from tests import reference
from tests.layer_checks import BACKEND, randomized_ffn_moe, routing_counters

RULE = "dl_moe.dispatch.gathered_dispatch_pays_off"
HOST_LIMIT = "dl_moe.backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS"
D, H = 8, 12

eager_torch_only = pytest.mark.skipif(BACKEND != "torch", reason="host-planned slices run in eager PyTorch only")

# The small-batch plan a test checks, with the function that builds it (spied on).
SMALL_BATCH_PLANS = [pytest.param("gathered", id="gathered"), pytest.param("host", id="host_slices", marks=eager_torch_only)]
PLAN_BUILDERS = {"gathered": (dispatch, "plan_gathered_dispatch"), "host": (backend_fast_paths, "plan_slices_on_host")}


def randomized_layer(x, **kwargs):
    return randomized_ffn_moe(x, hidden_dim=D, intermediate_size=H, **kwargs)


def compiled_inference(layer, x, mask=None):
    """The layer's inference output, compiled (jax.jit / tf.function(jit_compile=True));
    eager on torch."""
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        fn = jax.jit(lambda t, n, x, m: layer.stateless_call(t, n, x, training=False, mask=m)[0])
        return np.asarray(fn(trainable, non_trainable, x, mask))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fn = tf.function(lambda x, m: layer(x, training=False, mask=m), jit_compile=True)
        return fn(x, mask).numpy()
    return np.asarray(ops.convert_to_numpy(layer(x, training=False, mask=mask)))


def use_plans(monkeypatch, small_batch):
    """Switches the small-batch plans: None (buffers only), "gathered" or "host"."""
    monkeypatch.setattr(RULE, lambda *args: small_batch == "gathered")
    monkeypatch.setattr(HOST_LIMIT, 10**6 if small_batch == "host" else 0)


def spy_on_plan(monkeypatch, small_batch):
    """A list that gets one entry each time the `small_batch` plan ("gathered" or
    "host") is built."""
    taken = []
    module, name = PLAN_BUILDERS[small_batch]
    build = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: taken.append(1) or build(*a, **k))
    return taken


def run_both_plans(layer, x, monkeypatch, mask=None, training=False, small_batch="gathered"):
    """`[(output, counters)]` of the buffered plan, then of the `small_batch` plan
    ("gathered" or "host"); checks which plan each call took."""
    taken = spy_on_plan(monkeypatch, small_batch)
    results = []
    for plan in (None, small_batch):
        use_plans(monkeypatch, plan)
        layer.reset_routing_stats()
        taken.clear()
        out = np.asarray(ops.convert_to_numpy(layer(x, training=training, mask=mask)))
        assert bool(taken) == (plan is not None)
        results.append((out, routing_counters(layer)))
    return results


def assert_same(buffered, gathered):
    np.testing.assert_allclose(gathered[0], buffered[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(gathered[0]))
    for key, value in buffered[1].items():
        np.testing.assert_array_equal(gathered[1][key], value, err_msg=key)


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# (layer kwargs, input shape): capacity without and with drops (C = 8 rows per
# expert, 48 assignments over 4 experts at eval factor 0.5), dropless, biases.
LINEAR_CASES = {
    "capacity": (dict(num_experts=4, top_k=2, ffn_type="swiglu", use_bias=False), (2, 3, D)),
    "capacity_drops": (dict(num_experts=4, top_k=2, ffn_type="swiglu", eval_capacity_factor=0.5), (3, 8, D)),
    "dropless": (dict(num_experts=6, top_k=3, ffn_type="mlp", drop_tokens=False), (2, 5, D)),
}


@pytest.mark.parametrize("small_batch", SMALL_BATCH_PLANS)
@pytest.mark.parametrize("case, masked", [("capacity", False), ("capacity_drops", True), ("dropless", True)])
def test_small_batch_plan_equals_buffered_plan_and_reference(case, masked, small_batch, monkeypatch):
    kwargs, shape = LINEAR_CASES[case]
    x = inputs(shape)
    mask = None
    if masked:
        mask = np.random.default_rng(5).random(shape[:-1]) < 0.7
        mask[0, 0] = False
    layer = randomized_layer(x, **kwargs)
    buffered, gathered = run_both_plans(layer, x, monkeypatch, mask=mask, small_batch=small_batch)
    assert_same(buffered, gathered)
    if case == "capacity_drops":
        stats = gathered[1]
        assert stats["processed_tokens_per_expert"].sum() < stats["routed_tokens_per_expert"].sum()

    num_tokens = int(np.prod(shape[:-1]))
    drops = kwargs.get("drop_tokens", True)
    cap = reference.capacity(num_tokens, kwargs["top_k"], kwargs["num_experts"], kwargs.get("eval_capacity_factor", 2.0))
    flat_mask = None if mask is None else mask.reshape(-1)
    ref = reference.token_choice_moe(
        x.reshape(-1, D), reference.weights_of(layer), num_experts=kwargs["num_experts"], top_k=kwargs["top_k"],
        ffn_type=kwargs["ffn_type"], use_bias=kwargs.get("use_bias", True), cap=cap if drops else None,
        mask=flat_mask,
    )
    expected = ref["out"] if flat_mask is None else ref["out"] * flat_mask[:, None]
    np.testing.assert_allclose(gathered[0].reshape(-1, D), expected, atol=1e-5)
    np.testing.assert_allclose(compiled_inference(layer, x, mask), gathered[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("small_batch", SMALL_BATCH_PLANS)
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_small_batch_plan_with_a_dynamic_k_router(drop_tokens, small_batch, monkeypatch):
    # top_p leaves unused slots inactive (weight 0): they must add nothing.
    x = inputs((2, 6, D), seed=2)
    layer = randomized_layer(
        x, num_experts=4, top_k=3, gating_type="top_p", top_p_threshold=0.5, ffn_type="swiglu",
        drop_tokens=drop_tokens,
    )
    active = dl_moe_active(layer, x)
    assert not active.all()  # some slots unused, so the test covers them
    buffered, gathered = run_both_plans(layer, x, monkeypatch, small_batch=small_batch)
    assert_same(buffered, gathered)
    np.testing.assert_allclose(compiled_inference(layer, x), gathered[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("small_batch", SMALL_BATCH_PLANS)
def test_small_batch_plan_with_every_token_masked(small_batch, monkeypatch):
    # No assignment is active: no expert runs, the outputs are zeros and no token is counted.
    x = inputs((1, 3, D), seed=7)
    layer = randomized_layer(x, num_experts=4, top_k=2)
    mask = np.zeros((1, 3), bool)
    buffered, small = run_both_plans(layer, x, monkeypatch, mask=mask, small_batch=small_batch)
    assert_same(buffered, small)
    np.testing.assert_array_equal(small[0], np.zeros((1, 3, D), "float32"))
    assert small[1]["routed_tokens_per_expert"].sum() == 0 and small[1]["seen_tokens"] == 0


def dl_moe_active(layer, x):
    return np.asarray(layer.route(x)["active"])


@pytest.mark.parametrize("small_batch", SMALL_BATCH_PLANS)
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_small_batch_plan_with_a_quantized_bank(drop_tokens, small_batch, monkeypatch):
    x = inputs((2, 5, D), seed=3)
    layer = randomized_layer(
        x, quantize=True, num_experts=4, top_k=2, ffn_type="swiglu", use_expert_scale=True, drop_tokens=drop_tokens,
    )
    assert layer.experts.quantization_mode == "int8"
    buffered, gathered = run_both_plans(layer, x, monkeypatch, small_batch=small_batch)
    assert_same(buffered, gathered)
    np.testing.assert_allclose(compiled_inference(layer, x), gathered[0], rtol=1e-5, atol=1e-5)


def test_gathered_plan_rule():
    # Decode-sized batches: at most E/2 assignments (and at most 64).
    assert dispatch.gathered_dispatch_pays_off(1, 2, 8)
    assert dispatch.gathered_dispatch_pays_off(2, 2, 8)
    assert not dispatch.gathered_dispatch_pays_off(3, 2, 8)
    assert dispatch.gathered_dispatch_pays_off(4, 8, 64)
    assert not dispatch.gathered_dispatch_pays_off(5, 8, 64)
    assert dispatch.gathered_dispatch_pays_off(64, 1, 128)
    assert not dispatch.gathered_dispatch_pays_off(65, 1, 256)


def test_gathered_plan_is_taken_in_inference_only(monkeypatch):
    monkeypatch.setattr(HOST_LIMIT, 0)  # eager PyTorch would plan these batches on the host
    taken = spy_on_plan(monkeypatch, "gathered")
    x = inputs((1, 2, D))
    layer = randomized_layer(x, num_experts=8, top_k=2)
    layer(x, training=False)
    assert taken  # T*k = 4 <= E/2: the rule picks the gathered plan
    taken.clear()
    layer(x, training=True)
    assert not taken
    layer(inputs((1, 3, D)), training=False)  # T*k = 6 > E/2: buffers
    assert not taken


def test_plan_gathered_dispatch_layout():
    # 3 tokens, k=2, 3 experts; token 2 has an inactive second slot.
    expert_index = np.array([[0, 1], [0, 2], [1, 0]], dtype="int32")
    active = np.array([[True, True], [True, True], [True, False]])
    plan = dispatch.plan_gathered_dispatch(expert_index, active, 3)
    numpy = lambda t: np.asarray(ops.convert_to_numpy(t))  # noqa: E731
    # Rows are choice-major assignments: (t0,c0), (t1,c0), (t2,c0), (t0,c1), (t1,c1), (t2,c1).
    np.testing.assert_array_equal(numpy(plan.group_expert), [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(numpy(plan.row_token)[:, 0], [0, 1, 2, 0, 1, 3])
    np.testing.assert_array_equal(numpy(plan.assignment_row), [[0, 3], [1, 4], [2, 6]])
    np.testing.assert_array_equal(numpy(plan.routed_per_expert), [2, 2, 1])
    # Capacity 1: first choices go first, then earlier tokens; expert 0 keeps (t0,c0)
    # and drops (t1,c0), expert 1 keeps (t2,c0) and drops (t0,c1).
    plan = dispatch.plan_gathered_dispatch(expert_index, active, 3, capacity=1)
    np.testing.assert_array_equal(numpy(plan.assignment_row), [[0, 6], [6, 4], [2, 6]])
    np.testing.assert_array_equal(numpy(plan.processed_per_expert), [1, 1, 1])


def test_plan_slices_on_host_layout():
    # The example of test_plan_gathered_dispatch_layout, as per-expert slices.
    expert_index = np.array([[0, 1], [0, 2], [1, 0]], dtype="int32")
    active = np.array([[True, True], [True, True], [True, False]])
    plan = backend_fast_paths.plan_slices_on_host(expert_index, active, 3)
    # Expert 0 computes (t0,c0), (t1,c0); expert 1 (t2,c0), (t0,c1); expert 2 (t1,c1).
    np.testing.assert_array_equal(plan.row_token, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(plan.row_choice, [0, 0, 0, 1, 1])
    assert plan.counts == [2, 2, 1]
    np.testing.assert_array_equal(plan.routed_per_expert, [2, 2, 1])
    np.testing.assert_array_equal(plan.kept, active)
    # Capacity 1 keeps what the gathered and buffered plans keep: (t0,c0), (t2,c0), (t1,c1).
    plan = backend_fast_paths.plan_slices_on_host(expert_index, active, 3, capacity=1)
    np.testing.assert_array_equal(plan.row_token, [0, 2, 1])
    np.testing.assert_array_equal(plan.row_choice, [0, 0, 1])
    assert plan.counts == [1, 1, 1]
    np.testing.assert_array_equal(plan.routed_per_expert, [2, 2, 1])
    np.testing.assert_array_equal(plan.kept, [[True, False], [False, True], [True, False]])


@eager_torch_only
def test_host_planned_slices_are_taken_in_eager_inference_up_to_the_limit(monkeypatch):
    taken = spy_on_plan(monkeypatch, "host")
    limit = backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS
    x = inputs((1, limit // 2, D))
    layer = randomized_layer(x, num_experts=8, top_k=2)
    layer(x, training=False)
    assert taken  # T*k = limit
    taken.clear()
    layer(x, training=True)
    assert not taken
    layer(inputs((1, limit // 2 + 1, D)), training=False)  # T*k = limit + 2
    assert not taken


@eager_torch_only
def test_host_planned_slices_in_mixed_precision(monkeypatch):
    # A bfloat16 compute dtype over float32 weights: the bank is called through
    # Layer.__call__, which autocasts its weights.
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")
    x = inputs((2, 4, D), seed=4)
    layer = randomized_layer(x, num_experts=4, top_k=2, ffn_type="swiglu", eval_capacity_factor=0.5)
    buffered, host = run_both_plans(layer, x, monkeypatch, small_batch="host")
    assert host[0].dtype == buffered[0].dtype
    np.testing.assert_allclose(host[0].astype("float32"), buffered[0].astype("float32"), rtol=2e-2, atol=2e-2)
    for key, value in buffered[1].items():
        np.testing.assert_array_equal(host[1][key], value, err_msg=key)


@eager_torch_only
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_host_planned_slices_gradients_equal_the_buffered_plan(drop_tokens, monkeypatch):
    # An inference-mode call still differentiates (e.g. saliency maps): the host plan's
    # gathers and index_add give the buffered plan's gradients.
    from tests.autodiff import gradients

    x = inputs((2, 3, D), seed=6)
    layer = randomized_layer(x, num_experts=4, top_k=2, ffn_type="swiglu", drop_tokens=drop_tokens)
    per_plan = []
    for plan in (None, "host"):
        use_plans(monkeypatch, plan)
        per_plan.append(gradients(lambda t: ops.sum(layer(t, training=False) ** 2), x, variables=layer.trainable_variables))
    for buffered, host in zip(*per_plan):
        np.testing.assert_allclose(host, buffered, rtol=1e-5, atol=1e-5)
