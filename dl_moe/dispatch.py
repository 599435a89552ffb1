"""Sparse dispatch: routing decision + tokens → per-expert buffers → combined output.

Shapes (letters used below): T tokens, k choices per token, E experts, N = T*k
assignments, G groups of R rows that the expert bank processes (`[G, R, d]`).

* Capacity mode: G = E groups of R = C rows, C = ceil(cf*T*k/E) rounded up to a
  multiple of 8. Assignments past an expert's C rows are dropped. The expert capacity
  of Lepikhin et al. 2020, "GShard" (arXiv:2006.16668), with the capacity factor cf of
  Fedus, Zoph and Shazeer 2021, "Switch Transformers" (arXiv:2101.03961).
* Dropless mode: groups are blocks of R = b rows, each owned by one expert
  (`group_expert [G]`); every expert's assignments are padded to whole blocks, so the
  rows computed are at most N + E*(b - 1) and nothing is dropped. The block-sparse
  formulation of Gale et al. 2022, "MegaBlocks: Efficient Sparse Training with
  Mixture-of-Experts" (arXiv:2211.15841), with dense blocks gathered instead of
  block-sparse kernels.

Both modes order the N assignments by the unique integer key `expert * N + priority`,
with priority = choice * T + token: every token's first choice goes before any second
choice, then earlier tokens first. Keys are unique, so the order (and therefore which
assignments a full expert drops) is the same on every backend, whatever the stability
of its sort. Everything is gathers with static shapes, so it compiles under XLA.

The plan holds the map in both directions (row → assignment and assignment → row),
so `dispatch` and `combine` also differentiate with gathers: the gradient of a
gather is normally a scatter-add, which is several times slower on CPU.
"""

import math
from typing import NamedTuple, Optional

from keras import ops

from dl_moe.export_compat import is_symbolic_dim, symbolic_ceil

CAPACITY_MULTIPLE = 8
MAX_DROPLESS_BLOCK = 256
# Rows per dropless block when the token count is only known at run time (TF graphs
# with an unknown batch size); any value gives the same outputs.
DYNAMIC_DROPLESS_BLOCK = 64
# Cost of copying one block's expert weights, in rows of matmul: an estimate for CPUs
# (a weight copy moves ~8 bytes per element while a row does 2 flops per element).
BLOCK_WEIGHT_COST = 32


class DispatchPlan(NamedTuple):
    """Where every assignment goes and where every buffer row comes from.

    Attributes:
        row_token: `[G, R]` int32: the token that fills each row, T for an empty row.
        assignment_row: `[T, k]` int32: the flat row (`g * R + r`) that computes each
            assignment, or G*R when the assignment is inactive or dropped.
        group_expert: `[G]` int32 expert of each group, or None when group g is expert g.
        routed_per_expert: `[E]` int32 active assignments per expert (before dropping).
        processed_per_expert: `[E]` int32 assignments per expert that were computed.
        row_assignment: `[G, R]` int32 flat assignment (`choice * T + token`) computed
            by each row, T*k for an empty row; None when rows are not token-choice
            assignments (then `dispatch` differentiates by plain autodiff).
    """

    row_token: object
    assignment_row: object
    group_expert: Optional[object]
    routed_per_expert: object
    processed_per_expert: object
    row_assignment: Optional[object] = None

    @property
    def kept(self):
        """`[T, k]` bool: the assignment was computed."""
        num_rows = ops.shape(self.row_token)[0] * ops.shape(self.row_token)[1]
        return self.assignment_row < num_rows


def _min(a, b):
    """min of two sizes, each a Python int or a scalar tensor; with a JAX symbolic
    size (`model.export`) the second, an upper bound that needs no comparison."""
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    if is_symbolic_dim(a) or is_symbolic_dim(b):
        return b
    return ops.minimum(a, b)


def static_dim(tensor, axis):
    """The size of `axis` as a Python int when known, else a scalar tensor."""
    size = tensor.shape[axis]
    return size if size is not None else ops.shape(tensor)[axis]


