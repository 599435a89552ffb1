"""Plug-ins: a user-written expert and a user-written router, saved and reloaded.

`CustomExpert` is written as ONE expert; the layer creates `num_experts` of them and
feeds each only the tokens routed to it. Its constructor arguments travel in
`ExpertConfig.expert_kwargs`. `CustomGating` returns dense softmax weights with argmax
indices (one expert per token). Both are registered by name, so configs (and `.keras`
files) refer to them like built-in types.

    KERAS_BACKEND=jax python examples/custom_expert_and_gating.py
"""

import os
import tempfile

import keras
import numpy as np

from dl_moe import ExpertConfig, GatingConfig, MixtureOfExperts, MoEConfig
from dl_moe.experts import BaseExpert, register_expert
from dl_moe.gating import BaseGating, register_gating


@keras.saving.register_keras_serializable(package="examples")
class CustomExpert(BaseExpert):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.custom_layer = keras.layers.Dense(self.units, activation="gelu")
        super().build(input_shape)

    def call(self, inputs, training=None):
        return self.custom_layer(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape[:-1] + (self.units,)


@keras.saving.register_keras_serializable(package="examples")
class CustomGating(BaseGating):
    def call(self, inputs, training=None):
        gate_logits = self.compute_gate_logits(inputs)
        expert_weights = keras.ops.softmax(gate_logits)
        expert_indices = keras.ops.argmax(expert_weights, axis=-1)
        auxiliary_info = {"gate_logits": gate_logits, "expert_weights": expert_weights}
        return expert_weights, expert_indices, auxiliary_info


register_expert("custom_dense", CustomExpert, overwrite=True)
register_gating("custom_argmax", CustomGating, overwrite=True)


def main(hidden_dim=16, num_experts=4, seq_len=8, num_examples=128, epochs=3, verbose=1):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, seq_len, hidden_dim)).astype("float32")
    y = (x[:, :, 0].mean(axis=1) > 0).astype("int64")
    config = MoEConfig(
        num_experts=num_experts,
        expert_config=ExpertConfig(expert_type="custom_dense", hidden_dim=hidden_dim,
                                   expert_kwargs={"units": hidden_dim}),
        gating_config=GatingConfig(gating_type="custom_argmax", top_k=1),
    )
    inputs = keras.Input((seq_len, hidden_dim))
    h = MixtureOfExperts(config, name="custom_moe")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=verbose)

    path = os.path.join(tempfile.mkdtemp(), "custom_moe.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    difference = float(np.max(np.abs(restored.predict(x, verbose=0) - model.predict(x, verbose=0))))
    print(f"Saved to {path}; reloaded model differs by {difference:.2e}")
    print(f"Expert utilization: {np.round(model.get_layer('custom_moe').get_expert_utilization(), 3)}")
    return {"loss": history.history["loss"], "reload_difference": difference}


if __name__ == "__main__":
    main()
