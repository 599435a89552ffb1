"""Soft MoE forward (Puigcerver et al. 2023): experts compute slots, mixes of tokens.

route (per sequence: dispatch weights tokens → slots, combine weights slots → tokens)
→ dispatch (each expert's P slots of every sequence) → experts → combine (each token
mixes all slot outputs of its sequence). No token is dropped.
"""

import numpy as np
from keras import ops

from dl_moe import dispatch as dispatch_lib
from dl_moe import statistics
from dl_moe.forward.common import finish, to_numpy
from dl_moe.registry import GATING_TYPES


def build_router(layer, input_shape):
    """The Soft MoE router; `num_slots=None` is sized from a known sequence length."""
    sequence_length = None
    if len(input_shape) > 2 and None not in input_shape[1:-1]:
        sequence_length = int(np.prod(input_shape[1:-1]))
    router_cls = GATING_TYPES.get(layer.config.gating_config.gating_type)
    router = router_cls.from_moe_config(layer.config, name="router", sequence_length=sequence_length)
    router.build((None, None, layer.config.expert_config.hidden_dim))
    return router


def group_tokens(layer, inputs, mask):
    """inputs → `(groups [B, S, d], group_mask [B, S] or None)`; a 2-D input is one group."""
    if len(inputs.shape) == 2:
        groups = ops.expand_dims(inputs, 0)  # one group [1, T, d]
    else:
        groups = ops.reshape(inputs, (ops.shape(inputs)[0], -1, layer.config.expert_config.hidden_dim))
    group_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), ops.shape(groups)[:2])
    return groups, group_mask


def forward(layer, inputs, training, mask):
    """`[..., d]` → `[..., o]`; every token mixes the outputs of every expert's slots."""
    num_experts = layer.config.num_experts
    groups, group_mask = group_tokens(layer, inputs, mask)

    # Route.
    combine_weights, _, info = layer.gating_network(groups, training=training, mask=group_mask)  # [B, S, E*P]

    # Dispatch.
    expert_inputs = dispatch_lib.dispatch_soft(groups, info["dispatch_weights"], num_experts)  # [E, B*P, d]

    # Experts.
    expert_outputs = layer.experts(expert_inputs, training=training)  # [E, B*P, o]

    # Combine.
    outputs = dispatch_lib.combine_soft(expert_outputs, combine_weights)  # [B, S, o]

    token_mask = None if group_mask is None else ops.reshape(group_mask, (-1,))
    _record_statistics(layer, info, token_mask)
    if training:
        logits = ops.reshape(info["gate_logits"], (-1, num_experts * layer.gating_network.num_slots))  # [T, E*P]
        statistics.add_training_losses(layer, {"gate_logits": logits}, token_mask)
    tokens = ops.reshape(inputs, (-1, layer.config.expert_config.hidden_dim))
    outputs = ops.reshape(outputs, (-1, outputs.shape[-1]))  # [T, o]
    return finish(layer, outputs, tokens, None, ops.shape(inputs)[:-1], mask, training)


def _record_statistics(layer, info, token_mask):
    """Each expert's load is its share of the combine weights (nothing is dropped)."""
    expert_mass = ops.reshape(info["raw_gate_probs"], (-1, layer.config.num_experts))  # [T, E]
    if token_mask is not None:
        expert_mass = expert_mass * ops.expand_dims(ops.cast(token_mask, expert_mass.dtype), -1)
    mass = ops.sum(expert_mass, axis=0)
    statistics.record_routing(layer, mass, mass, statistics.count_tokens(expert_mass, token_mask), 0.0)


def routing_decision(layer, inputs, training, mask):
    """`{"weights", "probs"}`: the combine weight per expert `[B, S, E]` (numpy)."""
    groups, group_mask = group_tokens(layer, inputs, mask)
    _, _, info = layer.gating_network(groups, training=training, mask=group_mask)
    probs = to_numpy(info["raw_gate_probs"])
    return {"weights": probs, "probs": probs}
