"""Backend-neutral gradient helper for tests."""

import keras
import numpy as np
from keras import ops


def gradients(fn, *args):
    """Gradients of the scalar `fn(*args)` w.r.t. every (float numpy) arg, as numpy."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grads = jax.grad(fn, argnums=tuple(range(len(args))))(*[ops.convert_to_tensor(a) for a in args])
    elif backend == "tensorflow":
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = fn(*tensors)
        grads = tape.gradient(value, tensors)
    else:
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        grads = torch.autograd.grad(fn(*tensors), tensors)
    return [np.asarray(ops.convert_to_numpy(g)) for g in grads]
