"""Helpers shared by the dynamic-k routers (a per-token number of experts).

A dynamic-k router ranks the experts of every token, keeps a per-token prefix of the
ranking and returns `[T, K]` weights and indices (K = its most experts per token) plus
`info["active"] [T, K]`: slot j of token t is used iff `active[t, j]`. Inactive slots
carry weight 0, take no expert capacity and cost no expert FLOPs.
"""

import math

from keras import ops

from dl_moe.gating.base import select_top_k


def first_slots_active(counts, max_k):
    """`[T, K]` bool with the first `counts[t]` slots of token t active.

    Args:
        counts: `[T]` number of experts per token (any numeric dtype).
        max_k: K, a Python int.
    """
    slots = ops.arange(max_k, dtype="int32")  # [K]
    return ops.expand_dims(slots, 0) < ops.expand_dims(ops.cast(counts, "int32"), -1)


def finish_weights(weights, active, normalize):
    """Zeroes inactive slots; with `normalize`, rescales the active weights to sum to 1."""
    weights = ops.where(active, weights, ops.zeros_like(weights))
    if normalize:
        weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
    return weights


def normalized_entropy(probs, epsilon=1e-9):
    """Entropy of `probs [..., E]` divided by log(E), in [0, 1] (0 when E == 1)."""
    num_experts = probs.shape[-1]
    if num_experts is None or num_experts < 2:
        return ops.zeros_like(probs[..., 0])
    entropy = -ops.sum(probs * ops.log(probs + epsilon), axis=-1)
    return entropy / math.log(num_experts)


def interpolate_count(score, min_k, max_k):
    """`min_k + round(score * (max_k - min_k))` for `score` in [0, 1] (half to even)."""
    score = ops.clip(score, 0.0, 1.0)
    return ops.cast(min_k + ops.round(score * float(max_k - min_k)), "int32")


def validate_count_range(owner, min_k, max_k, num_experts):
    if not 1 <= min_k <= max_k <= num_experts:
        raise ValueError(
            f"{owner}: need 1 <= min_experts <= max_experts <= num_experts={num_experts}, "
            f"got min_experts={min_k!r}, max_experts={max_k!r}."
        )


# Most experts per token of a min/max-k router when `max_experts` is not set.
DEFAULT_MAX_EXPERTS = 4


class ExpertCountRange:
    """Mixin of routers whose k varies in [min_experts, max_experts] (conditional,
    confidence): the config rule and the expected k that sizes expert capacity.

    The router sets `min_experts`, `max_experts`, `expected_experts` and
    `normalize_top_k` attributes and has `selection_bias()` (from `BaseGating`).
    """

    @classmethod
    def validate_for_layer(cls, moe_config):
        gating = moe_config.gating_config
        max_k = gating.max_experts or min(DEFAULT_MAX_EXPERTS, moe_config.num_experts)
        validate_count_range("GatingConfig", gating.min_experts or 1, max_k, moe_config.num_experts)

    def keep_first(self, probs, counts):
        """The top `max_experts` experts of `probs [T, E]`, the first `counts [T]` active.

        Returns:
            `(weights [T, K], indices [T, K], active [T, K])`, inactive weights zero.
        """
        weights, indices = select_top_k(probs, self.max_experts, False, bias=self.selection_bias())
        active = first_slots_active(counts, self.max_experts)
        return finish_weights(weights, active, self.normalize_top_k), indices, active

    @property
    def expected_k(self):
        """`expected_experts` clipped to the range, else the middle of the range."""
        if self.expected_experts is not None:
            return min(max(float(self.expected_experts), self.min_experts), self.max_experts)
        return (self.min_experts + self.max_experts) / 2
