"""Expert-token resonance router: a blend of token->expert and expert->token affinities, then top-k.

Tokens rank experts (a softmax over experts, as in the linear router) and experts
rank tokens (a softmax over the tokens of the call, as in expert choice routing,
Zhou et al. 2022, arXiv:2202.09368); the top-k of the blend is kept. It has no paper
of its own; not causal.
"""

import keras
from keras import ops

from dl_moe.gating.base import BaseGating, select_top_k

DEFAULT_STRENGTH = 0.5
# Masks a logit out of a softmax; small enough for float16.
NEG_INF = -3.0e4


@keras.saving.register_keras_serializable(package="dl_moe")
class ResonanceGating(BaseGating):
    """Top-k of a blend of token->expert and expert->token affinities.

    With `router_kernel [d, E]` (token side) and `expert_kernel [d, E]` (expert side)
    over the T (unmasked) tokens of a call:

        a_te = softmax over experts of x W_te / temperature      [T, E], rows sum to 1
        a_et = softmax over tokens  of x W_et / temperature      [T, E], columns sum to 1
        blend = (1 - beta) * a_te + beta * a_et * T / E          (both average 1/E)
        r = blend / sum_e blend                                  [T, E], rows sum to 1

    Experts are the top-k of r (plus the aux-free bias when balancing is "aux_free");
    weights are their r (renormalised when `normalize_top_k`). beta =
    `bidirectional_strength`: 0 is a linear router, 1 lets experts rank tokens. An
    expert that many tokens prefer spreads its expert-side mass thin, which evens out
    the load. Not causal: the expert-side softmax mixes all tokens of the call.

    Args:
        num_experts: E.
        top_k: k.
        bidirectional_strength: beta in [0, 1].
        temperature: Divides both logits.
        normalize_top_k: Renormalise the kept weights.
        **kwargs: `BaseGating` arguments.

    Call takes `(inputs [T, d], mask [T] or None)`; masked tokens take no part in the
    expert-side softmax. `info` has `gate_logits` (token side), `raw_gate_probs` (r).
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = ("bidirectional_strength",)
    supports_bias_balancing = True

    def __init__(
        self,
        num_experts,
        top_k=2,
        bidirectional_strength=DEFAULT_STRENGTH,
        temperature=1.0,
        normalize_top_k=False,
        **kwargs,
    ):
        if not 0 <= bidirectional_strength <= 1:
            raise ValueError(f"bidirectional_strength must be in [0, 1], got {bidirectional_strength!r}.")
        super().__init__(num_experts, top_k, **kwargs)
        self.bidirectional_strength = float(bidirectional_strength)
        self.temperature = float(temperature)
        self.normalize_top_k = normalize_top_k
        self.supports_masking = True  # the mask is an explicit call argument

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        strength = gating.bidirectional_strength
        return cls(
            top_k=gating.top_k,
            bidirectional_strength=DEFAULT_STRENGTH if strength is None else strength,
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            **cls.common_kwargs(config, name),
        )

    def build(self, input_shape):
        super().build(input_shape)
        self.expert_kernel = self.add_weight(
            name="expert_kernel", shape=(input_shape[-1], self.num_experts), initializer="glorot_uniform"
        )
        self.built = True

    def resonance(self, inputs, mask=None):
        """Returns `(token logits [T, E], r [T, E])`."""
        token_logits = self.compute_gate_logits(inputs) / self.temperature
        token_side = ops.softmax(token_logits, axis=-1)
        expert_logits = ops.matmul(inputs, self.expert_kernel) / self.temperature
        if mask is None:
            num_tokens = ops.cast(ops.shape(inputs)[0], token_side.dtype)
        else:
            mask = ops.cast(mask, "bool")
            expert_logits = ops.where(ops.expand_dims(mask, -1), expert_logits, NEG_INF)
            num_tokens = ops.maximum(ops.sum(ops.cast(mask, token_side.dtype)), 1.0)
        expert_side = ops.softmax(expert_logits, axis=0) * (num_tokens / self.num_experts)
        beta = self.bidirectional_strength
        blend = (1.0 - beta) * token_side + beta * expert_side
        return token_logits, blend / ops.maximum(ops.sum(blend, axis=-1, keepdims=True), 1e-9)

    def call(self, inputs, training=None, mask=None):
        logits, probs = self.resonance(self.apply_jitter(inputs, training), mask)
        weights, indices = select_top_k(probs, self.top_k, self.normalize_top_k, bias=self.selection_bias())
        return weights, indices, {"gate_logits": logits, "raw_gate_probs": probs}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bidirectional_strength": self.bidirectional_strength,
                "temperature": self.temperature,
                "normalize_top_k": self.normalize_top_k,
            }
        )
        return config
