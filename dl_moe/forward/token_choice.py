"""Token-choice forward: every token picks its k experts (linear, cosine, top-p, ...).

route (`[T, k]` weights and experts) → with `overflow="reroute"`, the overflow moved
to fallback experts (`dl_moe.overflow`) → dispatch (a capacity, dropless, gathered
small-batch or, in eager PyTorch, per-expert-slice plan; or, with capacity classes,
the capacity plan of the class chosen at run time, `dl_moe.capacity_classes`) →
experts → combine (weighted sum of each token's k outputs).
"""

from typing import NamedTuple

import keras
from keras import ops

from dl_moe import capacity_classes
from dl_moe import dispatch as dispatch_lib
from dl_moe import expert_parallel as expert_parallel_lib
from dl_moe import export_compat
from dl_moe import overflow as overflow_lib
from dl_moe import statistics
from dl_moe.backend_fast_paths import (
    capacity_slices_pay_off,
    concrete_expert_loads,
    dropless_buffer_capacity,
    host_planned_slices_apply,
    run_host_planned_slices,
    torch_eager_slices_enabled,
)
from dl_moe.forward import common
from dl_moe.forward.common import finish, flatten_tokens, place_on_expert_devices, run_experts, to_numpy
from dl_moe.gating.base import call_router

# Capacity used when the token count is only known at run time (TF graphs with an
# unknown batch size) for dropless blocks; any value gives the same outputs.
DYNAMIC_DROPLESS_BLOCK = 64

build_router = common.build_router


def forward(layer, inputs, training, mask, router_inputs=None):
    """`[..., d]` → `[..., o]`; every token's k assignments computed unless dropped.

    `router_inputs` (`inputs`' shape): what the router sees instead of `inputs`.
    """
    tokens, token_mask, leading_shape = flatten_tokens(layer, inputs, mask)

    # Route.
    router_tokens = None
    if router_inputs is not None:
        router_tokens = ops.reshape(ops.cast(router_inputs, tokens.dtype), ops.shape(tokens))
    weights, indices, active, info = route(layer, tokens, training, token_mask, router_tokens)  # [T, k]

    # Overflow rerouting: a new [T, k] decision whose kept assignments fit the capacity.
    routed_active, reroute = active, None
    dispatch_indices, dispatch_weights = indices, weights
    if layer.config.overflow == "reroute":
        reroute, dispatch_weights = overflow_lib.reroute_routing(
            weights, indices, active, info.get("raw_gate_probs"), layer.config.num_experts,
            capacity_rows(layer, indices, training), layer.config.reroute_attempts,
        )
        dispatch_indices, active = reroute.expert_index, reroute.kept

    # Dispatch → experts → combine: one plan, or (capacity classes) the plan of the
    # class this call needs, chosen at run time.
    dispatched, combine_weights = tokens, dispatch_weights
    if layer.config.scale_expert_inputs:
        dispatched, combine_weights = weight_expert_inputs(tokens, dispatch_weights, active)
    classes = choose_capacity_class(layer, dispatch_indices, active, training)
    # Expert-parallel row (issue 28): token-sharded shard_map + all_to_all on JAX.
    if expert_parallel_lib.expert_parallel_applies(layer, training, dispatch_indices.shape[0]):
        capacity = expert_parallel_lib.group_capacity(
            layer, dispatch_indices.shape[0], experts_per_token(layer, dispatch_indices), training
        )
        outputs, plan = expert_parallel_lib.run_expert_parallel(
            layer, dispatched, combine_weights, dispatch_indices, active, training, capacity
        )
    elif classes is not None:
        outputs, plan = run_capacity_class(
            layer, classes, dispatched, combine_weights, dispatch_indices, active, inputs, mask, training
        )
        if layer.config.adaptive_capacity and training:
            statistics.update_capacity_load_factor(layer, classes.loads)
    elif host_planned_slices_apply(layer, dispatch_indices.shape[0], dispatch_indices.shape[1], training):
        outputs, plan = run_host_plan(layer, dispatched, combine_weights, dispatch_indices, active, training)
    else:
        plan, slice_counts = choose_plan(layer, dispatch_indices, active, training)
        outputs = dispatch_compute_combine(layer, dispatched, combine_weights, plan, inputs, mask, training, slice_counts)
    fully_dropped = ops.any(routed_active, axis=-1) & ~ops.any(plan.kept & active, axis=-1)  # [T]

    if reroute is not None:
        # Losses and statistics see the load the router chose, before rerouting.
        plan = plan._replace(routed_per_expert=reroute.routed_per_expert)
        statistics.record_rerouted(layer, reroute.rerouted)
    if training:
        statistics.add_training_losses(
            layer, info, token_mask, plan.routed_per_expert, weights=weights, indices=indices
        )
    statistics.record_token_routing(layer, plan, token_mask, fully_dropped)
    return finish(layer, outputs, tokens, fully_dropped, leading_shape, mask, training)


