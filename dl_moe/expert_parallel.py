"""Token-sharded expert parallelism on JAX: `shard_map` + two `all_to_all`s (GShard).

Under a `keras.distribution.ModelParallel` whose layout shards the stacked expert
weights `[E, ...]` over a mesh axis (`dl_moe.distribution.expert_parallel_layout_map`),
a token-choice layer with `MoEConfig(expert_parallel=True)` runs dispatch → experts →
combine per device:

1. Each of the P devices along the token axes (the batch axis and the expert axis)
   holds T_l = T / P tokens and their `[T_l, k]` routing decision (the router runs
   before, on the sharded tokens).
2. It plans and fills capacity buffers `[E, C_l, d]` for all E experts from its own
   tokens (`dispatch.plan_capacity_dispatch`, `dispatch.dispatch`).
3. An all-to-all over the expert axis (P_e devices) sends expert e's rows to the
   device that owns e: each device then holds `[E / P_e, P_e * C_l, d]`, the rows of
   its own experts from every device of its expert-axis group.
4. The local slice of the expert bank (its stacked weights arrive as `[E / P_e, ...]`)
   runs on them; a second all-to-all returns `[E, C_l, o]` to the tokens' devices,
   where `dispatch.combine` weights and sums them.

Per device and step this moves 2 × E·C_l·d values forward (and the same backward),
about 2 × k·cf·T_l·d: the all-to-all floor, which falls as 1/P. Nothing else scales
with the token count: the counts per expert are summed over devices (`[E]` int32)
so losses and `RoutingMonitor` see the global load.

Capacity is per group (per device), as in GShard: C_l = ceil(cf · T_l · k / E)
rounded up to a multiple of 8 (`dispatch.expert_capacity`), so an expert takes at
most C_l assignments from each device. An imbalance that a single device's C would
absorb can drop tokens here; with no drop the outputs equal the single-device ones.

Dropless mode (`drop_tokens=False`) sizes C_l = T_l rounded up to 8: an expert gets
each token at most once, so nothing drops and the result is the single-device one.
The price is E / (k · cf) times the capacity-mode buffers and all-to-all bytes
(`[E, T_l, d]` per device), still 1/P of the global tokens.

What this path does not cover (the layer then keeps the single-program path, where
XLA places the buffers): other backends; banks that need per-sequence context
(attention experts) or run dropout in training; a bank whose weights are also
sharded on another mesh axis (`model_axis`); `overflow="reroute"`; a token count
that is not static or not divisible by the number of token shards.
"""

from typing import NamedTuple

import keras
from keras import ops

from dl_moe import dispatch as dispatch_lib
from dl_moe import dispatch_plans
from dl_moe.experts.base import ExpertBank


class ExpertParallelPlan(NamedTuple):
    """What the statistics need of an expert-parallel call (`DispatchPlan`'s names).

    Attributes:
        routed_per_expert: `[E]` int32 active assignments per expert, all devices.
        processed_per_expert: `[E]` int32 computed assignments per expert, all devices.
        kept: `[T, k]` bool, the assignment was computed.
    """

    routed_per_expert: object
    processed_per_expert: object
    kept: object


def mesh_axes(layer):
    """`(expert_axis, token_axes)` of the active distribution for `layer`, or None.

    The expert axis is the mesh axis sharding the bank's stacked weights' first
    dimension; the token axes are the distribution's batch axis followed by the expert
    axis (one name when they are the same axis). None when no distribution shards the
    bank by expert, or a bank weight is sharded on another dimension or axis
    (replicated `[E, ...]` weights, e.g. an expert scale, are sliced locally).
    """
    distribution = keras.distribution.distribution()
    if distribution is None or getattr(distribution, "device_mesh", None) is None:
        return None
    sharded = {}
    for weight in _stacked_weights(layer):
        axes = tuple(getattr(distribution.get_variable_layout(weight), "axes", ()) or ())
        if any(a is not None for a in axes):
            if axes[0] is None or any(a is not None for a in axes[1:]):
                return None
            sharded[axes[0]] = weight
    if len(sharded) != 1:
        return None
    (axis,) = sharded
    batch_axis = getattr(distribution, "batch_dim_name", None)
    token_axes = (axis,) if batch_axis in (None, axis) else (batch_axis, axis)
    return axis, token_axes


