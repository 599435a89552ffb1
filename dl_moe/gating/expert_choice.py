"""Expert-choice router: every expert picks its top-C tokens instead of tokens picking experts.

Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"
(arXiv:2202.09368): each expert takes the C tokens with the highest router
probability for it, so the load is balanced by construction and a token may get any
number of experts (0 to E); not causal.
"""

import math

import keras
from keras import ops

from dl_moe import export_compat
from dl_moe.gating.base import BaseGating

DEFAULT_CAPACITY_FACTOR = 1.0


def expert_choice_capacity(num_tokens, capacity_factor, num_experts):
    """Tokens per expert C = ceil(T * c / E), at least 1 and at most T.

    `num_tokens` is a Python int, a JAX symbolic dimension (`model.export`), or a scalar
    tensor when T is only known at run time.
    """
    if export_compat.is_symbolic_dim(num_tokens):
        # T >= 1, so the ceiling is >= 1; it exceeds T only when c > E.
        if capacity_factor >= num_experts:
            return num_tokens
        return export_compat.symbolic_ceil(num_tokens, capacity_factor / num_experts)
    if isinstance(num_tokens, int):
        return max(1, min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts)))
    tokens = ops.cast(num_tokens, "float32")
    capacity = ops.cast(ops.ceil(tokens * capacity_factor / num_experts), "int32")
    return ops.maximum(1, ops.minimum(ops.cast(num_tokens, "int32"), capacity))


@keras.saving.register_keras_serializable(package="dl_moe")
class ExpertChoiceGating(BaseGating):
    """p = softmax(x W / temperature) over experts; expert e takes the C tokens with the
    highest p[:, e], C = ceil(T * c / E) with c = `capacity_factor`.

    Every expert processes exactly C tokens (loads are equal by construction, nothing
    is dropped, no balancing loss is needed); a token is processed by 0..E experts, on
    average c, each weighted by its p. Masked tokens are never picked (an expert picks
    fewer than C tokens only when fewer than C tokens are unmasked). Not causal: the
    choice depends on the other tokens of the call.

    Args:
        num_experts: E.
        capacity_factor: c, the average number of experts per token.
        temperature: Divides the logits.
        **kwargs: `BaseGating` arguments.

    Call takes `(inputs [T, d], mask [T] or None)` and returns
    `(weights [E, C], token_index [E, C] int32, info)`: the tokens each expert picked
    (T for an empty slot, weight 0) with `info` keys `gate_logits [T, E]` and
    `raw_gate_probs [T, E]`.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    routing_kind = "expert_choice"

    def __init__(self, num_experts, capacity_factor=DEFAULT_CAPACITY_FACTOR, temperature=1.0, **kwargs):
        kwargs.pop("top_k", None)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}.")
        super().__init__(num_experts, 1, **kwargs)
        self.capacity_factor = float(capacity_factor)
        self.temperature = float(temperature)
        self.supports_masking = True  # the mask is an explicit call argument

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        kwargs = cls.common_kwargs(config, name)
        kwargs.pop("use_expert_bias")
        kwargs.pop("bias_update_rate")
        return cls(
            capacity_factor=gating.capacity_factor or DEFAULT_CAPACITY_FACTOR,
            temperature=gating.temperature or 1.0,
            **kwargs,
        )

    @property
    def expected_k(self):
        return min(self.capacity_factor, self.num_experts)

    def capacity(self, num_tokens):
        return expert_choice_capacity(num_tokens, self.capacity_factor, self.num_experts)

    def call(self, inputs, training=None, mask=None):
        logits = self.compute_gate_logits(self.apply_jitter(inputs, training)) / self.temperature  # [T, E]
        probs = ops.softmax(logits, axis=-1)
        num_tokens = inputs.shape[0] if inputs.shape[0] is not None else ops.shape(inputs)[0]
        scores = probs
        if mask is not None:
            # p is in [0, 1], so a masked token (score -1) is picked only into slots
            # that no unmasked token can fill; those slots are emptied below.
            scores = ops.where(ops.expand_dims(ops.cast(mask, "bool"), -1), probs, -1.0)
        picked, token_index = export_compat.top_k(ops.transpose(scores), self.capacity(num_tokens))  # [E, C]
        token_index = ops.cast(token_index, "int32")
        valid = picked >= 0
        weights = ops.where(valid, picked, ops.zeros_like(picked))
        token_index = ops.where(valid, token_index, ops.cast(num_tokens, "int32"))
        return weights, token_index, {"gate_logits": logits, "raw_gate_probs": probs}

    def get_config(self):
        config = super().get_config()
        config.pop("top_k")
        config.update({"capacity_factor": self.capacity_factor, "temperature": self.temperature})
        return config
