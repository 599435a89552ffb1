"""`MixtureOfExperts`: route → dispatch → experts → combine."""

import copy

import keras
from keras import ops

from dl_moe import forward as forward_lib
from dl_moe import statistics
from dl_moe.config import MoEConfig
from dl_moe.experts.shared import SharedExpertGate, shared_expert_bank
from dl_moe.registry import EXPERT_TYPES, GATING_TYPES


@keras.saving.register_keras_serializable(package="dl_moe")
class MixtureOfExperts(keras.layers.Layer):
    """A sparse Mixture-of-Experts layer.

    Every token `[..., d]` is routed to experts by the router (`gating_network`),
    gathered into per-expert buffers, processed by the expert bank (`experts`) and
    combined with the routing weights. An expert only ever computes the tokens routed
    to it.

    Args:
        config: A `MoEConfig` (or its `to_dict()`); None means `MoEConfig()`.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `[..., d]` with d = `expert_config.hidden_dim`; all leading axes are
            tokens (Soft MoE treats axis 0 as the group axis of `[B, S, d]` inputs and a
            2-D input as one group).
        training: Training mode (noise, dropout, `train_capacity_factor`, losses).
        mask: Optional boolean `[...]` (Keras masking). Masked tokens take no capacity,
            are ignored by losses and statistics, and output zeros.
        router_inputs: Optional `[..., d]` tensor the router sees instead of `inputs`
            (same shape), for models that route on other features than the experts
            compute on (Gemma 4 routes the block's input, its experts see a normalised
            copy). Token-choice routing of FFN-style experts only.

    Returns:
        `[..., output_dim]`.

    The forward pass for the router's routing kind (token choice, expert choice, soft)
    lives in `dl_moe.forward`. In training the layer registers, each when its weight is
    above 0, `aux_loss_weight * load_balancing_loss` (token choice with
    `balancing="aux_loss"`), `z_loss_weight * router_z_loss`,
    `importance_loss_weight * importance_loss` (token choice) and
    `entropy_loss_weight * router_entropy_loss` with `add_loss`; routing statistics
    accumulate in non-trainable variables (see `get_routing_stats` and
    `dl_moe.statistics`).

    Example:
        ```python
        import numpy as np
        from dl_moe import ExpertConfig, MixtureOfExperts, MoEConfig

        layer = MixtureOfExperts(MoEConfig(num_experts=4, expert_config=ExpertConfig(hidden_dim=8)))
        y = layer(np.ones((2, 5, 8), "float32"))  # any [..., d] input: every leading axis is tokens
        print(y.shape)                            # (2, 5, 8)
        print(layer.get_expert_utilization())     # measured share of assignments per expert
        ```
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(**kwargs)
        if config is None:
            config = MoEConfig()
        elif isinstance(config, dict):
            config = MoEConfig.from_dict(config)
        elif not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a MoEConfig or a dict, got {type(config).__name__}.")
        else:
            config = copy.deepcopy(config)
        config.validate()
        self.config = config
        self.supports_masking = True
        self._gating_cls = GATING_TYPES.get(config.gating_config.gating_type)
        self._expert_cls = EXPERT_TYPES.get(config.expert_config.expert_type)
        self.is_soft = self._gating_cls.routing_kind == "soft"
        # The module that runs route → dispatch → experts → combine for this router.
        self._forward = forward_lib.for_routing_kind(self._gating_cls.routing_kind)

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.config.expert_config.hidden_dim is None and input_shape and input_shape[-1] is not None:
            # hidden_dim=None: the input decides (stored in the config from now on).
            self.config.expert_config.hidden_dim = int(input_shape[-1])
        self._check_input_shape(input_shape)
        hidden_dim = self.config.expert_config.hidden_dim
        # Later calls with another width (or rank, for rank-bound experts) fail with
        # Keras's own ValueError naming the expected and the received shape.
        required_rank = self._expert_cls.input_rank
        rank = {"min_ndim": 2} if required_rank is None else {"ndim": required_rank}
        self.input_spec = keras.InputSpec(axes={-1: hidden_dim}, **rank)
        self.gating_network = self._forward.build_router(self, input_shape)
        self.experts = self._expert_cls.from_moe_config(
            self.config, name="experts", dtype=self._bank_dtype_policy("experts")
        )
        row_features = tuple(input_shape[1:]) if self.experts.token_layout == "example" else (hidden_dim,)
        self.experts.build((None, None) + row_features)
        self.shared_experts = self._build_shared_experts(hidden_dim) if self.config.num_shared_experts else None
        self.shared_expert_gate = None
        if self.config.shared_expert_gate:
            self.shared_expert_gate = SharedExpertGate(dtype=self.dtype_policy, name="shared_expert_gate")
            self.shared_expert_gate.build((None, hidden_dim))
        statistics.create_statistics(self, self.config.num_experts)
        self.built = True

    def _check_input_shape(self, input_shape):
        hidden_dim = self.config.expert_config.hidden_dim
        if len(input_shape) < 2:
            raise ValueError(
                f"MixtureOfExperts expects inputs of rank >= 2 [..., {hidden_dim}], got shape {input_shape}."
            )
        required_rank = self._expert_cls.input_rank
        if required_rank is not None and len(input_shape) != required_rank:
            raise ValueError(
                f"expert_type={self.config.expert_config.expert_type!r} expects inputs of rank "
                f"{required_rank}, got shape {input_shape}."
            )
        if input_shape[-1] != hidden_dim:
            raise ValueError(
                f"MixtureOfExperts expects a last dimension of hidden_dim={hidden_dim}, "
                f"got input shape {input_shape}."
            )

    def _build_shared_experts(self, hidden_dim):
        """The shared FFN (see `dl_moe.experts.shared.shared_expert_bank`)."""
        output_dim = self.experts.compute_output_shape((None, None, hidden_dim))[-1]
        shared_experts = shared_expert_bank(self.config, output_dim, dtype=self._bank_dtype_policy("shared_experts"))
        shared_experts.build((None, None, hidden_dim))
        return shared_experts

    # ------------------------------------------------------------------- call

    def call(self, inputs, training=None, mask=None, router_inputs=None):
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            # Integer inputs are almost always token ids that missed an Embedding.
            raise ValueError(
                f"MixtureOfExperts expects floating-point inputs, got dtype {dtype}; embed or cast "
                "them first (e.g. keras.layers.Embedding for token ids)."
            )
        if mask is not None and self.experts.token_layout == "example":
            raise ValueError(
                f"expert_type={self.config.expert_config.expert_type!r} routes whole examples "
                "and does not take a Keras mask."
            )
        if self._has_no_tokens(inputs.shape):
            # Like keras.layers.Dense: an empty batch gives an empty output.
            return ops.zeros(self.compute_output_shape(inputs.shape), dtype=self.compute_dtype)
        if router_inputs is not None:
            self._check_router_inputs(inputs, router_inputs)
            return self._forward.forward(self, inputs, training, mask, router_inputs=router_inputs)
        return self._forward.forward(self, inputs, training, mask)

    def _has_no_tokens(self, input_shape):
        """Whether a token axis of `input_shape` is statically 0 (`[0, d]`, `[B, 0, d]`)."""
        token_axes = input_shape[:1] if self.experts.token_layout == "example" else input_shape[:-1]
        return any(isinstance(size, int) and size == 0 for size in token_axes)

    def _check_router_inputs(self, inputs, router_inputs):
        """`router_inputs` needs token-choice routing, token-layout experts and `[..., d]`."""
        if self._gating_cls.routing_kind != "token_choice" or self.experts.token_layout != "token":
            raise ValueError(
                f"router_inputs needs a token-choice router and FFN-style experts, got gating_type="
                f"{self.config.gating_config.gating_type!r}, expert_type={self.config.expert_config.expert_type!r}."
            )
        if tuple(router_inputs.shape) != tuple(inputs.shape):
            raise ValueError(
                f"router_inputs must have the shape of inputs {tuple(inputs.shape)}, got {tuple(router_inputs.shape)}."
            )

    def add_loss(self, loss):
        """Registers `loss` as float32 (Keras sums it with the float32 model loss), so a
        bfloat16/float16 `routing_dtype` cannot break the trainer's loss sum."""
        super().add_loss(ops.cast(loss, "float32"))

    # --------------------------------------------------------------- public

    def get_expert_utilization(self):
        """Measured share of routed token assignments per expert since the last reset.

        Returns:
            numpy `[E]` float array summing to 1 (zeros before any call). Soft MoE
            reports each expert's share of the combine weights.
        """
        return statistics.expert_utilization(self)

    def get_routing_stats(self):
        """Routing statistics accumulated since the last `reset_routing_stats()`.

        Returns:
            dict with `expert_fraction` (numpy `[E]`, as `get_expert_utilization`),
            `avg_experts_per_token`, `dropped_fraction` (share of routed assignments not
            computed), `dropped_token_fraction` (share of tokens with every assignment
            dropped), `rerouted_fraction` (share of routed assignments that
            `overflow="reroute"` moved to another expert; 0 otherwise), `load_cv` (coefficient of variation of the per-expert load),
            `tokens`, when computed in training the unscaled `aux_loss`, `z_loss`,
            `importance_loss`, `entropy_loss`, and with `balancing="aux_free"` the
            router's current `expert_bias` (numpy `[E]`). With an active-expert mask
            (`MoEConfig.initial_active_experts`) also `active_experts` (numpy bool
            `[E]`), and `load_cv` is over the live experts.
        """
        return statistics.routing_stats(self)

    def get_active_experts(self):
        """numpy bool `[E]`: the live experts (all True without an active-expert mask)."""
        return statistics.live_expert_mask(self)

    def route(self, inputs, training=False, mask=None):
        """The routing decision for `inputs`, for inspection and plots (eager only).

        Runs only the router: no expert, no loss, no statistics or bias update.

        Args:
            inputs: `[..., d]` tokens (for "example"-layout experts `[B, ...]`).
            training: Route as in training (noise, no top-any fallback).
            mask: Optional boolean mask of the leading axes.

        Returns:
            A dict of numpy arrays over the T flattened tokens. Token-choice routers
            give `indices [T, k]`, `weights [T, k]`, `active [T, k]` (False for unused
            dynamic-k slots and masked tokens) and `probs [T, E]`. "expert_choice"
            gives the same with k = E (`indices[t, e] = e`; `active[t, e]`: expert e
            picked token t) plus `expert_tokens [E, C]` (T marks an empty slot).
            "softmoe" gives `weights` and `probs` `[B, S, E]` (the combine weight per
            expert).
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        return self._forward.routing_decision(self, inputs, training, mask)

    def reset_routing_stats(self):
        """Clears the accumulated routing statistics."""
        statistics.reset_statistics(self)

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if not self.built:
            self.build(input_shape)  # the expert bank knows its output shape
        if self._expert_cls.token_layout == "example":
            # [B, ...] -> [B, ...out], e.g. [B, H', W', filters] for conv experts.
            return input_shape[:1] + tuple(self.experts.compute_output_shape((None, None) + input_shape[1:]))[2:]
        output_dim = self.experts.compute_output_shape((None, None, input_shape[-1]))[-1]
        return input_shape[:-1] + (output_dim,)

    def compute_mask(self, inputs, mask=None):
        if self._expert_cls.token_layout == "example":
            return None
        return mask

    def get_config(self):
        config = super().get_config()
        config["config"] = self.config.to_dict()
        return config

    # ----------------------------------------------------------- quantization

    def _expert_banks(self):
        """`{name: bank}` of the built expert banks ("experts", "shared_experts")."""
        banks = {"experts": self.experts}
        if self.shared_experts is not None:
            banks["shared_experts"] = self.shared_experts
        return banks

    def _bank_dtype_policy(self, name):
        """The dtype policy a bank is built with: quantized when it was saved quantized."""
        mode = getattr(self, "_bank_quantization", {}).get(name)
        if mode is None:
            return self.dtype_policy
        return keras.dtype_policies.get(f"{mode}_from_{self.dtype_policy.name}")

    def quantize(self, mode=None, type_check=True, config=None):
        """Quantizes the expert banks (the router stays float); e.g. `quantize("int8")`.

        `model.quantize(mode)` reaches the banks directly (Keras quantizes leaf layers);
        this method is for quantizing one MoE layer. FFN banks support "int8" only (see
        `FFNExpertBank`); other banks and modes raise `NotImplementedError`.

        Args:
            mode: Keras quantization mode.
            type_check: Unused (kept for Keras's `quantize` signature).
            config: Optional `keras.quantizers.QuantizationConfig`.
        """
        for bank in self._expert_banks().values():
            bank.quantize(mode, config=config)
        if keras.backend.backend() == "torch":
            for layer in self._flatten_layers():
                layer._track_variables()  # re-register the replaced torch parameters

    def get_build_config(self):
        """Input shape plus the quantization mode of each quantized expert bank.

        `build_from_config` rebuilds those banks quantized, so a quantized model
        round-trips through `.keras`.
        """
        config = super().get_build_config()
        if config is not None and self.built:
            modes = {name: bank.quantization_mode for name, bank in self._expert_banks().items()}
            modes = {name: mode for name, mode in modes.items() if mode}
            if modes:
                config = dict(config, quantized_expert_banks=modes)
        return config

    def build_from_config(self, config):
        config = dict(config)
        self._bank_quantization = dict(config.pop("quantized_expert_banks", None) or {})
        super().build_from_config(config)
