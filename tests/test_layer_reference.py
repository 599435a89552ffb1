"""The layer's outputs, losses and statistics against the numpy reference.

The reference is backend-independent, so agreement here on each of the three
backends is also the cross-backend agreement check (same weights, same inputs,
within 1e-5).
"""

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from tests import reference

ATOL = 1e-5


def make_layer(input_shape, **overrides):
    params = dict(num_experts=4, hidden_dim=8, top_k=2, intermediate_size=12)
    params.update(overrides)
    layer = dl_moe.create_ffn_moe(**params)
    layer.build(input_shape)
    return layer


def randomize(layer, seed=0, scale=0.5):
    """Gives every weight (biases too) random values so each term matters."""
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("ffn_type", ["mlp", "swiglu", "geglu"])
@pytest.mark.parametrize("normalize", [False, True])
def test_dropless_matches_reference(ffn_type, normalize):
    x = np.random.default_rng(1).normal(size=(3, 7, 8)).astype("float32")
    layer = make_layer(x.shape, ffn_type=ffn_type, normalize_top_k=normalize, drop_tokens=False)
    randomize(layer)
    out = numpy_of(layer(x))
    ref = reference.token_choice_moe(
        x.reshape(-1, 8), reference.weights_of(layer), num_experts=4, top_k=2, ffn_type=ffn_type, normalize=normalize
    )
    np.testing.assert_allclose(out.reshape(-1, 8), ref["out"], atol=ATOL, rtol=1e-5)


def test_dropless_with_output_dim_and_no_bias_matches_reference():
    x = np.random.default_rng(2).normal(size=(20, 8)).astype("float32")
    layer = make_layer(x.shape, drop_tokens=False, output_dim=5, use_bias=False, activation="relu", top_k=3)
    randomize(layer)
    out = numpy_of(layer(x))
    assert out.shape == (20, 5)
    ref = reference.token_choice_moe(
        x, reference.weights_of(layer), num_experts=4, top_k=3, activation="relu", use_bias=False
    )
    np.testing.assert_allclose(out, ref["out"], atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("block", [None, 8, 16])
def test_dropless_result_does_not_depend_on_block_size(block):
    x = np.random.default_rng(3).normal(size=(50, 8)).astype("float32")
    layer = make_layer(x.shape, drop_tokens=False, dropless_block_size=block, num_experts=6, top_k=2)
    randomize(layer)
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=6, top_k=2)
    np.testing.assert_allclose(numpy_of(layer(x)), ref["out"], atol=ATOL, rtol=1e-5)
    assert layer.get_routing_stats()["dropped_fraction"] == 0.0


@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_mode_drops_by_documented_priority(factor, top_k):
    # 64 tokens, 4 experts: C = ceil(factor * 64 * k / 4) rounded up to 8.
    x = np.random.default_rng(4).normal(size=(64, 8)).astype("float32")
    layer = make_layer(x.shape, top_k=top_k, eval_capacity_factor=factor)
    randomize(layer, scale=1.0)
    cap = reference.capacity(64, top_k, 4, factor)
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=4, top_k=top_k, cap=cap)
    out = numpy_of(layer(x, training=False))
    np.testing.assert_allclose(out, ref["out"], atol=ATOL, rtol=1e-5)
    stats = layer.get_routing_stats()
    routed = ref["load"].sum()
    np.testing.assert_allclose(stats["dropped_fraction"], 1 - ref["kept"].sum() / routed, atol=1e-7)
    np.testing.assert_allclose(stats["dropped_token_fraction"], ref["fully_dropped"].mean(), atol=1e-7)
    np.testing.assert_allclose(stats["expert_fraction"], ref["load"] / routed, atol=1e-7)


def test_train_and_eval_capacity_factors_are_used():
    x = np.random.default_rng(5).normal(size=(64, 8)).astype("float32")
    layer = make_layer(x.shape, top_k=1, train_capacity_factor=0.25, eval_capacity_factor=4.0, aux_loss_weight=0.0)
    randomize(layer, scale=1.0)
    w = reference.weights_of(layer)
    for training, factor in ((True, 0.25), (False, 4.0)):
        ref = reference.token_choice_moe(x, w, num_experts=4, top_k=1, cap=reference.capacity(64, 1, 4, factor))
        np.testing.assert_allclose(numpy_of(layer(x, training=training)), ref["out"], atol=ATOL, rtol=1e-5)


