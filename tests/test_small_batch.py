"""The decode plans (decode-sized inference batches) equal the buffered plans.

Decode-sized batches (a few tokens, as in autoregressive decoding) run a plan that
touches only the experts they route to: the `grouped` plan under XLA (JAX,
TensorFlow; capacity-mode inference of at most `GROUPED_DECODE_ASSIGNMENTS`
assignments T*k, or any dropless call) and `host_slices` in eager PyTorch (planned on
the host with numpy). Every case runs the same layer under that plan and under the
buffered plan of its mode, asked for by name (`MoEConfig.dispatch`): `capacity`
([E, C] buffers) or `blocks` (dropless), and compares outputs and routing counters;
the linear-router cases are also checked against the numpy reference, and compiled
(XLA on JAX and TensorFlow) against eager. The table's "auto" choice for these sizes
is checked too.
"""

import keras
import numpy as np
import pytest
from keras import ops

from dl_moe import backend_fast_paths, dispatch_plans
from dl_moe.forward import token_choice
from tests import reference
from tests.layer_checks import BACKEND, randomized_ffn_moe, routing_counters

D, H = 8, 12
EAGER_TORCH = backend_fast_paths.torch_eager_slices_enabled()
# The plan "auto" runs decode-sized inference batches with.
DECODE_PLAN = "host_slices" if EAGER_TORCH else "grouped"

eager_torch_only = pytest.mark.skipif(not EAGER_TORCH, reason="host-planned slices run in eager PyTorch only")


def randomized_layer(x, **kwargs):
    return randomized_ffn_moe(x, hidden_dim=D, intermediate_size=H, **kwargs)


def buffered_plan(layer):
    return "capacity" if layer.config.drop_tokens else "blocks"


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


def auto_plan(layer, x, training=False):
    """The plan "auto" picks for `layer` on `x`."""
    indices = ops.convert_to_tensor(np.asarray(layer.route(x, training=training)["indices"]))
    return token_choice.choose_plan(layer, indices, training).name


def run_plans(layer, x, plans, mask=None):
    """`{plan: (inference output, counters, utilization)}` of `layer` under each named plan."""
    results = {}
    for name in plans:
        layer.config.dispatch = name
        layer.reset_routing_stats()
        out = np.asarray(ops.convert_to_numpy(layer(x, training=False, mask=mask)))
        results[name] = (out, routing_counters(layer), np.asarray(layer.get_expert_utilization()))
    layer.config.dispatch = "auto"
    return results


def auto_dropless_plan(layer, x, training=False):
    """What "auto" runs for a dropless FFN layer under XLA: grouped, or blocks where the
    blocks' weight copies are small next to the rows (`dispatch_plans.block_copies_are_small`,
    checked against its own rule in test_plans.py)."""
    tokens = int(np.prod(x.shape[:-1]))
    facts = dispatch_plans.CallFacts(
        backend=keras.backend.backend(), eager_torch=False, training=training, num_tokens=tokens,
        slots=layer.config.gating_config.top_k, drop_tokens=False, adaptive_capacity=False,
        expert_parallel=False, bank=layer.experts, layer=layer,
    )
    return "blocks" if dispatch_plans.block_copies_are_small(facts) else "grouped"


def expected_auto(layer, x, training=False):
    if EAGER_TORCH or layer.config.drop_tokens:
        return DECODE_PLAN
    return auto_dropless_plan(layer, x, training)


def decode_and_buffered(layer, x, mask=None):
    """`(buffered, decode)` results; checks that "auto" picks the decode plan."""
    assert auto_plan(layer, x) == expected_auto(layer, x)
    results = run_plans(layer, x, (buffered_plan(layer), DECODE_PLAN), mask=mask)
    return results[buffered_plan(layer)], results[DECODE_PLAN]


def assert_same(buffered, decode):
    np.testing.assert_allclose(decode[0], buffered[0], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(decode[0]))
    for key, value in buffered[1].items():
        np.testing.assert_array_equal(decode[1][key], value, err_msg=key)
    np.testing.assert_array_equal(decode[2], buffered[2])


