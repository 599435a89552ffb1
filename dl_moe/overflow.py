"""Overflow rerouting: assignments past their expert's capacity move to the token's
next-best expert that still has room, instead of being dropped.

Letters: T tokens, k choices per token, E experts, C rows per expert.

It is a step between route and dispatch: it takes the router's `[T, k]` decision and
the token's preference order over all E experts, and returns a new `[T, k]` decision
in which every kept assignment fits in C rows per expert. Any capacity plan (the
`[E, C]` buffers, or eager PyTorch's per-expert slices) then computes it without
dropping anything more.

The order is deterministic and uses static shapes only:

1. The router's own assignments fill the experts in the dispatch priority order
   (`dispatch.py`: first choices before second choices, then earlier tokens first);
   those past C overflow.
2. A token's fallback experts are all experts it did not choose (among its active
   assignments), best first by the router's preference.
3. Rounds: in each round, every token that still has an overflowing assignment (its
   lowest choice index first) proposes it to its next untried fallback expert. An
   expert accepts the proposals of the round in priority order (choice * T + token)
   while it has room. A token tries each fallback once, whether accepted or not, so it
   never holds the same expert twice, and an expert that rejected a proposal was full
   and stays full.

After `E - 1` rounds (the default) every fallback has been tried, so an assignment is
still dropped only when every expert it could move to was full when it asked.
"""

from typing import NamedTuple

from keras import ops

from dl_moe import export_compat
from dl_moe.dispatch import _sort_assignments, _unsort, static_dim



class RerouteDecision(NamedTuple):
    """A routing decision whose kept assignments fit the capacity.

    Attributes:
        expert_index: `[T, k]` int32 expert of each assignment after rerouting.
        kept: `[T, k]` bool, the assignment is computed (within capacity).
        rerouted: `[T, k]` bool, the assignment moved to a fallback expert.
        routed_per_expert: `[E]` int32 active assignments per expert as the router
            chose them (before capacity and rerouting): the load the balancing
            losses and statistics see.
    """

    expert_index: object
    kept: object
    rerouted: object
    routed_per_expert: object


def preference_order(scores, num_experts):
    """`[T, E]` scores → `[T, E]` int32 experts from best to worst (ties: the backend's top_k)."""
    _, order = export_compat.top_k(scores, num_experts)
    return ops.cast(order, "int32")


def _fallback_experts(expert_index, active, preference, num_experts):
    """Each token's experts it did not choose, best first: `([T, E] experts, [T] count)`.

    The chosen experts move to the end (stable), so row t lists its `count[t]`
    fallbacks first.
    """
    chosen = ops.one_hot(ops.where(active, expert_index, num_experts), num_experts + 1)[..., :num_experts]  # [T, k, E]
    chosen = ops.max(chosen, axis=1) > 0  # [T, E]
    chosen_in_order = ops.cast(ops.take_along_axis(chosen, preference, axis=1), "int32")  # [T, E]
    position = ops.arange(num_experts, dtype="int32")
    partition = ops.cast(ops.argsort(chosen_in_order * num_experts + position, axis=1), "int32")  # unique keys
    fallbacks = ops.take_along_axis(preference, partition, axis=1)
    return fallbacks, num_experts - ops.sum(chosen_in_order, axis=1)


