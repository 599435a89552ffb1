"""Soft MoE router: every expert slot is a softmax-weighted mix of all tokens.

Puigcerver, Riquelme, Mustafa and Houlsby 2023, "From Sparse to Soft Mixtures of
Experts" (arXiv:2308.00951): dispatch weights are a softmax over the tokens of a
sequence per slot, combine weights a softmax over the slots per token, so nothing is
dropped and no balancing loss is needed; not causal.
"""

import math

import keras
from keras import ops

from dl_moe.gating.base import BaseGating
from dl_moe.gating.cosine import l2_normalize

# Large enough to zero a softmax term, small enough for float16.
NEG_INF = -3.0e4


@keras.saving.register_keras_serializable(package="dl_moe")
class SoftMoEGating(BaseGating):
    """Soft routing over groups of tokens (one group = one sequence).

    For a group x `[B, S, d]` and slot parameters `slot_embeddings [d, E*P]`
    (P = `num_slots` per expert):

        logits[b, m, n] = normalize(x[b, m]) . normalize(slot_embeddings[:, n]) * scale
        dispatch = softmax over tokens m     (each slot n is a convex mix of tokens)
        combine  = softmax over slots n      (each token mixes the slot outputs)

    `scale` is learnable (initial value 1) when `learnable_temperature` is on.
    No token is dropped and there is no auxiliary loss. Not causal: a slot mixes the
    whole sequence.

    Args:
        num_experts: E.
        num_slots: Slots per expert P.
        learnable_temperature: Train `scale`.
        jitter_noise: Multiplicative router-input noise in training.
        seed: Seed of the noise generator.

    Call takes `inputs [B, S, d]` and an optional `mask [B, S]` (masked tokens enter no
    slot) and returns `(combine [B, S, E*P], None, info)` with `info` keys
    `dispatch_weights [B, S, E*P]`, `gate_logits [B, S, E*P]` and
    `raw_gate_probs [B, S, E]` (combine weight summed per expert).
    """

    routing_kind = "soft"

    def __init__(self, num_experts, num_slots=1, learnable_temperature=True, jitter_noise=0.0, seed=None, **kwargs):
        kwargs.pop("top_k", None)
        super().__init__(num_experts, 1, jitter_noise=jitter_noise, seed=seed, **kwargs)
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be a positive integer, got {num_slots!r}.")
        self.num_slots = num_slots
        self.supports_masking = True  # the mask is an explicit call argument
        self.learnable_temperature = learnable_temperature

    @classmethod
    def from_moe_config(cls, config, name=None, sequence_length=None):
        num_slots = config.gating_config.num_slots
        if num_slots is None:
            num_slots = max(1, math.ceil(sequence_length / config.num_experts)) if sequence_length else 1
        return cls(
            num_experts=config.num_experts,
            num_slots=num_slots,
            learnable_temperature=config.gating_config.learnable_temperature,
            jitter_noise=config.jitter_noise,
            dtype=config.routing_dtype,
            name=name,
        )

    def build(self, input_shape):
        total_slots = self.num_experts * self.num_slots
        self.slot_embeddings = self.add_weight(
            name="slot_embeddings",
            shape=(input_shape[-1], total_slots),
            initializer=keras.initializers.LecunNormal(),
        )
        self.scale = self.add_weight(
            name="scale", shape=(), initializer="ones", trainable=self.learnable_temperature
        )
        self.built = True

    def compute_gate_logits(self, inputs):
        tokens = l2_normalize(inputs)  # [B, S, d]
        slots = l2_normalize(self.slot_embeddings, axis=0)  # [d, E*P]
        return ops.matmul(tokens, slots) * self.scale  # [B, S, E*P]

    def call(self, inputs, training=None, mask=None):
        logits = self.compute_gate_logits(self.apply_jitter(inputs, training))
        dispatch_logits = logits
        if mask is not None:
            dispatch_logits = ops.where(ops.expand_dims(mask, -1), logits, NEG_INF)
        dispatch = ops.softmax(dispatch_logits, axis=-2)
        combine = ops.softmax(logits, axis=-1)
        shape = ops.shape(combine)
        per_expert = ops.reshape(combine, (shape[0], shape[1], self.num_experts, self.num_slots))
        info = {
            "dispatch_weights": dispatch,
            "gate_logits": logits,
            "raw_gate_probs": ops.sum(per_expert, axis=-1),
        }
        return combine, None, info

    def get_config(self):
        config = super().get_config()
        config.pop("top_k")
        config.update({"num_slots": self.num_slots, "learnable_temperature": self.learnable_temperature})
        return config
