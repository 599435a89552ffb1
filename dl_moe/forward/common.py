"""Steps every routing kind shares: tokens in, expert bank run, layer output out.

Each function takes the `MixtureOfExperts` layer whose parts (config, `experts`,
`shared_experts`) it uses; none of them routes.
"""

import numpy as np
from keras import ops

from dl_moe.backend_fast_paths import run_experts_on_slices
from dl_moe.distribution import constrain_to_expert_axis
from dl_moe.gating.hierarchical import HierarchicalGating
from dl_moe.registry import GATING_TYPES


def build_router(layer, input_shape):
    """The layer's token router `[T, d]` → decision (token- and expert-choice kinds).

    `hierarchical_routing`: a `HierarchicalGating`, one router of the configured type per tree level.
    """
    hidden_dim = layer.config.expert_config.hidden_dim
    if layer.config.hierarchical_routing:
        router = HierarchicalGating.from_moe_config(layer.config, name="router")
    else:
        router = GATING_TYPES.get(layer.config.gating_config.gating_type).from_moe_config(layer.config, name="router")
    router.build((None, hidden_dim))
    return router


def flatten_tokens(layer, inputs, mask):
    """inputs → `(tokens [T, ...], token_mask [T] or None, leading_shape)`.

    FFN/attention banks: every position of `[..., d]` is a token `[T, d]`.
    Example-layout banks (conv): each example is one token `[T = B, H, W, C]`.
    """
    token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))
    if layer.experts.token_layout == "example":
        return inputs, token_mask, ops.shape(inputs)[:1]
    tokens = ops.reshape(inputs, (-1, layer.config.expert_config.hidden_dim))
    return tokens, token_mask, ops.shape(inputs)[:-1]


def place_on_expert_devices(layer, expert_inputs, plan):
    """With `expert_parallel`, shards `[E, C, ...]` buffers like the expert weights."""
    if not layer.config.expert_parallel or plan.group_expert is not None:
        return expert_inputs  # dropless blocks are not indexed by expert
    # Any stacked expert matrix [E, ...] carries the expert axis's layout (the
    # kernels stay [E, ...] when int8-quantized too).
    stacked = next(w for w in layer.experts.weights if len(w.shape) >= 3)
    return constrain_to_expert_axis(expert_inputs, stacked)


def run_experts(layer, expert_inputs, plan, inputs, mask, training, slice_counts=None, expert_blocks=None):
    """Runs the bank on `[G, R, ...]` rows (a context-using bank also gets row tokens).

    `slice_counts` (eager PyTorch): the rows are contiguous per-expert slices of these
    lengths, run by `backend_fast_paths.run_experts_on_slices`. `expert_blocks`: a
    `grouped_matmul.ExpertBlocks` for a bank with `supports_expert_blocks`.
    """
    context = layer.experts.prepare_context(inputs, mask)
    extra = {} if context is None else {"context": context, "row_token": plan.row_token}
    if slice_counts is not None:
        return run_experts_on_slices(layer.experts, expert_inputs, slice_counts, training, **extra)
    if expert_blocks is not None:
        extra["expert_blocks"] = expert_blocks
    return layer.experts(expert_inputs, group_expert=plan.group_expert, training=training, **extra)


def add_shared_experts(layer, tokens, outputs, training):
    """outputs `[T, o]` + the shared experts' output on every token `[T, d]`, times the
    per-token sigmoid gate `[T, 1]` with `shared_expert_gate`."""
    if layer.shared_experts is None:
        return outputs
    shared = layer.shared_experts(ops.expand_dims(tokens, 0), training=training)[0]  # [T, o]
    if layer.shared_expert_gate is not None:
        shared = shared * layer.shared_expert_gate(tokens)
    return outputs + ops.cast(shared, outputs.dtype)


def zero_masked(outputs, mask):
    """Zeros the outputs `[..., o]` of masked positions (`mask [...]`)."""
    if mask is None:
        return outputs
    return outputs * ops.expand_dims(ops.cast(mask, outputs.dtype), -1)


def finish(layer, outputs, tokens, unrouted, leading_shape, mask, training):
    """Residual for tokens no expert computed, shared experts, output shape and mask.

    Args:
        outputs: `[T, ...o]` combined expert outputs.
        tokens: `[T, ...]` layer inputs as tokens.
        unrouted: `[T]` bool, real tokens that got no expert output (all their
            assignments dropped, or picked by no expert); None when every token is
            computed (Soft MoE).
        leading_shape: The input's token axes; the output is `leading_shape + [...o]`.
    """
    if unrouted is not None and layer.config.use_residual_connection and tuple(outputs.shape[1:]) == tuple(
        tokens.shape[1:]
    ):
        rows = ops.reshape(unrouted, (-1,) + (1,) * (len(tokens.shape) - 1))
        outputs = outputs + ops.where(rows, tokens, ops.zeros_like(tokens))
    outputs = add_shared_experts(layer, tokens, outputs, training)
    outputs = ops.reshape(outputs, tuple(leading_shape) + tuple(outputs.shape[1:]))
    return zero_masked(outputs, mask)


def to_numpy(x):
    """A tensor as a numpy array (`route()` answers in numpy)."""
    return np.asarray(ops.convert_to_numpy(x))
