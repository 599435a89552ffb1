"""Shared experts: a dense FFN every token passes through, optionally gated per token.

DeepSeekMoE adds `num_shared_experts` FFN experts' outputs to the routed output;
Qwen-MoE and Qwen3.5-MoE give the shared FFN its own width and multiply its output by
a learned per-token gate sigmoid(x W_g) before adding it.
"""

import keras
from keras import ops

from dl_moe.experts.ffn import FFNExpertBank


def shared_expert_bank(config, output_dim, dtype=None, name="shared_experts"):
    """The shared FFN of a `MoEConfig` as a one-expert `FFNExpertBank`.

    Its width is `shared_expert_intermediate_size`, or `num_shared_experts *
    intermediate_size` (n shared experts of width h are one FFN of width n*h). It takes
    the routed experts' `ffn_type`, activation, biases and GLU settings, never their
    per-expert output scale. Weights: `gate_kernel`/`up_kernel [1, d, h_s]`,
    `down_kernel [1, h_s, o]` (+ biases `[1, h_s]`/`[1, o]`).
    """
    expert = config.expert_config
    width = config.shared_expert_intermediate_size or config.num_shared_experts * expert.resolved_intermediate_size
    return FFNExpertBank(
        num_experts=1,
        intermediate_size=width,
        output_dim=output_dim,
        ffn_type=expert.ffn_type,
        activation=expert.activation,
        dropout_rate=expert.dropout_rate,
        use_bias=expert.use_bias,
        glu_alpha=expert.glu_alpha,
        glu_limit=expert.glu_limit,
        dtype=dtype,
        name=name,
    )


@keras.saving.register_keras_serializable(package="dl_moe")
class SharedExpertGate(keras.layers.Layer):
    """Per-token gate of the shared expert: sigmoid(x @ kernel), kernel `[d, 1]`.

    Call: tokens `[..., d]` → gate `[..., 1]`. Like the router it stays float when a
    model is quantized (it is d weights against the shared FFN's 3*d*h).
    """

    def build(self, input_shape):
        self.kernel = self.add_weight(name="kernel", shape=(input_shape[-1], 1), initializer="glorot_uniform")
        self.built = True

    def call(self, inputs):
        return ops.sigmoid(ops.matmul(inputs, self.kernel))

    def quantize(self, mode=None, type_check=True, config=None):
        """Leaves the gate in float (see the class docstring)."""

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (1,)
