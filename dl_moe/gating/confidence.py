"""Confidence-based dynamic-k router: fewer experts for confident tokens, more for uncertain ones.

k grows linearly with a complexity score that mixes 1 - max p and the normalised
entropy of the router's distribution. It has no paper of its own; it follows the idea
of Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(arXiv:2403.07652), whose threshold rule is the "top_p" router.
"""

import keras
from keras import ops

from dl_moe.gating.base import BaseGating
from dl_moe.gating.dynamic import (
    DEFAULT_MAX_EXPERTS,
    ExpertCountRange,
    interpolate_count,
    normalized_entropy,
    validate_count_range,
)


@keras.saving.register_keras_serializable(package="dl_moe")
class ConfidenceGating(ExpertCountRange, BaseGating):
    """Fewer experts for confident tokens, more for uncertain ones.

    p = softmax(x W / temperature) `[T, E]`, then per token

        complexity = 0.6 * (1 - max_e p) + 0.4 * H(p) / log(E)      in [0, 1]
        complexity = clip(complexity * layer_depth_scale, 0, 1)
        k          = min_experts + round(complexity * (max_experts - min_experts))

    (with `min_experts = 1`: k = 1 + round(complexity * (max - 1))).
    The k most probable experts are kept (ranked by p plus the aux-free bias when
    balancing is "aux_free"); weights are their raw p (renormalised when
    `normalize_top_k`). The complexity carries no gradient: k is discrete.

    Args:
        num_experts: E.
        min_experts: Lower bound of k.
        max_experts: Upper bound of k.
        layer_depth_scale: Multiplies the complexity (e.g. 1 + 0.5 * depth / layers).
        temperature: Divides the logits.
        normalize_top_k: Renormalise the kept weights.
        expected_experts: Average k the layer sizes capacity for (None: the midpoint
            of [min_experts, max_experts]).
        **kwargs: `BaseGating` arguments.

    Call returns `(weights [T, K], indices [T, K], info)`, K = `max_experts`, with
    `info["active"] [T, K]` and `info["complexity"] [T]`.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = ("min_experts", "max_experts", "layer_depth_scale", "expected_experts")
    supports_bias_balancing = True

    def __init__(
        self,
        num_experts,
        min_experts=1,
        max_experts=None,
        layer_depth_scale=1.0,
        temperature=1.0,
        normalize_top_k=False,
        expected_experts=None,
        **kwargs,
    ):
        kwargs.pop("top_k", None)
        max_experts = max_experts or min(DEFAULT_MAX_EXPERTS, num_experts)
        validate_count_range(type(self).__name__, min_experts, max_experts, num_experts)
        if layer_depth_scale <= 0:
            raise ValueError(f"layer_depth_scale must be > 0, got {layer_depth_scale!r}.")
        super().__init__(num_experts, max_experts, **kwargs)
        self.min_experts = int(min_experts)
        self.max_experts = int(max_experts)
        self.layer_depth_scale = float(layer_depth_scale)
        self.temperature = float(temperature)
        self.normalize_top_k = normalize_top_k
        self.expected_experts = expected_experts

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            min_experts=gating.min_experts or 1,
            max_experts=gating.max_experts,
            layer_depth_scale=1.0 if gating.layer_depth_scale is None else gating.layer_depth_scale,
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            expected_experts=gating.expected_experts,
            **cls.common_kwargs(config, name),
        )

    def complexity(self, probs):
        """Per-token complexity `[T]` in [0, 1] (after `layer_depth_scale`)."""
        confidence = ops.max(probs, axis=-1)
        score = 0.6 * (1.0 - confidence) + 0.4 * normalized_entropy(probs)
        return ops.clip(score * self.layer_depth_scale, 0.0, 1.0)

    def call(self, inputs, training=None):
        x = self.apply_jitter(inputs, training)
        logits = self.compute_gate_logits(x) / self.temperature  # [T, E]
        probs = ops.softmax(logits, axis=-1)
        complexity = ops.stop_gradient(self.complexity(probs))  # [T]
        counts = interpolate_count(complexity, self.min_experts, self.max_experts)  # [T]
        weights, indices, active = self.keep_first(probs, counts)  # [T, K]
        info = {"gate_logits": logits, "raw_gate_probs": probs, "active": active, "complexity": complexity}
        return weights, indices, info

    def get_config(self):
        config = super().get_config()
        config.pop("top_k")
        config.update(
            {
                "min_experts": self.min_experts,
                "max_experts": self.max_experts,
                "layer_depth_scale": self.layer_depth_scale,
                "temperature": self.temperature,
                "normalize_top_k": self.normalize_top_k,
                "expected_experts": self.expected_experts,
            }
        )
        return config
