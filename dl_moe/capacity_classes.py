"""Capacity classes: a few static buffer sizes, one chosen per call at run time.

XLA compiles static shapes, so a dispatch buffer `[E, C, d]` must have its C fixed at
trace time. A capacity class is one such C. The layer compiles a few of them,
C_i = expert_capacity(T, k, E, f_i), and `keras.ops.switch` runs the one the call
needs. Only that branch computes, so the cost is that of the class it takes.

Adaptive capacity uses them (`MoEConfig.adaptive_capacity`, capacity mode, training;
the `adaptive_capacity` row of `dl_moe.dispatch_plans`): the capacity factor is the
smallest class factor at or above a moving statistic of the measured maximum expert
load, `capacity_load_factor`, clipped to `[min_capacity_factor,
max_capacity_factor]`. A balanced router runs small buffers; one whose load is skewed
gets larger ones, so few assignments are dropped.
"""

import keras
from keras import ops

from dl_moe import dispatch as dispatch_lib

# The class factors adaptive capacity picks from between its bounds.
ADAPTIVE_GRID = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0)


def class_capacities(num_tokens, top_k, num_experts, factors):
    """Distinct capacities C_i (Python ints, ascending) of the factors `f_i`.

    Args:
        num_tokens: T, a Python int.
        top_k: Assignments per token k (the router's expected k).
        num_experts: E.
        factors: Capacity factors, ascending.

    Returns:
        `(capacities, factors)`: factors that round to the same C keep the first.
            No capacity is above T (an expert holds each token at most once).
    """
    capacities, kept = [], []
    ceiling = dispatch_lib.round_up_rows(num_tokens)
    for factor in factors:
        capacity = min(dispatch_lib.expert_capacity(num_tokens, top_k, num_experts, factor), ceiling)
        if not capacities or capacity > capacities[-1]:
            capacities.append(capacity)
            kept.append(factor)
    return capacities, kept


def adaptive_factors(min_factor, max_factor):
    """The class factors adaptive capacity uses: both bounds and `ADAPTIVE_GRID` between them."""
    inside = [f for f in ADAPTIVE_GRID if min_factor < f < max_factor]
    return sorted({min_factor, max_factor, *inside})


def class_of_factor(load_factor, factors):
    """Index of the first factor >= `load_factor` (a scalar tensor), the last one past them all."""
    below = ops.cast(ops.convert_to_tensor(factors[:-1], "float32") < ops.cast(load_factor, "float32"), "int32")
    return ops.sum(below)


def max_load_factor(loads):
    """The largest expert load `[E]` over the mean load (1 when perfectly balanced, 0 when empty)."""
    loads = ops.cast(loads, "float32")
    mean = ops.mean(loads)
    return ops.where(mean > 0, ops.max(loads) / ops.maximum(mean, 1e-9), 0.0)


def run_switched(index, branches, operands, rematerialize=False):
    """`branches[index](*operands)` with `keras.ops.switch` (one compiled branch runs).

    A single branch is called directly: no switch in the program.

    `rematerialize` (training): each branch is wrapped in `keras.remat`, so its
    backward pass recomputes its forward. Without it, differentiating a switch makes
    every branch return the intermediates of all branches for the backward pass
    (zeros for those not taken); with a few `[E, C, h]` branches that costs more than
    recomputing the one taken. Not on TensorFlow (see below).
    """
    if len(branches) == 1:
        return branches[0](*operands)
    # TensorFlow's `keras.remat` (tf.recompute_grad) gives no gradient to variables
    # read inside a tf.function; there the switch differentiates as it is.
    if rematerialize and keras.backend.backend() != "tensorflow":
        branches = [keras.remat(branch) for branch in branches]
    return ops.switch(ops.cast(index, "int32"), branches, *operands)