def inputs(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# (layer kwargs): capacity mode with a small eval factor (C = 8 rows, so a skewed
# batch of 12 tokens drops), dropless with biases.
MODES = {
    "capacity": dict(num_experts=4, top_k=2, ffn_type="swiglu", use_bias=False, eval_capacity_factor=0.5),
    "dropless": dict(num_experts=6, top_k=2, ffn_type="mlp", drop_tokens=False),
}


def skewed(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(1,) * (len(shape) - 1) + shape[-1:]) + 1e-3 * rng.normal(size=shape)).astype("float32")


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "num_tokens, masked, skew",
    [(1, False, False), (2, False, False), (2, True, False), (8, True, False), (12, False, True)],
    ids=["T1", "T2", "T2_masked", "T8_masked", "T12_skewed"],
)
def test_decode_plan_equals_buffered_plan_and_reference(mode, num_tokens, masked, skew):
    kwargs = MODES[mode]
    shape = (1, num_tokens, D)
    x = skewed(shape, seed=num_tokens) if skew else inputs(shape, seed=num_tokens)
    mask = None
    if masked:
        mask = np.random.default_rng(5).random(shape[:-1]) < 0.6
        mask[0, 0], mask[0, -1] = False, True
    layer = randomized_layer(x, **kwargs)
    buffered, decode = decode_and_buffered(layer, x, mask=mask)
    assert_same(buffered, decode)

    drops = kwargs.get("drop_tokens", True)
    num_experts, top_k = kwargs["num_experts"], kwargs["top_k"]
    cap = reference.capacity(num_tokens, top_k, num_experts, kwargs.get("eval_capacity_factor", 2.0))
    flat_mask = None if mask is None else mask.reshape(-1)
    ref = reference.token_choice_moe(
        x.reshape(-1, D), reference.weights_of(layer), num_experts=num_experts, top_k=top_k,
        ffn_type=kwargs["ffn_type"], use_bias=kwargs.get("use_bias", True), cap=cap if drops else None,
        mask=flat_mask,
    )
    np.testing.assert_allclose(decode[0].reshape(-1, D), ref["out"], atol=1e-5)
    stats = decode[1]
    np.testing.assert_array_equal(stats["routed_tokens_per_expert"], ref["load"])
    processed = np.minimum(ref["load"], cap) if drops else ref["load"]
    np.testing.assert_array_equal(stats["processed_tokens_per_expert"], processed)
    if skew and drops:
        assert stats["dropped_tokens"] > 0  # two experts of 8 rows get 12 tokens' 24 assignments
    layer.config.dispatch = DECODE_PLAN
    np.testing.assert_allclose(compiled_inference(layer, x, mask), decode[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_decode_plan_with_a_dynamic_k_router(drop_tokens):
    # top_p leaves unused slots inactive (weight 0): they must add nothing.
    x = inputs((2, 4, D), seed=2)
    layer = randomized_layer(
        x, num_experts=4, top_k=3, gating_type="top_p", top_p_threshold=0.5, ffn_type="swiglu",
        drop_tokens=drop_tokens,
    )
    active = np.asarray(layer.route(x)["active"])
    assert not active.all()  # some slots unused, so the test covers them
    buffered, decode = decode_and_buffered(layer, x)
    assert_same(buffered, decode)
    layer.config.dispatch = DECODE_PLAN
    np.testing.assert_allclose(compiled_inference(layer, x), decode[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_decode_plan_with_every_token_masked(drop_tokens):
    # No assignment is active: no expert runs, the outputs are zeros and no token is counted.
    x = inputs((1, 3, D), seed=7)
    layer = randomized_layer(x, num_experts=4, top_k=2, drop_tokens=drop_tokens)
    mask = np.zeros((1, 3), bool)
    buffered, decode = decode_and_buffered(layer, x, mask=mask)
    assert_same(buffered, decode)
    np.testing.assert_array_equal(decode[0], np.zeros((1, 3, D), "float32"))
    assert decode[1]["routed_tokens_per_expert"].sum() == 0 and decode[1]["seen_tokens"] == 0
    layer.config.dispatch = DECODE_PLAN
    np.testing.assert_array_equal(compiled_inference(layer, x, mask), decode[0])


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_decode_plan_with_a_quantized_bank(drop_tokens):
    x = inputs((2, 4, D), seed=3)
    layer = randomized_layer(
        x, quantize=True, num_experts=4, top_k=2, ffn_type="swiglu", use_expert_scale=True, drop_tokens=drop_tokens,
    )
    assert layer.experts.quantization_mode == "int8"
    buffered, decode = decode_and_buffered(layer, x)
    assert_same(buffered, decode)
    layer.config.dispatch = DECODE_PLAN
    np.testing.assert_allclose(compiled_inference(layer, x), decode[0], rtol=1e-5, atol=1e-5)


def test_auto_picks_the_decode_plan_for_decode_sized_inference_only():
    # E=8, k=2, capacity mode. Under XLA: grouped up to GROUPED_DECODE_ASSIGNMENTS = 64
    # assignments in inference, capacity buffers above and in training. Eager PyTorch:
    # host_slices up to MAX_HOST_PLANNED_ASSIGNMENTS = 32 in inference, slices otherwise.
    limit = (
        backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS if EAGER_TORCH else dispatch_plans.GROUPED_DECODE_ASSIGNMENTS
    )
    otherwise = "slices" if EAGER_TORCH else "capacity"
    x = inputs((1, limit // 2 + 1, D))
    layer = randomized_layer(x, num_experts=8, top_k=2)
    for num_tokens in (1, 2, 8, limit // 2):
        assert auto_plan(layer, x[:, :num_tokens]) == DECODE_PLAN, num_tokens
        assert auto_plan(layer, x[:, :num_tokens], training=True) == otherwise, num_tokens
    assert auto_plan(layer, x) == otherwise  # T*k = limit + 2
    # Dropless: XLA runs grouped at every size; eager PyTorch plans small inference
    # batches on the host.
    dropless = randomized_layer(x, num_experts=8, top_k=2, drop_tokens=False)
    for num_tokens in (1, 2, 8):
        assert auto_plan(dropless, x[:, :num_tokens]) == expected_auto(dropless, x[:, :num_tokens]), num_tokens
    assert auto_plan(dropless, x, training=True) == ("slices" if EAGER_TORCH else auto_dropless_plan(dropless, x, True))


def test_plan_slices_on_host_layout():
    # 3 tokens, k=2, 3 experts; token 2 has an inactive second slot.
    expert_index = np.array([[0, 1], [0, 2], [1, 0]], dtype="int32")
    active = np.array([[True, True], [True, True], [True, False]])
    plan = backend_fast_paths.plan_slices_on_host(expert_index, active, 3)
    # Expert 0 computes (t0,c0), (t1,c0); expert 1 (t2,c0), (t0,c1); expert 2 (t1,c1).
    np.testing.assert_array_equal(plan.row_token, [0, 1, 2, 0, 1])
    np.testing.assert_array_equal(plan.row_choice, [0, 0, 0, 1, 1])
    assert plan.counts == [2, 2, 1]
    np.testing.assert_array_equal(plan.routed_per_expert, [2, 2, 1])
    np.testing.assert_array_equal(plan.kept, active)
    # Capacity 1 keeps what the capacity plan keeps (first choices first, then earlier
    # tokens): (t0,c0), (t2,c0), (t1,c1).
    plan = backend_fast_paths.plan_slices_on_host(expert_index, active, 3, capacity=1)
    np.testing.assert_array_equal(plan.row_token, [0, 2, 1])
    np.testing.assert_array_equal(plan.row_choice, [0, 0, 1])
    assert plan.counts == [1, 1, 1]
    np.testing.assert_array_equal(plan.routed_per_expert, [2, 2, 1])
    np.testing.assert_array_equal(plan.kept, [[True, False], [False, True], [True, False]])


@eager_torch_only
def test_host_slices_in_mixed_precision():
    # A bfloat16 compute dtype over float32 weights: the bank is called through
    # Layer.__call__, which autocasts its weights.
    import keras

    keras.config.set_dtype_policy("mixed_bfloat16")  # conftest restores the policy
    x = inputs((2, 4, D), seed=4)
    layer = randomized_layer(x, num_experts=4, top_k=2, ffn_type="swiglu", eval_capacity_factor=0.5)
    results = run_plans(layer, x, ("capacity", "host_slices"))
    buffered, host = results["capacity"], results["host_slices"]
    assert host[0].dtype == buffered[0].dtype
    np.testing.assert_allclose(host[0].astype("float32"), buffered[0].astype("float32"), rtol=2e-2, atol=2e-2)
    for key, value in buffered[1].items():
        np.testing.assert_array_equal(host[1][key], value, err_msg=key)


@eager_torch_only
@pytest.mark.parametrize("drop_tokens", [True, False])
def test_host_slices_gradients_equal_the_buffered_plan(drop_tokens):
    # An inference-mode call still differentiates (e.g. saliency maps): the host plan's
    # gathers and index_add give the buffered plan's gradients.
    from tests.autodiff import gradients

    x = inputs((2, 3, D), seed=6)
    layer = randomized_layer(x, num_experts=4, top_k=2, ffn_type="swiglu", drop_tokens=drop_tokens)
    per_plan = []
    for plan in (buffered_plan(layer), "host_slices"):
        layer.config.dispatch = plan
        per_plan.append(gradients(lambda t: ops.sum(layer(t, training=False) ** 2), x, variables=layer.trainable_variables))
    for buffered, host in zip(*per_plan):
        np.testing.assert_allclose(host, buffered, rtol=1e-5, atol=1e-5)
