"""Token-choice forward: every token picks its k experts (linear, cosine, top-p, ...).

route (`[T, k]` weights and experts) → with `overflow="reroute"`, the overflow moved
to fallback experts (`dl_moe.overflow`) → a plan from the table in
`dl_moe.dispatch_plans` runs dispatch → experts → combine (weighted sum of each
token's k outputs) → losses and statistics.
"""

from keras import ops

from dl_moe import dispatch_plans
from dl_moe import expert_parallel  # noqa: F401  (adds JAX's expert-parallel row to the plan table)
from dl_moe import export_compat
from dl_moe import overflow as overflow_lib
from dl_moe import statistics
from dl_moe import torch_eager_plans  # noqa: F401  (adds eager PyTorch's rows to the plan table)
from dl_moe.dispatch_plans import capacity_rows, experts_per_token  # noqa: F401  (public helpers)
from dl_moe.forward import common
from dl_moe.forward.common import finish, flatten_tokens, to_numpy
from dl_moe.gating.base import call_router

build_router = common.build_router


def forward(layer, inputs, training, mask, router_inputs=None):
    """`[..., d]` → `[..., o]`; every token's k assignments computed unless dropped.

    `router_inputs` (`inputs`' shape): what the router sees instead of `inputs`.
    """
    tokens, token_mask, leading_shape = flatten_tokens(layer, inputs, mask)

    # Route.
    router_tokens = None
    if router_inputs is not None:
        router_tokens = ops.reshape(ops.cast(router_inputs, tokens.dtype), ops.shape(tokens))
    weights, indices, active, info = route(layer, tokens, training, token_mask, router_tokens)  # [T, k]

    # Overflow rerouting: a new [T, k] decision whose kept assignments fit the capacity.
    routed_active, reroute = active, None
    dispatch_indices, dispatch_weights = indices, weights
    if layer.config.overflow == "reroute":
        reroute, dispatch_weights = overflow_lib.reroute_routing(
            weights, indices, active, info.get("raw_gate_probs"), layer.config.num_experts,
            capacity_rows(layer, indices, training), layer.config.reroute_attempts,
        )
        dispatch_indices, active = reroute.expert_index, reroute.kept

    # Dispatch → experts → combine, by the plan the table picks for this call.
    dispatched, combine_weights = tokens, dispatch_weights
    if layer.config.scale_expert_inputs:
        dispatched, combine_weights = weight_expert_inputs(tokens, dispatch_weights, active)
    plan = choose_plan(layer, dispatch_indices, training)
    call = dispatch_plans.TokenChoiceCall(
        layer, dispatched, combine_weights, dispatch_indices, active, inputs, mask, training
    )
    result = plan.run(call)
    fully_dropped = ops.any(routed_active, axis=-1) & ~ops.any(result.kept & active, axis=-1)  # [T]

    if reroute is not None:
        # Losses and statistics see the load the router chose, before rerouting.
        result = result._replace(routed_per_expert=reroute.routed_per_expert)
        statistics.record_rerouted(layer, reroute.rerouted)
    if training:
        statistics.add_training_losses(
            layer, info, token_mask, result.routed_per_expert, weights=weights, indices=indices
        )
    statistics.record_token_routing(layer, result, token_mask, fully_dropped)
    return finish(layer, result.outputs, tokens, fully_dropped, leading_shape, mask, training)


def choose_plan(layer, indices, training):
    """The `dispatch_plans.Plan` that runs a call with `[T, k]` assignments
    (`MoEConfig.dispatch`: "auto" or a plan's name)."""
    facts = dispatch_plans.call_facts(layer, indices, training)
    return dispatch_plans.choose_plan(facts, layer.config.dispatch)


def routing_decision(layer, inputs, training, mask):
    """The numpy decision `MixtureOfExperts.route` returns for token-choice routers."""
    tokens, token_mask, _ = flatten_tokens(layer, inputs, mask)
    weights, indices, active, info = route(layer, tokens, training, token_mask)
    decision = {"indices": to_numpy(indices), "weights": to_numpy(weights), "active": to_numpy(active)}
    if info.get("raw_gate_probs") is not None:
        decision["probs"] = to_numpy(info["raw_gate_probs"])
    return decision


def weight_expert_inputs(tokens, weights, active):
    """`scale_expert_inputs` (Llama 4): tokens `[T, d]` times their one weight `[T, 1]`,
    and combine weights of 1 for the active assignments, so the output is expert(w * x)."""
    if weights.shape[-1] != 1:
        raise ValueError(
            f"MoEConfig.scale_expert_inputs=True needs one expert per token, the router gave {weights.shape[-1]}."
        )
    return tokens * ops.cast(weights, tokens.dtype), ops.cast(active, weights.dtype)


def route(layer, tokens, training, token_mask, router_tokens=None):
    """Routes tokens `[T, ...]` (or, when given, `router_tokens [T, d]` in their place).

    Returns:
        `(weights [T, k], indices [T, k] int32, active [T, k] bool, info)`: `active` is
        False for unused dynamic-k slots, masked tokens and (with an active-expert
        mask) dead experts; their weights are zero.
    """
    if router_tokens is None:
        router_tokens = layer.experts.router_inputs(tokens)
    weights, indices, info = call_token_router(layer, router_tokens, training, token_mask)
    active = info.get("active")
    active = ops.ones_like(indices, dtype="bool") if active is None else ops.cast(active, "bool")
    if getattr(layer.gating_network, "has_expert_mask", False):
        # An assignment to a dead expert (top_k above the live count) costs nothing.
        active = active & ops.take(layer.gating_network.live_experts(), indices)
    if token_mask is not None:
        active = active & ops.expand_dims(token_mask, -1)
    weights = ops.where(active, weights, ops.zeros_like(weights))
    return weights, indices, active, info


def call_token_router(layer, router_inputs, training, token_mask=None):
    """Runs the router and normalises its answer to `[T, k]` weights and indices.

    Routers whose `call` takes a `mask` (e.g. "resonance", "conditional") get the
    token mask `[T]`.
    """
    weights, indices, info = call_router(layer.gating_network, router_inputs, training=training, mask=token_mask)
    num_experts = layer.config.num_experts
    if indices is None:
        # Dense [T, E] weights: keep the top_k largest.
        info.setdefault("raw_gate_probs", weights)
        weights, indices = export_compat.top_k(weights, layer.config.gating_config.top_k)
    elif len(indices.shape) == len(weights.shape) - 1:
        # Dense weights with one index per token (e.g. argmax).
        if weights.shape[-1] != num_experts:
            raise ValueError(
                f"A router returning one index per token must return weights of shape "
                f"[T, num_experts={num_experts}], got {weights.shape}."
            )
        info.setdefault("raw_gate_probs", weights)
        indices = ops.expand_dims(indices, -1)
        weights = ops.take_along_axis(weights, ops.cast(indices, "int32"), axis=-1)
    return weights, ops.cast(indices, "int32"), info