def dispatch_compute_combine(layer, tokens, weights, plan, inputs, mask, training, slice_counts=None):
    """Tokens `[T, d]` → buffers `[G, R, d]` (dispatch) → bank → `[T, ...o]` (combine,
    weighted by `weights [T, k]`)."""
    expert_inputs = place_on_expert_devices(layer, dispatch_lib.dispatch(tokens, plan), plan)  # [G, R, d]
    expert_outputs = run_experts(layer, expert_inputs, plan, inputs, mask, training, slice_counts)
    return dispatch_lib.combine(expert_outputs, plan, weights)  # [T, ...o]


class ClassChoice(NamedTuple):
    """The capacity classes of one call and the one it runs.

    Attributes:
        capacities: C_i per class (Python ints); None stands for the dropless block
            plan (the fallback of dropless classes, which every load fits).
        index: Scalar int32 tensor, the class to run.
        loads: `[E]` int32 active assignments per expert.
    """

    capacities: list
    index: object
    loads: object


class SwitchedPlan(NamedTuple):
    """What the statistics need of a plan that is not a `DispatchPlan` (`DispatchPlan`'s
    names): the plan a capacity class ran, or host-planned slices."""

    routed_per_expert: object
    processed_per_expert: object
    kept: object


def choose_capacity_class(layer, indices, active, training):
    """The `ClassChoice` of `[T, k]` assignments, or None when capacity classes do not apply.

    They apply when T is static, the layer is not expert-parallel, the gathered
    small-batch plan does not take the batch, eager PyTorch does not run per-expert
    slices (which already size buffers from the concrete load), and either
    * dropless mode with `dropless_classes` (None: in inference only): the first of
      `CLASS_FACTORS`' capacities that holds the largest load, else the block plan
      (not needed when the largest class has T rows, which every load fits); or
    * capacity mode in training with `adaptive_capacity`: the first class factor at or
      above `capacity_load_factor`, clipped to [min, max]_capacity_factor.
    """
    config = layer.config
    num_tokens = indices.shape[0]
    if not isinstance(num_tokens, int) or config.expert_parallel or torch_eager_slices_enabled():
        return None
    if config.drop_tokens:
        if not (config.adaptive_capacity and training):
            return None
        factors = capacity_classes.adaptive_factors(config.min_capacity_factor, config.max_capacity_factor)
    elif dropless_classes_apply(config.dropless_classes, training):
        factors = capacity_classes.CLASS_FACTORS
    else:
        return None
    if small_batch_plan(layer, indices, active, training) is not None:
        return None
    num_experts = config.num_experts
    top_k = experts_per_token(layer, indices)
    capacities, factors = capacity_classes.class_capacities(num_tokens, top_k, num_experts, factors)
    loads = capacity_classes.expert_loads(indices, active, num_experts)
    if config.drop_tokens:
        load_factor = ops.clip(layer.capacity_load_factor, config.min_capacity_factor, config.max_capacity_factor)
        return ClassChoice(capacities, capacity_classes.class_of_factor(load_factor, factors), loads)
    index = capacity_classes.smallest_class_holding(ops.max(loads), capacities)
    if capacities[-1] < num_tokens:
        # The block plan holds what no class does. Training on TensorFlow takes a
        # class of T rows instead: under XLA the gradient of the block plan's weight
        # gathers inside a switch branch does not compile (a segment count that is
        # not a compile-time constant).
        tf_training = bool(training) and keras.backend.backend() == "tensorflow"
        capacities = capacities + [dispatch_lib.round_up_rows(num_tokens) if tf_training else None]
    return ClassChoice(capacities, index, loads)


def dropless_classes_apply(dropless_classes, training):
    """Whether `MoEConfig.dropless_classes` (True, False, or None: inference only) asks
    for dropless classes in this call."""
    if dropless_classes is None:
        return not training
    return dropless_classes


