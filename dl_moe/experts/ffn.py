"""Feed-forward expert bank: E FFNs stored as stacked weight tensors."""

import keras
from keras import ops
from keras.quantizers import AbsMaxQuantizer

from dl_moe import dispatch as dispatch_lib
from dl_moe.backend_fast_paths import join_slices, split_slices
from dl_moe.config import FFN_TYPES
from dl_moe.experts.base import ExpertBank
from dl_moe.experts.glu import GatedUnit
from dl_moe.grouped_matmul import grouped_gated_matmul, grouped_matmul


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
    * "geglu":  as "swiglu" with (exact) gelu; "geglu_tanh": with tanh-approximated gelu.
    * "clamped_swiglu" (GPT-OSS): the "swiglu" weights;
                g = min(x W_gate + b_gate, limit), u = clip(x W_up + b_up, -limit, limit),
                y = ((u + 1) * g * sigmoid(alpha * g)) W_down + b_down

    Biases (`use_bias`) are `gate_bias`/`up_bias [E, h]` and `down_bias [E, o]`. With
    `use_expert_scale` each expert's output is multiplied by `expert_scale [E]`
    (Gemma 4's per-expert scale). Dropout acts on the hidden activations. Fused
    checkpoint tensors `[E, d, 2h]` split into `gate_kernel`/`up_kernel` with
    `dl_moe.experts.fused.split_gate_up`.

    Int8 quantization (`bank.quantize("int8")`, reached by `model.quantize("int8")` and
    `MixtureOfExperts.quantize("int8")`) is weight-only: each kernel becomes an int8,
    non-trainable tensor of the same name and shape plus a float scale per expert and
    output channel, `<kernel>_scale [E, 1, b]` (kernel ~ int8 / scale, absmax over the
    input axis, values in [-127, 127]). Matmuls then run as `(x @ int8) / scale` in the
    compute dtype; activations are not quantized (an `activation_quantizer` of the
    quantization config is ignored). Biases stay float and trainable. Other modes raise
    `NotImplementedError`.

    Args:
        num_experts: E.
        intermediate_size: h.
        output_dim: o (None: the input width d).
        ffn_type: One of "mlp", "swiglu", "geglu", "geglu_tanh", "clamped_swiglu".
        activation: Activation of "mlp" (Keras activation name).
        dropout_rate: Dropout on the hidden activations in training.
        use_bias: Add biases.
        glu_alpha: "clamped_swiglu" alpha (None: 1.702).
        glu_limit: "clamped_swiglu" clamp limit (None: 7.0).
        use_expert_scale: Multiply expert e's output by a learned `expert_scale[e]`.
    """

    supports_expert_scale = True
    # Blocks whose owners an `ExpertBlocks` describes run without a kernel copy per
    # block (`grouped_matmul`, the "grouped" dispatch plan).
    supports_expert_blocks = True
    # The FFN fields of ExpertConfig (other expert types must leave them at their defaults).
    config_fields = ("intermediate_size", "ffn_type", "activation")

    def __init__(
        self,
        num_experts,
        intermediate_size,
        output_dim=None,
        ffn_type="mlp",
        activation="gelu",
        dropout_rate=0.0,
        use_bias=True,
        glu_alpha=None,
        glu_limit=None,
        use_expert_scale=False,
        **kwargs,
    ):
        super().__init__(num_experts, **kwargs)
        if ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type must be one of {list(FFN_TYPES)}, got {ffn_type!r}.")
        if (glu_alpha is not None or glu_limit is not None) and ffn_type != "clamped_swiglu":
            raise ValueError(
                f"glu_alpha/glu_limit are only used by ffn_type='clamped_swiglu', got ffn_type={ffn_type!r}."
            )
        self.glu_alpha = glu_alpha
        self.glu_limit = glu_limit
        self.use_expert_scale = bool(use_expert_scale)
        self.intermediate_size = intermediate_size
        self.output_dim = output_dim
        self.ffn_type = ffn_type
        self.activation = activation
        self.dropout_rate = dropout_rate
        self.use_bias = use_bias
        if ffn_type == "mlp":
            self._hidden_activation = keras.activations.get(activation)
        else:
            self._gated_unit = GatedUnit(ffn_type, glu_alpha, glu_limit)
        # Dropout without a sub-layer: `model.quantize` only visits leaf layers.
        self.seed_generator = keras.random.SeedGenerator() if dropout_rate > 0 else None

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
            glu_alpha=expert.glu_alpha,
            glu_limit=expert.glu_limit,
            use_expert_scale=expert.use_expert_scale,
            dtype=dtype,
            name=name,
        )

    def build(self, input_shape):
        d = input_shape[-1]
        h = self.intermediate_size
        out = self.output_dim or d
        e = self.num_experts
        if self.quantization_mode:
            # A quantized bank (e.g. rebuilt when a quantized model is loaded).
            self.quantized_build(input_shape, mode=self.quantization_mode)
        else:
            init = stacked_kernel_initializer(e)
            for name, shape in self._kernel_shapes(d, out):
                setattr(self, name, self.add_weight(name=name, shape=shape, initializer=init))
        if self.use_bias:
            if self.ffn_type != "mlp":
                self.gate_bias = self.add_weight(name="gate_bias", shape=(e, h), initializer="zeros")
            self.up_bias = self.add_weight(name="up_bias", shape=(e, h), initializer="zeros")
            self.down_bias = self.add_weight(name="down_bias", shape=(e, out), initializer="zeros")
        if self.use_expert_scale:
            self.expert_scale = self.add_weight(name="expert_scale", shape=(e,), initializer="ones")
        self._input_dim = d
        self.built = True

    def _kernel_shapes(self, d, out):
        """`(name, shape)` of each stacked kernel, in creation order."""
        e, h = self.num_experts, self.intermediate_size
        shapes = [("gate_kernel", (e, d, h))] if self.ffn_type != "mlp" else []
        return shapes + [("up_kernel", (e, d, h)), ("down_kernel", (e, h, out))]

    def _bias_names(self):
        """Names of the float, never-quantized weights: biases and the expert scale."""
        scale = ["expert_scale"] if self.use_expert_scale else []
        if not self.use_bias:
            return scale
        return (["gate_bias"] if self.ffn_type != "mlp" else []) + ["up_bias", "down_bias"] + scale

    def _project(self, x, names, group_expert, quantized, expert_blocks=None):
        """x `[G, R, a]` @ each named kernel of each group's expert `[G, a, b]` (+ bias `[G, 1, b]`).

        Args:
            x: `[G, R, a]` rows.
            names: Matrices that multiply `x`, e.g. ("gate", "up").
            group_expert: `[G]` owner of each group, or None when group g is expert g.
            quantized: The kernels are int8; each product is divided by the owning
                expert's per-output-channel scale `[E, 1, b]`.
            expert_blocks: The groups are blocks owned as this `ExpertBlocks` says
                (`group_expert` names the same owners): the products index one
                expert's kernels at a time (`grouped_matmul`) instead of gathering a
                kernel copy per group.

        Returns:
            A tuple of `[G, R, b]`, one per name.
        """
        kernels = [getattr(self, name + "_kernel") for name in names]
        if expert_blocks is not None:
            products = grouped_matmul(x, kernels, expert_blocks)
        else:
            if group_expert is not None:
                kernels = [ops.take(kernel, group_expert, axis=0) for kernel in kernels]
            products = [ops.matmul(x, ops.cast(kernel, x.dtype)) for kernel in kernels]
        return tuple(self._finish_product(name, y, group_expert, quantized) for name, y in zip(names, products))

    def _finish_product(self, name, y, group_expert, quantized):
        """`y [G, R, b]`, the rows times the named kernel, divided by the owning expert's
        int8 scale `[1, b]` when `quantized` and plus its bias `[b]` with `use_bias`."""
        if quantized:
            scale = getattr(self, name + "_kernel_scale")
            if group_expert is not None:
                scale = ops.take(scale, group_expert, axis=0)
            y = y / ops.cast(scale, y.dtype)
        if self.use_bias:
            bias = getattr(self, name + "_bias")
            if group_expert is not None:
                bias = ops.take(bias, group_expert, axis=0)
            y = y + ops.expand_dims(bias, 1)
        return y

    def call(self, inputs, group_expert=None, training=None, slice_counts=None, expert_blocks=None):
        """Applies each group's expert.

        Args:
            inputs: `[G, R, d]` dispatched rows.
            group_expert: `[G]` int32 owner of each group, or None when G == E.
            training: Enables dropout.
            slice_counts: Eager alternative to groups (see `supports_slice_counts`):
                `inputs` is `[1, N, d]` with rows sorted by expert, the first
                `slice_counts[0]` rows for expert 0, the next `slice_counts[1]` for
                expert 1, and so on; rows past `sum(slice_counts)` are empty.
            expert_blocks: With `group_expert`, a `grouped_matmul.ExpertBlocks` saying
                which consecutive blocks each expert owns (see `supports_expert_blocks`).

        Returns:
            `[G, R, o]` (empty slice rows are zeros).
        """
        quantized = self.quantization_mode == "int8"
        if slice_counts is not None:
            return self._ffn_on_slices(inputs, slice_counts, training, quantized)
        return self._ffn(inputs, group_expert, training, quantized, expert_blocks)

    def _ffn(self, inputs, group_expert, training, quantized, expert_blocks=None):
        def project(x, names):
            return self._project(x, names, group_expert, quantized, expert_blocks)

        dropout = training and self.dropout_rate > 0
        if expert_blocks is not None and self.ffn_type != "mlp" and not dropout:
            outputs = self._gated_ffn_on_blocks(inputs, project, group_expert, quantized, expert_blocks)
        else:
            outputs = self._ffn_body(inputs, project, training)  # [G, R, o]
        if self.use_expert_scale:
            scale = self.expert_scale if group_expert is None else ops.take(self.expert_scale, group_expert, axis=0)
            outputs = outputs * ops.reshape(ops.cast(scale, outputs.dtype), (-1, 1, 1))
        return outputs

    def _ffn_body(self, inputs, project, training):
        """The FFN on `inputs`, with `project(x, names)` applying the named matrices
        ("gate", "up", "down") to `x`, one output each."""
        if self.ffn_type == "mlp":
            (up,) = project(inputs, ("up",))  # [..., h]
            hidden = self._hidden_activation(up)
        else:
            gate, up = project(inputs, ("gate", "up"))  # [..., h] each
            hidden = self._gated_unit(gate, up)
        if training and self.dropout_rate > 0:
            hidden = keras.random.dropout(hidden, self.dropout_rate, seed=self.seed_generator)
        (outputs,) = project(hidden, ("down",))  # [..., o]
        return outputs

    def _gated_ffn_on_blocks(self, inputs, project, group_expert, quantized, expert_blocks):
        """The GLU FFN on expert blocks `[G, b, d]`, its gated unit fused into the down
        projection (`grouped_gated_matmul`): the `[G, b, h]` hidden activations and their
        gradient are never stored whole, which at real widths is two of the largest
        buffers of a training step."""
        gate, up = project(inputs, ("gate", "up"))  # [G, b, h] each
        outputs = grouped_gated_matmul(gate, up, self.down_kernel, expert_blocks, self._gated_unit)
        return self._finish_product("down", outputs, group_expert, quantized)

    # Rows that arrive as contiguous per-expert slices (eager PyTorch, see
    # dl_moe.backend_fast_paths) run as one plain matmul per expert.
    supports_slice_counts = True

    def _ffn_on_slices(self, inputs, slice_counts, training, quantized):
        """`[1, N, d]` rows in per-expert slices → `[1, N, o]`.

        The stacked weights are unstacked once and the rows split once, so the backward
        pass stacks and concatenates the per-expert gradients once, instead of writing
        each expert's gradient into a full-size zero tensor.
        """
        rows = inputs[0]  # [N, d]
        pieces = split_slices(rows, slice_counts)
        names = ["up", "down"] + (["gate"] if self.ffn_type != "mlp" else [])
        # Training unstacks every stacked weight (its gradient then stacks once); in
        # inference indexing the few experts with rows costs less (no E views each).
        by_expert = (lambda w: ops.unstack(w, axis=0)) if training else (lambda w: w)
        per_expert = {}
        for name in names:
            per_expert[name] = by_expert(ops.convert_to_tensor(getattr(self, name + "_kernel")))
            if self.use_bias:
                per_expert[name + "_bias"] = by_expert(ops.convert_to_tensor(getattr(self, name + "_bias")))
            if quantized:
                per_expert[name + "_scale"] = by_expert(ops.convert_to_tensor(getattr(self, name + "_kernel_scale")))

        def project_with(expert):
            # `@` on the backend tensors, not ops.matmul: in eager PyTorch, ops.matmul's
            # dtype handling costs as much as a decode-sized product.
            def project_one(x, name):
                kernel = per_expert[name][expert]  # [a, b]
                if quantized:
                    y = (x @ ops.cast(kernel, x.dtype)) / ops.cast(per_expert[name + "_scale"][expert], x.dtype)
                else:
                    y = x @ kernel
                if self.use_bias:
                    y = y + per_expert[name + "_bias"][expert]
                return y

            return lambda x, names: tuple(project_one(x, name) for name in names)

        def expert_ffn(piece, expert):
            y = self._ffn_body(piece, project_with(expert), training)
            return y * ops.cast(self.expert_scale[expert], y.dtype) if self.use_expert_scale else y

        outputs = [
            expert_ffn(piece, expert)
            for expert, (piece, count) in enumerate(zip(pieces, slice_counts))
            if count > 0
        ]
        out_dim = self.output_dim or self._input_dim
        joined = join_slices(outputs, dispatch_lib.static_dim(rows, 0), (out_dim,), self.compute_dtype)
        return ops.expand_dims(joined, 0)

    # ----------------------------------------------------------- quantization
    # The protocol of keras.layers.Dense: `quantize` converts a built float bank,
    # `quantized_build` creates the int8 variables directly (a quantized bank being
    # rebuilt on load), the layer's dtype policy ("int8_from_<policy>") carries the
    # mode, and Layer.__call__ routes to `_int8_call`.

    SUPPORTED_QUANTIZATION_MODES = ("int8",)

    def _unsupported_mode(self, mode):
        return NotImplementedError(
            f"{type(self).__name__} supports quantization mode 'int8' only "
            f"(weight-only, per-expert per-output-channel scales), got mode={mode!r}."
        )

    def quantized_build(self, input_shape, mode, config=None):
        """Creates the quantized variables for `mode` (only "int8")."""
        if mode not in self.SUPPORTED_QUANTIZATION_MODES:
            raise self._unsupported_mode(mode)
        self._int8_build(input_shape)
        self._is_quantized = True

    def _int8_build(self, input_shape):
        """int8 kernels (same names and shapes) + float32 scales `[E, 1, b]`."""
        d = input_shape[-1]
        out = self.output_dim or d
        for name, shape in self._kernel_shapes(d, out):
            setattr(
                self, name,
                self.add_weight(name=name, shape=shape, initializer="zeros", dtype="int8", trainable=False),
            )
        for name, shape in self._kernel_shapes(d, out):
            setattr(
                self, name + "_scale",
                self.add_weight(
                    name=name + "_scale", shape=(shape[0], 1, shape[2]), initializer="ones", trainable=False
                ),
            )

    def _int8_call(self, inputs, group_expert=None, training=None, slice_counts=None, expert_blocks=None):
        return self.call(
            inputs, group_expert=group_expert, training=training, slice_counts=slice_counts, expert_blocks=expert_blocks
        )

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the built bank's kernels in place.

        Args:
            mode: "int8" (the only supported mode).
            type_check: Refuse subclasses (they may hold other weights), as Keras does.
            config: Optional `keras.quantizers.Int8QuantizationConfig`; its
                `weight_quantizer` (default `AbsMaxQuantizer`) is applied over each
                kernel's input axis, giving scales `[E, 1, b]`.

        Raises:
            NotImplementedError: For any mode other than "int8".
        """
        if type_check and type(self) is not FFNExpertBank:
            raise self._not_implemented_error(self.quantize)
        if mode not in self.SUPPORTED_QUANTIZATION_MODES:
            raise self._unsupported_mode(mode)
        from keras.quantizers import QuantizationConfig

        quantizer = QuantizationConfig.weight_quantizer_or_default(config, AbsMaxQuantizer())
        d = self._input_dim
        out = self.output_dim or d
        quantized = {}
        for name, shape in self._kernel_shapes(d, out):
            values, scale = quantizer(getattr(self, name), axis=1, to_numpy=True)  # [E, a, b], [E, 1, b]
            if tuple(scale.shape) != (shape[0], 1, shape[2]):
                raise ValueError(
                    f"The weight quantizer must give one scale per expert and output channel "
                    f"{(shape[0], 1, shape[2])} for {name}, got {tuple(scale.shape)}."
                )
            quantized[name] = (values, scale)
            delattr(self, name)
        self.quantized_build((None, None, d), mode)
        for name, (values, scale) in quantized.items():
            getattr(self, name).assign(values)
            getattr(self, name + "_scale").assign(scale)
        if self.dtype_policy.quantization_mode is None:
            self.dtype_policy = keras.dtype_policies.get(f"{mode}_from_{self.dtype_policy.name}")

    def _serialized_variable_names(self):
        d = getattr(self, "_input_dim", None)
        kernels = [name for name, _ in self._kernel_shapes(d, None)]
        names = kernels + self._bias_names()
        if self.quantization_mode == "int8":
            names += [name + "_scale" for name in kernels]
        return names

    def save_own_variables(self, store):
        """Stores kernels, biases and (quantized) scales by a fixed name order."""
        if not self.built:
            return
        for index, name in enumerate(self._serialized_variable_names()):
            store[str(index)] = getattr(self, name)

    def load_own_variables(self, store):
        """Loads what `save_own_variables` stored; a float/int8 mismatch is a ValueError."""
        if not self.built:
            return
        names = self._serialized_variable_names()
        if len(store.keys()) != len(names):
            raise ValueError(
                f"Layer '{self.name}' (quantization_mode={self.quantization_mode!r}) expects "
                f"{len(names)} variables {names}, but the file holds {len(store.keys())}. "
                "A quantized bank only loads weights saved from a bank quantized the same way."
            )
        for index, name in enumerate(names):
            getattr(self, name).assign(store[str(index)])

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
                "glu_alpha": self.glu_alpha,
                "glu_limit": self.glu_limit,
                "use_expert_scale": self.use_expert_scale,
            }
        )
        return config