def round_up_rows(rows, multiple=CAPACITY_MULTIPLE):
    """`rows` rounded up to a multiple of `multiple`, and at least `multiple` (Python ints)."""
    return max(multiple, -(-rows // multiple) * multiple)


def expert_capacity(num_tokens, top_k, num_experts, capacity_factor, multiple=CAPACITY_MULTIPLE):
    """C = ceil(cf * T * k / E), rounded up to a multiple of `multiple` (Python ints)."""
    return round_up_rows(math.ceil(capacity_factor * num_tokens * top_k / num_experts), multiple)


def dynamic_expert_capacity(num_tokens, top_k, num_experts, capacity_factor, multiple=CAPACITY_MULTIPLE):
    """`expert_capacity` for a token count known only at run time (a scalar tensor)."""
    tokens = ops.cast(num_tokens, "float32")
    raw = ops.cast(ops.ceil(capacity_factor * tokens * top_k / num_experts), "int32")
    return ops.maximum(multiple, (raw + multiple - 1) // multiple * multiple)


def symbolic_expert_capacity(num_tokens, top_k, num_experts, capacity_factor, multiple=CAPACITY_MULTIPLE):
    """`expert_capacity` for a JAX symbolic token count (a dimension expression).

    For T >= 1 the ceiling is >= 1, so rounding up to a multiple is already >= `multiple`.
    """
    raw = symbolic_ceil(num_tokens, capacity_factor * top_k / num_experts)
    return (raw + multiple - 1) // multiple * multiple


def dropless_block_size(num_tokens, top_k, num_experts, block_size=None):
    """Rows per dropless block: the given size, else ~sqrt(32 * T*k/E), in [8, 256].

    A block costs its b rows of matmul plus one copy of its expert's weights (and the
    matching gradient), worth about BLOCK_WEIGHT_COST rows; the rows computed are
    about N + E*b. Minimising (N + E*b) * (1 + BLOCK_WEIGHT_COST / b) gives
    b = sqrt(BLOCK_WEIGHT_COST * N / E): small blocks for decode-sized batches, where
    the weight copies dominate, and large ones when groups are long.
    """
    if block_size is not None:
        return block_size
    mean_group = num_tokens * top_k / num_experts
    block = CAPACITY_MULTIPLE * round(math.sqrt(BLOCK_WEIGHT_COST * mean_group) / CAPACITY_MULTIPLE)
    return int(min(MAX_DROPLESS_BLOCK, max(CAPACITY_MULTIPLE, block)))


def grouped_block_size(num_tokens, top_k, num_experts):
    """Rows per block of the grouped plan: a 32nd of the mean rows per expert T*k/E,
    a multiple of 8 in [8, MAX_DROPLESS_BLOCK].

    The grouped plan reads each expert's weights once per expert, not per block, so
    the block size only trades the padding rows its buffers hold (at most E*(b - 1),
    here about T*k/32: memory) against the number of loop steps, each a b-row
    matmul. At the widths of Qwen3-30B-A3B (E = 128, k = 8, T = 4096) a 16th instead
    of a 32nd took the training step's temporaries from 1,709 to 1,751 MiB.
    """
    group_share = num_tokens * top_k / (32 * num_experts)
    return int(min(MAX_DROPLESS_BLOCK, round_up_rows(math.ceil(group_share))))


def expert_loads(expert_index, active, num_experts):
    """`[E]` int32 active assignments per expert of `[T, k]` assignments (traceable)."""
    flat = ops.reshape(ops.where(active, ops.cast(expert_index, "int32"), num_experts), (-1,))
    one_hot = ops.expand_dims(flat, 1) == ops.arange(num_experts, dtype="int32")  # [N, E]
    return ops.sum(ops.cast(one_hot, "int32"), axis=0)


def _sort_assignments(expert_index, active, num_experts):
    """Orders the T*k assignments by (expert, priority).

    Returns:
        sorted_token `[N]`, sorted_expert `[N]` (E for inactive assignments, which sort
        last), group starts `[E + 1]`, rank within the expert's group `[N]` and the
        permutation `order [N]` (sorted position → flat assignment index).
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    num_assignments = num_tokens * top_k
    expert = ops.where(active, ops.cast(expert_index, "int32"), num_experts)
    flat_expert = ops.reshape(ops.transpose(expert), (-1,))  # [N], choice-major
    position = ops.arange(num_assignments, dtype="int32")
    order = ops.cast(ops.argsort(flat_expert * num_assignments + position), "int32")  # [N]
    sorted_expert = ops.take(flat_expert, order)  # [N]
    sorted_token = order % num_tokens  # [N]
    starts = _group_starts(sorted_expert, num_experts)  # [E + 1]
    rank = position - ops.take(starts, sorted_expert)  # [N]
    return sorted_token, sorted_expert, starts, rank, order


def _group_starts(sorted_expert, num_experts):
    """`[E + 1]` start of each expert's group in the sorted `[N]` experts (N at the end)."""
    experts = ops.arange(num_experts + 1, dtype="int32")
    if is_symbolic_dim(sorted_expert.shape[0]):
        # jnp.searchsorted sizes its result dtype from the length, which a symbolic
        # length cannot answer: count the assignments before each expert instead.
        before = ops.expand_dims(sorted_expert, 0) < ops.expand_dims(experts, 1)  # [E + 1, N]
        return ops.sum(ops.cast(before, "int32"), axis=1)
    return ops.cast(ops.searchsorted(sorted_expert, experts, side="left"), "int32")


def _unsort(values_sorted, order, num_tokens, top_k):
    """Inverse of the sort: `[N]` values in sorted order → `[T, k]` per assignment."""
    num_assignments = num_tokens * top_k
    # `order` is a permutation, so a plain (non-accumulating) scatter inverts it; it is
    # vectorised on every backend, where `ops.scatter` loops in Python on torch.
    flat = ops.scatter_update(
        ops.zeros((num_assignments,), values_sorted.dtype), ops.expand_dims(order, -1), values_sorted
    )
    return ops.transpose(ops.reshape(flat, (top_k, num_tokens)))


def plan_capacity_dispatch(expert_index, active, num_experts, capacity):
    """Capacity-mode plan: E groups of `capacity` rows.

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool; inactive assignments (masked tokens, unused dynamic-k
            slots) take no capacity.
        num_experts: E.
        capacity: C, a Python int.

    Returns:
        A `DispatchPlan` with `row_token [E, C]`.
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    sorted_token, sorted_expert, starts, rank, order = _sort_assignments(expert_index, active, num_experts)
    kept = (rank < capacity) & (sorted_expert < num_experts)
    slot_sorted = ops.where(kept, sorted_expert * capacity + rank, num_experts * capacity)
    assignment_row = _unsort(slot_sorted, order, num_tokens, top_k)

    counts = starts[1:] - starts[:-1]  # [E]
    row = ops.arange(capacity, dtype="int32")
    source = ops.expand_dims(starts[:-1], 1) + ops.expand_dims(row, 0)  # [E, C]
    filled = ops.expand_dims(row, 0) < ops.expand_dims(counts, 1)
    num_assignments = num_tokens * top_k
    row_assignment = ops.where(filled, ops.take(order, ops.minimum(source, num_assignments - 1)), num_assignments)
    return DispatchPlan(
        row_token=ops.where(filled, row_assignment % num_tokens, num_tokens),
        assignment_row=assignment_row,
        group_expert=None,
        routed_per_expert=counts,
        processed_per_expert=ops.minimum(counts, capacity),
        row_assignment=row_assignment,
    )


def dropless_num_blocks(num_assignments, num_experts, block_size):
    """G = min(N, floor((N + E*(b-1)) / b)): the blocks a dropless plan of N assignments
    allocates, a static upper bound of sum_e ceil(count_e / b). Every used block holds
    at least one assignment, so there are at most N of them.

    Args:
        num_assignments: N, a Python int or a scalar tensor.
        num_experts: E.
        block_size: b.
    """
    return _min(num_assignments, (num_assignments + num_experts * (block_size - 1)) // block_size)


def plan_dropless_dispatch(expert_index, active, num_experts, block_size):
    """Dropless plan: blocks of `block_size` rows, each owned by one expert.

    It allocates `dropless_num_blocks(N, E, b)` blocks; blocks past the used ones are
    empty (owned by expert E-1, all rows empty).

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool.
        num_experts: E.
        block_size: b, a Python int.

    Returns:
        A `DispatchPlan` with `row_token [G, b]` and `group_expert [G]`.
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    num_assignments = num_tokens * top_k
    num_blocks = dropless_num_blocks(num_assignments, num_experts, block_size)
    sorted_token, sorted_expert, starts, rank, order = _sort_assignments(expert_index, active, num_experts)

    counts = starts[1:] - starts[:-1]  # [E]
    blocks = (counts + block_size - 1) // block_size  # [E]
    block_end = ops.cumsum(blocks)  # [E]
    block_start = ops.concatenate([ops.zeros((1,), "int32"), block_end[:-1]])  # [E]
    padded_start = ops.concatenate([block_start, ops.zeros((1,), "int32")])  # [E + 1]
    valid = sorted_expert < num_experts
    row_sorted = ops.take(padded_start, sorted_expert) * block_size + rank
    slot_sorted = ops.where(valid, row_sorted, num_blocks * block_size)
    assignment_row = _unsort(slot_sorted, order, num_tokens, top_k)

    block_ids = ops.arange(num_blocks, dtype="int32")
    group_expert = ops.minimum(
        ops.cast(ops.searchsorted(block_end, block_ids, side="right"), "int32"), num_experts - 1
    )  # [G]
    row = ops.arange(block_size, dtype="int32")
    offset = ops.expand_dims((block_ids - ops.take(block_start, group_expert)) * block_size, 1) + row  # [G, b]
    filled = (offset < ops.expand_dims(ops.take(counts, group_expert), 1)) & (offset >= 0)
    source = ops.expand_dims(ops.take(starts, group_expert), 1) + offset
    source = ops.clip(source, 0, num_assignments - 1)
    row_assignment = ops.where(filled, ops.take(order, source), num_assignments)
    return DispatchPlan(
        row_token=ops.where(filled, row_assignment % num_tokens, num_tokens),
        assignment_row=assignment_row,
        group_expert=group_expert,
        routed_per_expert=counts,
        processed_per_expert=counts,
        row_assignment=row_assignment,
    )


def plan_ragged_dispatch(expert_index, active, num_experts, capacity=None):
    """Eager-only plan: every computed assignment in one row, grouped by expert.

    Rows form a single group `[1, N]`; expert e owns the contiguous rows
    `starts[e]:starts[e + 1]` and the rows past the computed assignments are empty. The
    per-expert row counts come back as Python ints, so this needs concrete tensors (no
    tracing); it computes exactly the useful rows, with no block or capacity padding.

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool.
        num_experts: E.
        capacity: None for dropless; else each expert computes its first `capacity`
            assignments in the priority order of `plan_capacity_dispatch` and drops the
            rest, so the same assignments are kept as in capacity mode.

    Returns:
        `(plan, counts)`: a `DispatchPlan` with `row_token [1, N]` and the list of
        E row counts.
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    num_assignments = num_tokens * top_k
    routed_per_expert = None
    if capacity is not None:
        routed_per_expert = expert_loads(expert_index, active, num_experts)
        active = active & capacity_kept(expert_index, active, num_experts, capacity)
    sorted_token, sorted_expert, starts, _, order = _sort_assignments(expert_index, active, num_experts)
    valid = sorted_expert < num_experts
    position = ops.arange(num_assignments, dtype="int32")
    counts = starts[1:] - starts[:-1]
    plan = DispatchPlan(
        row_token=ops.expand_dims(ops.where(valid, sorted_token, num_tokens), 0),
        assignment_row=_unsort(ops.where(valid, position, num_assignments), order, num_tokens, top_k),
        group_expert=None,
        routed_per_expert=counts if routed_per_expert is None else routed_per_expert,
        processed_per_expert=counts,
        row_assignment=ops.expand_dims(ops.where(valid, order, num_assignments), 0),
    )
    return plan, [int(c) for c in ops.convert_to_numpy(counts)]


def capacity_kept(expert_index, active, num_experts, capacity):
    """`[T, k]` bool: the active assignments capacity mode computes.

    Each expert keeps its first `capacity` active assignments in the priority order
    of `plan_capacity_dispatch` (choice, then token), so any plan that computes
    these keeps and drops exactly what the capacity plan does.
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    _, sorted_expert, _, rank, order = _sort_assignments(expert_index, active, num_experts)
    kept = ops.cast((rank < capacity) & (sorted_expert < num_experts), "int32")
    return _unsort(kept, order, num_tokens, top_k) > 0


def _append_zero_row(x):
    """`[n, ...]` → `[n + 1, ...]`: index n then reads zeros."""
    return ops.concatenate([x, ops.zeros_like(x[:1])], axis=0)


def _upstream(args, upstream):
    # keras.ops.custom_gradient passes the cotangent positionally on JAX and TF and as
    # `upstream=` (after the saved inputs) on torch.
    return args[0] if upstream is None else upstream


def _broadcast_weights(weights, rank):
    """`[...]` weights → `[..., 1, ..., 1]` to multiply values of `rank` more axes."""
    for _ in range(rank):
        weights = ops.expand_dims(weights, -1)
    return weights


def dispatch(tokens, plan):
    """Gathers tokens `[T, ...]` into expert buffers `[G, R, ...]` (empty rows are 0).

    With a token-choice plan the gradient is a gather too: token t collects the
    gradient of the (at most k) rows that hold it through `assignment_row`.
    """
    group_shape = (static_dim(plan.row_token, 0), static_dim(plan.row_token, 1))
    feature_shape = tuple(tokens.shape[1:])

    def gather(values, row_token):
        flat_slots = ops.reshape(row_token, (-1,))
        return ops.reshape(ops.take(_append_zero_row(values), flat_slots, axis=0), group_shape + feature_shape)

    if plan.row_assignment is None or any(is_symbolic_dim(size) for size in group_shape):
        # Symbolic shapes (jax.export): the gather gradient's closure would hold arrays
        # of symbolic size as constants, which export cannot size; plain autodiff then.
        return gather(tokens, plan.row_token)

    # The index tensors are inputs of the custom-gradient function rather than values
    # its gradient closes over: inside a `keras.ops.switch` branch (capacity classes)
    # JAX cannot close a custom gradient over the branch's own traced values.
    @ops.custom_gradient
    def gather_with_gather_gradient(values, row_token, assignment_row):
        def grad(*args, upstream=None):
            rows = ops.reshape(_upstream(args, upstream), (-1,) + feature_shape)  # [G*R, ...]
            per_assignment = ops.take(_append_zero_row(rows), assignment_row, axis=0)  # [T, k, ...]
            return ops.sum(per_assignment, axis=1), None, None

        return gather(values, row_token), grad

    return gather_with_gather_gradient(tokens, plan.row_token, plan.assignment_row)


def combine(expert_outputs, plan, weights):
    """Weighted sum of each token's expert outputs.

    Args:
        expert_outputs: `[G, R, ...]` outputs of the expert bank.
        plan: The `DispatchPlan` used for `dispatch`.
        weights: `[T, k]` combine weights (zero where the assignment is inactive).

    Returns:
        `[T, ...]`: sum_j weights[t, j] * output of assignment (t, j); dropped or
        inactive assignments contribute zero. The gradient w.r.t. the expert outputs
        is a gather through `row_token` / `row_assignment`, not a scatter.
    """
    feature_shape = tuple(expert_outputs.shape[2:])
    rank = len(feature_shape)

    def gather_assignments(outputs, assignment_row):
        rows = _append_zero_row(ops.reshape(outputs, (-1,) + feature_shape))  # [G*R + 1, ...]
        return ops.take(rows, assignment_row, axis=0)  # [T, k, ...]

    def weighted_sum(gathered, w):
        # A contraction over k: no [T, k, ...] product is materialised.
        flat = ops.reshape(gathered, ops.shape(gathered)[:2] + (-1,))  # [T, k, F]
        summed = ops.einsum("tk,tkf->tf", ops.cast(w, gathered.dtype), flat)
        return ops.reshape(summed, ops.shape(gathered)[:1] + ops.shape(gathered)[2:])

    if plan.row_assignment is None or is_symbolic_dim(weights.shape[0]):
        return weighted_sum(gather_assignments(expert_outputs, plan.assignment_row), weights)

    # Index tensors as inputs, not closed over: see `dispatch`.
    @ops.custom_gradient
    def combine_with_gather_gradient(outputs, w, assignment_row, row_token, row_assignment):
        gathered = gather_assignments(outputs, assignment_row)  # [T, k, ...]

        def grad(*args, upstream=None):
            upstream = _upstream(args, upstream)  # [T, ...]
            # d/d weights[t, j] = <upstream[t], output of assignment (t, j)>.
            flat_gathered = ops.reshape(gathered, ops.shape(gathered)[:2] + (-1,))  # [T, k, F]
            flat_upstream = ops.reshape(upstream, ops.shape(upstream)[:1] + (-1,))  # [T, F]
            grad_weights = ops.cast(ops.einsum("tkf,tf->tk", flat_gathered, flat_upstream), w.dtype)
            # d/d row r = weight of the row's assignment * upstream of the row's token.
            flat_weights = _append_zero_row(ops.reshape(ops.transpose(ops.cast(w, upstream.dtype)), (-1,)))
            row_weights = ops.take(flat_weights, row_assignment, axis=0)  # [G, R]
            row_upstream = ops.take(_append_zero_row(upstream), row_token, axis=0)  # [G, R, ...]
            grad_outputs = row_upstream * _broadcast_weights(row_weights, rank)
            return grad_outputs, grad_weights, None, None, None

        return weighted_sum(gathered, w), grad

    return combine_with_gather_gradient(
        expert_outputs, weights, plan.assignment_row, plan.row_token, plan.row_assignment
    )


def plan_expert_choice_dispatch(token_index, num_tokens, num_experts):
    """Plan for expert-choice routing: expert e computes the tokens it picked.

    Args:
        token_index: `[E, C]` int token picked by each expert slot, `num_tokens` (T)
            for an empty slot.
        num_tokens: T (a Python int or a scalar tensor).
        num_experts: E.

    Returns:
        A `DispatchPlan` with `row_token = token_index` (G = E groups of R = C rows,
        group g is expert g). Its `assignment_row` is None: combine with
        `combine_expert_choice`, which scatters rows back to tokens.
    """
    filled = ops.cast(token_index < num_tokens, "int32")  # [E, C]
    counts = ops.sum(filled, axis=1)  # [E]
    del num_experts  # G = E is implied by token_index
    return DispatchPlan(
        row_token=ops.cast(token_index, "int32"),
        assignment_row=None,
        group_expert=None,
        routed_per_expert=counts,
        processed_per_expert=counts,
    )


def combine_expert_choice(expert_outputs, plan, slot_weights, num_tokens):
    """Scatter-adds weighted expert rows back to their tokens.

    Args:
        expert_outputs: `[E, C, ...]` outputs of the expert bank.
        plan: The plan of `plan_expert_choice_dispatch`.
        slot_weights: `[E, C]` weight of each row (0 for an empty slot).
        num_tokens: T.

    Returns:
        `(outputs [T, ...], experts_per_token [T] int32)`: out[t] = sum over the slots
        (e, c) that picked t of slot_weights[e, c] * expert_outputs[e, c].
    """
    feature_shape = tuple(expert_outputs.shape[2:])
    rows = ops.reshape(expert_outputs, (-1,) + feature_shape)  # [E*C, ...]
    weights = _broadcast_weights(ops.cast(ops.reshape(slot_weights, (-1,)), rows.dtype), len(feature_shape))
    target = ops.reshape(plan.row_token, (-1,))  # [E*C]; T = empty
    # segment_sum is a vectorised scatter-add on every backend (`ops.scatter` loops
    # in Python on torch); segment T collects the empty slots and is cut off.
    outputs = ops.segment_sum(rows * weights, target, num_segments=num_tokens + 1, sorted=False)[:num_tokens]
    hits = ops.segment_sum(ops.ones_like(target), target, num_segments=num_tokens + 1, sorted=False)[:num_tokens]
    return outputs, hits


def dispatch_soft(groups, dispatch_weights, num_experts):
    """Soft MoE dispatch (Puigcerver et al. 2023, arXiv:2308.00951): every slot mixes its group's tokens.

    Args:
        groups: `[B, S, d]` tokens, one group per sequence.
        dispatch_weights: `[B, S, E*P]` weights of each token in each of the E*P slots
            (P slots per expert; a softmax over the S tokens).
        num_experts: E.

    Returns:
        `[E, B*P, d]` expert buffers: expert e's rows are its P slots of every group.
    """
    hidden_dim = groups.shape[-1]
    slots = ops.matmul(ops.transpose(ops.cast(dispatch_weights, groups.dtype), (0, 2, 1)), groups)  # [B, E*P, d]
    num_groups = ops.shape(slots)[0]
    slots = ops.reshape(slots, (num_groups, num_experts, -1, hidden_dim))  # [B, E, P, d]
    return ops.reshape(ops.transpose(slots, (1, 0, 2, 3)), (num_experts, -1, hidden_dim))


def combine_soft(expert_outputs, combine_weights):
    """Soft MoE combine: every token is a weighted mix of all slot outputs of its group.

    Args:
        expert_outputs: `[E, B*P, o]` outputs of the expert bank on `dispatch_soft` buffers.
        combine_weights: `[B, S, E*P]` weights of each slot for each token (a softmax
            over the E*P slots).

    Returns:
        `[B, S, o]`.
    """
    num_experts, output_dim = expert_outputs.shape[0], expert_outputs.shape[-1]
    num_groups = ops.shape(combine_weights)[0]
    slots = ops.reshape(expert_outputs, (num_experts, num_groups, -1, output_dim))  # [E, B, P, o]
    slots = ops.reshape(ops.transpose(slots, (1, 0, 2, 3)), (num_groups, -1, output_dim))  # [B, E*P, o]
    return ops.matmul(ops.cast(combine_weights, slots.dtype), slots)
