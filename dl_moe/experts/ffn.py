"""Feed-forward expert bank: E FFNs stored as stacked weight tensors."""

import keras
from keras import ops

from dl_moe.config import FFN_TYPES
from dl_moe.experts.base import ExpertBank

GLU_GATE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}


def stacked_kernel_initializer(num_experts):
    """Glorot-uniform per expert for a stacked kernel `[E, fan_in, fan_out]`.

    Keras counts the leading axis of a 3-D kernel as a receptive field and would
    shrink the limit by sqrt(E); scaling by E restores sqrt(6 / (fan_in + fan_out)).
    """
    return keras.initializers.VarianceScaling(scale=float(num_experts), mode="fan_avg", distribution="uniform")


@keras.saving.register_keras_serializable(package="dl_moe")
class FFNExpertBank(ExpertBank):
    """E feed-forward experts with weights stacked along a leading expert axis.

    Weight layout (Mixtral-style checkpoints map onto it one tensor per matrix):

    * "mlp":    `up_kernel [E, d, h]`, `down_kernel [E, h, o]`;
                y = act(x W_up + b_up) W_down + b_down
    * "swiglu": `gate_kernel [E, d, h]`, `up_kernel [E, d, h]`, `down_kernel [E, h, o]`;
                y = (silu(x W_gate) * (x W_up)) W_down
    * "geglu":  as "swiglu" with gelu.

    Biases (`use_bias`) are `[E, h]` / `[E, o]`. Dropout acts on the hidden activations.

    Args:
        num_experts: E.
        intermediate_size: h.
        output_dim: o (None: the input width d).
        ffn_type: One of "mlp", "swiglu", "geglu".
        activation: Activation of "mlp" (Keras activation name).
        dropout_rate: Dropout on the hidden activations in training.
        use_bias: Add biases.
    """

    def __init__(
        self,
        num_experts,
        intermediate_size,
        output_dim=None,
        ffn_type="mlp",
        activation="gelu",
        dropout_rate=0.0,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        if ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type must be one of {list(FFN_TYPES)}, got {ffn_type!r}.")
        self.intermediate_size = intermediate_size
        self.output_dim = output_dim
        self.ffn_type = ffn_type
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.use_bias = use_bias
        if ffn_type == "mlp":
            self._hidden_activation = keras.activations.get(activation)
        else:
            self._hidden_activation = keras.activations.get(GLU_GATE_ACTIVATIONS[ffn_type])
        self.dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy, name="dropout")

    @classmethod
    def from_moe_config(cls, config, name=None, dtype=None):
        expert = config.expert_config
        return cls(
            num_experts=config.num_experts,
            intermediate_size=expert.resolved_intermediate_size,
            output_dim=expert.resolved_output_dim,
            ffn_type=expert.ffn_type,
            activation=expert.activation,
            dropout_rate=expert.dropout_rate,
            use_bias=expert.use_bias,
            dtype=dtype,
            name=name,
        )

    def build(self, input_shape):
        d = input_shape[-1]
        h = self.intermediate_size
        out = self.output_dim or d
        e = self.num_experts
        init = stacked_kernel_initializer(e)
        if self.ffn_type != "mlp":
            self.gate_kernel = self.add_weight(name="gate_kernel", shape=(e, d, h), initializer=init)
        self.up_kernel = self.add_weight(name="up_kernel", shape=(e, d, h), initializer=init)
        self.down_kernel = self.add_weight(name="down_kernel", shape=(e, h, out), initializer=init)
        if self.use_bias:
            if self.ffn_type != "mlp":
                self.gate_bias = self.add_weight(name="gate_bias", shape=(e, h), initializer="zeros")
            self.up_bias = self.add_weight(name="up_bias", shape=(e, h), initializer="zeros")
            self.down_bias = self.add_weight(name="down_bias", shape=(e, out), initializer="zeros")
        self.built = True

    def _project(self, x, kernel, bias, group_expert):
        """x `[G, R, a]` @ kernel of each group's expert `[G, a, b]` (+ bias `[G, 1, b]`)."""
        if group_expert is not None:
            kernel = ops.take(kernel, group_expert, axis=0)
        y = ops.matmul(x, kernel)
        if bias is not None:
            if group_expert is not None:
                bias = ops.take(bias, group_expert, axis=0)
            y = y + ops.expand_dims(bias, 1)
        return y

    def call(self, inputs, group_expert=None, training=None):
        """Applies each group's expert.

        Args:
            inputs: `[G, R, d]` dispatched rows.
            group_expert: `[G]` int32 owner of each group, or None when G == E.
            training: Enables dropout.

        Returns:
            `[G, R, o]`.
        """
        bias = lambda name: getattr(self, name) if self.use_bias else None  # noqa: E731
        up = self._project(inputs, self.up_kernel, bias("up_bias"), group_expert)  # [G, R, h]
        if self.ffn_type == "mlp":
            hidden = self._hidden_activation(up)
        else:
            gate = self._project(inputs, self.gate_kernel, bias("gate_bias"), group_expert)
            hidden = self._hidden_activation(gate) * up
        hidden = self.dropout(hidden, training=training)
        return self._project(hidden, self.down_kernel, bias("down_bias"), group_expert)  # [G, R, o]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_size": self.intermediate_size,
                "output_dim": self.output_dim,
                "ffn_type": self.ffn_type,
                "activation": self.activation,
                "dropout_rate": self.dropout_rate,
                "use_bias": self.use_bias,
            }
        )
        return config
