"""The tests' one backend-neutral gradient helper."""

import keras
import numpy as np
from keras import ops


def gradients(fn, *args, variables=()):
    """Gradients of the scalar `fn(*args)` w.r.t. every arg and every Keras variable given.

    `fn` may call layers whose `variables` it differentiates (on JAX it runs in a
    `keras.StatelessScope` that maps them to traced values, so `layer.losses` still
    holds the losses the call registers).

    Args:
        fn: Callable of the args' tensors returning a scalar (keras.ops, any backend).
        *args: Float numpy arrays.
        variables: Keras variables (e.g. `layer.trainable_variables`).

    Returns:
        A list of numpy arrays: one per arg, then one per variable. A variable `fn` does
        not reach gets None on TensorFlow and torch, zeros on JAX.
    """
    backend = keras.backend.backend()
    variables = list(variables)
    if backend == "jax":
        import jax

        def wrapped(arg_values, variable_values):
            mapping = list(zip(variables, variable_values))
            with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
                return fn(*arg_values)

        arg_grads, variable_grads = jax.grad(wrapped, argnums=(0, 1))(
            [ops.convert_to_tensor(a) for a in args], [v.value for v in variables]
        )
        grads = [*arg_grads, *variable_grads]
    elif backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors + [v.value for v in variables])
    else:
        import torch

        tensors = [ops.convert_to_tensor(a).detach().requires_grad_(True) for a in args]
        grads = torch.autograd.grad(fn(*tensors), tensors + [v.value for v in variables], allow_unused=True)
    return [None if g is None else np.asarray(ops.convert_to_numpy(g)) for g in grads]
