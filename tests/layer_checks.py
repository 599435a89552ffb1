"""One battery of checks every MoE layer configuration goes through.

In the spirit of `keras.src.testing.TestCase.run_layer_test`: symbolic call in a
functional model, eager call, losses in training only, gradients reaching router and
expert weights, a compiled `fit` whose loss falls, and a `.keras` round trip.
"""

import os

import keras
import numpy as np
from keras import ops

import dl_moe
from tests.autodiff import gradients

BACKEND = keras.backend.backend()

ROUTING_COUNTERS = ("routed_tokens_per_expert", "processed_tokens_per_expert", "seen_tokens", "dropped_tokens")


def randomized_ffn_moe(x, seed=1, quantize=False, **create_kwargs):
    """`create_ffn_moe(**create_kwargs)` built for `x`, every trainable weight drawn from N(0, 0.4²).

    The layers' own initialisers give near-zero routers and small outputs; random weights
    make routing and outputs distinctive, so a mismatch with a reference shows.
    """
    layer = dl_moe.create_ffn_moe(**create_kwargs)
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=0.4, size=v.shape).astype("float32"))
    if quantize:
        layer.quantize("int8")
    return layer


def routing_counters(layer, names=ROUTING_COUNTERS):
    """The layer's routing counters (non-trainable variables) as numpy, by name."""
    return {name: np.asarray(ops.convert_to_numpy(getattr(layer, name))) for name in names}


def trainable_gradients(layer, inputs, training=True):
    """Gradient of sum(outputs^2) + the layer's losses w.r.t. every trainable weight, as numpy."""
    variables = layer.trainable_variables

    def loss():
        return ops.sum(ops.square(layer(inputs, training=training))) + sum(layer.losses)

    return {v.path: g for v, g in zip(variables, gradients(loss, variables=variables))}


def classifier(layer_factory, input_shape, num_classes=3):
    inputs = keras.Input(input_shape)
    x = layer_factory()(inputs)
    x = keras.layers.Flatten()(x) if len(input_shape) > 1 else x
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs)


def run_moe_layer_checks(layer_factory, input_shape, tmp_path, batch=16, epochs=4, expect_aux_loss=True):
    """Runs the shared checks; returns the trained model.

    Args:
        layer_factory: Zero-argument callable returning a fresh MoE layer.
        input_shape: Per-example input shape (without batch).
        tmp_path: pytest tmp_path for the `.keras` file.
        expect_aux_loss: The configuration registers at least one loss in training.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch,) + tuple(input_shape)).astype("float32")
    y = rng.integers(0, 3, size=(batch,))

    # Eager call: shape, dtype, finite; losses only in training.
    layer = layer_factory()
    out = layer(x, training=False)
    expected_shape = layer.compute_output_shape((batch,) + tuple(input_shape))
    assert tuple(out.shape) == tuple(expected_shape)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))
    assert len(layer.losses) == 0
    layer(x, training=True)
    assert (len(layer.losses) > 0) == expect_aux_loss

    # Gradients (of the output and the registered losses) reach every trainable
    # variable, router and experts alike, on every backend.
    grads = trainable_gradients(layer, x)
    assert any("/router/" in p for p in grads) and any("/experts/" in p for p in grads), grads.keys()
    no_gradient = sorted(p for p, g in grads.items() if g is None or not np.abs(g).sum() > 0)
    assert no_gradient == [], f"trainable variables without gradient: {no_gradient}"

    # Compiled fit (XLA on TF and JAX): loss falls.
    model = classifier(layer_factory, input_shape)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    history = model.fit(x, y, epochs=epochs, batch_size=batch, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses

    # .keras round trip, default safe mode, no custom_objects.
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored.predict(x, verbose=0)),
        ops.convert_to_numpy(model.predict(x, verbose=0)),
        rtol=1e-6,
        atol=1e-6,
    )
    return model


def compiled_output(layer, x, training=True):
    """The layer's output, compiled (jax.jit / tf.function(jit_compile=True)); eager on torch."""
    if BACKEND == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        fn = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=training)[0])
        return np.asarray(fn(trainable, non_trainable, x))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda x: layer(x, training=training), jit_compile=True)(x).numpy()
    return np.asarray(ops.convert_to_numpy(layer(x, training=training)))
