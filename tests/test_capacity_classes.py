"""Capacity classes (adaptive capacity) and the dropless plans under skewed loads.

The references are numpy (`tests.reference`): an adaptive-capacity layer must equal
the reference with the capacity of the class its load statistic picks (the factor is
written in the test, not read from the code), and the two dropless plans, `grouped`
(`dl_moe.grouped_matmul`, a hand-written gradient) and `blocks` (gathered weights,
autodiff), must equal the reference with no capacity, and each other's gradients,
eager and compiled, with balanced loads and with every token on two experts (six
idle experts the grouped loops skip).

The dropless plans are asked for by name (`dispatch=`), so they run on all three
backends, eager PyTorch included; "auto" runs adaptive capacity on all three.
"""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import capacity_classes
from dl_moe.forward import token_choice
from tests import reference
from tests.autodiff import gradients
from tests.layer_checks import BACKEND, compiled_output, randomized_ffn_moe, routing_counters

D, H, E, K = 8, 12, 4, 2


def randomized_layer(x, **kwargs):
    kwargs = {"num_experts": E, "top_k": K, "ffn_type": "swiglu", "use_bias": False, **kwargs}
    return randomized_ffn_moe(x, hidden_dim=D, intermediate_size=H, **kwargs)


def test_class_capacities_by_hand():
    # T=64, k=2, E=8: mean load 16. Factors 1, 1.25, 1.5, 2 give 16, ceil(20) -> 24,
    # 24 (the same C as 1.25, so dropped), 32 rows.
    capacities, factors = capacity_classes.class_capacities(64, 2, 8, (1.0, 1.25, 1.5, 2.0))
    assert capacities == [16, 24, 32]
    assert factors == [1.0, 1.25, 2.0]
    # T=4: every factor rounds to 8 rows (and no capacity exceeds T rounded up to 8).
    assert capacity_classes.class_capacities(4, 2, 8, (1.0, 2.0)) == ([8], [1.0])


def test_adaptive_factors_and_class_of_factor():
    assert capacity_classes.adaptive_factors(1.1, 2.5) == [1.1, 1.25, 1.5, 2.0, 2.5]
    factors = [1.0, 1.25, 2.0]
    for load_factor, expected in [(0.5, 0), (1.0, 0), (1.01, 1), (1.25, 1), (1.9, 2), (7.0, 2)]:
        assert int(ops.convert_to_numpy(capacity_classes.class_of_factor(load_factor, factors))) == expected


