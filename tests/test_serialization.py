import os

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe


@pytest.mark.parametrize("gating_type", ["linear", "cosine", "softmoe"])
def test_sequential_model_round_trips_through_keras_file(gating_type, tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6, 8)),
            dl_moe.create_ffn_moe(
                num_experts=4, hidden_dim=8, intermediate_size=16, gating_type=gating_type,
                ffn_type="swiglu", add_noise=gating_type == "linear",
            ),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )
    x = np.random.default_rng(0).normal(size=(5, 6, 8)).astype("float32")
    expected = ops.convert_to_numpy(model.predict(x, verbose=0))
    path = os.path.join(tmp_path, "seq.keras")
    model.save(path)
    restored = keras.models.load_model(path)  # safe mode, no custom_objects
    np.testing.assert_array_equal(ops.convert_to_numpy(restored.predict(x, verbose=0)), expected)
    moe = restored.layers[0]
    assert isinstance(moe, dl_moe.MixtureOfExperts)
    assert moe.config == model.layers[0].config


def test_layer_config_round_trip_rebuilds_an_equal_layer():
    layer = dl_moe.create_ffn_moe(num_experts=6, hidden_dim=8, top_k=3, drop_tokens=False, name="moe_a")
    clone = dl_moe.MixtureOfExperts.from_config(layer.get_config())
    assert clone.name == "moe_a"
    assert clone.config == layer.config
    assert clone.get_config() == layer.get_config()


def test_weight_layout_is_documented_shapes():
    layer = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8, intermediate_size=16, ffn_type="swiglu", output_dim=6)
    layer.build((None, 8))
    shapes = {v.path.split("/")[-1]: tuple(v.shape) for v in layer.weights}
    assert shapes["router_kernel"] == (8, 4)
    assert shapes["gate_kernel"] == (4, 8, 16)
    assert shapes["up_kernel"] == (4, 8, 16)
    assert shapes["down_kernel"] == (4, 16, 6)
    assert shapes["up_bias"] == (4, 16) and shapes["down_bias"] == (4, 6)
