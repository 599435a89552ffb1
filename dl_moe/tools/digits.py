"""The digits task shared by `dl-moe demo` and `dl-moe compare`.

Each 8x8 digit image from scikit-learn (no network needed) is read as a sequence of 8
row-tokens of 8 pixels, embedded to `hidden_dim`, passed through residual MoE blocks,
pooled and classified.
"""

import keras

from dl_moe.factories import create_ffn_moe
from dl_moe.layer import MixtureOfExperts


def load_digits_tokens(seed=0, test_fraction=0.25):
    """Digits as `[N, 8, 8]` row tokens scaled to [0, 1], split into train/test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")  # [N, 8, 8]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)


@keras.saving.register_keras_serializable(package="dl_moe")
class AddPositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding `[S, d]` to inputs `[B, S, d]`."""

    def build(self, input_shape):
        self.position_embedding = self.add_weight(
            name="position_embedding", shape=tuple(input_shape[1:]), initializer="glorot_uniform"
        )

    def call(self, inputs):
        return inputs + self.position_embedding


def build_classifier(hidden_dim=32, num_experts=8, top_k=2, num_blocks=2, num_classes=10, **moe_overrides):
    """Token embedding + `num_blocks` residual MoE blocks + mean pooling + softmax head."""
    inputs = keras.Input((8, 8), name="rows")
    x = keras.layers.Dense(hidden_dim, name="embed")(inputs)
    x = AddPositionEmbedding(name="position")(x)
    for i in range(num_blocks):
        h = keras.layers.LayerNormalization(name=f"norm_{i}")(x)
        h = create_ffn_moe(
            num_experts, hidden_dim, top_k=top_k, intermediate_size=2 * hidden_dim, name=f"moe_{i}", **moe_overrides
        )(h)
        x = keras.layers.Add(name=f"residual_{i}")([x, h])
    x = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.LayerNormalization(name="norm_out")(x))
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier")(x)
    return keras.Model(inputs, outputs, name="digits_moe")


def moe_layers(model):
    return [layer for layer in model.layers if isinstance(layer, MixtureOfExperts)]
