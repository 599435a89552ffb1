"""Router balancing losses (all computed in the routing dtype, unscaled).

* `load_balancing_loss`: E * sum_e f_e * P_e of Fedus, Zoph and Shazeer 2021,
  "Switch Transformers" (arXiv:2101.03961), after the auxiliary loss of Lepikhin et
  al. 2020, "GShard" (arXiv:2006.16668).
* `router_z_loss`: mean logsumexp(logits)^2 of Zoph et al. 2022, "ST-MoE: Designing
  Stable and Transferable Sparse Expert Models" (arXiv:2202.08906).
* `importance_loss`: CV^2 of the per-expert routing weight, Shazeer et al. 2017,
  "Outrageously Large Neural Networks" (arXiv:1701.06538).
* `router_entropy_loss`: the mean entropy of the router's distribution, the dynamic
  loss of Huang et al. 2024, "Harder Tasks Need More Experts" (arXiv:2403.07652).

The auxiliary-loss-free alternative (a selection bias, no loss) lives with the
routers (`BaseGating.update_expert_bias`).
"""

from keras import ops


def _masked_mean(values, token_weight):
    """Mean of `values [T, ...]` over tokens with `token_weight [T]` in {0, 1}."""
    if token_weight is None:
        return ops.mean(values, axis=0)
    token_weight = ops.cast(token_weight, values.dtype)
    for _ in range(len(values.shape) - 1):
        token_weight = ops.expand_dims(token_weight, -1)
    return ops.sum(values * token_weight, axis=0) / ops.maximum(ops.sum(token_weight, axis=0), 1.0)


def load_balancing_loss(router_probs, routed_per_expert, token_weight=None, num_experts=None):
    """Switch/GShard load-balancing loss E * sum_e f_e * P_e.

    f_e is the share of the (active) T*k assignments that chose expert e and P_e the
    mean router probability of e over the (unmasked) tokens, so a perfectly balanced
    router scores 1 for any k. Only P carries gradient.

    Args:
        router_probs: `[T, E]` router probabilities.
        routed_per_expert: `[E]` assignments per expert.
        token_weight: `[T]` 1 for real tokens, 0 for padding (None: all real).
        num_experts: The E of the factor (None: `router_probs.shape[-1]`); with an
            active-expert mask the number of live experts, so that a router balanced
            over the live experts still scores 1.

    Returns:
        Scalar loss.
    """
    if num_experts is None:
        num_experts = router_probs.shape[-1]
    counts = ops.cast(ops.stop_gradient(routed_per_expert), router_probs.dtype)
    fraction = counts / ops.maximum(ops.sum(counts), 1.0)  # [E]
    mean_prob = _masked_mean(router_probs, token_weight)  # [E]
    return ops.cast(num_experts, router_probs.dtype) * ops.sum(fraction * mean_prob)


def router_z_loss(router_logits, token_weight=None):
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

    Args:
        router_logits: `[T, E]` router logits.
        token_weight: `[T]` 1 for real tokens, 0 for padding (None: all real).

    Returns:
        Scalar loss.
    """
    z = ops.logsumexp(router_logits, axis=-1)  # [T]
    return _masked_mean(ops.square(z), token_weight)


def importance_loss(expert_weights, expert_indices, num_experts, token_weight=None, live_experts=None):
    """Importance loss of Shazeer et al. 2017: CV^2 of the per-expert routing weight.

    importance_e = sum over tokens and choices of the weight given to expert e; the loss
    is Var(importance) / Mean(importance)^2 (population variance), 0 when every expert
    receives the same total weight. The gradient flows through the weights.

    Args:
        expert_weights: `[T, k]` routing weights (zero for inactive assignments).
        expert_indices: `[T, k]` int experts of those weights.
        num_experts: E.
        token_weight: `[T]` 1 for real tokens, 0 for padding (None: all real).
        live_experts: Optional `[E]` bool; the CV^2 is taken over these experts only
            (dead experts of an active-expert mask have importance 0 and no gradient).

    Returns:
        Scalar loss.
    """
    weights = expert_weights
    if token_weight is not None:
        weights = weights * ops.expand_dims(ops.cast(token_weight, weights.dtype), -1)
    one_hot = ops.one_hot(ops.cast(expert_indices, "int32"), num_experts, dtype=weights.dtype)  # [T, k, E]
    importance = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=(0, 1))  # [E]
    if live_experts is None:
        return coefficient_of_variation_squared(importance)
    live = ops.cast(live_experts, importance.dtype)
    count = ops.maximum(ops.sum(live), 1.0)
    mean = ops.sum(importance * live) / count
    variance = ops.sum(ops.square(importance - mean) * live) / count
    return variance / (ops.square(mean) + 1e-10)


def coefficient_of_variation_squared(values, epsilon=1e-10):
    """Var(values) / (Mean(values)^2 + epsilon) over a 1-D tensor."""
    mean = ops.mean(values)
    return ops.mean(ops.square(values - mean)) / (ops.square(mean) + epsilon)


def router_entropy_loss(router_probs, token_weight=None, epsilon=1e-9):
    """Mean over tokens of the router entropy -sum_e p_e log p_e (nats).

    Minimising it sharpens the router (used with top-p routing, whose number of
    experts grows as the distribution flattens).

    Args:
        router_probs: `[T, E]` router probabilities.
        token_weight: `[T]` 1 for real tokens, 0 for padding (None: all real).

    Returns:
        Scalar loss.
    """
    entropy = -ops.sum(router_probs * ops.log(router_probs + epsilon), axis=-1)  # [T]
    return _masked_mean(entropy, token_weight)
