"""Top-p router: each token keeps its most probable experts until their mass reaches p.

Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models"
(ACL 2024, arXiv:2403.07652): a confident token uses one expert and an uncertain one
several; their dynamic (entropy) loss keeps the router from flattening its
distribution to buy more experts (`GatingConfig.entropy_loss_weight`).
"""

import math

import keras
from keras import ops

from dl_moe.gating.base import BaseGating, select_top_k
from dl_moe.gating.dynamic import finish_weights

DEFAULT_THRESHOLD = 0.4


def top_p_slot_count(num_experts, threshold, max_experts=None):
    """The most experts top-p can keep: K = min(max_experts, floor(threshold * E) + 1).

    Sorted probabilities p_(1) >= p_(2) >= ... have a prefix sum of j terms >= j / E,
    so expert j + 1 can only be kept when j / E < threshold. K is therefore a static
    bound, and the router returns `[T, K]` slots instead of `[T, E]`.
    """
    bound = min(num_experts, math.floor(threshold * num_experts + 1e-6) + 1)
    return max(1, min(bound, max_experts or num_experts))


@keras.saving.register_keras_serializable(package="dl_moe")
class TopPGating(BaseGating):
    """Keep the most probable experts until their mass reaches `threshold`.

    p = softmax(x W / temperature). Experts are ranked by p (plus the aux-free bias when
    balancing is "aux_free"); expert j of the ranking is kept iff the probability mass
    of the experts ranked before it is below `threshold`, so the first is always kept
    and a confident token uses one expert. Weights are the raw p of the kept experts
    (renormalised when `normalize_top_k`). Pair it with the entropy loss
    (`GatingConfig.entropy_loss_weight`, default 1e-4 for this router) so that the
    router does not flatten to use more experts.

    Args:
        num_experts: E.
        threshold: Probability mass in (0, 1].
        max_experts: Cap on experts per token (None: no cap beyond the bound of
            `top_p_slot_count`).
        temperature: Divides the logits.
        normalize_top_k: Renormalise the kept weights.
        expected_experts: Average experts per token the layer sizes expert capacity
            for (None: midpoint of [1, K]).
        **kwargs: `BaseGating` arguments.

    Call returns `(weights [T, K], indices [T, K], info)` with `info["active"] [T, K]`.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = ("top_p_threshold", "max_experts", "expected_experts")
    supports_bias_balancing = True
    supports_expert_mask = True
    default_entropy_loss_weight = 1e-4

    def __init__(
        self,
        num_experts,
        threshold=DEFAULT_THRESHOLD,
        max_experts=None,
        temperature=1.0,
        normalize_top_k=False,
        expected_experts=None,
        **kwargs,
    ):
        kwargs.pop("top_k", None)
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}.")
        if max_experts is not None and not 1 <= max_experts <= num_experts:
            raise ValueError(f"max_experts must be in [1, num_experts={num_experts}], got {max_experts!r}.")
        slots = top_p_slot_count(num_experts, threshold, max_experts)
        super().__init__(num_experts, slots, **kwargs)
        self.threshold = float(threshold)
        self.max_experts = max_experts
        self.temperature = float(temperature)
        self.normalize_top_k = normalize_top_k
        self.expected_experts = expected_experts

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            threshold=DEFAULT_THRESHOLD if gating.top_p_threshold is None else gating.top_p_threshold,
            max_experts=gating.max_experts,
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            expected_experts=gating.expected_experts,
            **cls.common_kwargs(config, name),
        )

    @property
    def expected_k(self):
        if self.expected_experts is not None:
            return min(float(self.expected_experts), self.top_k)
        return (1 + self.top_k) / 2

    def call(self, inputs, training=None):
        x = self.apply_jitter(inputs, training)
        logits = self.mask_logits(self.compute_gate_logits(x) / self.temperature)  # [T, E]
        probs = ops.softmax(logits, axis=-1)
        weights, indices = select_top_k(probs, self.top_k, False, bias=self.selection_bias())  # [T, K]
        mass_before = ops.cumsum(weights, axis=-1) - weights
        first = ops.expand_dims(ops.arange(self.top_k, dtype="int32") == 0, 0)  # [1, K]
        active = (mass_before < self.threshold) | first
        weights = finish_weights(weights, active, self.normalize_top_k)
        return weights, indices, {"gate_logits": logits, "raw_gate_probs": probs, "active": active}

    def get_config(self):
        config = super().get_config()
        config.pop("top_k")
        config.update(
            {
                "threshold": self.threshold,
                "max_experts": self.max_experts,
                "temperature": self.temperature,
                "normalize_top_k": self.normalize_top_k,
                "expected_experts": self.expected_experts,
            }
        )
        return config
