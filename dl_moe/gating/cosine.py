"""Cosine router: logits are scaled cosines between projected tokens and expert embeddings.

Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts"
(X-MoE, arXiv:2204.09179): tokens are projected to a low dimension and scored
against L2-normalised expert embeddings on the hypersphere, with a learnable
temperature, so that routing does not pull token representations onto the expert
centroids.
"""

import math

import keras
from keras import ops

from dl_moe.gating.base import BaseGating, select_top_k

MAX_LOGIT_SCALE = 100.0


def l2_normalize(x, axis=-1, epsilon=1e-6):
    """`x / max(||x||, epsilon)` along `axis`."""
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, epsilon)


@keras.saving.register_keras_serializable(package="dl_moe")
class CosineGating(BaseGating):
    """logits = cos(x W_proj, embedding_e) / tau; p = softmax(logits); top-k of p.

    The projection `proj_kernel [d, m]` and the expert embeddings
    `expert_embeddings [E, m]` are L2-normalised, so logits lie in [-1/tau, 1/tau]
    whatever the scale of x. The scale 1/tau is stored as `log_logit_scale` and clamped
    to at most 100 (tau >= 0.01); it is trainable when `learnable_temperature` is on.

    Args:
        num_experts: E.
        top_k: k.
        embedding_dim: Projection width m.
        temperature: Initial tau (> 0).
        learnable_temperature: Train the logit scale.
        normalize_top_k: Renormalise the kept weights to sum to 1.
        jitter_noise: Multiplicative router-input noise in training.
        seed: Seed of the noise generator.
    """

    supports_bias_balancing = True
    supports_expert_mask = True

    def __init__(
        self,
        num_experts,
        top_k=2,
        embedding_dim=256,
        temperature=0.07,
        learnable_temperature=True,
        normalize_top_k=False,
        jitter_noise=0.0,
        seed=None,
        **kwargs,
    ):
        super().__init__(num_experts, top_k, jitter_noise=jitter_noise, seed=seed, **kwargs)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        self.embedding_dim = int(embedding_dim)
        self.temperature = float(temperature)
        self.learnable_temperature = learnable_temperature
        self.normalize_top_k = normalize_top_k

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            top_k=gating.top_k,
            embedding_dim=gating.embedding_dim or min(config.expert_config.hidden_dim, 256),
            temperature=gating.temperature or 0.07,
            learnable_temperature=gating.learnable_temperature,
            normalize_top_k=gating.normalize_top_k,
            **cls.common_kwargs(config, name),
        )

    def build(self, input_shape):
        self.proj_kernel = self.add_weight(
            name="proj_kernel", shape=(input_shape[-1], self.embedding_dim), initializer="glorot_uniform"
        )
        self.expert_embeddings = self.add_weight(
            name="expert_embeddings",
            shape=(self.num_experts, self.embedding_dim),
            initializer=keras.initializers.RandomNormal(stddev=0.32),
        )
        self.log_logit_scale = self.add_weight(
            name="log_logit_scale",
            shape=(),
            initializer=keras.initializers.Constant(math.log(1.0 / self.temperature)),
            trainable=self.learnable_temperature,
        )
        self.built = True

    def expert_axis_variables(self):
        found = [(self.expert_embeddings, 0)]
        if self.use_expert_bias:
            found.append((self.expert_bias, 0))
        return found

    def logit_scale(self):
        """1 / tau, clamped to at most 100."""
        return ops.minimum(ops.exp(self.log_logit_scale), MAX_LOGIT_SCALE)

    def compute_gate_logits(self, inputs):
        projected = l2_normalize(ops.matmul(inputs, self.proj_kernel))  # [..., m]
        embeddings = l2_normalize(self.expert_embeddings)  # [E, m]
        return ops.matmul(projected, ops.transpose(embeddings)) * self.logit_scale()

    def call(self, inputs, training=None):
        logits = self.mask_logits(self.compute_gate_logits(self.apply_jitter(inputs, training)))
        probs = ops.softmax(logits, axis=-1)
        weights, indices = select_top_k(probs, self.top_k, self.normalize_top_k, bias=self.selection_bias())
        return weights, indices, {"gate_logits": logits, "raw_gate_probs": probs}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "embedding_dim": self.embedding_dim,
                "temperature": self.temperature,
                "learnable_temperature": self.learnable_temperature,
                "normalize_top_k": self.normalize_top_k,
            }
        )
        return config
