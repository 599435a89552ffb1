"""The dispatch plan table (`dl_moe.dispatch_plans`): names, the "auto" choice, and
every plan against the numpy reference.

Plans differ only in cost: each keeps and drops the same assignments, so every plan
that can run a call must give the numpy reference's outputs (`tests.reference`), in
training and inference, eager and compiled (`jax.jit` of `stateless_call`,
`tf.function(jit_compile=True)`; eager PyTorch runs op by op), and the grouped plan's
hand-written gradient must equal autodiff through the block and capacity plans. A
plan is asked for by name with `MoEConfig.dispatch`; a plan that cannot run a call
says why.
"""

import dataclasses
import json
import zipfile

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import backend_fast_paths, dispatch_plans
from dl_moe.dispatch_plans import CallFacts
from dl_moe.forward import token_choice
from tests import reference
from tests.autodiff import gradients
from tests.layer_checks import BACKEND, compiled_output, randomized_ffn_moe, routing_counters

EAGER_TORCH = backend_fast_paths.torch_eager_slices_enabled()
# Adaptive capacity precedes eager PyTorch's slices: it changes which assignments are
# kept, so every backend must run it (plans differ only in cost).
TABLE_ORDER = ["expert_parallel", "host_slices", "adaptive_capacity", "slices", "grouped", "blocks", "capacity"]


def test_plan_names_list_auto_and_every_row_in_order():
    assert dispatch_plans.plan_names() == ["auto"] + TABLE_ORDER
    assert [row.name for row in dispatch_plans.PLAN_TABLE] == TABLE_ORDER


# ----------------------------------------------------------------- the auto choice


@pytest.fixture(scope="module")
def banks():
    """{"ffn": an FFN bank, "attention": an attention bank}, from small built layers."""
    ffn = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4)
    ffn.build((None, 8))
    attention = dl_moe.MixtureOfExperts(
        dl_moe.MoEConfig(
            num_experts=4,
            expert_config=dl_moe.ExpertConfig(expert_type="attention", hidden_dim=8, num_heads=2),
            gating_config=dl_moe.GatingConfig(top_k=2),
        )
    )
    attention.build((2, 5, 8))
    assert ffn.experts.supports_expert_blocks and ffn.experts.supports_slice_counts
    assert not attention.experts.supports_expert_blocks and not attention.experts.supports_slice_counts
    return {"ffn": ffn, "attention": attention}


def facts_for(layer, *, training, num_tokens, drop_tokens, adaptive=False, slots=2):
    return CallFacts(
        backend=BACKEND,
        eager_torch=EAGER_TORCH,
        training=training,
        num_tokens=num_tokens,
        slots=slots,
        drop_tokens=drop_tokens,
        adaptive_capacity=adaptive,
        expert_parallel=False,
        bank=layer.experts,
        layer=layer,
    )


def expected_auto(bank, *, training, num_tokens, drop_tokens, adaptive=False, slots=2):
    """The documented "auto" row (the table in `dl_moe.dispatch_plans`' docstring)."""
    static = num_tokens is not None
    if drop_tokens and adaptive and training and static:
        return "adaptive_capacity"
    if EAGER_TORCH:
        small = static and num_tokens * slots <= backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS
        if not training and bank == "ffn" and small:
            return "host_slices"
        return "slices"
    if bank == "ffn":
        decode = static and num_tokens * slots <= dispatch_plans.GROUPED_DECODE_ASSIGNMENTS and not training
        if drop_tokens and decode:
            return "grouped"
        if not drop_tokens and not small_block_copies(num_tokens, slots):
            return "grouped"
    return "capacity" if drop_tokens else "blocks"


