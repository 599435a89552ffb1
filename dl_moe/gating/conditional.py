"""Difficulty-conditional router: a small learned head predicts how many experts a token needs.

The head predicts a difficulty in [0, 1] per token (trained to match the router's
normalised entropy), and k interpolates between `min_experts` and `max_experts`
across two thresholds. It has no paper of its own; the published dynamic-k routers
here are "top_p" (Huang et al. 2024) and "top_any" (Guo et al. 2024).
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
from dl_moe.losses import _masked_mean

DEFAULT_THRESHOLD_LOW = 0.3
DEFAULT_THRESHOLD_HIGH = 0.7
DEFAULT_DIFFICULTY_LOSS_WEIGHT = 0.01


@keras.saving.register_keras_serializable(package="dl_moe")
class ConditionalGating(ExpertCountRange, BaseGating):
    """Per-token k from a predicted difficulty.

    A small difficulty head (d -> h, ReLU, h -> 1, sigmoid) predicts the difficulty
    D(x) in [0, 1] of each token, and

        k = min_experts + round(clip((D - low) / (high - low), 0, 1) * (max - min))

    so D <= `threshold_low` uses `min_experts`, D >= `threshold_high` uses
    `max_experts` and k grows linearly in between. The experts are the k most probable
    under p = softmax(x W / temperature) (ranked with the aux-free bias when balancing is
    "aux_free"); weights are their raw p (renormalised when `normalize_top_k`).

    The head learns, in training, to predict the router's normalised entropy
    H(p) / log E (a stop-gradient target: how unsure the router is about the token)
    through the loss `difficulty_loss_weight * mean((D - H(p)/log E)^2)`, registered
    with `add_loss`. The head reads a stop-gradient copy of x, so that loss never
    shapes the token representation. k is discrete and takes no gradient.

    Args:
        num_experts: E.
        min_experts: Lower bound of k.
        max_experts: Upper bound of k.
        threshold_low: Difficulty at and below which k = min_experts (0 <= low < high).
        threshold_high: Difficulty at and above which k = max_experts (high <= 1).
        difficulty_loss_weight: Weight of the head's regression loss (0: the head is
            not trained).
        difficulty_hidden_dim: Width h of the head (None: d // 4 clipped to [4, 64]).
        temperature: Divides the logits.
        normalize_top_k: Renormalise the kept weights.
        expected_experts: Average k the layer sizes capacity for (None: the midpoint
            of [min_experts, max_experts]).
        **kwargs: `BaseGating` arguments.

    Call takes `(inputs [T, d], mask [T] or None)` and returns `(weights [T, K],
    indices [T, K], info)`, K = `max_experts`, with `info["active"] [T, K]` and
    `info["difficulty"] [T]`.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = (
        "min_experts", "max_experts", "threshold_low", "threshold_high", "difficulty_loss_weight",
        "expected_experts",
    )
    supports_bias_balancing = True

    def __init__(
        self,
        num_experts,
        min_experts=1,
        max_experts=None,
        threshold_low=DEFAULT_THRESHOLD_LOW,
        threshold_high=DEFAULT_THRESHOLD_HIGH,
        difficulty_loss_weight=DEFAULT_DIFFICULTY_LOSS_WEIGHT,
        difficulty_hidden_dim=None,
        temperature=1.0,
        normalize_top_k=False,
        expected_experts=None,
        **kwargs,
    ):
        kwargs.pop("top_k", None)
        max_experts = max_experts or min(DEFAULT_MAX_EXPERTS, num_experts)
        validate_count_range(type(self).__name__, min_experts, max_experts, num_experts)
        if not 0 <= threshold_low < threshold_high <= 1:
            raise ValueError(
                f"Need 0 <= threshold_low < threshold_high <= 1, got threshold_low={threshold_low!r}, "
                f"threshold_high={threshold_high!r}."
            )
        super().__init__(num_experts, max_experts, **kwargs)
        self.min_experts = int(min_experts)
        self.max_experts = int(max_experts)
        self.threshold_low = float(threshold_low)
        self.threshold_high = float(threshold_high)
        self.difficulty_loss_weight = float(difficulty_loss_weight)
        self.difficulty_hidden_dim = difficulty_hidden_dim
        self.temperature = float(temperature)
        self.normalize_top_k = normalize_top_k
        self.expected_experts = expected_experts
        self.supports_masking = True  # the mask is an explicit call argument

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config

        def pick(value, default):
            return default if value is None else value

        return cls(
            min_experts=gating.min_experts or 1,
            max_experts=gating.max_experts,
            threshold_low=pick(gating.threshold_low, DEFAULT_THRESHOLD_LOW),
            threshold_high=pick(gating.threshold_high, DEFAULT_THRESHOLD_HIGH),
            difficulty_loss_weight=pick(gating.difficulty_loss_weight, DEFAULT_DIFFICULTY_LOSS_WEIGHT),
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            expected_experts=gating.expected_experts,
            **cls.common_kwargs(config, name),
        )

    def build(self, input_shape):
        super().build(input_shape)
        hidden = self.difficulty_hidden_dim or int(min(64, max(4, input_shape[-1] // 4)))
        self.difficulty_kernel_1 = self.add_weight(
            name="difficulty_kernel_1", shape=(input_shape[-1], hidden), initializer="glorot_uniform"
        )
        self.difficulty_bias_1 = self.add_weight(name="difficulty_bias_1", shape=(hidden,), initializer="zeros")
        self.difficulty_kernel_2 = self.add_weight(
            name="difficulty_kernel_2", shape=(hidden, 1), initializer="glorot_uniform"
        )
        self.difficulty_bias_2 = self.add_weight(name="difficulty_bias_2", shape=(1,), initializer="zeros")
        self.built = True

    def difficulty(self, inputs):
        """Predicted difficulty `[T]` in [0, 1]."""
        hidden = ops.relu(ops.matmul(ops.stop_gradient(inputs), self.difficulty_kernel_1) + self.difficulty_bias_1)
        return ops.sigmoid(ops.matmul(hidden, self.difficulty_kernel_2) + self.difficulty_bias_2)[..., 0]

    def call(self, inputs, training=None, mask=None):
        x = self.apply_jitter(inputs, training)
        logits = self.compute_gate_logits(x) / self.temperature  # [T, E]
        probs = ops.softmax(logits, axis=-1)
        difficulty = self.difficulty(inputs)  # [T]
        if training and self.difficulty_loss_weight > 0:
            target = ops.stop_gradient(normalized_entropy(probs))
            self.add_loss(self.difficulty_loss_weight * _masked_mean(ops.square(difficulty - target), mask))
        span = self.threshold_high - self.threshold_low
        score = (ops.stop_gradient(difficulty) - self.threshold_low) / span
        counts = interpolate_count(score, self.min_experts, self.max_experts)  # [T]
        weights, indices, active = self.keep_first(probs, counts)  # [T, K]
        info = {"gate_logits": logits, "raw_gate_probs": probs, "active": active, "difficulty": difficulty}
        return weights, indices, info

    def get_config(self):
        config = super().get_config()
        config.pop("top_k")
        config.update(
            {
                "min_experts": self.min_experts,
                "max_experts": self.max_experts,
                "threshold_low": self.threshold_low,
                "threshold_high": self.threshold_high,
                "difficulty_loss_weight": self.difficulty_loss_weight,
                "difficulty_hidden_dim": self.difficulty_hidden_dim,
                "temperature": self.temperature,
                "normalize_top_k": self.normalize_top_k,
                "expected_experts": self.expected_experts,
            }
        )
        return config
