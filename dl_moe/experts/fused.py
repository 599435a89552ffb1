"""Fused gate/up checkpoint tensors ↔ the FFN bank's separate gate and up kernels.

Many checkpoints store a GLU expert's gate and up projections as one tensor
`[E, d, 2h]` (and its bias as `[E, 2h]`). `FFNExpertBank` keeps them apart
(`gate_kernel`, `up_kernel`, each `[E, d, h]`). Two layouts of the last axis occur:

* "interleaved" (GPT-OSS): gate = fused[..., 0::2], up = fused[..., 1::2];
* "halves" (Qwen-MoE, Qwen3-MoE, Qwen3.5-MoE): gate = fused[..., :h], up = fused[..., h:].

The functions work on numpy arrays (or anything `numpy.asarray` accepts) and are exact
inverses of each other.
"""

import numpy as np

FUSED_LAYOUTS = ("interleaved", "halves")


def _check_layout(layout):
    if layout not in FUSED_LAYOUTS:
        raise ValueError(f"layout must be one of {list(FUSED_LAYOUTS)}, got {layout!r}.")


def split_gate_up(fused, layout):
    """Splits a fused gate/up tensor `[..., 2h]` into `(gate [..., h], up [..., h])`.

    Args:
        fused: Kernel `[E, d, 2h]` or bias `[E, 2h]`.
        layout: "interleaved" or "halves" (see the module docstring).

    Returns:
        `(gate, up)` numpy arrays.
    """
    _check_layout(layout)
    fused = np.asarray(fused)
    if fused.shape[-1] % 2:
        raise ValueError(f"A fused gate/up tensor needs an even last axis, got shape {fused.shape}.")
    if layout == "interleaved":
        return fused[..., 0::2], fused[..., 1::2]
    half = fused.shape[-1] // 2
    return fused[..., :half], fused[..., half:]


def fuse_gate_up(gate, up, layout):
    """The inverse of `split_gate_up`: `(gate [..., h], up [..., h])` → `[..., 2h]`."""
    _check_layout(layout)
    gate, up = np.asarray(gate), np.asarray(up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {gate.shape} and {up.shape}.")
    if layout == "halves":
        return np.concatenate([gate, up], axis=-1)
    fused = np.empty(gate.shape[:-1] + (2 * gate.shape[-1],), dtype=np.result_type(gate, up))
    fused[..., 0::2] = gate
    fused[..., 1::2] = up
    return fused