def test_gating_capacity_factor_overrides_both_phases():
    config = dl_moe.MoEConfig(
        num_experts=4,
        expert_config=dl_moe.ExpertConfig(hidden_dim=8),
        gating_config=dl_moe.GatingConfig(top_k=1, capacity_factor=1.0),
        train_capacity_factor=3.0,
        eval_capacity_factor=3.0,
    )
    assert config.capacity_factor(True) == config.capacity_factor(False) == 1.0
    # ... and through the outputs: both phases drop what C = capacity(T, 1, E, 1.0) drops.
    x = np.random.default_rng(5).normal(size=(64, 8)).astype("float32")
    layer = dl_moe.MixtureOfExperts(config)
    layer.build(x.shape)
    randomize(layer, seed=3, scale=1.0)
    w = reference.weights_of(layer)
    ref = reference.token_choice_moe(x, w, num_experts=4, top_k=1, cap=reference.capacity(64, 1, 4, 1.0))
    loose = reference.token_choice_moe(x, w, num_experts=4, top_k=1, cap=reference.capacity(64, 1, 4, 3.0))
    assert ref["fully_dropped"].any() and not loose["fully_dropped"].any()
    for training in (True, False):
        np.testing.assert_allclose(numpy_of(layer(x, training=training)), ref["out"], atol=ATOL, rtol=1e-5)


def test_all_tokens_to_one_expert_drops_exactly_the_overflow():
    # Feature 0 is large and only expert 2 listens to it: every token picks expert 2.
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 8)).astype("float32")
    x[:, 0] = 20.0
    layer = make_layer(x.shape, top_k=1, eval_capacity_factor=1.0)
    randomize(layer)
    kernel = np.zeros((8, 4), "float32")
    kernel[0, 2] = 1.0
    layer.gating_network.router_kernel.assign(kernel)
    out = numpy_of(layer(x, training=False))
    cap = reference.capacity(40, 1, 4, 1.0)  # 16
    assert cap == 16
    w = reference.weights_of(layer)
    prob = reference.softmax(x @ kernel)[:, 2]
    expected_kept = prob[:cap, None] * reference.ffn_expert(w, 2, x[:cap], "mlp")
    np.testing.assert_allclose(out[:cap], expected_kept, atol=ATOL, rtol=1e-5)
    np.testing.assert_array_equal(out[cap:], x[cap:])  # passed through unchanged
    stats = layer.get_routing_stats()
    assert stats["dropped_fraction"] == pytest.approx(24 / 40)
    np.testing.assert_allclose(stats["expert_fraction"], [0, 0, 1, 0])


def test_dropped_tokens_output_zero_without_residual():
    x = np.random.default_rng(7).normal(size=(40, 8)).astype("float32")
    x[:, 0] = 20.0
    layer = make_layer(x.shape, top_k=1, eval_capacity_factor=1.0, use_residual_connection=False)
    kernel = np.zeros((8, 4), "float32")
    kernel[0, 1] = 1.0
    layer.gating_network.router_kernel.assign(kernel)
    out = numpy_of(layer(x, training=False))
    np.testing.assert_array_equal(out[16:], 0.0)
    assert np.abs(out[:16]).sum() > 0


def test_cosine_router_matches_reference():
    x = np.random.default_rng(8).normal(size=(30, 8)).astype("float32")
    layer = make_layer(x.shape, gating_type="cosine", drop_tokens=False, embedding_dim=6)
    randomize(layer)
    layer.gating_network.log_logit_scale.assign(np.log(20.0))
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=4, top_k=2, gating="cosine")
    np.testing.assert_allclose(numpy_of(layer(x)), ref["out"], atol=ATOL, rtol=1e-5)


def test_cosine_logit_scale_is_clamped_at_100():
    x = np.random.default_rng(9).normal(size=(10, 8)).astype("float32")
    layer = make_layer(x.shape, gating_type="cosine")
    layer.gating_network.log_logit_scale.assign(np.log(1e4))
    _, _, info = layer.gating_network(x)
    logits = numpy_of(info["gate_logits"])
    assert np.abs(logits).max() <= 100.0 + 1e-4
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=4, top_k=2, gating="cosine")
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-3)


def test_linear_temperature_divides_logits():
    x = np.random.default_rng(10).normal(size=(10, 8)).astype("float32")
    layer = make_layer(x.shape, temperature=2.5)
    randomize(layer)
    _, _, info = layer.gating_network(x)
    np.testing.assert_allclose(
        numpy_of(info["gate_logits"]), x @ reference.weights_of(layer)["router_kernel"] / 2.5, atol=1e-5
    )


@pytest.mark.parametrize("with_mask", [False, True])
def test_soft_moe_matches_reference(with_mask):
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool) if with_mask else None
    layer = make_layer(x.shape, gating_type="softmoe", num_slots=2)
    randomize(layer)
    out = numpy_of(layer(x, mask=mask))
    ref = reference.soft_moe(x, reference.weights_of(layer), num_experts=4, num_slots=2, mask=mask)
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)


