"""The dispatch plan table: which plan runs dispatch → experts → combine, and why.

A token-choice call has routed its T tokens to `[T, k]` experts. A *plan* takes that
decision and the tokens, places the tokens in expert buffers, runs the expert bank
and combines the outputs. Plans differ only in cost; every plan keeps and drops the
same assignments (dropless: none; capacity mode: the first C of each expert in the
priority order of `dl_moe.dispatch`), so outputs, losses and statistics are equal.

`PLAN_TABLE` is ordered. With `MoEConfig.dispatch="auto"` a call runs the first row
whose `applies(facts)` holds, where `CallFacts` are known before the call runs (backend
mode, training, static token count, capacity or dropless, expert parallelism, what the
bank supports). `MoEConfig.dispatch="<name>"` runs that row instead, or raises a
`ValueError` saying why it cannot run this call. Backend-specific plans add their rows
from their own modules (`register_plan`): eager PyTorch's slices in
`dl_moe.backend_fast_paths`, JAX's expert parallelism in `dl_moe.expert_parallel`.

The rows, in table order:

| plan | runs (auto) | why |
|---|---|---|
| `expert_parallel` | JAX, `expert_parallel=True` under a distribution that shards the bank by expert | tokens stay sharded; two all-to-alls move only the routed rows (`dl_moe.expert_parallel`) |
| `host_slices` | eager PyTorch, inference, at most 32 assignments, FFN banks | decode-sized batches planned on the host with numpy (`dl_moe.torch_eager_plans`) |
| `adaptive_capacity` | capacity mode, training, `adaptive_capacity` | the buffer size follows the measured load: a switch over a few static capacities |
| `slices` | eager PyTorch | per-expert slices over weight views: no padding rows, no weight copies |
| `grouped` | dropless mode; and inference of at most `GROUPED_DECODE_ASSIGNMENTS` assignments in capacity mode; FFN banks | loops over the experts that have rows and reads each one's weights once; no weight copy per block, so memory is O(T·k·(d + h) + E·d·h) |
| `blocks` | dropless mode, banks without block support (attention, conv, user banks) | every block gathers its expert's weights: simple, any bank |
| `capacity` | capacity mode | `[E, C, d]` buffers, one batched matmul over the stacked weights, no copies |
"""

import dataclasses
from typing import NamedTuple

import keras
from keras import ops

from dl_moe import capacity_classes
from dl_moe import dispatch as dispatch_lib
from dl_moe import export_compat
from dl_moe import grouped_matmul
from dl_moe.forward.common import place_on_expert_devices, run_experts

# The blocks plan gathers a copy of its expert's weights per block of rows. Where those
# copies total at most this many times the rows' activations T*k*(d + h) (small experts
# and many rows), it is faster than the grouped plan's loops: at d=256, h=512, E=8,
# k=2, T=4096 (ratio 3.3) it trains at 0.61 of the dense-equivalent on JAX against
# the grouped plan's 0.35. At the widths of released models the ratio is 20-60 (the
# copies are what made the block plan need 8-36 GB there), and the grouped plan runs.
MAX_BLOCK_COPIES_PER_ACTIVATION = 4

# Capacity-mode inference batches of at most this many assignments T*k run the grouped
# plan: they touch few experts, and reading only those beats `[E, C]` buffers, which
# read every expert's weights and compute at least 8 rows for each.
GROUPED_DECODE_ASSIGNMENTS = 64


@dataclasses.dataclass(frozen=True)
class CallFacts:
    """What a plan is chosen from: all known before the call runs.

    Attributes:
        backend: `keras.backend.backend()`.
        eager_torch: Eager PyTorch (not traced by torch.compile).
        training: Training call.
        num_tokens: T as a Python int, or None when only known at run time.
        slots: k, assignment slots per token.
        drop_tokens: Capacity mode (True) or dropless (False).
        adaptive_capacity: `MoEConfig.adaptive_capacity`.
        expert_parallel: `MoEConfig.expert_parallel`.
        bank: The layer's expert bank (plans read its `supports_*` attributes).
        layer: The `MixtureOfExperts` layer (the expert-parallel row reads how the
            active distribution lays out its weights).
    """

    backend: str
    eager_torch: bool
    training: bool
    num_tokens: object
    slots: int
    drop_tokens: bool
    adaptive_capacity: bool
    expert_parallel: bool
    bank: object
    layer: object

    @property
    def static_tokens(self):
        return isinstance(self.num_tokens, int)

    def bank_supports(self, feature):
        return bool(getattr(self.bank, f"supports_{feature}", False))


