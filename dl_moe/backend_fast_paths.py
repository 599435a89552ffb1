"""Backend-specific fast paths. Each has a test that it equals the portable path.

Eager PyTorch, dropless mode: the portable dropless path pads every expert's rows to
whole blocks and gathers each block's expert weights, which static shapes under XLA
require. Eager PyTorch has no such constraint: rows sorted by expert are cut into one
contiguous slice per expert and each slice runs against its expert alone. The work
is exactly the routed rows, and no weights are copied.
"""

import keras
from keras import ops

from dl_moe import dispatch as dispatch_lib


def torch_eager_dropless_enabled():
    """True when running eagerly on PyTorch (not under torch.compile tracing)."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    return not torch.compiler.is_compiling()


def run_experts_on_slices(experts, expert_inputs, counts, training, **extra):
    """Runs a bank on the contiguous per-expert slices of `[1, N, ...]` rows.

    Args:
        experts: An `ExpertBank`; each slice is passed as one group with
            `group_expert=[e]`, a one-row gather of the expert's weights.
        expert_inputs: `[1, N, ...]` rows of a `plan_ragged_dispatch` plan.
        counts: Python list of rows per expert (they come first, in expert order).
        training: Passed to the bank.
        **extra: Further bank arguments (e.g. `context` / `row_token`, sliced the
            same way when `row_token` is given).

    Returns:
        `[1, N, ...out]`; the rows past sum(counts) (inactive assignments) are zeros.
    """
    rows = expert_inputs[0]
    outputs, start = [], 0
    row_token = extra.pop("row_token", None)
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        piece = rows[start : start + count][None]  # [1, count, ...]
        kwargs = dict(extra)
        if row_token is not None:
            kwargs["row_token"] = row_token[:, start : start + count]
        group = ops.convert_to_tensor([expert], dtype="int32")
        outputs.append(experts(piece, group_expert=group, training=training, **kwargs)[0])
        start += count
    total = dispatch_lib.static_dim(rows, 0)
    if outputs:
        out = ops.concatenate(outputs, axis=0)
    else:
        out_shape = experts.compute_output_shape((1, 1) + tuple(rows.shape[1:]))[2:]
        out = ops.zeros((0,) + tuple(out_shape), dtype=experts.compute_dtype)
    if start < total:
        out = ops.concatenate([out, ops.zeros((total - start,) + tuple(out.shape[1:]), dtype=out.dtype)], axis=0)
    return out[None]
