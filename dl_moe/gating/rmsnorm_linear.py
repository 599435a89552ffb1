"""Linear router on RMS-normalised, per-dimension scaled tokens.

The router of Google's Gemma 4 MoE models (no paper): rms_norm(x), a
learned per-dimension scale and d^-1/2, then the linear top-k router.
"""

import keras
from keras import ops

from dl_moe.gating.linear import LinearGating


@keras.saving.register_keras_serializable(package="dl_moe")
class RMSNormLinearGating(LinearGating):
    """logits = (rms_norm(x) * d^-1/2 * s) W (+ b); then softmax top-k as "linear".

    rms_norm(x) = x / sqrt(mean(x^2) + eps) has no learned scale of its own; s
    (`router_input_scale [d]`, initialised to ones) is the router's learned
    per-dimension weight. With `normalize_top_k=True` this is Gemma 4's router.

    Args:
        num_experts: E.
        top_k: k.
        norm_epsilon: eps of the RMS norm.
        **kwargs: `LinearGating` arguments.
    """

    config_fields = ("router_norm_epsilon",)

    def __init__(self, num_experts, top_k=2, norm_epsilon=1e-6, **kwargs):
        super().__init__(num_experts, top_k, **kwargs)
        self.norm_epsilon = float(norm_epsilon)

    @classmethod
    def from_moe_config(cls, config, name=None):
        router = super().from_moe_config(config, name)
        epsilon = config.gating_config.router_norm_epsilon
        router.norm_epsilon = 1e-6 if epsilon is None else float(epsilon)
        return router

    def build(self, input_shape):
        super().build(input_shape)
        self.router_input_scale = self.add_weight(
            name="router_input_scale", shape=(input_shape[-1],), initializer="ones"
        )

    def compute_gate_logits(self, inputs):
        """Logits `[..., E]` of the normalised, scaled tokens `[..., d]`."""
        x = ops.cast(inputs, "float32")
        normed = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.norm_epsilon)
        normed = ops.cast(normed, inputs.dtype) * (float(inputs.shape[-1]) ** -0.5) * self.router_input_scale
        return super().compute_gate_logits(normed)

    def get_config(self):
        config = super().get_config()
        config["norm_epsilon"] = self.norm_epsilon
        return config
