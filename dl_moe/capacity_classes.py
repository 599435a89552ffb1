"""Capacity classes: a few static buffer sizes, one chosen per call at run time.

XLA compiles static shapes, so a dispatch buffer `[E, C, d]` must have its C fixed at
trace time. A capacity class is one such C. The layer compiles a few of them,
C_i = expert_capacity(T, k, E, f_i), and `keras.ops.switch` runs the one the call
needs. Only that branch computes, so the cost is that of the class it takes.

Two uses (see `dl_moe.forward.token_choice`):

* **Dropless classes** (`MoEConfig.dropless_classes`, dropless mode; by default in
  inference only): the smallest class that holds this batch's largest expert load
  runs as a capacity plan that drops nothing. A batch that no class holds runs the
  dropless block plan. The result is exactly dropless either way, and a balanced
  batch pays what the capacity plan pays (no per-block weight copies).
* **Capacity that follows the load** (`MoEConfig.adaptive_capacity`, capacity mode,
  training): the capacity factor is the smallest class factor at or above a moving
  statistic of the measured maximum expert load, `capacity_load_factor`, clipped to
  `[min_capacity_factor, max_capacity_factor]`. A balanced router runs small buffers;
  one whose load is skewed gets larger ones, so few assignments are dropped.
"""

import keras
from keras import ops

from dl_moe import dispatch as dispatch_lib

# Capacity factors of the dropless classes (and the grid that adaptive capacity picks
# from between its bounds). A router trained to balance sits at a largest load of
# about 1.05-1.15 times the mean, hence the fine steps near 1; 2.0 holds a load twice
# the mean, which covers a router still learning to balance.
CLASS_FACTORS = (1.0, 1.1, 1.25, 1.5, 2.0)
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


def smallest_class_holding(max_load, capacities):
    """Index of the first capacity >= `max_load` (a scalar int32 tensor);
    `len(capacities)` when none holds it."""
    below = ops.cast(ops.convert_to_tensor(capacities, "int32") < ops.cast(max_load, "int32"), "int32")
    return ops.sum(below)


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