def small_block_copies(num_tokens, slots, experts=4, d=8, h=16):
    """The blocks plan's weight copies (mlp bank: 2 matrices of d x h per block) within
    4x the rows' activations, for the `banks` fixture's FFN layer."""
    if num_tokens is None:
        return False
    from dl_moe import dispatch

    n = num_tokens * slots
    block = dispatch.dropless_block_size(num_tokens, slots, experts)
    blocks = min(n, (n + experts * (block - 1)) // block)
    return blocks * 2 * d * h <= 4 * n * (d + h)


def test_blocks_run_where_their_weight_copies_are_small_and_grouped_at_real_widths():
    from dl_moe import dispatch

    # d=256, h=512, E=8, k=2, T=4096 (benchmark case a): 52 blocks, copies 3.3x the rows.
    block = dispatch.dropless_block_size(4096, 2, 8)
    blocks = (8192 + 8 * (block - 1)) // block
    assert blocks * 3 * 256 * 512 <= 4 * 8192 * (256 + 512)
    # GPT-OSS-20B widths: copies about 40x the rows.
    block = dispatch.dropless_block_size(4096, 4, 32)
    blocks = (16384 + 32 * (block - 1)) // block
    assert blocks * 3 * 2880 * 2880 > 4 * 16384 * (2880 + 2880)
    # d = h = 1024 with the same E, k and T: copies 12x the rows.
    for widths, want in [((256, 512), "blocks"), ((1024, 1024), "grouped")]:
        layer = dl_moe.create_ffn_moe(
            num_experts=8, hidden_dim=widths[0], intermediate_size=widths[1], ffn_type="swiglu", drop_tokens=False
        )
        layer.build((None, widths[0]))
        facts = facts_for(layer, training=True, num_tokens=4096, drop_tokens=False)
        facts = dataclasses.replace(facts, eager_torch=False)  # the compiled rows
        assert dispatch_plans.choose_plan(facts, "auto").name == want


@pytest.mark.parametrize("bank", ["ffn", "attention"])
@pytest.mark.parametrize("drop_tokens", [True, False], ids=["capacity", "dropless"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("num_tokens", [1, 16, 32, 33, 512, None], ids=lambda t: f"T{t}")
def test_auto_picks_the_documented_row(banks, bank, drop_tokens, training, num_tokens):
    facts = facts_for(banks[bank], training=training, num_tokens=num_tokens, drop_tokens=drop_tokens)
    want = expected_auto(bank, training=training, num_tokens=num_tokens, drop_tokens=drop_tokens)
    assert dispatch_plans.choose_plan(facts, "auto").name == want
    if drop_tokens:
        adaptive = facts_for(
            banks[bank], training=training, num_tokens=num_tokens, drop_tokens=True, adaptive=True
        )
        want = expected_auto(bank, training=training, num_tokens=num_tokens, drop_tokens=True, adaptive=True)
        assert dispatch_plans.choose_plan(adaptive, "auto").name == want


def test_auto_decode_limits_are_the_documented_ones(banks):
    # T*k at the limit runs the decode plan, one token more does not (inference, capacity mode).
    layer = banks["ffn"]
    limit = (
        backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS if EAGER_TORCH else dispatch_plans.GROUPED_DECODE_ASSIGNMENTS
    )
    decode, buffers = ("host_slices", "slices") if EAGER_TORCH else ("grouped", "capacity")
    for slots in (1, 2, 4):
        at_limit = facts_for(layer, training=False, num_tokens=limit // slots, drop_tokens=True, slots=slots)
        above = facts_for(layer, training=False, num_tokens=limit // slots + 1, drop_tokens=True, slots=slots)
        assert dispatch_plans.choose_plan(at_limit).name == decode
        assert dispatch_plans.choose_plan(above).name == buffers


def test_auto_choice_of_a_real_call_follows_the_layer_config():
    x = np.random.default_rng(0).normal(size=(24, 8)).astype("float32")
    layer = randomized_ffn_moe(x, hidden_dim=8, intermediate_size=16, num_experts=4, top_k=2)
    indices = ops.convert_to_tensor(np.asarray(layer.route(x)["indices"]))
    want = "slices" if EAGER_TORCH else "capacity"
    assert token_choice.choose_plan(layer, indices, True).name == want
    facts = dispatch_plans.call_facts(layer, indices, True)
    assert (facts.num_tokens, facts.slots, facts.drop_tokens, facts.eager_torch) == (24, 2, True, EAGER_TORCH)
    assert dispatch_plans.choose_plan(facts, "auto").name == want
    layer.config.dispatch = "grouped"
    assert token_choice.choose_plan(layer, indices, True).name == "grouped"


# ----------------------------------------------------------------- asking by name


def test_an_unknown_plan_name_is_a_value_error_listing_the_names():
    with pytest.raises(ValueError) as error:
        dl_moe.MoEConfig(dispatch="nope")
    message = str(error.value)
    assert "'nope'" in message
    for name in dispatch_plans.plan_names():
        assert repr(name) in message
    with pytest.raises(ValueError, match="nope"):
        dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4, dispatch="nope")
    with pytest.raises(ValueError, match="must be one of"):
        dispatch_plans.choose_plan(facts_for_unknown(), "nope")


def facts_for_unknown():
    layer = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4)
    layer.build((None, 8))
    return facts_for(layer, training=True, num_tokens=8, drop_tokens=True)


UNAVAILABLE = [
    pytest.param(dict(dispatch="blocks"), True, "needs drop_tokens=False", id="blocks_in_capacity_mode"),
    pytest.param(dict(dispatch="capacity", drop_tokens=False), True, "needs drop_tokens=True", id="capacity_dropless"),
    pytest.param(dict(dispatch="adaptive_capacity"), True, "adaptive_capacity=True", id="adaptive_without_it"),
    pytest.param(dict(dispatch="expert_parallel"), True, "expert_parallel=True", id="expert_parallel_without_it"),
    pytest.param(
        dict(dispatch="host_slices"), EAGER_TORCH,
        "inference only" if EAGER_TORCH else "eager PyTorch only", id="host_slices",
    ),
]
if not EAGER_TORCH:
    UNAVAILABLE.append(pytest.param(dict(dispatch="slices"), True, "eager PyTorch only", id="slices"))


@pytest.mark.parametrize("kwargs, training, reason", UNAVAILABLE)
def test_a_named_plan_that_cannot_run_the_call_says_why(kwargs, training, reason):
    x = np.random.default_rng(1).normal(size=(4, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4, **kwargs)
    with pytest.raises(ValueError, match=f"dispatch={kwargs['dispatch']!r} cannot run this call: .*{reason}"):
        layer(x, training=training)


def test_adaptive_capacity_by_name_runs_the_capacity_plan_in_inference():
    x = np.random.default_rng(3).normal(size=(16, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4, adaptive_capacity=True)
    layer(x)
    expected = ops.convert_to_numpy(layer(x, training=False))
    layer.config.dispatch = "adaptive_capacity"
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=False)), expected, rtol=1e-6, atol=1e-6)


def test_grouped_plan_needs_a_bank_that_takes_expert_blocks(banks):
    layer = banks["attention"]
    x = np.random.default_rng(2).normal(size=(2, 5, 8)).astype("float32")
    layer.config.dispatch = "grouped"
    try:
        with pytest.raises(ValueError, match="does not take expert blocks"):
            layer(x, training=False)
    finally:
        layer.config.dispatch = "auto"


# ----------------------------------------------------------------- every plan = the reference

NUM_TOKENS = 24
CASES = {
    "swiglu_k2": dict(num_experts=4, hidden_dim=8, intermediate_size=16, top_k=2, ffn_type="swiglu", use_bias=False),
    "mlp_k1_bias": dict(num_experts=8, hidden_dim=16, intermediate_size=32, top_k=1, ffn_type="mlp", use_bias=True),
}
# C = ceil(factor * 24 * k / E) rounded up to 8: 8 rows in training, where the half of
# the tokens that are nearly the same (on the same k experts) overflow them.
FACTORS = {"train_capacity_factor": 0.5, "eval_capacity_factor": 1.0}


def runnable_plans(drop_tokens, training, top_k):
    """The plans that can run a call of 24 tokens on this backend (the adaptive and
    expert-parallel rows need their own configurations: test_capacity_classes.py,
    test_distribution.py)."""
    plans = ["grouped", "capacity" if drop_tokens else "blocks"]
    if EAGER_TORCH:
        plans.append("slices")
        if not training and NUM_TOKENS * top_k <= backend_fast_paths.MAX_HOST_PLANNED_ASSIGNMENTS:
            plans.append("host_slices")
    return plans


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    """(case name, x [24, d], {"capacity": layer, "dropless": layer}) with random weights."""
    kwargs = CASES[request.param]
    rng = np.random.default_rng(11)
    x = rng.normal(size=(NUM_TOKENS, kwargs["hidden_dim"])).astype("float32")
    x[::2] = x[0] + 1e-3 * rng.normal(size=x[::2].shape)
    layers = {
        "capacity": randomized_ffn_moe(x, seed=3, **kwargs, **FACTORS),
        "dropless": randomized_ffn_moe(x, seed=3, drop_tokens=False, **kwargs),
    }
    return request.param, x, layers


def reference_of(case_name, x, layer, training):
    kwargs = CASES[case_name]
    cap = None
    if layer.config.drop_tokens:
        factor = FACTORS["train_capacity_factor" if training else "eval_capacity_factor"]
        cap = reference.capacity(len(x), kwargs["top_k"], kwargs["num_experts"], factor)
    return reference.token_choice_moe(
        x, reference.weights_of(layer), num_experts=kwargs["num_experts"], top_k=kwargs["top_k"],
        ffn_type=kwargs["ffn_type"], use_bias=kwargs["use_bias"], cap=cap,
    )


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_every_plan_matches_the_reference(case, mode, training):
    case_name, x, layers = case
    layer = layers[mode]
    ref = reference_of(case_name, x, layer, training)
    if mode == "capacity" and training:
        assert not ref["kept"].all()  # the case drops, so every plan must drop the same
    processed = np.array([(ref["kept"] & (ref["indices"] == e)).sum() for e in range(layer.config.num_experts)])
    try:
        for name in runnable_plans(layer.config.drop_tokens, training, CASES[case_name]["top_k"]):
            layer.config.dispatch = name
            layer.reset_routing_stats()
            eager = np.asarray(ops.convert_to_numpy(layer(x, training=training)))
            np.testing.assert_allclose(eager, ref["out"], rtol=1e-4, atol=1e-5, err_msg=f"{name} eager")
            stats = routing_counters(layer)
            np.testing.assert_array_equal(stats["routed_tokens_per_expert"], ref["load"], err_msg=name)
            np.testing.assert_array_equal(stats["processed_tokens_per_expert"], processed, err_msg=name)
            if not EAGER_TORCH:
                compiled = compiled_output(layer, x, training)
                np.testing.assert_allclose(compiled, ref["out"], rtol=1e-4, atol=1e-5, err_msg=f"{name} compiled")
    finally:
        layer.config.dispatch = "auto"


# ----------------------------------------------------------------- the grouped plan's gradient


def eager_gradients(layer, x):
    """Gradients of sum(outputs^2) w.r.t. x and the trainable weights (JAX: jax.grad)."""
    return gradients(lambda t: ops.sum(ops.square(layer(t, training=True))), x, variables=layer.trainable_variables)


def compiled_gradients(layer, x):
    """The same gradients, compiled (jax.jit of jax.grad over stateless_call;
    tf.function(jit_compile=True) of a GradientTape); eager on torch."""
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            return ops.sum(ops.square(layer.stateless_call(trainable, non_trainable, x, training=True)[0]))

        grad_x, grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, [v.value for v in layer.trainable_variables])
        return [np.asarray(grad_x)] + [np.asarray(g) for g in grads]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(tf.square(layer(x, training=True)))
            return tape.gradient(loss, [x] + [v.value for v in layer.trainable_variables])

        return [tf.convert_to_tensor(g).numpy() for g in step(tf.constant(x))]
    return eager_gradients(layer, x)


def assert_gradients_equal(got, want, names):
    assert len(got) == len(want)
    for name, g, w in zip(names, got, want):
        assert g is not None, name
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale, err_msg=name)