def run_capacity_class(layer, classes, tokens, weights, indices, active, inputs, mask, training):
    """Runs dispatch → experts → combine with the plan of the chosen class (`ops.switch`).

    Returns:
        `(outputs [T, ...o], SwitchedPlan)`.
    """
    num_experts = layer.config.num_experts

    def branch_for(capacity):
        def branch(tokens, weights, indices, active):
            if capacity is None:
                block = dispatch_lib.dropless_block_size(
                    indices.shape[0], indices.shape[1], num_experts, layer.config.dropless_block_size
                )
                plan = dispatch_lib.plan_dropless_dispatch(indices, active, num_experts, block)
            else:
                plan = dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity)
            outputs = dispatch_compute_combine(layer, tokens, weights, plan, inputs, mask, training)
            return outputs, plan.processed_per_expert, ops.cast(plan.kept, "int32")

        return branch

    branches = [branch_for(capacity) for capacity in classes.capacities]
    outputs, processed, kept = capacity_classes.run_switched(
        classes.index, branches, (tokens, weights, indices, active), rematerialize=bool(training)
    )
    return outputs, SwitchedPlan(classes.loads, processed, kept > 0)


def run_host_plan(layer, tokens, weights, indices, active, training):
    """Eager PyTorch inference at decode sizes (`backend_fast_paths.run_host_planned_slices`).

    Returns:
        `(outputs [T, o], SwitchedPlan)`; the same assignments are kept as by the
        capacity plan (dropless: all).
    """
    capacity = capacity_rows(layer, indices, training) if layer.config.drop_tokens else None
    outputs, routed, processed, kept = run_host_planned_slices(layer, tokens, weights, indices, active, capacity, training)
    return outputs, SwitchedPlan(routed, processed, kept)


def routing_decision(layer, inputs, training, mask):
    """The numpy decision `MixtureOfExperts.route` returns for token-choice routers."""
    tokens, token_mask, _ = flatten_tokens(layer, inputs, mask)
    weights, indices, active, info = route(layer, tokens, training, token_mask)
    decision = {"indices": to_numpy(indices), "weights": to_numpy(weights), "active": to_numpy(active)}
    if info.get("raw_gate_probs") is not None:
        decision["probs"] = to_numpy(info["raw_gate_probs"])
    return decision


def weight_expert_inputs(tokens, weights, active):
    """`scale_expert_inputs` (Llama 4): tokens `[T, d]` times their one weight `[T, 1]`,
    and combine weights of 1 for the active assignments, so the output is expert(w * x)."""
    if weights.shape[-1] != 1:
        raise ValueError(
            f"MoEConfig.scale_expert_inputs=True needs one expert per token, the router gave {weights.shape[-1]}."
        )
    return tokens * ops.cast(weights, tokens.dtype), ops.cast(active, weights.dtype)


def route(layer, tokens, training, token_mask, router_tokens=None):
    """Routes tokens `[T, ...]` (or, when given, `router_tokens [T, d]` in their place).

    Returns:
        `(weights [T, k], indices [T, k] int32, active [T, k] bool, info)`: `active` is
        False for unused dynamic-k slots, masked tokens and (with an active-expert
        mask) dead experts; their weights are zero.
    """
    if router_tokens is None:
        router_tokens = layer.experts.router_inputs(tokens)
    weights, indices, info = call_token_router(layer, router_tokens, training, token_mask)
    active = info.get("active")
    active = ops.ones_like(indices, dtype="bool") if active is None else ops.cast(active, "bool")
    if getattr(layer.gating_network, "has_expert_mask", False):
        # An assignment to a dead expert (top_k above the live count) costs nothing.
        active = active & ops.take(layer.gating_network.live_experts(), indices)
    if token_mask is not None:
        active = active & ops.expand_dims(token_mask, -1)
    weights = ops.where(active, weights, ops.zeros_like(weights))
    return weights, indices, active, info


def call_token_router(layer, router_inputs, training, token_mask=None):
    """Runs the router and normalises its answer to `[T, k]` weights and indices.

    Routers whose `call` takes a `mask` (e.g. "resonance", "conditional") get the
    token mask `[T]`.
    """
    weights, indices, info = call_router(layer.gating_network, router_inputs, training=training, mask=token_mask)
    num_experts = layer.config.num_experts
    if indices is None:
        # Dense [T, E] weights: keep the top_k largest.
        info.setdefault("raw_gate_probs", weights)
        weights, indices = export_compat.top_k(weights, layer.config.gating_config.top_k)
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


