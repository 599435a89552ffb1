"""Routing statistics and balancing losses of a `MixtureOfExperts` layer.

The statistics are non-trainable float32 variables of the layer (so they survive
JAX's stateless train step and round-trip through `.keras` files); the losses are
registered with the layer's `add_loss` in training only, and each one's last unscaled
value is kept in a variable for logging. A new statistic or loss is a change here:
`STATISTICS` names every variable, `add_training_losses` registers every loss and
`routing_stats` reads them back.
"""

import keras
import numpy as np
from keras import ops

from dl_moe.capacity_classes import max_load_factor
from dl_moe.losses import importance_loss, load_balancing_loss, router_entropy_loss, router_z_loss

# (variable name, per expert?) in creation order: the order is part of the `.keras`
# file layout, so new statistics go at the end.
STATISTICS = (
    ("routed_tokens_per_expert", True),  # active assignments per expert, before dropping
    ("processed_tokens_per_expert", True),  # assignments per expert that were computed
    ("seen_tokens", False),  # real (unmasked) tokens
    ("dropped_tokens", False),  # tokens with every assignment dropped (or picked by no expert)
    ("last_aux_loss", False),  # unscaled losses of the last training call
    ("last_z_loss", False),
    ("last_importance_loss", False),
    ("last_entropy_loss", False),
)


# Created only when the layer's config asks for them (so other layers' `.keras` files
# keep their variable layout): name -> (per expert?, predicate of the MoEConfig).
OPTIONAL_STATISTICS = {
    "rerouted_assignments": (False, lambda config: config.overflow == "reroute"),  # moved by overflow="reroute"
}


# Control state: non-trainable variables the forward pass reads back (not statistics,
# so `reset_statistics` keeps them), created only when the config asks for them:
# name -> (predicate of the MoEConfig, initial value from the MoEConfig).
CONTROL_STATE = {
    # Moving average of the largest expert load over the mean (adaptive_capacity).
    "capacity_load_factor": (lambda config: config.adaptive_capacity, lambda config: config.max_capacity_factor),
}


def _layer_statistics(layer):
    """Names of the statistics variables `layer` holds (`STATISTICS` + optional ones)."""
    names = [name for name, _ in STATISTICS]
    return names + [name for name in OPTIONAL_STATISTICS if getattr(layer, name, None) is not None]


def create_statistics(layer, num_experts):
    """Creates the `STATISTICS` variables (and the optional ones the config asks for)
    as attributes of `layer` (zeros, float32); an optional one not asked for is None."""
    optional = [(name, per_expert) for name, (per_expert, wanted) in OPTIONAL_STATISTICS.items() if wanted(layer.config)]
    for name, per_expert in list(STATISTICS) + optional:
        variable = layer.add_weight(
            name=name,
            shape=(num_experts,) if per_expert else (),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )
        setattr(layer, name, variable)
    for name in OPTIONAL_STATISTICS:
        if name not in dict(optional):
            setattr(layer, name, None)
    for name, (wanted, initial) in CONTROL_STATE.items():
        variable = None
        if wanted(layer.config):
            variable = layer.add_weight(
                name=name,
                shape=(),
                initializer=keras.initializers.Constant(initial(layer.config)),
                trainable=False,
                dtype="float32",
                autocast=False,
            )
        setattr(layer, name, variable)


def reset_statistics(layer):
    """Sets every statistics variable of `layer` back to zero."""
    for name in _layer_statistics(layer):
        variable = getattr(layer, name)
        variable.assign(ops.zeros(variable.shape, variable.dtype))


def update_capacity_load_factor(layer, loads):
    """Moves `capacity_load_factor` toward this call's largest load over the mean load
    (loads `[E]`), with weight 1 - `capacity_decay`."""
    decay = layer.config.capacity_decay
    measured = ops.stop_gradient(max_load_factor(loads))
    layer.capacity_load_factor.assign(decay * layer.capacity_load_factor + (1.0 - decay) * measured)


def record_rerouted(layer, rerouted):
    """Adds one call's `[T, k]` bool rerouted assignments to `rerouted_assignments`."""
    layer.rerouted_assignments.assign_add(ops.stop_gradient(ops.sum(ops.cast(rerouted, "float32"))))


def count_tokens(per_token, token_mask):
    """Real tokens of a call: `token_mask [T]` summed, or T without a mask."""
    if token_mask is None:
        return ops.cast(ops.shape(per_token)[0], "float32")
    return ops.sum(ops.cast(token_mask, "float32"))


def record_routing(layer, routed_per_expert, processed_per_expert, num_tokens, dropped_tokens):
    """Adds one call's counts to the statistics.

    Args:
        routed_per_expert: `[E]` active assignments per expert (before dropping).
        processed_per_expert: `[E]` computed assignments per expert.
        num_tokens: Scalar, real tokens of the call.
        dropped_tokens: Scalar, tokens none of whose assignments was computed.
    """
    as_stat = lambda x: ops.stop_gradient(ops.cast(x, "float32"))  # noqa: E731
    layer.routed_tokens_per_expert.assign_add(as_stat(routed_per_expert))
    layer.processed_tokens_per_expert.assign_add(as_stat(processed_per_expert))
    layer.seen_tokens.assign_add(as_stat(num_tokens))
    layer.dropped_tokens.assign_add(as_stat(dropped_tokens))


def record_token_routing(layer, plan, token_mask, unrouted):
    """`record_routing` for a dispatch plan; `unrouted [T]` marks real tokens no expert computed."""
    dropped = ops.cast(unrouted, "float32")
    record_routing(
        layer, plan.routed_per_expert, plan.processed_per_expert, count_tokens(dropped, token_mask), ops.sum(dropped)
    )