def test_soft_moe_default_slots_and_2d_inputs():
    x = np.random.default_rng(12).normal(size=(10, 8)).astype("float32")
    layer = make_layer((None, 9, 8), gating_type="softmoe")
    assert layer.gating_network.num_slots == 3  # ceil(9 / 4)
    layer2 = make_layer(x.shape, gating_type="softmoe", num_slots=2)
    randomize(layer2)
    out = numpy_of(layer2(x))
    ref = reference.soft_moe(x[None], reference.weights_of(layer2), num_experts=4, num_slots=2)[0]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------- masking


def test_masked_tokens_take_no_capacity_and_output_zeros():
    rng = np.random.default_rng(13)
    x = rng.normal(size=(1, 40, 8)).astype("float32")
    x[..., 0] = 20.0  # everyone wants expert 3
    mask = np.zeros((1, 40), bool)
    mask[0, 20:] = True  # the first 20 tokens are padding
    layer = make_layer(x.shape, top_k=1, eval_capacity_factor=1.0)
    kernel = np.zeros((8, 4), "float32")
    kernel[0, 3] = 1.0
    layer.gating_network.router_kernel.assign(kernel)
    out = numpy_of(layer(x, mask=mask, training=False))[0]
    ref = reference.token_choice_moe(
        x[0], reference.weights_of(layer), num_experts=4, top_k=1, cap=16, mask=mask[0]
    )
    np.testing.assert_allclose(out, ref["out"], atol=ATOL, rtol=1e-5)
    np.testing.assert_array_equal(out[:20], 0.0)
    # Real tokens 20..35 got the 16 slots; padding would have taken them otherwise.
    assert np.abs(out[20:36] - x[0, 20:36]).max() > 1e-3
    np.testing.assert_array_equal(out[36:], x[0, 36:])
    assert layer.get_routing_stats()["tokens"] == 20


def test_padding_does_not_change_real_tokens_in_dropless_mode():
    rng = np.random.default_rng(14)
    real = rng.normal(size=(1, 9, 8)).astype("float32")
    padded = np.concatenate([real, rng.normal(size=(1, 5, 8)).astype("float32")], axis=1)
    mask = np.array([[True] * 9 + [False] * 5])
    layer = make_layer(padded.shape, drop_tokens=False)
    randomize(layer)
    out_real = numpy_of(layer(real))
    out_padded = numpy_of(layer(padded, mask=mask))
    np.testing.assert_allclose(out_padded[:, :9], out_real, atol=1e-6)
    np.testing.assert_array_equal(out_padded[:, 9:], 0.0)


def test_embedding_mask_zero_reaches_the_layer():
    tokens = np.array([[3, 5, 2, 0, 0], [1, 2, 3, 4, 5]])
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    moe = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8, intermediate_size=8, drop_tokens=False)
    out = numpy_of(moe(embedding(tokens)))
    np.testing.assert_array_equal(out[0, 3:], 0.0)
    assert np.abs(out[0, :3]).min() > 0
    assert moe.get_routing_stats()["tokens"] == 8
    assert moe.compute_mask(None, mask=embedding.compute_mask(tokens)) is not None


# ----------------------------------------------------------------- losses


@pytest.mark.parametrize("with_mask", [False, True])
def test_losses_match_reference_and_only_exist_in_training(with_mask):
    rng = np.random.default_rng(15)
    x = rng.normal(size=(2, 10, 8)).astype("float32")
    mask = np.ones((2, 10), bool)
    if with_mask:
        mask[1, 6:] = False
    layer = make_layer(x.shape, drop_tokens=False, aux_loss_weight=0.3, z_loss_weight=0.05)
    randomize(layer)
    layer(x, training=False, mask=mask)
    assert layer.losses == []
    layer(x, training=True, mask=mask)
    assert len(layer.losses) == 2
    flat_mask = mask.reshape(-1)
    ref = reference.token_choice_moe(x.reshape(-1, 8), reference.weights_of(layer), num_experts=4, top_k=2, mask=flat_mask)
    aux = reference.switch_aux_loss(ref["probs"], ref["load"], flat_mask)
    z = reference.z_loss(ref["logits"], flat_mask)
    got = sorted(float(numpy_of(v)) for v in layer.losses)
    np.testing.assert_allclose(got, sorted([0.3 * aux, 0.05 * z]), rtol=1e-5)
    stats = layer.get_routing_stats()
    np.testing.assert_allclose([stats["aux_loss"], stats["z_loss"]], [aux, z], rtol=1e-5)