def _stacked_weights(layer):
    """The bank's weights with a leading expert dimension E (kernels, biases, scales)."""
    num_experts = layer.config.num_experts
    return [w for w in layer.experts.weights if len(w.shape) >= 1 and w.shape[0] == num_experts]


def _axis_size(mesh_shape, axes):
    size = 1
    for axis in axes:
        size *= mesh_shape[axis]
    return size


def expert_parallel_applies(layer, training, num_tokens):
    """Whether `run_expert_parallel` runs this call of a token-choice layer.

    Args:
        layer: The `MixtureOfExperts` layer.
        training: Whether the call trains.
        num_tokens: T of the call: a Python int, or None / a tensor when not static.

    Returns:
        True on the JAX backend for `MoEConfig(expert_parallel=True)` under a
        distribution that shards the bank's stacked weights by expert only
        (`mesh_axes`), with E divisible by the expert axis, a static T divisible by
        the number of token shards, a bank of token layout without per-call context,
        no dropout in training and `overflow="drop"`. Otherwise False, and the layer
        runs its single-program plans.
    """
    config = layer.config
    if not config.expert_parallel or keras.backend.backend() != "jax":
        return False
    if config.overflow != "drop":
        return False
    bank = layer.experts
    if bank.token_layout != "token" or type(bank).prepare_context is not ExpertBank.prepare_context:
        return False
    if training and getattr(bank, "dropout_rate", 0) > 0:
        return False
    axes = mesh_axes(layer)
    if axes is None:
        return False
    expert_axis, token_axes = axes
    shape = _mesh_shape()
    if not isinstance(num_tokens, int) or num_tokens % _axis_size(shape, token_axes):
        return False
    return config.num_experts % shape[expert_axis] == 0


def _mesh_shape():
    """`{axis name: size}` of the active distribution's device mesh."""
    mesh = keras.distribution.distribution().device_mesh
    return dict(zip(mesh.axis_names, mesh.shape))


def token_shards(layer):
    """Number of devices the tokens are split over (the product of the token axes)."""
    return _axis_size(_mesh_shape(), mesh_axes(layer)[1])


def group_capacity(layer, num_tokens, top_k, training):
    """C_l rows per expert and device group.

    Args:
        layer: The `MixtureOfExperts` layer.
        num_tokens: Global T (a Python int).
        top_k: k the buffers are sized for (the router's expected k).
        training: Picks the training or evaluation capacity factor.

    Returns:
        `expert_capacity(T_l, k, E, cf)` in capacity mode; None in dropless mode.
    """
    if not layer.config.drop_tokens:
        return None
    local_tokens = num_tokens // token_shards(layer)
    capacity_factor = layer.config.capacity_factor(bool(training))
    return dispatch_lib.expert_capacity(local_tokens, top_k, layer.config.num_experts, capacity_factor)


