"""Eager PyTorch's fast paths, run by its rows of the plan table (`dl_moe.torch_eager_plans`).

Each has a test that it equals the portable plans (`tests/test_fast_paths.py`,
`tests/test_small_batch.py`):
* per-expert slices (training and large batches; below);
* host-planned slices for decode-sized inference batches (at the end of the file).

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
from typing import NamedTuple

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
    pieces' gradients once instead of padding each to the full size. On PyTorch it
    is `torch.split` with the sizes as Python ints: `keras.ops.split` turns them
    into a tensor and back (five ops and a device-to-host read), which costs a
    tenth of a decode-sized call.
    """
    if keras.backend.backend() == "torch":
        import torch

        return list(torch.split(rows, list(counts) + [rows.shape[0] - sum(counts)], dim=0))
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


# ---------------------------------------------------------------------------
# Eager PyTorch, decode-sized inference batches: plan on the host, compute in torch.
#
# At a few tokens a call, eager PyTorch spends its time in per-op overhead (each
# keras.ops call costs several torch calls of dtype and shape handling), not in the
# matmuls: the planned dispatch, gathers and combine cost more than the experts.
# The routing decision is tiny, so it is read back once and planned with numpy; the
# rows are then gathered, run as per-expert slices (views of each chosen expert's
# weights, no copies) and combined with a handful of direct torch calls.

# Most assignments T*k a call plans on the host. Measured against `[E, C]` buffers
# (E=8, k=2, d=256, h=512, two runs of the inference benchmark):
# 1.6-2.2x faster at T <= 2, 1.6x at T=4, 1.1-1.2x at T=8, 0.9-1.2x at T=16, and
# slower at T=32 (0.95x). By then nearly every expert has rows, and one batched
# matmul over [E, C] buffers beats E per-expert products.
MAX_HOST_PLANNED_ASSIGNMENTS = 32


class HostSlicePlan(NamedTuple):
    """A numpy plan of the computed assignments, sorted by expert.

    Attributes:
        row_token: `[n]` token of each computed row (expert e's rows are contiguous).
        row_choice: `[n]` which of the token's k assignments the row computes.
        counts: Python list of E computed rows per expert.
        routed_per_expert: `[E]` active assignments per expert (before dropping).
        kept: `[T, k]` bool, the assignment is computed.
    """

    row_token: np.ndarray
    row_choice: np.ndarray
    counts: list
    routed_per_expert: np.ndarray
    kept: np.ndarray


def plan_slices_on_host(expert_index, active, num_experts, capacity=None):
    """Plans `[T, k]` numpy assignments as per-expert slices, like the buffered plans.

    Each expert computes its active assignments in priority order (choice, then
    token), the first `capacity` of them in capacity mode (None: all), so the same
    assignments are kept as by `dispatch.plan_capacity_dispatch`.
    """
    num_tokens, top_k = expert_index.shape
    expert = np.where(active, expert_index, num_experts).T.reshape(-1)  # [N], choice-major
    order = np.argsort(expert, kind="stable")
    sorted_expert = expert[order]
    routed = np.bincount(expert, minlength=num_experts + 1)
    starts = np.concatenate([[0], np.cumsum(routed)])
    rank = np.arange(expert.size) - starts[sorted_expert]
    keep = sorted_expert < num_experts
    if capacity is not None:
        keep &= rank < capacity
    computed = order[keep]  # flat choice-major assignments, grouped by expert
    kept = np.zeros(expert.size, bool)
    kept[computed] = True
    counts = np.bincount(sorted_expert[keep], minlength=num_experts)[:num_experts]
    return HostSlicePlan(
        row_token=computed % num_tokens,
        row_choice=computed // num_tokens,
        counts=[int(c) for c in counts],
        routed_per_expert=routed[:num_experts],
        kept=kept.reshape(top_k, num_tokens).T,
    )


def run_host_planned_slices(layer, tokens, weights, expert_index, active, capacity, training):
    """dispatch → experts → combine of `[T, k]` assignments, planned on the host.

    Args:
        layer: The `MixtureOfExperts` layer (its FFN bank runs the slices).
        tokens: `[T, d]` torch tensor.
        weights: `[T, k]` combine weights (zero where inactive).
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool.
        capacity: C rows per expert in capacity mode (a Python int), None dropless.
        training: Passed to the bank.

    Returns:
        `(outputs [T, o], routed_per_expert [E], processed_per_expert [E], kept [T, k])`,
        the last three int32 / bool torch tensors for the statistics.
    """
    import torch

    plan = plan_slices_on_host(
        ops.convert_to_numpy(expert_index), ops.convert_to_numpy(active), layer.config.num_experts, capacity
    )
    device = tokens.device
    row_token = torch.as_tensor(plan.row_token, device=device)
    if row_token.numel():
        rows = call_layer(layer.experts, tokens[row_token][None], training=training, slice_counts=plan.counts)
        rows = rows[0]  # [n, o]
        row_weight = weights[row_token, torch.as_tensor(plan.row_choice, device=device)].to(rows.dtype)  # [n]
        outputs = rows.new_zeros((tokens.shape[0], rows.shape[-1])).index_add(0, row_token, rows * row_weight[:, None])
    else:
        out_dim = layer.experts.compute_output_shape((1, 1) + tuple(tokens.shape[1:]))[-1]
        outputs = ops.zeros((tokens.shape[0], out_dim), dtype=layer.experts.compute_dtype)
    as_tensor = lambda array, dtype: torch.as_tensor(array, dtype=dtype, device=device)  # noqa: E731
    return (
        outputs,
        as_tensor(plan.routed_per_expert, torch.int32),
        as_tensor(plan.counts, torch.int32),
        as_tensor(plan.kept, torch.bool),
    )


def call_layer(layer, inputs, training=None, **kwargs):
    """`layer(inputs, ...)`, skipping `Layer.__call__` where it would only add cost.

    In eager PyTorch inference, `Layer.__call__` costs about as much as a
    decode-sized FFN or router itself (argument handling, module hooks: 115 us of a
    router's 159 us at d=8). There it does nothing `call` does not, provided the
    layer is built, needs no autocast (its compute dtype is its variable dtype;
    int8 banks read their quantized weights in `call` themselves) and has no torch
    forward hooks; the inputs are cast to the compute dtype here. Anywhere else, and
    in training (where layers may register losses), the layer is called as usual.
    """
    policy = layer.dtype_policy
    direct = (
        not training
        and torch_eager_slices_enabled()
        and layer.built
        and policy.compute_dtype == policy.variable_dtype
        and not (layer._forward_hooks or layer._forward_pre_hooks)
    )
    if not direct:
        return layer(inputs, training=training, **kwargs)
    return layer.call(ops.cast(inputs, policy.compute_dtype), training=training, **kwargs)