def skewed_tokens(num_tokens, seed=0):
    """Every token nearly the same: the router sends all of them to the same k experts."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(1, D))
    return (base + 1e-3 * rng.normal(size=(num_tokens, D))).astype("float32")


def compiled_training_gradients(layer, x):
    """Gradients of sum(outputs^2) w.r.t. the trainable weights, compiled (jax.jit,
    tf.function(jit_compile=True)); eager on torch."""
    if BACKEND == "jax":
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def loss(trainable, x):
            return ops.sum(ops.square(layer.stateless_call(trainable, non_trainable, x, training=True)[0]))

        grads = jax.jit(jax.grad(loss))([v.value for v in layer.trainable_variables], x)
        return [np.asarray(g) for g in grads]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(layer(x, training=True)))
            return tape.gradient(loss, [v.value for v in layer.trainable_variables])

        return [tf.convert_to_tensor(g).numpy() for g in step(x)]
    return eager_training_gradients(layer, x)


def eager_training_gradients(layer, x):
    """Gradients of sum(outputs^2) w.r.t. the trainable weights, op by op (JAX: jax.grad)."""
    loss = lambda inputs: ops.sum(ops.square(layer(inputs, training=True)))  # noqa: E731
    return gradients(loss, x, variables=layer.trainable_variables)[1:]


DROPLESS_PLANS = ("grouped", "blocks")


@pytest.fixture(scope="module", params=[False, True], ids=["balanced", "all_on_two_experts"])
def dropless_case(request):
    """40 tokens on 8 experts, dropless: one layer per plan, the same weights, and the
    numpy reference. Skewed: every token on the same two experts (loads 40, 40, 0...)."""
    num_tokens, num_experts = 40, 8
    x = skewed_tokens(num_tokens) if request.param else np.random.default_rng(8).normal(size=(num_tokens, D))
    x = x.astype("float32")
    layers = {
        name: randomized_layer(x, num_experts=num_experts, drop_tokens=False, dispatch=name) for name in DROPLESS_PLANS
    }
    ref = reference.token_choice_moe(
        x, reference.weights_of(layers["blocks"]), num_experts=num_experts, top_k=K, ffn_type="swiglu", use_bias=False,
    )
    if request.param:
        assert sorted(ref["load"])[-2:] == [num_tokens, num_tokens] and (ref["load"] == 0).sum() == num_experts - 2
    return x, layers, ref


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
def test_grouped_and_block_plans_match_the_reference(dropless_case, training):
    x, layers, ref = dropless_case
    for name, layer in layers.items():
        indices = ops.convert_to_tensor(np.asarray(layer.route(x)["indices"]))
        assert token_choice.choose_plan(layer, indices, training).name == name
        layer.reset_routing_stats()
        out = np.asarray(ops.convert_to_numpy(layer(x, training=training)))
        np.testing.assert_allclose(out, ref["out"], rtol=1e-4, atol=1e-5, err_msg=name)
        stats = routing_counters(layer)
        np.testing.assert_array_equal(stats["processed_tokens_per_expert"], ref["load"], err_msg=name)
        np.testing.assert_array_equal(stats["routed_tokens_per_expert"], ref["load"], err_msg=name)
        assert stats["dropped_tokens"] == 0
        np.testing.assert_allclose(compiled_output(layer, x, training), ref["out"], rtol=1e-4, atol=1e-5, err_msg=name)


def test_grouped_plan_gradients_equal_the_block_plan(dropless_case):
    """Eager and compiled: the grouped plan's hand-written gradient equals autodiff
    through the block plan's gathers."""
    x, layers, _ = dropless_case
    want = eager_training_gradients(layers["blocks"], x)
    names = [v.path for v in layers["blocks"].trainable_variables]
    for got in (
        eager_training_gradients(layers["grouped"], x),
        compiled_training_gradients(layers["grouped"], x),
        compiled_training_gradients(layers["blocks"], x),
    ):
        assert len(got) == len(want)
        for name, g, w in zip(names, got, want):
            assert g is not None and np.abs(w).max() > 0, name
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.mark.parametrize("num_tokens", [8, 40])
@pytest.mark.parametrize("skewed", [False, True], ids=["balanced", "all_on_two_experts"])
def test_default_dropless_inference_compiled_matches_the_reference(num_tokens, skewed):
    rng = np.random.default_rng(num_tokens)
    x = skewed_tokens(num_tokens, seed=2) if skewed else rng.normal(size=(num_tokens, D)).astype("float32")
    layer = randomized_layer(x, num_experts=8, drop_tokens=False)
    ref = reference.token_choice_moe(
        x, reference.weights_of(layer), num_experts=8, top_k=K, ffn_type="swiglu", use_bias=False,
    )
    np.testing.assert_allclose(compiled_output(layer, x, training=False), ref["out"], rtol=1e-4, atol=1e-5)


def adaptive_layer(x, **kwargs):
    return randomized_layer(
        x, adaptive_capacity=True, min_capacity_factor=1.0, max_capacity_factor=2.0, capacity_decay=0.5, **kwargs
    )


def adaptive_training_call(layer, x):
    """`layer(x, training=True)`, which "auto" runs with the adaptive-capacity plan on
    every backend (its row precedes eager PyTorch's slices)."""
    indices = ops.convert_to_tensor(np.asarray(layer.route(x, training=True)["indices"]))
    assert token_choice.choose_plan(layer, indices, True).name == "adaptive_capacity"
    return layer(x, training=True)