def _register_loss(layer, name, weight, compute):
    """`layer.add_loss(weight * loss)` and keeps the unscaled loss in `last_{name}_loss`."""
    if not weight > 0:
        return
    loss = compute()
    layer.add_loss(weight * loss)
    getattr(layer, f"last_{name}_loss").assign(ops.cast(ops.stop_gradient(loss), "float32"))


def add_training_losses(layer, info, token_mask, routed_per_expert=None, weights=None, indices=None):
    """Registers the balancing losses of one training call and moves the aux-free bias.

    Args:
        layer: The `MixtureOfExperts` layer (its config gives the loss weights).
        info: The router's info dict: `gate_logits` feed the z-loss, `raw_gate_probs`
            the Switch loss (token-choice routers only) and the entropy loss.
        token_mask: `[T]` bool or None; masked tokens count in no loss.
        routed_per_expert: `[E]` active assignments per expert (Switch loss, bias update).
        weights, indices: `[T, k]` token-choice decision (importance loss).
    """
    gating = layer.config.gating_config
    router = layer.gating_network
    probs, logits = info.get("raw_gate_probs"), info.get("gate_logits")
    # Active-expert mask: the losses balance over the live experts only (dead ones have
    # probability 0 and no gradient, so no loss can push load onto them).
    live = router.live_experts() if getattr(router, "has_expert_mask", False) else None
    num_live = None if live is None else ops.sum(ops.cast(live, "float32"))
    if weights is not None and indices is not None:
        _register_loss(
            layer, "importance", gating.importance_loss_weight,
            lambda: importance_loss(weights, indices, layer.config.num_experts, token_mask, live_experts=live),
        )
    entropy_weight = gating.entropy_loss_weight
    if entropy_weight is None:
        entropy_weight = getattr(router, "default_entropy_loss_weight", 0.0)
    if probs is not None:
        _register_loss(layer, "entropy", entropy_weight, lambda: router_entropy_loss(probs, token_mask))
    if routed_per_expert is not None and gating.balancing == "aux_free" and hasattr(router, "update_expert_bias"):
        # DeepSeek-V3: this batch's load moves the selection bias used from the next
        # step on. A variable assignment, so it is carried by every backend's fit.
        router.update_expert_bias(routed_per_expert)
    if probs is not None and gating.balancing == "aux_loss" and router.routing_kind == "token_choice":
        _register_loss(
            layer, "aux", gating.aux_loss_weight,
            lambda: load_balancing_loss(probs, routed_per_expert, token_mask, num_experts=num_live),
        )
    if logits is not None:
        _register_loss(layer, "z", gating.z_loss_weight, lambda: router_z_loss(logits, token_mask))


def _to_numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable), dtype="float64")


def expert_utilization(layer):
    """Measured share of routed assignments per expert: numpy `[E]` summing to 1 (zeros before any call)."""
    routed = _to_numpy(layer.routed_tokens_per_expert)
    total = routed.sum()
    return routed / total if total > 0 else routed


def _rerouted_fraction(layer, routed_total):
    """Share of routed assignments `overflow="reroute"` moved (0 without rerouting)."""
    if getattr(layer, "rerouted_assignments", None) is None or routed_total <= 0:
        return 0.0
    return float(_to_numpy(layer.rerouted_assignments)) / routed_total


def live_expert_mask(layer):
    """numpy `[E]` bool of the live experts (all True without an active-expert mask)."""
    router = layer.gating_network
    if not getattr(router, "has_expert_mask", False):
        return np.ones((layer.config.num_experts,), dtype=bool)
    return _to_numpy(router.active_experts) > 0.5


def _load_cv(layer, routed):
    """std / mean of the per-expert load `[E]`, over the live experts only."""
    routed = routed[live_expert_mask(layer)]
    return float(routed.std() / routed.mean()) if routed.size and routed.sum() > 0 else 0.0


def routing_stats(layer):
    """The dict `MixtureOfExperts.get_routing_stats` returns (see there)."""
    routed = _to_numpy(layer.routed_tokens_per_expert)
    processed = _to_numpy(layer.processed_tokens_per_expert)
    tokens = float(_to_numpy(layer.seen_tokens))
    total = routed.sum()
    stats = {
        "expert_fraction": expert_utilization(layer),
        "avg_experts_per_token": total / tokens if tokens > 0 else 0.0,
        "dropped_fraction": float(1.0 - processed.sum() / total) if total > 0 else 0.0,
        "dropped_token_fraction": float(_to_numpy(layer.dropped_tokens)) / tokens if tokens > 0 else 0.0,
        "rerouted_fraction": _rerouted_fraction(layer, total),
        "load_cv": _load_cv(layer, routed),
        "tokens": tokens,
        "aux_loss": float(_to_numpy(layer.last_aux_loss)),
        "z_loss": float(_to_numpy(layer.last_z_loss)),
        "importance_loss": float(_to_numpy(layer.last_importance_loss)),
        "entropy_loss": float(_to_numpy(layer.last_entropy_loss)),
    }
    router = layer.gating_network
    if getattr(router, "has_expert_mask", False):
        bias = router.expert_bias if router.use_expert_bias else None  # unmasked values
    else:
        bias = getattr(router, "selection_bias", lambda: None)()
    if bias is not None:
        stats["expert_bias"] = _to_numpy(bias)
    if getattr(layer.gating_network, "has_expert_mask", False):
        stats["active_experts"] = live_expert_mask(layer)
    if getattr(layer, "capacity_load_factor", None) is not None:
        stats["capacity_load_factor"] = float(_to_numpy(layer.capacity_load_factor))
    return stats
