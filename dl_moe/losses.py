"""Router balancing losses (all computed in the routing dtype, unscaled)."""

from keras import ops


def _masked_mean(values, token_weight):
    """Mean of `values [T, ...]` over tokens with `token_weight [T]` in {0, 1}."""
    if token_weight is None:
        return ops.mean(values, axis=0)
    token_weight = ops.cast(token_weight, values.dtype)
    for _ in range(len(values.shape) - 1):
        token_weight = ops.expand_dims(token_weight, -1)
    return ops.sum(values * token_weight, axis=0) / ops.maximum(ops.sum(token_weight, axis=0), 1.0)


def load_balancing_loss(router_probs, routed_per_expert, token_weight=None):
    """Switch/GShard load-balancing loss E * sum_e f_e * P_e.

    f_e is the share of the (active) T*k assignments that chose expert e and P_e the
    mean router probability of e over the (unmasked) tokens, so a perfectly balanced
    router scores 1 for any k. Only P carries gradient.

    Args:
        router_probs: `[T, E]` router probabilities.
        routed_per_expert: `[E]` assignments per expert.
        token_weight: `[T]` 1 for real tokens, 0 for padding (None: all real).

    Returns:
        Scalar loss.
    """
    num_experts = router_probs.shape[-1]
    counts = ops.cast(ops.stop_gradient(routed_per_expert), router_probs.dtype)
    fraction = counts / ops.maximum(ops.sum(counts), 1.0)  # [E]
    mean_prob = _masked_mean(router_probs, token_weight)  # [E]
    return num_experts * ops.sum(fraction * mean_prob)


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