# Every gated unit, whose down projection the grouped plan fuses with the unit
# (`grouped_gated_matmul`, hand-written derivatives): biases, an expert scale, and a
# clamp limit that the random projections cross.
GATED_CASES = {
    f"{ffn_type}_bias": dict(
        num_experts=4, hidden_dim=8, intermediate_size=16, top_k=2, ffn_type=ffn_type, use_bias=True,
        use_expert_scale=True, **(dict(glu_limit=0.7) if ffn_type == "clamped_swiglu" else {}),
    )
    for ffn_type in ("geglu", "geglu_tanh", "clamped_swiglu")
}


@pytest.mark.parametrize("case_name", ["swiglu_k2", "mlp_k1_bias", *GATED_CASES])
@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_grouped_gradients_equal_the_buffered_plans(case_name, mode):
    """Dropless: grouped vs blocks. Capacity mode with no drops (factor 4): grouped vs
    capacity. Eager and compiled, to 1e-5 of the largest gradient."""
    kwargs = {**CASES, **GATED_CASES}[case_name]
    x = np.random.default_rng(12).normal(size=(NUM_TOKENS, kwargs["hidden_dim"])).astype("float32")
    extra = dict(drop_tokens=False) if mode == "dropless" else dict(train_capacity_factor=4.0)
    layer = randomized_ffn_moe(x, seed=4, **kwargs, **extra)
    names = ["x"] + [v.path for v in layer.trainable_variables]
    buffered = "blocks" if mode == "dropless" else "capacity"
    try:
        layer.config.dispatch = buffered
        want = eager_gradients(layer, x)
        assert routing_counters(layer)["dropped_tokens"] == 0
        layer.config.dispatch = "grouped"
        assert_gradients_equal(eager_gradients(layer, x), want, names)
        if not EAGER_TORCH:
            assert_gradients_equal(compiled_gradients(layer, x), want, names)
    finally:
        layer.config.dispatch = "auto"