class TokenChoiceCall(NamedTuple):
    """One call's routed tokens, as every plan receives them.

    Attributes:
        layer: The `MixtureOfExperts` layer.
        tokens: `[T, ...]` tokens (scaled by their weight with `scale_expert_inputs`).
        weights: `[T, k]` combine weights, zero where inactive.
        indices: `[T, k]` int32 experts.
        active: `[T, k]` bool assignments to compute.
        inputs: The layer's input (context-using banks read it).
        mask: The layer's Keras mask, or None.
        training: Training call.
    """

    layer: object
    tokens: object
    weights: object
    indices: object
    active: object
    inputs: object
    mask: object
    training: object


class PlanResult(NamedTuple):
    """A plan's output and what the statistics need of it.

    Attributes:
        outputs: `[T, ...o]` combined expert outputs (zero for an uncomputed token).
        routed_per_expert: `[E]` int32 active assignments per expert (before dropping).
        processed_per_expert: `[E]` int32 assignments per expert that were computed.
        kept: `[T, k]` bool, the assignment was computed.
    """

    outputs: object
    routed_per_expert: object
    processed_per_expert: object
    kept: object


class Plan:
    """A row of the plan table. Subclasses set `name` and implement the three methods."""

    name = None

    def applies(self, facts):
        """Whether `dispatch="auto"` runs this plan for a call with these `CallFacts`."""
        raise NotImplementedError

    def unavailable_reason(self, facts):
        """Why this plan cannot run a call with these facts, or None when it can."""
        return None

    def run(self, call):
        """dispatch → experts → combine of a `TokenChoiceCall`; returns a `PlanResult`."""
        raise NotImplementedError


PLAN_TABLE = []


def register_plan(plan, before=None):
    """Adds `plan` to the table, before the row named `before` (None: at the end).

    A row of the same name is replaced in place.
    """
    names = [row.name for row in PLAN_TABLE]
    if plan.name in names:
        PLAN_TABLE[names.index(plan.name)] = plan
        return
    PLAN_TABLE.insert(names.index(before) if before in names else len(PLAN_TABLE), plan)


def plan_names():
    """Names a config may ask for: "auto" and every row of the table, in order."""
    return ["auto"] + [row.name for row in PLAN_TABLE]


def call_facts(layer, indices, training):
    """The `CallFacts` of a token-choice call with `[T, k]` assignments."""
    from dl_moe.backend_fast_paths import torch_eager_slices_enabled

    config = layer.config
    return CallFacts(
        backend=keras.backend.backend(),
        eager_torch=torch_eager_slices_enabled(),
        training=bool(training),
        num_tokens=indices.shape[0] if isinstance(indices.shape[0], int) else None,
        slots=indices.shape[-1],
        drop_tokens=config.drop_tokens,
        adaptive_capacity=config.adaptive_capacity,
        expert_parallel=config.expert_parallel,
        bank=layer.experts,
        layer=layer,
    )


def choose_plan(facts, requested="auto"):
    """The table row that runs a call: the first that applies, or the one requested.

    Raises:
        ValueError: If the requested plan is unknown or cannot run this call.
    """
    if requested == "auto":
        for plan in PLAN_TABLE:
            if plan.applies(facts):
                return plan
        raise RuntimeError("No dispatch plan applies; the 'capacity'/'blocks' rows must close the table.")
    for plan in PLAN_TABLE:
        if plan.name == requested:
            reason = plan.unavailable_reason(facts)
            if reason is not None:
                raise ValueError(f"MoEConfig.dispatch={requested!r} cannot run this call: {reason}.")
            return plan
    raise ValueError(f"MoEConfig.dispatch must be one of {plan_names()}, got {requested!r}.")


