"""`MixtureOfExperts`: route → dispatch → experts → combine."""

import copy

import keras
import numpy as np
from keras import ops

from dl_moe import dispatch as dispatch_lib
from dl_moe import overflow as overflow_lib
from dl_moe.backend_fast_paths import (
    capacity_slices_pay_off,
    dropless_buffer_capacity,
    expert_loads,
    run_experts_on_slices,
    torch_eager_slices_enabled,
)
from dl_moe.config import MoEConfig
from dl_moe.distribution import constrain_to_expert_axis
from dl_moe.experts.ffn import FFNExpertBank
from dl_moe.gating.base import call_router
from dl_moe.losses import importance_loss, load_balancing_loss, router_entropy_loss, router_z_loss
from dl_moe.registry import EXPERT_TYPES, GATING_TYPES

# Capacity used when the token count is only known at run time (TF graphs with an
# unknown batch size) for dropless blocks; any value gives the same outputs.
DYNAMIC_DROPLESS_BLOCK = 64


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

    Returns:
        `[..., output_dim]`.

    In training the layer registers `aux_loss_weight * load_balancing_loss` and
    `z_loss_weight * router_z_loss` with `add_loss`. Routing statistics accumulate in
    non-trainable variables (see `get_routing_stats`).
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

    # ------------------------------------------------------------------ build

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.config.expert_config.hidden_dim is None and input_shape and input_shape[-1] is not None:
            # hidden_dim=None: the input decides (stored in the config from now on).
            self.config.expert_config.hidden_dim = int(input_shape[-1])
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
        num_experts = self.config.num_experts
        if self.is_soft:
            sequence_length = None
            if len(input_shape) > 2 and None not in input_shape[1:-1]:
                sequence_length = int(np.prod(input_shape[1:-1]))
            self.gating_network = self._gating_cls.from_moe_config(
                self.config, name="router", sequence_length=sequence_length
            )
            self.gating_network.build((None, None, hidden_dim))
        elif self.config.hierarchical_routing:
            from dl_moe.gating.hierarchical import HierarchicalGating

            self.gating_network = HierarchicalGating.from_moe_config(self.config, name="router")
            self.gating_network.build((None, hidden_dim))
        else:
            self.gating_network = self._gating_cls.from_moe_config(self.config, name="router")
            self.gating_network.build((None, hidden_dim))
        self.experts = self._expert_cls.from_moe_config(
            self.config, name="experts", dtype=self._bank_dtype_policy("experts")
        )
        row_features = tuple(input_shape[1:]) if self.experts.token_layout == "example" else (hidden_dim,)
        self.experts.build((None, None) + row_features)
        self.shared_experts = None
        if self.config.num_shared_experts:
            # n shared FFN experts of width h == one FFN of width n*h (stacked hidden axis).
            expert = self.config.expert_config
            self.shared_experts = FFNExpertBank(
                num_experts=1,
                intermediate_size=self.config.num_shared_experts * expert.resolved_intermediate_size,
                output_dim=self.experts.compute_output_shape((None, None, hidden_dim))[-1],
                ffn_type=expert.ffn_type,
                activation=expert.activation,
                dropout_rate=expert.dropout_rate,
                use_bias=expert.use_bias,
                dtype=self._bank_dtype_policy("shared_experts"),
                name="shared_experts",
            )
            self.shared_experts.build((None, None, hidden_dim))

        def stat(name, shape=()):
            return self.add_weight(
                name=name, shape=shape, initializer="zeros", trainable=False, dtype="float32", autocast=False
            )

        self.routed_tokens_per_expert = stat("routed_tokens_per_expert", (num_experts,))
        self.processed_tokens_per_expert = stat("processed_tokens_per_expert", (num_experts,))
        self.seen_tokens = stat("seen_tokens")
        self.dropped_tokens = stat("dropped_tokens")
        self.last_aux_loss = stat("last_aux_loss")
        self.last_z_loss = stat("last_z_loss")
        self.last_importance_loss = stat("last_importance_loss")
        self.last_entropy_loss = stat("last_entropy_loss")
        # Only with rerouting, so the variable layout of other layers' files is unchanged.
        self.rerouted_assignments = stat("rerouted_assignments") if self.config.overflow == "reroute" else None
        self.built = True

    # ------------------------------------------------------------------- call

    def call(self, inputs, training=None, mask=None):
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        if "float" not in dtype:
            # Integer inputs are almost always token ids that missed an Embedding.
            raise ValueError(
                f"MixtureOfExperts expects floating-point inputs, got dtype {dtype}; embed or cast "
                "them first (e.g. keras.layers.Embedding for token ids)."
            )
        if self.is_soft:
            return self._call_soft(inputs, training, mask)
        if self._gating_cls.routing_kind == "expert_choice":
            return self._call_expert_choice(inputs, training, mask)
        return self._call_token_choice(inputs, training, mask)

    def _flatten_tokens(self, inputs, mask):
        """inputs → `(tokens [T, ...], token_mask [T] or None, leading_shape)`.

        FFN/attention banks: every position of `[..., d]` is a token `[T, d]`.
        Example-layout banks (conv): each example is one token `[T = B, H, W, C]`.
        """
        if self.experts.token_layout == "example":
            if mask is not None:
                raise ValueError(
                    f"expert_type={self.config.expert_config.expert_type!r} routes whole examples "
                    "and does not take a Keras mask."
                )
            return inputs, None, ops.shape(inputs)[:1]
        tokens = ops.reshape(inputs, (-1, self.config.expert_config.hidden_dim))
        token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))
        return tokens, token_mask, ops.shape(inputs)[:-1]

    def _run_experts(self, expert_inputs, plan, inputs, mask, training, slice_counts=None):
        """Runs the bank on `[G, R, ...]` rows (a context-using bank also gets row tokens)."""
        context = self.experts.prepare_context(inputs, mask)
        extra = {} if context is None else {"context": context, "row_token": plan.slot_token}
        if slice_counts is not None:
            return run_experts_on_slices(self.experts, expert_inputs, slice_counts, training, **extra)
        return self.experts(expert_inputs, group_expert=plan.group_expert, training=training, **extra)

    def _finish(self, outputs, tokens, unrouted, leading_shape, mask, training):
        """Residual for tokens no expert computed, shared experts, output shape and mask.

        Args:
            outputs: `[T, ...o]` combined expert outputs.
            tokens: `[T, ...]` layer inputs as tokens.
            unrouted: `[T]` bool, real tokens that got no expert output (all their
                assignments dropped, or picked by no expert).
        """
        if self.config.use_residual_connection and tuple(outputs.shape[1:]) == tuple(tokens.shape[1:]):
            rows = ops.reshape(unrouted, (-1,) + (1,) * (len(tokens.shape) - 1))
            outputs = outputs + ops.where(rows, tokens, ops.zeros_like(tokens))
        outputs = self._add_shared_experts(tokens, outputs, training)
        outputs = ops.reshape(outputs, tuple(leading_shape) + tuple(outputs.shape[1:]))
        return self._zero_masked(outputs, mask)

    def _call_token_choice(self, inputs, training, mask):
        tokens, token_mask, leading_shape = self._flatten_tokens(inputs, mask)

        # Route.
        weights, indices, info = self._route(self.experts.router_inputs(tokens), training, token_mask)  # [T, k]
        active = info.get("active")
        active = ops.ones_like(indices, dtype="bool") if active is None else ops.cast(active, "bool")
        if token_mask is not None:
            active = active & ops.expand_dims(token_mask, -1)
        weights = ops.where(active, weights, ops.zeros_like(weights))

        # Overflow rerouting: a new decision whose kept assignments fit the capacity.
        routed_active, reroute = active, None
        if self.config.overflow == "reroute":
            reroute, dispatch_weights = overflow_lib.reroute_routing(
                weights, indices, active, info.get("raw_gate_probs"), self.config.num_experts,
                self._capacity(indices, training), self.config.reroute_attempts,
            )
            dispatch_indices, active = reroute.expert_index, reroute.kept
        else:
            dispatch_indices, dispatch_weights = indices, weights

        # Dispatch.
        plan, slice_counts = self._plan(dispatch_indices, active, training)
        expert_inputs = self._place_on_expert_devices(dispatch_lib.dispatch(tokens, plan), plan)  # [G, R, d]

        # Experts.
        expert_outputs = self._run_experts(expert_inputs, plan, inputs, mask, training, slice_counts)

        # Combine.
        outputs = dispatch_lib.combine(expert_outputs, plan, dispatch_weights)  # [T, ...o]
        kept = plan.kept & active
        fully_dropped = ops.any(routed_active, axis=-1) & ~ops.any(kept, axis=-1)  # [T]
        if reroute is not None:
            # Losses and statistics see the load the router chose, before rerouting.
            plan = plan._replace(routed_per_expert=reroute.routed_per_expert)
            self.rerouted_assignments.assign_add(ops.sum(ops.cast(reroute.rerouted, "float32")))
        self._add_losses_and_stats(info, plan, token_mask, fully_dropped, training, weights=weights, indices=indices)
        return self._finish(outputs, tokens, fully_dropped, leading_shape, mask, training)

    def _call_expert_choice(self, inputs, training, mask):
        """Expert choice: each expert computes exactly the C tokens it picked."""
        tokens, token_mask, leading_shape = self._flatten_tokens(inputs, mask)
        num_tokens = dispatch_lib.static_dim(tokens, 0)

        # Route: slot_weights / token_index [E, C] (T marks an empty slot).
        slot_weights, token_index, info = call_router(
            self.gating_network, self.experts.router_inputs(tokens), training=training, mask=token_mask
        )
        plan = dispatch_lib.plan_expert_choice_dispatch(token_index, num_tokens, self.config.num_experts)
        expert_inputs = self._place_on_expert_devices(dispatch_lib.dispatch(tokens, plan), plan)  # [E, C, d]
        expert_outputs = self._run_experts(expert_inputs, plan, inputs, mask, training)
        outputs, hits = dispatch_lib.combine_expert_choice(expert_outputs, plan, slot_weights, num_tokens)

        # A token no expert picked is treated like a fully dropped one.
        unrouted = hits == 0  # [T]
        if token_mask is not None:
            unrouted = unrouted & token_mask
        self._add_losses_and_stats(info, plan, token_mask, unrouted, training)
        return self._finish(outputs, tokens, unrouted, leading_shape, mask, training)

    def _place_on_expert_devices(self, expert_inputs, plan):
        """With `expert_parallel`, shards `[E, C, ...]` buffers like the expert weights."""
        if not self.config.expert_parallel or plan.group_expert is not None:
            return expert_inputs  # dropless blocks are not indexed by expert
        # Any stacked expert matrix [E, ...] carries the expert axis's layout (the
        # kernels stay [E, ...] when int8-quantized too).
        stacked = next(w for w in self.experts.weights if len(w.shape) >= 3)
        return constrain_to_expert_axis(expert_inputs, stacked)

    def _add_shared_experts(self, tokens, outputs, training):
        """outputs `[T, o]` + the shared experts' output on every token `[T, d]`."""
        if self.shared_experts is None:
            return outputs
        shared = self.shared_experts(ops.expand_dims(tokens, 0), training=training)  # [1, T, o]
        return outputs + ops.cast(shared[0], outputs.dtype)

    def _call_soft(self, inputs, training, mask):
        hidden_dim = self.config.expert_config.hidden_dim
        output_dim = self.config.expert_config.resolved_output_dim
        num_experts = self.config.num_experts
        num_slots = self.gating_network.num_slots
        leading_shape = ops.shape(inputs)[:-1]
        if len(inputs.shape) == 2:
            groups = ops.expand_dims(inputs, 0)  # one group [1, T, d]
        else:
            groups = ops.reshape(inputs, (ops.shape(inputs)[0], -1, hidden_dim))  # [B, S, d]
        group_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), ops.shape(groups)[:2])

        combine, _, info = self.gating_network(groups, training=training, mask=group_mask)  # [B, S, E*P]
        dispatch_weights = ops.cast(info["dispatch_weights"], groups.dtype)
        slots = ops.matmul(ops.transpose(dispatch_weights, (0, 2, 1)), groups)  # [B, E*P, d]
        batch = ops.shape(slots)[0]
        expert_inputs = ops.reshape(slots, (batch, num_experts, num_slots, hidden_dim))
        expert_inputs = ops.reshape(ops.transpose(expert_inputs, (1, 0, 2, 3)), (num_experts, -1, hidden_dim))
        expert_outputs = self.experts(expert_inputs, training=training)  # [E, B*P, o]
        output_dim = expert_outputs.shape[-1]
        expert_outputs = ops.reshape(expert_outputs, (num_experts, batch, num_slots, output_dim))
        expert_outputs = ops.reshape(ops.transpose(expert_outputs, (1, 0, 2, 3)), (batch, -1, output_dim))
        outputs = ops.matmul(ops.cast(combine, expert_outputs.dtype), expert_outputs)  # [B, S, o]

        token_weight = None if group_mask is None else ops.reshape(group_mask, (-1,))
        expert_mass = ops.reshape(info["raw_gate_probs"], (-1, num_experts))  # [T, E]
        if token_weight is not None:
            expert_mass = expert_mass * ops.expand_dims(ops.cast(token_weight, expert_mass.dtype), -1)
        mass = ops.sum(expert_mass, axis=0)
        self._update_stats(mass, mass, self._count_tokens(expert_mass, token_weight), 0.0)
        if training and self.config.gating_config.z_loss_weight > 0:
            logits = ops.reshape(info["gate_logits"], (-1, num_experts * num_slots))
            z_loss = router_z_loss(logits, token_weight)
            self.add_loss(self.config.gating_config.z_loss_weight * z_loss)
            self.last_z_loss.assign(ops.cast(ops.stop_gradient(z_loss), "float32"))
        outputs = ops.reshape(outputs, (-1, output_dim))  # [T, o]
        outputs = self._add_shared_experts(ops.reshape(inputs, (-1, hidden_dim)), outputs, training)
        outputs = ops.reshape(outputs, tuple(leading_shape) + (output_dim,))
        return self._zero_masked(outputs, mask)

    # ---------------------------------------------------------------- helpers

    def _route(self, tokens, training, token_mask=None):
        """Runs the router and normalises its answer to `[T, k]` weights and indices.

        Routers whose `call` takes a `mask` (e.g. "resonance", "conditional") get the
        token mask `[T]`.
        """
        weights, indices, info = call_router(self.gating_network, tokens, training=training, mask=token_mask)
        num_experts = self.config.num_experts
        if indices is None:
            # Dense [T, E] weights: keep the top_k largest.
            info.setdefault("raw_gate_probs", weights)
            weights, indices = ops.top_k(weights, self.config.gating_config.top_k)
        elif len(indices.shape) == len(weights.shape) - 1:
            # Dense weights with one index per token (e.g. argmax).
            if weights.shape[-1] != num_experts:
                raise ValueError(
                    f"A router returning one index per token must return weights of shape "
                    f"[T, num_experts={num_experts}], got {weights.shape}."
                )
            info.setdefault("raw_gate_probs", weights)
            indices = ops.expand_dims(indices, -1)
            weights = ops.take_along_axis(weights, ops.cast(indices, "int32"), axis=-1)
        return weights, ops.cast(indices, "int32"), info

    def _plan(self, indices, active, training):
        """The dispatch plan of `[T, k]` assignments.

        Returns:
            `(plan, slice_counts)`: `slice_counts` is None, or (eager PyTorch) the
            per-expert row counts of a plan whose rows are contiguous expert slices.
        """
        num_experts = self.config.num_experts
        num_tokens = dispatch_lib.static_dim(indices, 0)
        # Buffers are sized for the router's average experts per token: `expected_k` is
        # top_k for fixed-k routers and smaller than the k_max slots of dynamic-k ones
        # (their inactive slots take no capacity), so a router averaging 1.3 experts
        # gets C = ceil(cf * T * 1.3 / E) rows per expert, not the k_max bound.
        top_k = min(getattr(self.gating_network, "expected_k", indices.shape[-1]), indices.shape[-1])
        # Expert-parallel buffers must stay [E, C, ...] to be sharded by expert.
        slices = torch_eager_slices_enabled() and not self.config.expert_parallel
        if not self.config.drop_tokens:
            if slices:
                # Eager: buffers as large as this batch's largest load drop nothing;
                # slices skip their padding, which pays off unless experts are many
                # and evenly loaded.
                loads = expert_loads(indices, active, num_experts)
                capacity = dropless_buffer_capacity(loads)
                if capacity_slices_pay_off(loads, capacity):
                    return dispatch_lib.plan_ragged_dispatch(indices, active, num_experts)
                return dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity), None
            if isinstance(num_tokens, int):
                block = dispatch_lib.dropless_block_size(
                    num_tokens, top_k, num_experts, self.config.dropless_block_size
                )
            else:
                block = self.config.dropless_block_size or DYNAMIC_DROPLESS_BLOCK
            return dispatch_lib.plan_dropless_dispatch(indices, active, num_experts, block), None
        capacity = self._capacity(indices, training)
        if isinstance(capacity, int) and slices:
            if capacity_slices_pay_off(expert_loads(indices, active, num_experts), capacity):
                return dispatch_lib.plan_ragged_dispatch(indices, active, num_experts, capacity)
        return dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity), None

    def _capacity(self, indices, training):
        """C rows per expert for `[T, k]` assignments in capacity mode (an int, or a
        scalar tensor when T is only known at run time)."""
        num_experts = self.config.num_experts
        num_tokens = dispatch_lib.static_dim(indices, 0)
        # See `_plan` on `expected_k`.
        top_k = min(getattr(self.gating_network, "expected_k", indices.shape[-1]), indices.shape[-1])
        capacity_factor = self.config.capacity_factor(bool(training))
        if isinstance(num_tokens, int):
            return dispatch_lib.expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
        return dispatch_lib.dynamic_expert_capacity(num_tokens, top_k, num_experts, capacity_factor)

    def add_loss(self, loss):
        """Registers `loss` as float32 (Keras sums it with the float32 model loss), so a
        bfloat16/float16 `routing_dtype` cannot break the trainer's loss sum."""
        super().add_loss(ops.cast(loss, "float32"))

    @staticmethod
    def _count_tokens(per_token, token_weight):
        if token_weight is None:
            return ops.cast(ops.shape(per_token)[0], "float32")
        return ops.sum(ops.cast(token_weight, "float32"))

    def _add_losses_and_stats(self, info, plan, token_mask, fully_dropped, training, weights=None, indices=None):
        """Balancing losses (training only), aux-free bias update and statistics.

        `weights`/`indices` `[T, k]` (token-choice routing) feed the importance loss.
        """
        probs = info.get("raw_gate_probs")
        logits = info.get("gate_logits")
        gating = self.config.gating_config
        token_choice = self.gating_network.routing_kind == "token_choice"
        if training:
            self._add_router_losses(probs, weights, indices, token_mask)
            if gating.balancing == "aux_free" and hasattr(self.gating_network, "update_expert_bias"):
                # DeepSeek-V3: this batch's load moves the selection bias used from the next
                # step on. A variable assignment, so it is carried by every backend's fit.
                self.gating_network.update_expert_bias(plan.routed_per_expert)
        if training and probs is not None and gating.aux_loss_weight > 0 and gating.balancing == "aux_loss" and token_choice:
            aux_loss = load_balancing_loss(probs, plan.routed_per_expert, token_mask)
            self.add_loss(gating.aux_loss_weight * aux_loss)
            self.last_aux_loss.assign(ops.cast(ops.stop_gradient(aux_loss), "float32"))
        if training and logits is not None and gating.z_loss_weight > 0:
            z_loss = router_z_loss(logits, token_mask)
            self.add_loss(gating.z_loss_weight * z_loss)
            self.last_z_loss.assign(ops.cast(ops.stop_gradient(z_loss), "float32"))
        dropped = ops.cast(fully_dropped, "float32")
        num_tokens = self._count_tokens(dropped, token_mask)
        self._update_stats(plan.routed_per_expert, plan.processed_per_expert, num_tokens, ops.sum(dropped))

    def _add_router_losses(self, probs, weights, indices, token_mask):
        """Importance CV^2 and entropy losses, each with its own weight (training only)."""
        gating = self.config.gating_config
        importance_weight = gating.importance_loss_weight
        if importance_weight > 0 and weights is not None and indices is not None:
            loss = importance_loss(weights, indices, self.config.num_experts, token_mask)
            self.add_loss(importance_weight * loss)
            self.last_importance_loss.assign(ops.cast(ops.stop_gradient(loss), "float32"))
        entropy_weight = gating.entropy_loss_weight
        if entropy_weight is None:
            entropy_weight = getattr(self.gating_network, "default_entropy_loss_weight", 0.0)
        if entropy_weight > 0 and probs is not None:
            loss = router_entropy_loss(probs, token_mask)
            self.add_loss(entropy_weight * loss)
            self.last_entropy_loss.assign(ops.cast(ops.stop_gradient(loss), "float32"))

    def _update_stats(self, routed, processed, num_tokens, dropped_tokens):
        as_stat = lambda x: ops.stop_gradient(ops.cast(x, "float32"))  # noqa: E731
        self.routed_tokens_per_expert.assign_add(as_stat(routed))
        self.processed_tokens_per_expert.assign_add(as_stat(processed))
        self.seen_tokens.assign_add(as_stat(num_tokens))
        self.dropped_tokens.assign_add(as_stat(dropped_tokens))

    @staticmethod
    def _zero_masked(outputs, mask):
        if mask is None:
            return outputs
        return outputs * ops.expand_dims(ops.cast(mask, outputs.dtype), -1)

    # --------------------------------------------------------------- public

    def get_expert_utilization(self):
        """Measured share of routed token assignments per expert since the last reset.

        Returns:
            numpy `[E]` float array summing to 1 (zeros before any call). Soft MoE
            reports each expert's share of the combine weights.
        """
        routed = np.asarray(ops.convert_to_numpy(self.routed_tokens_per_expert), dtype="float64")
        total = routed.sum()
        return routed / total if total > 0 else routed

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
            router's current `expert_bias` (numpy `[E]`).
        """
        routed = np.asarray(ops.convert_to_numpy(self.routed_tokens_per_expert), dtype="float64")
        processed = np.asarray(ops.convert_to_numpy(self.processed_tokens_per_expert), dtype="float64")
        tokens = float(ops.convert_to_numpy(self.seen_tokens))
        total = routed.sum()
        return {
            "expert_fraction": routed / total if total > 0 else routed,
            "avg_experts_per_token": total / tokens if tokens > 0 else 0.0,
            "dropped_fraction": float(1.0 - processed.sum() / total) if total > 0 else 0.0,
            "dropped_token_fraction": float(ops.convert_to_numpy(self.dropped_tokens)) / tokens if tokens > 0 else 0.0,
            "rerouted_fraction": self._rerouted_fraction(total),
            "load_cv": float(routed.std() / routed.mean()) if total > 0 else 0.0,
            "tokens": tokens,
            "aux_loss": float(ops.convert_to_numpy(self.last_aux_loss)),
            "z_loss": float(ops.convert_to_numpy(self.last_z_loss)),
            "importance_loss": float(ops.convert_to_numpy(self.last_importance_loss)),
            "entropy_loss": float(ops.convert_to_numpy(self.last_entropy_loss)),
            **self._bias_stats(),
        }

    def _rerouted_fraction(self, routed_total):
        if self.rerouted_assignments is None or routed_total <= 0:
            return 0.0
        return float(ops.convert_to_numpy(self.rerouted_assignments)) / routed_total

    def _bias_stats(self):
        bias = getattr(self.gating_network, "selection_bias", lambda: None)()
        return {} if bias is None else {"expert_bias": np.asarray(ops.convert_to_numpy(bias), dtype="float64")}

    def route(self, inputs, training=False, mask=None):
        """The routing decision for `inputs`, for inspection and plots (eager only).

        Runs only the router: no expert, no loss, no statistics or bias update.

        Args:
            inputs: `[..., d]` tokens (for "example"-layout experts `[B, ...]`).
            training: Route as in training (noise, no top-any fallback).
            mask: Optional boolean mask of the leading axes.

        Returns:
            dict of numpy arrays over the T flattened tokens:
            * token-choice routers: `indices [T, k]`, `weights [T, k]`, `active [T, k]`
              (False for unused dynamic-k slots and masked tokens) and `probs [T, E]`;
            * "expert_choice": the same with k = E (`indices[t, e] = e`, `active[t, e]`:
              expert e picked token t), plus `expert_tokens [E, C]` (T = empty slot);
            * "softmoe": `weights`/`probs` `[B, S, E]` (combine weight per expert).
        """
        if not self.built:
            self.build(tuple(inputs.shape))
        to_numpy = lambda x: np.asarray(ops.convert_to_numpy(x))  # noqa: E731
        if self.is_soft:
            groups = inputs if len(inputs.shape) > 2 else ops.expand_dims(inputs, 0)
            group_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), ops.shape(groups)[:2])
            _, _, info = self.gating_network(groups, training=training, mask=group_mask)
            probs = to_numpy(info["raw_gate_probs"])
            return {"weights": probs, "probs": probs}
        if self.experts.token_layout == "example":
            tokens = inputs
        else:
            tokens = ops.reshape(inputs, (-1, self.config.expert_config.hidden_dim))
        token_mask = None if mask is None else ops.reshape(ops.cast(mask, "bool"), (-1,))
        router_inputs = self.experts.router_inputs(tokens)
        if self.gating_network.routing_kind == "expert_choice":
            slot_weights, token_index, info = call_router(
                self.gating_network, router_inputs, training=training, mask=token_mask
            )
            num_tokens, num_experts = int(tokens.shape[0]), self.config.num_experts
            token_index, slot_weights = to_numpy(token_index), to_numpy(slot_weights)
            weights = np.zeros((num_tokens + 1, num_experts), dtype=slot_weights.dtype)
            for expert in range(num_experts):
                weights[token_index[expert], expert] = slot_weights[expert]
            active = np.zeros((num_tokens + 1, num_experts), dtype=bool)
            for expert in range(num_experts):
                active[token_index[expert], expert] = True
            return {
                "indices": np.tile(np.arange(num_experts, dtype="int32"), (num_tokens, 1)),
                "weights": weights[:num_tokens],
                "active": active[:num_tokens],
                "probs": to_numpy(info["raw_gate_probs"]),
                "expert_tokens": token_index,
            }
        weights, indices, info = self._route(router_inputs, training, token_mask)
        active = info.get("active")
        active = ops.ones_like(indices, dtype="bool") if active is None else ops.cast(active, "bool")
        if token_mask is not None:
            active = active & ops.expand_dims(token_mask, -1)
        weights = ops.where(active, weights, ops.zeros_like(weights))
        decision = {"indices": to_numpy(indices), "weights": to_numpy(weights), "active": to_numpy(active)}
        if info.get("raw_gate_probs") is not None:
            decision["probs"] = to_numpy(info["raw_gate_probs"])
        return decision

    def reset_routing_stats(self):
        """Clears the accumulated routing statistics."""
        for variable in (
            self.routed_tokens_per_expert,
            self.processed_tokens_per_expert,
            self.seen_tokens,
            self.dropped_tokens,
            self.last_aux_loss,
            self.last_z_loss,
            self.last_importance_loss,
            self.last_entropy_loss,
        ) + ((self.rerouted_assignments,) if self.rerouted_assignments is not None else ()):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

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