def test_grouped_plan_runs_int8_banks_as_the_blocks_plan_does():
    """An int8 GLU bank with biases (each product divided by its expert's scales, the
    down projection fused with the gated unit): grouped = blocks, eager and compiled."""
    kwargs = dict(GATED_CASES["clamped_swiglu_bias"], drop_tokens=False)
    x = np.random.default_rng(13).normal(size=(NUM_TOKENS, kwargs["hidden_dim"])).astype("float32")
    layer = randomized_ffn_moe(x, seed=5, quantize=True, **kwargs)
    assert str(layer.experts.down_kernel.dtype) == "int8"
    try:
        layer.config.dispatch = "blocks"
        want = np.asarray(ops.convert_to_numpy(layer(x, training=False)))
        layer.config.dispatch = "grouped"
        np.testing.assert_allclose(ops.convert_to_numpy(layer(x, training=False)), want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(compiled_output(layer, x, training=False), want, rtol=1e-5, atol=1e-5)
    finally:
        layer.config.dispatch = "auto"


# ----------------------------------------------------------------- saving


def test_keras_round_trip_keeps_dispatch(tmp_path):
    x = np.random.default_rng(5).normal(size=(6, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4, dispatch="grouped")
    model = keras.Sequential([keras.Input((8,)), layer])
    path = str(tmp_path / "grouped.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[0].config.dispatch == "grouped"
    assert dl_moe.MoEConfig.from_dict(layer.config.to_dict()).dispatch == "grouped"
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x, training=False)), ops.convert_to_numpy(model(x, training=False)), atol=1e-6
    )