@pytest.mark.parametrize("load_factor, class_factor", [(0.7, 1.0), (1.1, 1.25), (1.6, 2.0), (9.0, 2.0)])
def test_adaptive_capacity_runs_the_class_of_its_load_statistic(load_factor, class_factor):
    num_tokens = 48
    x = np.random.default_rng(4).normal(size=(num_tokens, D)).astype("float32")
    layer = adaptive_layer(x)
    layer.capacity_load_factor.assign(load_factor)
    out = np.asarray(ops.convert_to_numpy(adaptive_training_call(layer, x)))

    cap = reference.capacity(num_tokens, K, E, class_factor)
    ref = reference.token_choice_moe(
        x, reference.weights_of(layer), num_experts=E, top_k=K, ffn_type="swiglu", use_bias=False, cap=cap,
    )
    np.testing.assert_allclose(out, ref["out"], rtol=1e-4, atol=1e-5)
    stats = routing_counters(layer)
    np.testing.assert_array_equal(stats["processed_tokens_per_expert"], np.minimum(ref["load"], cap))
    np.testing.assert_array_equal(stats["routed_tokens_per_expert"], ref["load"])

    # The statistic moves halfway (capacity_decay=0.5) to this batch's max load / mean load.
    measured = ref["load"].max() / ref["load"].mean()
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.capacity_load_factor)), 0.5 * load_factor + 0.5 * measured, rtol=1e-6
    )


def test_adaptive_capacity_only_in_training_and_state_survives_reset_and_save(tmp_path):
    x = np.random.default_rng(5).normal(size=(32, D)).astype("float32")
    layer = adaptive_layer(x)
    assert float(ops.convert_to_numpy(layer.capacity_load_factor)) == 2.0  # starts at max_capacity_factor
    layer(x, training=False)
    assert float(ops.convert_to_numpy(layer.capacity_load_factor)) == 2.0  # inference leaves it alone
    adaptive_training_call(layer, x)
    moved = float(ops.convert_to_numpy(layer.capacity_load_factor))
    assert moved != 2.0
    assert layer.get_routing_stats()["capacity_load_factor"] == pytest.approx(moved)
    layer.reset_routing_stats()
    assert float(ops.convert_to_numpy(layer.capacity_load_factor)) == moved

    model = keras.Sequential([keras.Input((D,)), layer])
    path = str(tmp_path / "adaptive.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert float(ops.convert_to_numpy(loaded.layers[0].capacity_load_factor)) == pytest.approx(moved)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x, training=False)), ops.convert_to_numpy(model(x, training=False)), atol=1e-6
    )


def test_adaptive_capacity_follows_a_skewed_router_and_drops_less():
    """Training on a skewed batch: the statistic rises toward its load, the class with it,
    and the dropped share falls below that of a fixed factor of 1."""
    x = skewed_tokens(32, seed=6)
    x[::2] = np.random.default_rng(7).normal(size=(16, D))  # half the tokens spread out
    layer = randomized_layer(
        x, adaptive_capacity=True, min_capacity_factor=1.0, max_capacity_factor=4.0, capacity_decay=0.5
    )
    fixed = randomized_layer(x, train_capacity_factor=1.0, dispatch="capacity")
    layer.capacity_load_factor.assign(1.0)
    for _ in range(6):
        adaptive_training_call(layer, x)
    fixed(x, training=True)
    load = routing_counters(layer)["routed_tokens_per_expert"]
    measured = load.max() / load.mean()  # six identical calls: the same load each time
    np.testing.assert_allclose(
        float(ops.convert_to_numpy(layer.capacity_load_factor)), measured + (1.0 - measured) * 0.5**6, rtol=1e-5
    )
    assert layer.get_routing_stats()["dropped_fraction"] < fixed.get_routing_stats()["dropped_fraction"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adaptive_capacity=True, drop_tokens=False), "adaptive_capacity=True needs drop_tokens=True"),
        (dict(adaptive_capacity=True, overflow="reroute"), "adaptive_capacity=True needs overflow='drop'"),
        (dict(adaptive_capacity=True, min_capacity_factor=2.5), "min_capacity_factor must be <= max_capacity_factor"),
        (dict(max_capacity_factor=3.0), "max_capacity_factor is only used with adaptive_capacity=True"),
        (dict(capacity_decay=0.5), "capacity_decay is only used with adaptive_capacity=True"),
        (dict(adaptive_capacity=True, capacity_decay=1.0), "capacity_decay"),
    ],
)
def test_adaptive_capacity_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dl_moe.create_ffn_moe(hidden_dim=D, intermediate_size=H, num_experts=E, **kwargs)