def run_expert_parallel(layer, tokens, weights, indices, active, training, capacity):
    """Dispatch → experts → combine with tokens and experts sharded over the mesh.

    Args:
        layer: A `MixtureOfExperts` layer for which `expert_parallel_applies`.
        tokens: `[T, d]` tokens (global view; T divisible by the token shards).
        weights: `[T, k]` combine weights (zero for inactive assignments).
        indices: `[T, k]` int32 expert of each assignment.
        active: `[T, k]` bool.
        training: Python bool, passed to the bank.
        capacity: C_l rows per expert and device (`group_capacity`), or None for
            dropless (C_l = T_l rounded up to 8, which drops nothing).

    Returns:
        `(outputs [T, o], ExpertParallelPlan)`; its per-expert counts are summed over
        all devices.
    """
    import jax
    from jax.sharding import PartitionSpec
    from keras.src.backend.jax.distribution_lib import _to_backend_mesh

    distribution = keras.distribution.distribution()
    mesh = _to_backend_mesh(distribution.device_mesh)
    expert_axis, token_axes = mesh_axes(layer)
    num_experts = layer.config.num_experts
    local_tokens = tokens.shape[0] // _axis_size(dict(mesh.shape), token_axes)
    if capacity is None:
        capacity = dispatch_lib.round_up_rows(local_tokens)
    bank = layer.experts
    stacked = _stacked_weights(layer)
    token_spec = PartitionSpec(token_axes)
    expert_spec = PartitionSpec(expert_axis)

    def local_step(tokens, weights, indices, active, *bank_values):
        plan = dispatch_lib.plan_capacity_dispatch(indices, active, num_experts, capacity)
        buffers = dispatch_lib.dispatch(tokens, plan)  # [E, C_l, d]
        # Expert e's rows go to the device owning e; rows arrive ordered by source.
        received = jax.lax.all_to_all(buffers, expert_axis, 0, 1, tiled=True)  # [E/P_e, P_e*C_l, d]
        with _local_bank_values(stacked, bank_values):
            computed = bank(received, training=training)  # [E/P_e, P_e*C_l, o]
        returned = jax.lax.all_to_all(computed, expert_axis, 1, 0, tiled=True)  # [E, C_l, o]
        outputs = dispatch_lib.combine(returned, plan, weights)  # [T_l, o]
        routed = jax.lax.psum(plan.routed_per_expert, token_axes)
        processed = jax.lax.psum(plan.processed_per_expert, token_axes)
        return outputs, routed, processed, plan.kept

    sharded = jax.shard_map(
        local_step,
        mesh=mesh,
        in_specs=(token_spec,) * 4 + (expert_spec,) * len(stacked),
        out_specs=(token_spec, PartitionSpec(), PartitionSpec(), token_spec),
    )
    bank_values = [ops.convert_to_tensor(w.value) for w in stacked]
    outputs, routed, processed, kept = sharded(tokens, weights, indices, active, *bank_values)
    return outputs, ExpertParallelPlan(routed, processed, kept)


class _local_bank_values:
    """Maps each stacked bank variable to its local `[E/P_e, ...]` slice.

    A `StatelessScope` checks values against the variables' global shapes, so the
    slices are placed in its mapping after it is built.
    """

    def __init__(self, variables, values):
        self.scope = keras.StatelessScope(initialize_variables=False)
        for variable, value in zip(variables, values):
            self.scope.state_mapping[id(variable)] = value

    def __enter__(self):
        return self.scope.__enter__()

    def __exit__(self, *exc):
        return self.scope.__exit__(*exc)


class ExpertParallelAllToAll(dispatch_plans.Plan):
    """The plan table's expert-parallel row (JAX): `run_expert_parallel`."""

    name = "expert_parallel"

    def applies(self, facts):
        return expert_parallel_applies(facts.layer, facts.training, facts.num_tokens)

    def unavailable_reason(self, facts):
        if not self.applies(facts):
            return (
                "it needs the JAX backend, expert_parallel=True, a keras.distribution that shards the "
                "bank's stacked weights by expert, a static token count divisible by the token shards, "
                "a token-layout bank without dropout in training and overflow='drop'"
            )
        return None

    def run(self, call):
        layer = call.layer
        capacity = group_capacity(
            layer, call.indices.shape[0], dispatch_plans.experts_per_token(layer, call.indices), call.training
        )
        outputs, plan = run_expert_parallel(
            layer, call.tokens, call.weights, call.indices, call.active, call.training, capacity
        )
        return dispatch_plans.PlanResult(outputs, plan.routed_per_expert, plan.processed_per_expert, plan.kept)


dispatch_plans.register_plan(ExpertParallelAllToAll(), before=dispatch_plans.PLAN_TABLE[0].name)
