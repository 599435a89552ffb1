"""Int8 quantization of MoE layers (`model.quantize("int8")`, `layer.quantize("int8")`).

FFN expert banks store int8 kernels `[E, a, b]` with float32 scales `[E, 1, b]` (one
per expert and output channel); the router stays float. Documented tolerance: the
quantized layer's output is within QUANTIZATION_RTOL relative L2 error of the float
layer's (measured ~0.6% for these shapes; per-channel absmax int8 rounds each weight by
at most half a step, i.e. <= 0.4% of the channel's largest weight).
"""

import os
import warnings

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from benchmarks.quantization import expert_weight_bytes, quantization_report
from tests.layer_checks import BACKEND

QUANTIZATION_RTOL = 0.02


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


def relative_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def moe_model(seq=6, d=16, **overrides):
    params = dict(num_experts=4, hidden_dim=d, intermediate_size=32)
    params.update(overrides)
    inputs = keras.Input((seq, d))
    moe = dl_moe.create_ffn_moe(**params)
    return keras.Model(inputs, moe(inputs)), moe


def inputs_for(seq=6, d=16, batch=8, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, seq, d)).astype("float32")


def quantize_quietly(target, mode="int8"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        target.quantize(mode)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(ffn_type="mlp"),
        dict(ffn_type="swiglu", drop_tokens=False),
        dict(ffn_type="geglu", use_bias=False, output_dim=12),
        dict(ffn_type="swiglu", num_shared_experts=1, gating_type="cosine"),
        dict(gating_type="softmoe"),
        dict(gating_type="expert_choice"),
        dict(hierarchical_routing=True, num_experts=8, top_k=2),
    ],
    ids=["mlp", "swiglu-dropless", "geglu-nobias-outdim", "shared-cosine", "softmoe", "expert_choice", "hierarchical"],
)
def test_model_quantize_int8_layout_and_tolerance(overrides):
    model, moe = moe_model(**overrides)
    x = inputs_for()
    router_before = {v.path: numpy_of(v) for v in moe.gating_network.weights}
    reference = numpy_of(model(x))
    decision_before = moe.route(x) if not moe.is_soft else None

    quantize_quietly(model)

    num_experts = moe.config.num_experts
    banks = [moe.experts] + ([moe.shared_experts] if moe.shared_experts is not None else [])
    for bank in banks:
        assert bank.quantization_mode == "int8"
        names = ["up_kernel", "down_kernel"] + (["gate_kernel"] if bank.ffn_type != "mlp" else [])
        for name in names:
            kernel, scale = getattr(bank, name), getattr(bank, name + "_scale")
            assert keras.backend.standardize_dtype(kernel.dtype) == "int8"
            assert not kernel.trainable
            experts = kernel.shape[0]
            assert tuple(scale.shape) == (experts, 1, kernel.shape[2])
            assert keras.backend.standardize_dtype(scale.dtype) == "float32"
        assert bank.up_kernel.shape[0] == (num_experts if bank is moe.experts else 1)
    # The router is untouched: same float weights, same routing decision.
    for v in moe.gating_network.weights:
        assert keras.backend.standardize_dtype(v.dtype) == "float32"
        np.testing.assert_array_equal(numpy_of(v), router_before[v.path])
    if decision_before is not None:
        decision_after = moe.route(x)
        np.testing.assert_array_equal(decision_after["indices"], decision_before["indices"])

    out = numpy_of(model(x))
    assert out.shape == reference.shape
    assert relative_error(out, reference) < QUANTIZATION_RTOL


def test_quantized_outputs_equal_the_dequantized_float_model():
    # int8 weights / scale, put back into a float layer, give the same outputs.
    model, moe = moe_model(ffn_type="swiglu")
    x = inputs_for()
    quantize_quietly(model)
    quantized = numpy_of(model(x))
    float_model, float_moe = moe_model(ffn_type="swiglu")
    for source, target in zip(moe.gating_network.weights, float_moe.gating_network.weights):
        target.assign(numpy_of(source))
    for name in ("gate", "up", "down"):
        kernel = numpy_of(getattr(moe.experts, name + "_kernel")).astype("float32")
        getattr(float_moe.experts, name + "_kernel").assign(kernel / numpy_of(getattr(moe.experts, name + "_kernel_scale")))
        getattr(float_moe.experts, name + "_bias").assign(numpy_of(getattr(moe.experts, name + "_bias")))
    np.testing.assert_allclose(numpy_of(float_model(x)), quantized, rtol=1e-5, atol=1e-5)


def test_layer_quantize_on_the_moe_layer():
    model, moe = moe_model(num_shared_experts=1)
    x = inputs_for()
    reference = numpy_of(model(x))
    moe.quantize("int8")
    assert moe.experts.quantization_mode == "int8"
    assert moe.shared_experts.quantization_mode == "int8"
    assert relative_error(numpy_of(model(x)), reference) < QUANTIZATION_RTOL
    with pytest.raises(ValueError, match="already quantized"):
        moe.quantize("int8")