def test_balanced_router_scores_one_for_any_k():
    from dl_moe.losses import load_balancing_loss

    for k in (1, 2, 4):
        probs = np.full((16, 8), 1 / 8, "float32")
        loss = load_balancing_loss(ops.convert_to_tensor(probs), ops.convert_to_tensor(np.full(8, 16 * k / 8)))
        assert float(numpy_of(loss)) == pytest.approx(1.0)


def test_zero_loss_weights_register_no_loss():
    x = np.random.default_rng(16).normal(size=(10, 8)).astype("float32")
    layer = make_layer(x.shape, aux_loss_weight=0.0, z_loss_weight=0.0)
    layer(x, training=True)
    assert layer.losses == []


# ------------------------------------------------------------- statistics


def test_statistics_accumulate_and_reset():
    x = np.random.default_rng(17).normal(size=(12, 8)).astype("float32")
    layer = make_layer(x.shape, drop_tokens=False)
    assert layer.get_expert_utilization().sum() == 0
    layer(x)
    layer(x)
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=4, top_k=2)
    np.testing.assert_allclose(layer.get_expert_utilization(), ref["load"] / ref["load"].sum(), atol=1e-7)
    stats = layer.get_routing_stats()
    assert stats["tokens"] == 24
    assert stats["avg_experts_per_token"] == pytest.approx(2.0)
    load = ref["load"].astype(float)
    assert stats["load_cv"] == pytest.approx(load.std() / load.mean())
    layer.reset_routing_stats()
    assert layer.get_routing_stats()["tokens"] == 0
    np.testing.assert_array_equal(layer.get_expert_utilization(), 0.0)


def test_statistics_are_updated_inside_compiled_fit():
    x = np.random.default_rng(18).normal(size=(32, 5, 8)).astype("float32")
    y = np.zeros((32,), "int32")
    moe = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8, intermediate_size=8)
    model = keras.Sequential([keras.Input((5, 8)), moe, keras.layers.Flatten(), keras.layers.Dense(2)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=keras.backend.backend() != "torch")
    model.fit(x, y, epochs=2, batch_size=10, verbose=0)  # includes a partial batch
    assert moe.get_routing_stats()["tokens"] == 2 * 32 * 5
    assert moe.get_expert_utilization().sum() == pytest.approx(1.0)


# ------------------------------------------------------------------ noise


def test_noise_only_in_training():
    x = np.random.default_rng(19).normal(size=(16, 8)).astype("float32")
    layer = make_layer(x.shape, add_noise=True, noise_std=1.0, jitter_noise=0.2, drop_tokens=False)
    randomize(layer)
    eval_a, eval_b = numpy_of(layer(x)), numpy_of(layer(x))
    np.testing.assert_array_equal(eval_a, eval_b)
    # Outside training the layer is the noise-free router's MoE.
    ref = reference.token_choice_moe(x, reference.weights_of(layer), num_experts=4, top_k=2)
    np.testing.assert_allclose(eval_a, ref["out"], atol=ATOL, rtol=1e-5)
    train_a, train_b = numpy_of(layer(x, training=True)), numpy_of(layer(x, training=True))
    assert np.abs(train_a - train_b).max() > 1e-4
    assert "noise_kernel" in reference.weights_of(layer)


# --------------------------------------------------------------- dtypes


def test_mixed_precision_keeps_router_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x = np.random.default_rng(20).normal(size=(4, 6, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8, intermediate_size=8)
    out = layer(x, training=True)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert layer.gating_network.compute_dtype == "float32"
    _, _, info = layer.gating_network(x)
    assert keras.backend.standardize_dtype(info["raw_gate_probs"].dtype) == "float32"
    assert all(keras.backend.standardize_dtype(loss.dtype) == "float32" for loss in layer.losses)
    assert np.all(np.isfinite(numpy_of(ops.cast(out, "float32"))))


def test_routing_dtype_is_honoured():
    x = np.random.default_rng(21).normal(size=(6, 8)).astype("float32")
    layer = make_layer(x.shape, routing_dtype="bfloat16")
    assert layer.gating_network.compute_dtype == "bfloat16"
    _, _, info = layer.gating_network(x)
    assert keras.backend.standardize_dtype(info["raw_gate_probs"].dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer(x).dtype) == "float32"


# ------------------------------------------------------------- errors


def test_wrong_last_dimension_is_a_clear_error():
    layer = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8)
    with pytest.raises(ValueError, match=r"hidden_dim=8.*\(2, 5\)"):
        layer(np.zeros((2, 5), "float32"))


def test_rank_one_input_is_a_clear_error():
    layer = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8)
    with pytest.raises(ValueError, match="rank >= 2"):
        layer.build((8,))