# --------------------------------------------------------------------- shared steps


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


def dispatch_compute_combine(call, plan, **bank_kwargs):
    """Tokens `[T, d]` → buffers `[G, R, d]` (dispatch) → bank → `[T, ...o]` (combine,
    weighted by the call's `[T, k]` weights)."""
    layer = call.layer
    expert_inputs = place_on_expert_devices(layer, dispatch_lib.dispatch(call.tokens, plan), plan)  # [G, R, d]
    expert_outputs = run_experts(layer, expert_inputs, plan, call.inputs, call.mask, call.training, **bank_kwargs)
    return dispatch_lib.combine(expert_outputs, plan, call.weights)  # [T, ...o]


def result_of(call, plan, **bank_kwargs):
    """The `PlanResult` of running a `DispatchPlan`."""
    outputs = dispatch_compute_combine(call, plan, **bank_kwargs)
    return PlanResult(outputs, plan.routed_per_expert, plan.processed_per_expert, plan.kept)


def dropless_block(layer, indices, mean_rows_per_block=None):
    """Rows per dropless block: `MoEConfig.dropless_block_size`, else chosen from T*k/E."""
    config = layer.config
    num_tokens = indices.shape[0]
    if config.dropless_block_size is not None:
        return config.dropless_block_size
    if not isinstance(num_tokens, int):
        return dispatch_lib.DYNAMIC_DROPLESS_BLOCK
    rule = dispatch_lib.grouped_block_size if mean_rows_per_block else dispatch_lib.dropless_block_size
    return rule(num_tokens, experts_per_token(layer, indices), config.num_experts)


# --------------------------------------------------------------------- portable rows


class AdaptiveCapacityPlan(Plan):
    """Capacity mode in training with `adaptive_capacity`: the class of capacity factor
    at or above the moving load statistic, chosen at run time (`dl_moe.capacity_classes`).
    Outside training adaptive capacity uses `eval_capacity_factor`: the capacity plan."""

    name = "adaptive_capacity"

    def applies(self, facts):
        return self.unavailable_reason(facts) is None and facts.training

    def unavailable_reason(self, facts):
        if not (facts.drop_tokens and facts.adaptive_capacity and facts.static_tokens):
            return "it needs capacity mode with adaptive_capacity=True and a static token count"
        return None

    def run(self, call):
        if not call.training:
            return CapacityPlan().run(call)
        layer, config = call.layer, call.layer.config
        num_tokens, top_k = call.indices.shape[0], experts_per_token(layer, call.indices)
        factors = capacity_classes.adaptive_factors(config.min_capacity_factor, config.max_capacity_factor)
        capacities, factors = capacity_classes.class_capacities(num_tokens, top_k, config.num_experts, factors)
        loads = dispatch_lib.expert_loads(call.indices, call.active, config.num_experts)
        load_factor = ops.clip(layer.capacity_load_factor, config.min_capacity_factor, config.max_capacity_factor)
        index = capacity_classes.class_of_factor(load_factor, factors)

        def branch_for(capacity):
            def branch(tokens, weights, indices, active):
                plan = dispatch_lib.plan_capacity_dispatch(indices, active, config.num_experts, capacity)
                outputs = dispatch_compute_combine(call._replace(tokens=tokens, weights=weights), plan)
                return outputs, plan.processed_per_expert, ops.cast(plan.kept, "int32")

            return branch

        outputs, processed, kept = capacity_classes.run_switched(
            index,
            [branch_for(capacity) for capacity in capacities],
            (call.tokens, call.weights, call.indices, call.active),
            rematerialize=True,
        )
        from dl_moe import statistics

        statistics.update_capacity_load_factor(layer, loads)
        return PlanResult(outputs, loads, processed, kept > 0)


