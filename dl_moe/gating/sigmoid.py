"""Sigmoid router: independent per-expert sigmoid scores, top-k on the scores plus a bias.

DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv:2412.19437): scores =
sigmoid(x W); the selection adds the auxiliary-loss-free balancing bias of Wang et
al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(arXiv:2408.15664) and can be limited to each token's best groups of experts; the
weights are the selected unbiased scores, optionally renormalised, and scaled. With
top_k=1 and a shared expert it is also the router of Meta's Llama 4 models (2025; no
paper).
"""

import keras
from keras import ops

from dl_moe import export_compat
from dl_moe.gating.linear import LinearGating


def group_limited_mask(choice, num_groups, top_k_groups):
    """Which experts lie in each token's `top_k_groups` best groups (DeepSeek-V3).

    The E experts form `num_groups` groups of consecutive experts; a group's score is
    the sum of its two best `choice` scores (its one score when a group has one expert).

    Args:
        choice: Selection scores `[T, E]`.
        num_groups: G, a divisor of E.
        top_k_groups: Groups kept per token.

    Returns:
        bool `[T, E]`, True for the experts of the kept groups.
    """
    num_experts = choice.shape[-1]
    group_size = num_experts // num_groups
    grouped = ops.reshape(choice, (-1, num_groups, group_size))  # [T, G, E/G]
    best, _ = export_compat.top_k(grouped, min(2, group_size))
    group_scores = ops.sum(best, axis=-1)  # [T, G]
    _, kept_groups = export_compat.top_k(group_scores, top_k_groups)  # [T, kg]
    kept = ops.sum(ops.one_hot(kept_groups, num_groups, dtype="float32"), axis=-2) > 0  # [T, G]
    return ops.reshape(ops.repeat(kept, group_size, axis=-1), ops.shape(choice))


@keras.saving.register_keras_serializable(package="dl_moe")
class SigmoidGating(LinearGating):
    """scores = sigmoid(x W + b); top-k of the scores; weights = the selected scores.

    Each expert's score is independent of the others' (no softmax). Selection uses the
    scores plus the aux-free balancing bias (`balancing="aux_free"`), the weights the
    unbiased scores. With `num_expert_groups` G the selection is group-limited: the
    experts form G groups of E/G consecutive experts, each token keeps its
    `top_k_groups` groups with the largest sum of their two best (biased) scores, and
    picks its top-k experts inside them. Then the weights are optionally renormalised
    to sum to 1 (`normalize_top_k`, w / (sum w + 1e-20)) and multiplied by
    `routed_scaling_factor`.

    DeepSeek-V3: E=256, k=8, G=8, top_k_groups=4, normalize_top_k=True,
    routed_scaling_factor=2.5, aux-free balancing, one shared expert. Llama 4: k=1,
    normalize_top_k=False (weight = sigmoid of the best logit), one shared expert and
    `MoEConfig.scale_expert_inputs=True` (the weight scales the expert's input).

    Args:
        num_experts: E.
        top_k: k.
        num_expert_groups: G (None: no group limit). Must divide E.
        top_k_groups: Groups kept per token (with G).
        routed_scaling_factor: Multiplies the final weights.
        **kwargs: `LinearGating` arguments (`temperature`, `normalize_top_k`,
            `use_router_bias`, noise, `use_expert_bias`, ...).

    Call returns `(weights [..., k], indices [..., k], info)`; `info["gate_logits"]`
    are the logits and `info["raw_gate_probs"]` the scores normalised to sum to 1 over
    the experts (what the Switch loss and the statistics read).
    """

    # Independent sigmoid scores: a split's shared probability mass (-log 2 offsets)
    # has no meaning here, so the active-expert mask is not offered.
    supports_expert_mask = False

    reads_expert_groups = True

    def __init__(self, num_experts, top_k=2, num_expert_groups=None, top_k_groups=1,
                 routed_scaling_factor=1.0, **kwargs):
        super().__init__(num_experts, top_k, **kwargs)
        if num_expert_groups is not None:
            self._check_groups(num_experts, top_k, num_expert_groups, top_k_groups, "num_expert_groups")
        elif top_k_groups != 1:
            raise ValueError(f"top_k_groups={top_k_groups!r} needs num_expert_groups to be set.")
        self.num_expert_groups = num_expert_groups
        self.top_k_groups = top_k_groups
        self.routed_scaling_factor = float(routed_scaling_factor)

    @staticmethod
    def _check_groups(num_experts, top_k, groups, top_k_groups, field):
        ok = (
            isinstance(groups, int) and 2 <= groups <= num_experts and num_experts % groups == 0
            and 1 <= top_k_groups <= groups and top_k <= top_k_groups * (num_experts // groups)
        )
        if not ok:
            raise ValueError(
                f"{field} must be a divisor of num_experts={num_experts} in [2, {num_experts}] with "
                f"1 <= top_k_groups={top_k_groups} <= groups and top_k={top_k} <= top_k_groups * "
                f"group size, got {groups!r}."
            )

    @classmethod
    def validate_expert_groups(cls, moe_config):
        """Checks `MoEConfig.num_expert_groups` / `top_k_groups` for this router."""
        groups, top_k_groups = moe_config.num_expert_groups, moe_config.top_k_groups
        if groups is None:
            if top_k_groups != 1:
                raise ValueError(
                    f"MoEConfig.top_k_groups={top_k_groups!r} needs MoEConfig.num_expert_groups "
                    "(group-limited routing of the 'sigmoid' router)."
                )
            return
        cls._check_groups(
            moe_config.num_experts, moe_config.gating_config.top_k, groups, top_k_groups, "MoEConfig.num_expert_groups"
        )

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            top_k=gating.top_k,
            num_expert_groups=config.num_expert_groups,
            top_k_groups=config.top_k_groups,
            routed_scaling_factor=1.0 if gating.routed_scaling_factor is None else gating.routed_scaling_factor,
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            add_noise=gating.add_noise,
            noise_std=gating.noise_std,
            use_router_bias=gating.use_router_bias,
            **cls.common_kwargs(config, name),
        )

    config_fields = ("routed_scaling_factor",)

    def call(self, inputs, training=None):
        x = self.apply_jitter(inputs, training)
        logits = self.compute_gate_logits(x) / self.temperature  # [T, E]
        selection_logits = logits
        if training and self.add_noise:
            noise_scale = ops.softplus(ops.matmul(x, self.noise_kernel)) * self.noise_std
            noise = keras.random.normal(ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator)
            selection_logits = logits + noise * noise_scale
        scores = ops.sigmoid(selection_logits)  # [T, E]
        bias = self.selection_bias()
        choice = scores if bias is None else scores + ops.cast(bias, scores.dtype)
        if self.num_expert_groups is not None:
            kept = group_limited_mask(choice, self.num_expert_groups, self.top_k_groups)
            choice = ops.where(kept, choice, ops.full_like(choice, float("-inf")))
        _, indices = export_compat.top_k(choice, self.top_k)
        weights = ops.take_along_axis(scores, indices, axis=-1)  # [T, k]
        if self.normalize_top_k:
            weights = weights / (ops.sum(weights, axis=-1, keepdims=True) + 1e-20)
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        probs = scores / ops.sum(scores, axis=-1, keepdims=True)
        return weights, ops.cast(indices, "int32"), {"gate_logits": logits, "raw_gate_probs": probs}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_expert_groups": self.num_expert_groups,
                "top_k_groups": self.top_k_groups,
                "routed_scaling_factor": self.routed_scaling_factor,
            }
        )
        return config