def test_old_configs_with_dropless_classes_still_load(tmp_path):
    layer = dl_moe.create_ffn_moe(hidden_dim=8, intermediate_size=16, num_experts=4, drop_tokens=False)
    old = dict(layer.config.to_dict(), dropless_classes=True)
    del old["dispatch"]  # 0.1 files have no dispatch field
    config = dl_moe.MoEConfig.from_dict(old)
    assert config.dispatch == "auto" and not hasattr(config, "dropless_classes")

    # A .keras file whose layer config carries the retired field.
    x = np.random.default_rng(6).normal(size=(6, 8)).astype("float32")
    model = keras.Sequential([keras.Input((8,)), layer])
    want = ops.convert_to_numpy(model(x, training=False))
    path = tmp_path / "new.keras"
    model.save(str(path))
    edited = tmp_path / "old.keras"
    edits = []

    def add_retired_field(node):
        if isinstance(node, dict):
            if "num_experts" in node and "expert_config" in node:
                node["dropless_classes"] = True
                node.pop("dispatch", None)
                edits.append(node)
            for value in node.values():
                add_retired_field(value)
        elif isinstance(node, list):
            for value in node:
                add_retired_field(value)

    with zipfile.ZipFile(path) as source, zipfile.ZipFile(edited, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                tree = json.loads(data)
                add_retired_field(tree)
                data = json.dumps(tree).encode()
            target.writestr(item, data)
    assert len(edits) == 1
    loaded = keras.saving.load_model(str(edited))
    assert loaded.layers[0].config.dispatch == "auto"
    np.testing.assert_allclose(ops.convert_to_numpy(loaded(x, training=False)), want, atol=1e-6)
