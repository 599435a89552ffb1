"""Vision MoE with convolutional experts on scikit-learn's digits (8x8 images).

A conv stem, then a conv MoE layer: the router looks at each image's pooled features
and sends the whole image to one of 4 conv experts. Prints test accuracy and which
expert each digit class mostly goes to.

    KERAS_BACKEND=jax python examples/vision_conv_moe.py
"""

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dl_moe import create_conv_moe


def main(num_experts=4, filters=16, epochs=6, max_examples=None, verbose=1):
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]  # [N, 8, 8, 1]
    y = digits.target
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    conv_moe = create_conv_moe(num_experts=num_experts, filters=filters, kernel_size=3, top_k=1, name="conv_moe")
    inputs = keras.Input(shape=(8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    h = conv_moe(h)  # [B, 8, 8, filters]
    h = keras.layers.Flatten()(h)
    outputs = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=verbose)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)

    # Which expert does each class go to? (router on the MoE layer's pooled input)
    stem = keras.Model(inputs, model.layers[1].output)
    pooled = keras.ops.mean(stem.predict(x_test, verbose=0), axis=(1, 2))
    _, indices, _ = conv_moe.gating_network(pooled)
    indices = keras.ops.convert_to_numpy(indices)[:, 0]
    favourite = {int(c): int(np.bincount(indices[y_test == c], minlength=num_experts).argmax())
                 for c in np.unique(y_test)}
    print(f"Test accuracy: {accuracy:.3f}; favourite expert per digit: {favourite}")
    return {"loss": history.history["loss"], "accuracy": accuracy, "favourite_expert": favourite}


if __name__ == "__main__":
    main()
