"""What `model.export()` with a symbolic batch dimension needs (JAX's `jax.export`).

Under `jax.export` the batch axis is a dimension expression, not an int; shapes
derived from it (expert capacity, blocks) must be expressions too, and a few ops are
replaced while shapes are symbolic:

* `top_k`: `jax.lax.top_k` serialises as a StableHLO composite that older consumers
  (TensorFlow's `XlaCallModule`, which serves the exported SavedModel) cannot read; a
  stable descending argsort picks the same entries (ties: lower index first, as
  `top_k` does).

Outside export (eager, `jit`, TensorFlow, PyTorch) every function here is the plain op.
"""

import fractions

import keras
from keras import ops


def is_symbolic_dim(size):
    """Whether `size` (an entry of a tensor's shape) is a JAX symbolic dimension."""
    if size is None or isinstance(size, int) or keras.backend.backend() != "jax":
        return False
    from jax import export

    return export.is_symbolic_dim(size)


def has_symbolic_shape(tensor):
    """Whether any axis of `tensor` has a JAX symbolic size."""
    return any(is_symbolic_dim(size) for size in tensor.shape)


def symbolic_ceil(size, ratio):
    """ceil(size * ratio) for a JAX symbolic `size` (>= 1) and a float `ratio` > 0.

    The ratio becomes a fraction p/q (denominator at most 10**4, exact for the usual
    settings such as 1.25 * 2 / 8), so the result is the dimension expression
    (size * p + q - 1) // q that `jax.export` can carry.
    """
    ratio = fractions.Fraction(ratio).limit_denominator(10**4)
    return (size * ratio.numerator + ratio.denominator - 1) // ratio.denominator


def _tokens_sharded():
    """Whether a `keras.distribution` shards the batch on the JAX backend."""
    if keras.backend.backend() != "jax":
        return False
    return keras.distribution.distribution() is not None


def top_k(values, k):
    """`ops.top_k(values, k)` (largest first along the last axis) that also exports.

    Under a `keras.distribution` on JAX it sorts instead: XLA's SPMD partitioner does
    not split TopK along the sharded token axis and all-gathers every token's values
    first, while a sort along the last axis stays sharded. Both give the same values
    and indices (ties: the lower index first).
    """
    if not has_symbolic_shape(values) and not is_symbolic_dim(k) and not _tokens_sharded():
        return ops.top_k(values, k)
    order = ops.argsort(-values, axis=-1)[..., :k]
    return ops.take_along_axis(values, order, axis=-1), order
