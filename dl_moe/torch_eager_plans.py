"""Eager PyTorch's rows of the dispatch plan table (`dl_moe.dispatch_plans`).

Eager PyTorch reads tensors back to the host for free and indexes a stacked weight
tensor as a view, so it needs none of the static shapes XLA needs: it cuts the sorted
assignments into one contiguous slice per expert, and each slice runs against its
expert's weights alone (`dl_moe.backend_fast_paths`). Both rows keep and drop exactly
the assignments of the portable plans; `tests/test_fast_paths.py` and
`tests/test_small_batch.py` check that they give the same outputs, statistics and
gradients.

| plan | runs (auto) |
|---|---|
| `host_slices` | inference of at most `MAX_HOST_PLANNED_ASSIGNMENTS` assignments, FFN banks: planned with numpy, a handful of torch calls |
| `slices` | every other eager call (after the `adaptive_capacity` row, which takes adaptive capacity's training calls): per-expert slices, or `[E, C]` buffers sized to the batch's largest load when slices would not pay |
"""

from dl_moe import backend_fast_paths as fast
from dl_moe import dispatch as dispatch_lib
from dl_moe import dispatch_plans
from dl_moe.dispatch_plans import Plan, PlanResult, capacity_rows, result_of


def _eager_torch_reason(facts):
    if not facts.eager_torch:
        return f"it runs in eager PyTorch only (backend {facts.backend!r}, or traced by torch.compile)"
    if facts.expert_parallel:
        return "expert-parallel buffers must stay [E, C, ...] to be sharded by expert"
    return None


class HostSlicesPlan(Plan):
    """Decode-sized inference: the routing decision planned on the host with numpy."""

    name = "host_slices"

    def applies(self, facts):
        return self.unavailable_reason(facts) is None

    def unavailable_reason(self, facts):
        reason = _eager_torch_reason(facts)
        if reason is not None:
            return reason
        if facts.training:
            return "it runs in inference only"
        if not facts.bank_supports("slice_counts"):
            return f"the expert bank {type(facts.bank).__name__} does not take slice counts (FFN banks do)"
        if not facts.static_tokens or facts.num_tokens * facts.slots > fast.MAX_HOST_PLANNED_ASSIGNMENTS:
            return f"it takes at most {fast.MAX_HOST_PLANNED_ASSIGNMENTS} assignments T*k"
        return None

    def run(self, call):
        layer = call.layer
        capacity = capacity_rows(layer, call.indices, call.training) if layer.config.drop_tokens else None
        outputs, routed, processed, kept = fast.run_host_planned_slices(
            layer, call.tokens, call.weights, call.indices, call.active, capacity, call.training
        )
        return PlanResult(outputs, routed, processed, kept)


class SlicesPlan(Plan):
    """Per-expert slices of the sorted assignments over weight views (no padding rows,
    no weight copies); dropless batches whose slices would not pay run `[E, C]`
    buffers sized to the batch's largest load, which drop nothing."""

    name = "slices"

    def applies(self, facts):
        return self.unavailable_reason(facts) is None

    def unavailable_reason(self, facts):
        return _eager_torch_reason(facts)

    def run(self, call):
        layer = call.layer
        num_experts = layer.config.num_experts
        loads = fast.concrete_expert_loads(call.indices, call.active, num_experts)
        if layer.config.drop_tokens:
            capacity = capacity_rows(layer, call.indices, call.training)
            if fast.capacity_slices_pay_off(loads, capacity):
                plan, counts = dispatch_lib.plan_ragged_dispatch(call.indices, call.active, num_experts, capacity)
                return result_of(call, plan, slice_counts=counts)
        else:
            capacity = fast.dropless_buffer_capacity(loads)
            if fast.capacity_slices_pay_off(loads, capacity):
                plan, counts = dispatch_lib.plan_ragged_dispatch(call.indices, call.active, num_experts)
                return result_of(call, plan, slice_counts=counts)
        plan = dispatch_lib.plan_capacity_dispatch(call.indices, call.active, num_experts, capacity)
        return result_of(call, plan)


dispatch_plans.register_plan(HostSlicesPlan(), before="adaptive_capacity")
dispatch_plans.register_plan(SlicesPlan(), before="grouped")