def choose_plan(layer, indices, active, training):
    """The dispatch plan of `[T, k]` assignments.

    Returns:
        `(plan, slice_counts)`: `slice_counts` is None, or (eager PyTorch) the
        per-expert row counts of a plan whose rows are contiguous expert slices.
    """
    small_batch = small_batch_plan(layer, indices, active, training)
    if small_batch is not None:
        return small_batch, None
    config = layer.config
    num_experts = config.num_experts
    num_tokens = dispatch_lib.static_dim(indices, 0)
    top_k = experts_per_token(layer, indices)
    # Expert-parallel buffers must stay [E, C, ...] to be sharded by expert.
    slices = torch_eager_slices_enabled() and not config.expert_parallel
    if not config.drop_tokens:
        if slices:
            # Eager: buffers as large as this batch's largest load drop nothing;
            # slices skip their padding, which pays off unless experts are many
            # and evenly loaded.
            loads = concrete_expert_loads(indices, active, num_experts)
            capacity = dropless_buffer_capacity(loads)
            if capacity_slices_pay_off(loads, capacity):
                return dispatch_lib.plan_ragged_dispatch(indices, active, num_experts)
            return dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity), None
        if isinstance(num_tokens, int):
            block = dispatch_lib.dropless_block_size(num_tokens, top_k, num_experts, config.dropless_block_size)
        else:
            block = config.dropless_block_size or DYNAMIC_DROPLESS_BLOCK
        return dispatch_lib.plan_dropless_dispatch(indices, active, num_experts, block), None
    capacity = capacity_rows(layer, indices, training)
    if isinstance(capacity, int) and slices:
        if capacity_slices_pay_off(concrete_expert_loads(indices, active, num_experts), capacity):
            return dispatch_lib.plan_ragged_dispatch(indices, active, num_experts, capacity)
    return dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity), None


def small_batch_plan(layer, indices, active, training):
    """The gathered plan (`dispatch.plan_gathered_dispatch`) of a decode-sized batch, or None.

    Taken in inference only, for banks with `supports_gathered_rows` (FFN) that are
    not expert-parallel, when T is static and `dispatch.gathered_dispatch_pays_off`.
    It keeps and drops exactly the assignments of the capacity plan (or, dropless,
    none), so outputs and statistics are the same.
    """
    num_tokens = indices.shape[0]
    if training or not isinstance(num_tokens, int) or layer.config.expert_parallel:
        return None
    if not getattr(layer.experts, "supports_gathered_rows", False):
        return None
    num_experts = layer.config.num_experts
    if not dispatch_lib.gathered_dispatch_pays_off(num_tokens, indices.shape[-1], num_experts):
        return None
    capacity = capacity_rows(layer, indices, training) if layer.config.drop_tokens else None
    return dispatch_lib.plan_gathered_dispatch(indices, active, num_experts, capacity)


def experts_per_token(layer, indices):
    """The k that buffers are sized for, given `[T, k_max]` assignments.

    The router's average experts per token: `expected_k` is top_k for fixed-k routers
    and smaller than the k_max slots of dynamic-k ones (their inactive slots take no
    capacity), so a router averaging 1.3 experts gets C = ceil(cf * T * 1.3 / E) rows
    per expert, not the k_max bound.
    """
    slots = indices.shape[-1]
    return min(getattr(layer.gating_network, "expected_k", slots), slots)


def capacity_rows(layer, indices, training):
    """C rows per expert for `[T, k]` assignments in capacity mode: a Python int, or a
    scalar tensor when T is only known at run time."""
    num_experts = layer.config.num_experts
    num_tokens = dispatch_lib.static_dim(indices, 0)
    top_k = experts_per_token(layer, indices)
    capacity_factor = layer.config.capacity_factor(bool(training))
    if export_compat.is_symbolic_dim(num_tokens):
        return dispatch_lib.symbolic_expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    if isinstance(num_tokens, int):
        return dispatch_lib.expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
    return dispatch_lib.dynamic_expert_capacity(num_tokens, top_k, num_experts, capacity_factor)