@pytest.mark.parametrize("overrides", [dict(ffn_type="swiglu", num_shared_experts=1), dict(drop_tokens=False)])
def test_quantized_model_round_trips_through_keras_file(overrides, tmp_path):
    model, _ = moe_model(**overrides)
    x = inputs_for()
    quantize_quietly(model)
    expected = numpy_of(model.predict(x, verbose=0))
    path = os.path.join(tmp_path, "quantized.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    restored_moe = [layer for layer in restored.layers if isinstance(layer, dl_moe.MixtureOfExperts)][0]
    assert restored_moe.experts.quantization_mode == "int8"
    assert keras.backend.standardize_dtype(restored_moe.experts.up_kernel.dtype) == "int8"
    np.testing.assert_allclose(numpy_of(restored.predict(x, verbose=0)), expected, rtol=1e-6, atol=1e-6)


def test_quantized_sequential_model_round_trips(tmp_path):
    model = keras.Sequential(
        [keras.Input((5, 8)), dl_moe.create_ffn_moe(4, 8, intermediate_size=16), keras.layers.Dense(2)]
    )
    x = inputs_for(seq=5, d=8)
    quantize_quietly(model)
    path = os.path.join(tmp_path, "sequential.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(numpy_of(restored(x)), numpy_of(model(x)), rtol=1e-6, atol=1e-6)


def test_float_weights_do_not_load_into_a_quantized_bank(tmp_path):
    model, _ = moe_model()
    path = os.path.join(tmp_path, "float.weights.h5")
    model.save_weights(path)
    quantized, _ = moe_model()
    quantize_quietly(quantized)
    with pytest.raises(ValueError, match="quantization_mode='int8'"):
        quantized.load_weights(path)


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_unsupported_modes_are_clear_errors(mode):
    model, moe = moe_model()
    with pytest.raises(NotImplementedError, match="'int8' only"):
        moe.quantize(mode)
    assert moe.experts.quantization_mode is None
    # model.quantize turns a layer's NotImplementedError into a warning (Keras's rule)
    # and leaves that layer in float.
    with pytest.warns(UserWarning, match="'int8' only"):
        model.quantize(mode)
    assert moe.experts.quantization_mode is None


def test_quantize_an_unbuilt_layer_is_an_error():
    moe = dl_moe.create_ffn_moe(4, 8)
    with pytest.raises(ValueError, match="isn't yet built"):
        moe.quantize("int8")


def test_quantized_model_still_trains():
    # Biases, the router and the head stay trainable after quantization.
    inputs = keras.Input((6, 16))
    moe = dl_moe.create_ffn_moe(4, 16, intermediate_size=32, ffn_type="swiglu")
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(moe(inputs))))
    quantize_quietly(model)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    kernel_before = numpy_of(moe.experts.up_kernel)
    x, y = inputs_for(), np.random.default_rng(1).integers(0, 3, 8)
    losses = model.fit(x, y, epochs=3, batch_size=8, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    np.testing.assert_array_equal(numpy_of(moe.experts.up_kernel), kernel_before)


def test_quantize_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model, moe = moe_model(ffn_type="swiglu")
    x = inputs_for()
    reference = numpy_of(ops.cast(model(x), "float32"))
    quantize_quietly(model)
    assert moe.experts.dtype_policy.name == "int8_from_mixed_bfloat16"
    out = model(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert relative_error(numpy_of(ops.cast(out, "float32")), reference) < 0.05


def test_expert_dropout_still_applies_in_training_only():
    moe = dl_moe.create_ffn_moe(4, 8, intermediate_size=64, dropout_rate=0.5, drop_tokens=False)
    x = inputs_for(d=8)
    np.testing.assert_array_equal(numpy_of(moe(x)), numpy_of(moe(x)))
    assert np.abs(numpy_of(moe(x, training=True)) - numpy_of(moe(x))).max() > 1e-3


def test_memory_report():
    model, moe = moe_model(ffn_type="swiglu", num_experts=4, d=16)
    before = expert_weight_bytes(moe)
    quantize_quietly(model)
    after = expert_weight_bytes(moe)
    # Kernels shrink 4x exactly; scales and float biases are the small remainder.
    assert after["kernels"] * 4 == before["kernels"]
    assert after["experts"] < 0.4 * before["experts"]
    report = quantization_report(num_experts=4, hidden_dim=32, intermediate_size=64, tokens=64)
    assert report["saved_bytes"] == report["float_bytes"] - report["int8_bytes"] > 0
    assert report["relative_error"] < QUANTIZATION_RTOL
