"""User plug-ins: a BaseExpert subclass (one expert) and a BaseGating subclass."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from dl_moe import ExpertConfig, GatingConfig, MixtureOfExperts, MoEConfig
from dl_moe.experts import BaseExpert, PerExpertBank, register_expert
from dl_moe.forward import token_choice
from dl_moe.gating import BaseGating, register_gating


@keras.saving.register_keras_serializable(package="dl_moe_tests")
class CustomExpert(BaseExpert):
    """The seed README's CustomExpert, verbatim apart from the record of its inputs."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.custom_layer = keras.layers.Dense(self.units)
        super().build(input_shape)

    def call(self, inputs, training=None):
        return self.custom_layer(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape[:-1] + (self.units,)


@keras.saving.register_keras_serializable(package="dl_moe_tests")
class CustomGating(BaseGating):
    """The seed README's CustomGating: dense weights and argmax indices."""

    def call(self, inputs, training=None):
        gate_logits = self.compute_gate_logits(inputs)
        expert_weights = keras.ops.softmax(gate_logits)
        expert_indices = keras.ops.argmax(expert_weights, axis=-1)
        auxiliary_info = {"gate_logits": gate_logits, "expert_weights": expert_weights}
        return expert_weights, expert_indices, auxiliary_info


register_expert("test_custom_expert", CustomExpert, overwrite=True)
register_gating("test_custom_gating", CustomGating, overwrite=True)


def make_layer(drop_tokens=True, gating_type="test_custom_gating", units=5, top_k=1):
    return MixtureOfExperts(
        MoEConfig(
            num_experts=3,
            drop_tokens=drop_tokens,
            eval_capacity_factor=4.0,
            expert_config=ExpertConfig(expert_type="test_custom_expert", hidden_dim=4, expert_kwargs={"units": units}),
            gating_config=GatingConfig(gating_type=gating_type, top_k=top_k),
        )
    )


def reference(layer, x):
    """Every token through its chosen expert's Dense, weighted by the router."""
    tokens = x.reshape(-1, x.shape[-1])
    weights, indices, _ = token_choice.call_token_router(layer, ops.convert_to_tensor(tokens), False)
    weights, indices = ops.convert_to_numpy(weights), ops.convert_to_numpy(indices)
    out = 0.0
    for j in range(indices.shape[1]):
        rows = []
        for t in range(tokens.shape[0]):
            dense = layer.experts.expert_layers[indices[t, j]].custom_layer
            kernel, bias = (ops.convert_to_numpy(w) for w in dense.weights)
            rows.append(tokens[t] @ kernel + bias)
        out = out + weights[:, j : j + 1] * np.stack(rows)
    return out.reshape(x.shape[:-1] + (-1,))


@pytest.mark.parametrize("drop_tokens", [True, False])
@pytest.mark.parametrize("gating_type,top_k", [("test_custom_gating", 1), ("linear", 2)])
def test_custom_expert_matches_reference(drop_tokens, gating_type, top_k):
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    layer = make_layer(drop_tokens=drop_tokens, gating_type=gating_type, top_k=top_k)
    out = ops.convert_to_numpy(layer(x, training=False))
    assert out.shape == (2, 5, 5) and layer.compute_output_shape(x.shape) == (2, 5, 5)
    assert isinstance(layer.experts, PerExpertBank) and len(layer.experts.expert_layers) == 3
    np.testing.assert_allclose(out, reference(layer, x), rtol=1e-5, atol=1e-5)


def test_each_expert_sees_only_its_rows():
    seen = {}

    class Recorder(BaseExpert):
        def call(self, inputs, training=None):
            seen.setdefault(self.name, []).append(int(inputs.shape[0]))
            return inputs

        def compute_output_shape(self, input_shape):
            return input_shape

    register_expert("test_recorder", Recorder, overwrite=True)
    layer = MixtureOfExperts(
        MoEConfig(num_experts=4, expert_config=ExpertConfig(expert_type="test_recorder", hidden_dim=4),
                  gating_config=GatingConfig(top_k=1), eval_capacity_factor=1.0)
    )
    layer.build((64, 4))
    seen.clear()
    layer(np.ones((64, 4), "float32"))
    # Capacity mode: the 64 identical tokens all pick one expert, which computes its
    # C = 16 rows, never the 64 tokens. (The portable path also calls the idle
    # experts on their empty C-row buffers; eager PyTorch skips them.)
    calls = [rows for per_expert in seen.values() for rows in per_expert]
    assert max(calls) == 16 and all(rows in (0, 16) for rows in calls), seen


def test_fit_and_keras_round_trip(tmp_path):
    x = np.random.default_rng(1).normal(size=(16, 6, 4)).astype("float32")
    y = np.random.default_rng(2).integers(0, 3, size=(16,))
    inputs = keras.Input((6, 4))
    h = make_layer(units=4)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=keras.backend.backend() != "torch")
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    path = os.path.join(tmp_path, "plugins.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_registration_and_kwargs_validation():
    with pytest.raises(ValueError, match="BaseExpert or ExpertBank"):
        register_expert("bad", object)
    with pytest.raises(ValueError, match="expert_kwargs"):
        ExpertConfig(expert_type="ffn", expert_kwargs={"units": 3})
    with pytest.raises(ValueError, match="expert_kwargs"):
        ExpertConfig(expert_type="test_custom_expert", expert_kwargs={"units": object()})
    with pytest.raises(ValueError, match="expert_kwargs"):
        MixtureOfExperts(
            MoEConfig(num_experts=2, expert_config=ExpertConfig(expert_type="test_custom_expert", hidden_dim=4,
                                                              expert_kwargs={"unit": 3}),
                      gating_config=GatingConfig(top_k=1))
        ).build((None, 4))