def reroute_overflow(expert_index, active, preference, num_experts, capacity, max_attempts=None):
    """Reroutes the assignments that overflow their expert's `capacity` rows.

    Args:
        expert_index: `[T, k]` int expert of each assignment.
        active: `[T, k]` bool; inactive assignments take no capacity and never move.
        preference: `[T, E]` int experts in the token's order of preference (e.g.
            `preference_order(router probabilities)`).
        num_experts: E.
        capacity: C, rows per expert (a Python int or a scalar int tensor).
        max_attempts: Rounds of proposals, i.e. fallbacks a token tries at most
            (None: E - 1, every fallback).

    Returns:
        A `RerouteDecision`.
    """
    num_tokens = static_dim(expert_index, 0)
    top_k = static_dim(expert_index, 1)
    num_assignments = num_tokens * top_k
    expert_index = ops.cast(expert_index, "int32")
    active = ops.cast(active, "bool")
    preference = ops.cast(preference, "int32")

    # 1. The router's assignments, in dispatch priority order.
    _, sorted_expert, starts, rank, order = _sort_assignments(expert_index, active, num_experts)
    fits = ops.cast((rank < capacity) & (sorted_expert < num_experts), "int32")
    kept = _unsort(fits, order, num_tokens, top_k) > 0  # [T, k]
    routed = starts[1:] - starts[:-1]  # [E]
    fill = ops.minimum(routed, capacity)  # [E] rows taken

    # 2. Fallbacks.
    fallbacks, num_fallbacks = _fallback_experts(expert_index, active, preference, num_experts)  # [T, E], [T]

    # 3. Rounds of proposals.
    waiting = active & ~kept  # [T, k]
    rerouted = ops.zeros_like(kept)
    attempt = ops.zeros((num_tokens,), "int32")  # next fallback each token tries
    token = ops.arange(num_tokens, dtype="int32")
    choice_ids = ops.arange(top_k, dtype="int32")
    rounds = num_experts - 1 if max_attempts is None else min(max_attempts, num_experts - 1)
    for _ in range(rounds):
        has_waiting = ops.any(waiting, axis=1)  # [T]
        choice = ops.cast(ops.argmax(ops.cast(waiting, "int32"), axis=1), "int32")  # lowest waiting choice
        proposing = has_waiting & (attempt < num_fallbacks)
        target = ops.take_along_axis(fallbacks, ops.expand_dims(ops.minimum(attempt, num_experts - 1), 1), axis=1)[:, 0]
        target = ops.where(proposing, target, num_experts)  # E: no proposal
        priority = choice * num_tokens + token
        proposal_order = ops.cast(ops.argsort(target * num_assignments + priority), "int32")  # [T]
        sorted_target = ops.take(target, proposal_order)
        round_starts = ops.cast(
            ops.searchsorted(sorted_target, ops.arange(num_experts + 1, dtype="int32"), side="left"), "int32"
        )  # [E + 1]
        round_rank = token - ops.take(round_starts, sorted_target)  # token == sorted position here
        room = ops.concatenate([capacity - fill, ops.zeros((1,), "int32")])  # [E + 1]
        accepted_sorted = (sorted_target < num_experts) & (round_rank < ops.take(room, sorted_target))
        accepted = _unsort(ops.cast(accepted_sorted, "int32"), proposal_order, num_tokens, 1)[:, 0] > 0  # [T]
        # The accepted proposals to an expert are the first `room` of its group.
        fill = fill + ops.minimum(round_starts[1:] - round_starts[:-1], capacity - fill)
        moved = ops.expand_dims(accepted, 1) & (ops.expand_dims(choice, 1) == choice_ids)  # [T, k]
        expert_index = ops.where(moved, ops.expand_dims(target, 1), expert_index)
        kept = kept | moved
        rerouted = rerouted | moved
        waiting = waiting & ~moved
        attempt = attempt + ops.cast(proposing, "int32")
    return RerouteDecision(expert_index=expert_index, kept=kept, rerouted=rerouted, routed_per_expert=routed)


def rerouted_weights(weights, scores, original_index, decision):
    """Combine weights `[T, k]` after rerouting.

    A moved assignment takes the weight the router would have given its new expert in
    that slot: the original weight scaled by score(new) / score(old), which for plain
    top-k routers (weight = probability) is the new expert's probability, and keeps
    `normalize_top_k`'s normaliser. Assignments that stay dropped get weight 0.

    Args:
        weights: `[T, k]` the router's combine weights.
        scores: `[T, E]` the router's probabilities (what `preference` ranks).
        original_index: `[T, k]` the router's experts.
        decision: The `RerouteDecision`.
    """
    old = ops.take_along_axis(scores, ops.cast(original_index, "int32"), axis=1)
    new = ops.take_along_axis(scores, decision.expert_index, axis=1)
    scale = ops.cast(new, weights.dtype) / ops.cast(ops.maximum(old, 1e-9), weights.dtype)
    moved_weights = ops.where(decision.rerouted, weights * scale, weights)
    return ops.where(decision.kept, moved_weights, ops.zeros_like(weights))


def reroute_routing(weights, indices, active, scores, num_experts, capacity, max_attempts=None):
    """The router's `[T, k]` decision with its overflow rerouted.

    Args:
        weights: `[T, k]` combine weights (zero where inactive).
        indices: `[T, k]` experts.
        active: `[T, k]` bool.
        scores: `[T, E]` router probabilities: they rank the fallbacks and give a moved
            assignment its weight (`rerouted_weights`).
        num_experts: E.
        capacity: C.
        max_attempts: See `reroute_overflow`.

    Returns:
        `(decision, weights)`: the `RerouteDecision` and the `[T, k]` weights, zero for
        assignments that stay dropped.
    """
    if scores is None:
        raise ValueError(
            "MoEConfig.overflow='reroute' needs a router that reports its probabilities over all experts "
            "(info['raw_gate_probs'] [T, E]) to rank the fallback experts."
        )
    scores = ops.cast(scores, "float32")
    decision = reroute_overflow(indices, active, preference_order(scores, num_experts), num_experts, capacity, max_attempts)
    return decision, rerouted_weights(weights, scores, indices, decision)
