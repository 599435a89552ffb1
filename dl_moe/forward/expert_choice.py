"""Expert-choice forward (Zhou et al. 2022): every expert picks its C tokens.

route (`[E, C]` tokens and weights per expert) → dispatch (expert e's buffer holds
the tokens it picked) → experts → combine (each token sums the weighted outputs of the
0..E experts that picked it).
"""

import numpy as np

from dl_moe import dispatch as dispatch_lib
from dl_moe import statistics
from dl_moe.forward import common
from dl_moe.forward.common import finish, flatten_tokens, place_on_expert_devices, run_experts, to_numpy
from dl_moe.gating.base import call_router


# Expert-choice routers take the same `[T, d]` tokens as token-choice ones.
build_router = common.build_router


def forward(layer, inputs, training, mask):
    """`[..., d]` → `[..., o]`; each expert computes exactly the tokens it picked."""
    tokens, token_mask, leading_shape = flatten_tokens(layer, inputs, mask)
    num_tokens = dispatch_lib.static_dim(tokens, 0)

    # Route: slot_weights / token_index [E, C] (T marks an empty slot).
    slot_weights, token_index, info = route(layer, tokens, training, token_mask)

    # Dispatch.
    plan = dispatch_lib.plan_expert_choice_dispatch(token_index, num_tokens, layer.config.num_experts)
    expert_inputs = place_on_expert_devices(layer, dispatch_lib.dispatch(tokens, plan), plan)  # [E, C, d]

    # Experts.
    expert_outputs = run_experts(layer, expert_inputs, plan, inputs, mask, training)

    # Combine.
    outputs, hits = dispatch_lib.combine_expert_choice(expert_outputs, plan, slot_weights, num_tokens)
    unrouted = hits == 0  # [T]; a token no expert picked is treated like a fully dropped one
    if token_mask is not None:
        unrouted = unrouted & token_mask

    if training:
        statistics.add_training_losses(layer, info, token_mask, plan.routed_per_expert)
    statistics.record_token_routing(layer, plan, token_mask, unrouted)
    return finish(layer, outputs, tokens, unrouted, leading_shape, mask, training)


def route(layer, tokens, training, token_mask):
    """Routes tokens `[T, ...]`: `(slot_weights [E, C], token_index [E, C], info)`."""
    return call_router(layer.gating_network, layer.experts.router_inputs(tokens), training=training, mask=token_mask)


def routing_decision(layer, inputs, training, mask):
    """The decision as token-choice `[T, E]` arrays (k = E) plus `expert_tokens [E, C]`."""
    tokens, token_mask, _ = flatten_tokens(layer, inputs, mask)
    slot_weights, token_index, info = route(layer, tokens, training, token_mask)
    num_tokens, num_experts = int(tokens.shape[0]), layer.config.num_experts
    token_index, slot_weights = to_numpy(token_index), to_numpy(slot_weights)
    # Row T collects the empty slots and is cut off.
    weights = np.zeros((num_tokens + 1, num_experts), dtype=slot_weights.dtype)
    active = np.zeros((num_tokens + 1, num_experts), dtype=bool)
    for expert in range(num_experts):
        weights[token_index[expert], expert] = slot_weights[expert]
        active[token_index[expert], expert] = True
    return {
        "indices": np.tile(np.arange(num_experts, dtype="int32"), (num_tokens, 1)),
        "weights": weights[:num_tokens],
        "active": active[:num_tokens],
        "probs": to_numpy(info["raw_gate_probs"]),
        "expert_tokens": token_index,
    }
