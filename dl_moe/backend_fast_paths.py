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


def _expert_loads(expert_index, active, num_experts):
    """`[E]` active assignments per expert."""
    flat = ops.reshape(ops.where(active, expert_index, num_experts), (-1,))
    return ops.bincount(flat, minlength=num_experts + 1)[:num_experts]


def dropless_buffer_capacity(expert_index, active, num_experts):
    """Rows per expert that hold this batch's largest load: `[E, C]` buffers that drop
    nothing (eager only; a multiple of `dispatch.CAPACITY_MULTIPLE`)."""
    largest = int(ops.convert_to_numpy(ops.max(_expert_loads(expert_index, active, num_experts))))
    multiple = dispatch_lib.CAPACITY_MULTIPLE
    return max(multiple, -(-largest // multiple) * multiple)


def capacity_slices_pay_off(expert_index, active, num_experts, capacity):
    """Whether per-expert slices beat `[E, C]` buffers for this capacity-mode batch.

    Slices skip the buffers' padding rows, E*C - sum_e min(count_e, C) of them, but
    each expert costs a fixed overhead; buffers win when experts are many and nearly
    full. Eager only: the counts of this batch are read back.

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool.
        num_experts: E.
        capacity: C, rows per expert buffer (a Python int).
    """
    counts = _expert_loads(expert_index, active, num_experts)  # [E]
    computed_rows = int(ops.convert_to_numpy(ops.sum(ops.minimum(counts, capacity))))
    padding_rows = num_experts * capacity - computed_rows
    return padding_rows > num_experts * SLICE_OVERHEAD_ROWS


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
    used = sum(counts)
    # One split (not one slice per expert): the backward pass then concatenates the
    # slices' gradients once instead of padding each to the full size.
    pieces = ops.split(rows, list(itertools.accumulate(counts)), axis=0)
    outputs, start = [], 0
    for expert, (piece, count) in enumerate(zip(pieces, counts)):
        if count == 0:
            continue
        kwargs = dict(extra)
        if row_token is not None:
            kwargs["row_token"] = row_token[:, start : start + count]
        group = ops.convert_to_tensor([expert], dtype="int32")
        outputs.append(experts(piece[None], group_expert=group, training=training, **kwargs)[0])
        start += count
    total = dispatch_lib.static_dim(rows, 0)
    if outputs:
        out = ops.concatenate(outputs, axis=0)
    else:
        out_shape = experts.compute_output_shape((1, 1) + tuple(rows.shape[1:]))[2:]
        out = ops.zeros((0,) + tuple(out_shape), dtype=experts.compute_dtype)
    if used < total:
        out = ops.concatenate([out, ops.zeros((total - used,) + tuple(out.shape[1:]), dtype=out.dtype)], axis=0)
    return out[None]
