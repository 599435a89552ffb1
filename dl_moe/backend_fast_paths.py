"""Backend-specific fast paths. Each has a test that it equals the portable path.

Eager PyTorch, capacity and dropless modes: the portable paths give every expert a
fixed-size buffer (capacity mode: C rows, padded when the expert got fewer) or pad
every expert's rows to whole blocks and gather each block's expert weights (dropless
mode), which static shapes under XLA require. Eager PyTorch has no such constraint:
the computed assignments, sorted by expert, are cut into one contiguous slice per
expert and each slice runs against its expert alone. The work is exactly the
computed rows (no padding rows), and no weights are copied. Capacity mode keeps and
drops exactly the assignments the portable path does. Either mode uses slices only
when the padding they skip outweighs their per-expert overhead
(`capacity_slices_pay_off`); otherwise dropless mode runs `[E, C]` buffers sized to
this batch's largest load, which drop nothing.
"""

import itertools

import keras
import numpy as np
from keras import ops

from dl_moe import dispatch as dispatch_lib


def torch_eager_slices_enabled():
    """True when running eagerly on PyTorch (not under torch.compile tracing)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()


# Fixed cost of one expert's slice (its own matmuls and autograd nodes in eager mode),
# in rows of matmul: measured on CPU, E=128 experts of 64 rows ran 1.7x slower as
# slices than as one batched matmul over [E, C] buffers.
SLICE_OVERHEAD_ROWS = 48


def concrete_expert_loads(expert_index, active, num_experts):
    """This batch's active assignments per expert, read back as a numpy `[E]` array.

    Eager only (one device-to-host read); the slice decisions below take its result.

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool.
        num_experts: E.
    """
    flat = ops.reshape(ops.where(active, expert_index, num_experts), (-1,))
    return np.asarray(ops.convert_to_numpy(ops.bincount(flat, minlength=num_experts + 1)))[:num_experts]


def dropless_buffer_capacity(loads):
    """Rows per expert that hold the largest of `loads` `[E]`: `[E, C]` buffers that
    drop nothing (a multiple of `dispatch.CAPACITY_MULTIPLE`)."""
    return dispatch_lib.round_up_rows(int(loads.max()))


def capacity_slices_pay_off(loads, capacity):
    """Whether per-expert slices beat `[E, C]` buffers for a batch with these loads.

    Slices skip the buffers' padding rows, E*C - sum_e min(load_e, C) of them, but
    each expert costs a fixed overhead; buffers win when experts are many and nearly
    full.

    Args:
        loads: numpy `[E]` active assignments per expert (`concrete_expert_loads`).
        capacity: C, rows per expert buffer (a Python int).
    """
    num_experts = len(loads)
    padding_rows = num_experts * capacity - int(np.minimum(loads, capacity).sum())
    return padding_rows > num_experts * SLICE_OVERHEAD_ROWS


def split_slices(rows, counts):
    """`[N, ...]` rows → E + 1 pieces: expert e's `counts[e]` rows, then the empty rest.

    One split (not one slice per expert): the backward pass then concatenates the
    pieces' gradients once instead of padding each to the full size.
    """
    return ops.split(rows, list(itertools.accumulate(counts)), axis=0)


def join_slices(outputs, num_rows, feature_shape, dtype):
    """Concatenates per-expert outputs `[n_e, ...]` and zero-fills up to `num_rows` rows."""
    used = sum(int(out.shape[0]) for out in outputs)
    if used < num_rows or not outputs:
        outputs = list(outputs) + [ops.zeros((num_rows - used,) + tuple(feature_shape), dtype=dtype)]
    return ops.concatenate(outputs, axis=0)


def run_experts_on_slices(experts, expert_inputs, counts, training, **extra):
    """Runs a bank on the contiguous per-expert slices of `[1, N, ...]` rows.

    A bank with `supports_slice_counts` takes all slices in one call. Any other bank
    is called once per expert that has rows, with `group_expert=[e]`.

    Args:
        experts: An `ExpertBank`.
        expert_inputs: `[1, N, ...]` rows of a `plan_ragged_dispatch` plan.
        counts: Python list of rows per expert (they come first, in expert order).
        training: Passed to the bank.
        **extra: Further bank arguments (e.g. `context` / `row_token`, sliced the
            same way when `row_token` is given).

    Returns:
        `[1, N, ...out]`; the rows past sum(counts) (inactive assignments) are zeros.
    """
    row_token = extra.pop("row_token", None)
    if experts.supports_slice_counts and row_token is None:
        return experts(expert_inputs, slice_counts=list(counts), training=training, **extra)
    rows = expert_inputs[0]
    outputs, start = [], 0
    for expert, (piece, count) in enumerate(zip(split_slices(rows, counts), counts)):
        if count == 0:
            continue
        kwargs = dict(extra)
        if row_token is not None:
            kwargs["row_token"] = row_token[:, start : start + count]
        group = ops.convert_to_tensor([expert], dtype="int32")
        outputs.append(experts(piece[None], group_expert=group, training=training, **kwargs)[0])
        start += count
    feature_shape = experts.compute_output_shape((1, 1) + tuple(rows.shape[1:]))[2:]
    dtype = outputs[0].dtype if outputs else experts.compute_dtype
    return join_slices(outputs, dispatch_lib.static_dim(rows, 0), feature_shape, dtype)[None]