def block_copies_are_small(facts):
    """Whether the blocks plan's weight copies stay within `MAX_BLOCK_COPIES_PER_ACTIVATION`
    times the activations of the rows (static T and an FFN bank; else False)."""
    bank = facts.bank
    input_dim, hidden = getattr(bank, "_input_dim", None), getattr(bank, "intermediate_size", None)
    if not facts.static_tokens or input_dim is None or hidden is None:
        return False
    config = facts.layer.config
    num_experts, slots = config.num_experts, facts.slots
    assignments = facts.num_tokens * slots
    block = dispatch_lib.dropless_block_size(facts.num_tokens, slots, num_experts, config.dropless_block_size)
    blocks = dispatch_lib.dropless_num_blocks(assignments, num_experts, block)
    matrices = 2 if getattr(bank, "ffn_type", "mlp") == "mlp" else 3
    copies = blocks * matrices * input_dim * hidden
    return copies <= MAX_BLOCK_COPIES_PER_ACTIVATION * assignments * (input_dim + hidden)


class GroupedPlan(Plan):
    """Blocks of rows, each owned by one expert, computed by a loop over the experts
    that have rows (`dl_moe.grouped_matmul`): each expert's weights are read once and
    never copied per block. Dropless; in capacity mode it computes the assignments
    the capacity plan keeps."""

    name = "grouped"

    def applies(self, facts):
        if not facts.bank_supports("expert_blocks"):
            return False
        if not facts.drop_tokens:
            return not block_copies_are_small(facts)
        small = facts.static_tokens and facts.num_tokens * facts.slots <= GROUPED_DECODE_ASSIGNMENTS
        return small and not facts.training

    def unavailable_reason(self, facts):
        if not facts.bank_supports("expert_blocks"):
            return f"the expert bank {type(facts.bank).__name__} does not take expert blocks (FFN banks do)"
        return None

    def run(self, call):
        layer = call.layer
        num_experts = layer.config.num_experts
        active = call.active
        if layer.config.drop_tokens:
            capacity = capacity_rows(layer, call.indices, call.training)
            kept = dispatch_lib.capacity_kept(call.indices, active, num_experts, capacity)
            routed = dispatch_lib.expert_loads(call.indices, active, num_experts)
            active = active & kept
        block = dropless_block(layer, call.indices, mean_rows_per_block=True)
        plan = dispatch_lib.plan_dropless_dispatch(call.indices, active, num_experts, block)
        blocks = grouped_matmul.expert_blocks(plan.processed_per_expert, block)
        result = result_of(call, plan, expert_blocks=blocks)
        if layer.config.drop_tokens:
            result = result._replace(routed_per_expert=routed)
        return result


class BlocksPlan(Plan):
    """Dropless blocks for any bank: each block gathers its expert's weights."""

    name = "blocks"

    def applies(self, facts):
        return not facts.drop_tokens

    def run(self, call):
        layer = call.layer
        block = dropless_block(layer, call.indices)
        plan = dispatch_lib.plan_dropless_dispatch(call.indices, call.active, layer.config.num_experts, block)
        return result_of(call, plan)

    def unavailable_reason(self, facts):
        if facts.drop_tokens:
            return "it is a dropless plan and needs drop_tokens=False"
        return None


class CapacityPlan(Plan):
    """`[E, C, d]` buffers: one batched matmul over the stacked weights."""

    name = "capacity"

    def applies(self, facts):
        return facts.drop_tokens

    def unavailable_reason(self, facts):
        if not facts.drop_tokens:
            return "it drops assignments past C and needs drop_tokens=True"
        return None

    def run(self, call):
        layer = call.layer
        capacity = capacity_rows(layer, call.indices, call.training)
        plan = dispatch_lib.plan_capacity_dispatch(call.indices, call.active, layer.config.num_experts, capacity)
        return result_of(call, plan)


for _plan in (AdaptiveCapacityPlan(), GroupedPlan(), BlocksPlan(), CapacityPlan()):
    register_plan(_plan)
