"""Convolutional expert bank: E 2-D convolutions, one per expert, routed per example.

Letters: B batch, H x W spatial size, C input channels, F filters, E experts, G groups
of R dispatched rows (see `dl_moe.dispatch`).

Routing choice: a conv expert layer routes whole examples, not pixels. The router sees
each example's globally average-pooled features `[B, C]`, picks k experts for it, and
each chosen expert convolves the example's whole feature map. Per-example routing keeps
every convolution a dense, well-shaped computation (no pixel gathers, no holes in the
receptive field) and lets experts specialise by image content, at the price of coarser
routing than per-patch routing (use FFN experts on `[B, H*W, C]` patches for that).
"""

import keras
from keras import ops

from dl_moe.experts.base import ExpertBank


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive integer or a pair of them, got {value!r}.")
    return value


def conv_output_size(size, kernel, stride, padding):
    """Output length of one spatial axis ("same": ceil(size / stride))."""
    if size is None:
        return None
    if padding == "same":
        return -(-size // stride)
    return (size - kernel) // stride + 1


def _same_padding(size, kernel, stride):
    """(before, after) padding of one axis for "same" (TensorFlow's convention)."""
    total = max((conv_output_size(size, kernel, stride, "same") - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


@keras.saving.register_keras_serializable(package="dl_moe")
class Conv2DExpertBank(ExpertBank):
    """E convolution experts with stacked kernels.

    Weight layout: `kernel [E, kh, kw, C, F]`, `bias [E, F]` (Keras Conv2D's kernel per
    expert, stacked). Each expert computes y = act(conv2d(x, kernel[e]) + bias[e]).

    The convolution of each group is computed as kh*kw batched matmuls over shifted,
    strided views of the (padded) input, `[G, R*H'*W', C] @ [G, C, F]`, so all groups
    run at once with static shapes on every backend.

    Args:
        num_experts: E.
        filters: F.
        kernel_size: int or (kh, kw).
        strides: int or (sh, sw).
        padding: "same" or "valid".
        activation: Keras activation applied to each expert's output.
        dropout_rate: Dropout on the experts' outputs in training.
        use_bias: Add `bias`.
    """

    token_layout = "example"
    input_rank = 4
    config_fields = ("filters", "kernel_size", "strides", "padding", "activation")

    def __init__(
        self,
        num_experts,
        filters,
        kernel_size=3,
        strides=1,
        padding="same",
        activation="gelu",
        dropout_rate=0.0,
        use_bias=True,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        if isinstance(filters, bool) or not isinstance(filters, int) or filters < 1:
            raise ValueError(f"filters must be a positive integer, got {filters!r}.")
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {padding!r}.")
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = padding
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.use_bias = use_bias
        self._activation = keras.activations.get(activation)
        self.dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy, name="dropout")

    @classmethod
    def from_moe_config(cls, config, name=None, dtype=None):
        expert = config.expert_config
        return cls(
            num_experts=config.num_experts,
            filters=expert.filters or expert.resolved_output_dim,
            kernel_size=expert.kernel_size or 3,
            strides=expert.strides or 1,
            padding=expert.padding or "same",
            activation=expert.activation,
            dropout_rate=expert.dropout_rate,
            use_bias=expert.use_bias,
            dtype=dtype,
            name=name,
        )

    def build(self, input_shape):
        channels = input_shape[-1]
        kh, kw = self.kernel_size
        e = self.num_experts
        # Glorot per expert: fan_in = kh*kw*C, fan_out = kh*kw*F (Keras counts the
        # leading E axis as receptive field too, hence the factor E).
        init = keras.initializers.VarianceScaling(scale=float(e), mode="fan_avg", distribution="uniform")
        self.kernel = self.add_weight(name="kernel", shape=(e, kh, kw, channels, self.filters), initializer=init)
        if self.use_bias:
            self.bias = self.add_weight(name="bias", shape=(e, self.filters), initializer="zeros")
        self.built = True

    def router_inputs(self, tokens):
        """Global average pooling: `[T, H, W, C]` -> `[T, C]`."""
        return ops.mean(tokens, axis=(1, 2))

    def call(self, inputs, group_expert=None, training=None):
        """Applies each group's convolution.

        Args:
            inputs: `[G, R, H, W, C]` dispatched examples (H, W static).
            group_expert: `[G]` owner of each group, or None when G == E.
            training: Enables dropout.

        Returns:
            `[G, R, H', W', F]`.
        """
        height, width, channels = inputs.shape[2], inputs.shape[3], inputs.shape[4]
        if height is None or width is None:
            raise ValueError(f"Conv experts need static spatial dimensions, got input shape {inputs.shape}.")
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        out_h = conv_output_size(height, kh, sh, self.padding)
        out_w = conv_output_size(width, kw, sw, self.padding)
        x = inputs
        if self.padding == "same":
            x = ops.pad(x, [[0, 0], [0, 0], list(_same_padding(height, kh, sh)), list(_same_padding(width, kw, sw)), [0, 0]])
        kernel = self.kernel if group_expert is None else ops.take(self.kernel, group_expert, axis=0)
        num_groups, rows = ops.shape(inputs)[0], ops.shape(inputs)[1]
        outputs = None
        for a in range(kh):
            for b in range(kw):
                view = x[:, :, a : a + sh * (out_h - 1) + 1 : sh, b : b + sw * (out_w - 1) + 1 : sw, :]  # [G, R, H', W', C]
                term = ops.matmul(ops.reshape(view, (num_groups, -1, channels)), kernel[:, a, b])  # [G, R*H'*W', F]
                outputs = term if outputs is None else outputs + term
        outputs = ops.reshape(outputs, (num_groups, rows, out_h, out_w, self.filters))
        if self.use_bias:
            bias = self.bias if group_expert is None else ops.take(self.bias, group_expert, axis=0)
            outputs = outputs + ops.reshape(bias, (-1, 1, 1, 1, self.filters))
        return self.dropout(self._activation(outputs), training=training)

    def compute_output_shape(self, input_shape):
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        return tuple(input_shape[:2]) + (
            conv_output_size(input_shape[2], kh, sh, self.padding),
            conv_output_size(input_shape[3], kw, sw, self.padding),
            self.filters,
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "activation": self.activation,
                "dropout_rate": self.dropout_rate,
                "use_bias": self.use_bias,
            }
        )
        return config
