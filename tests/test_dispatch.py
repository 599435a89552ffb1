"""The dispatch plans, checked row by row against a loop over assignments."""

import numpy as np
import pytest
from keras import ops

from dl_moe import dispatch
from tests import reference


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


def random_routing(num_tokens, top_k, num_experts, seed, inactive=0.2):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]).astype("int32")
    active = rng.random((num_tokens, top_k)) >= inactive
    return indices, active


def rows_by_expert(plan, num_tokens):
    """{expert: [tokens in row order]} from a plan's row_token / group_expert."""
    row_token = numpy_of(plan.row_token)
    groups = np.arange(row_token.shape[0]) if plan.group_expert is None else numpy_of(plan.group_expert)
    result = {}
    for g, expert in enumerate(groups):
        result.setdefault(int(expert), []).extend(int(t) for t in row_token[g] if t < num_tokens)
    return result


def expected_rows(indices, active, num_experts, cap):
    kept, _ = reference.assign_with_capacity(indices, active, num_experts, cap)
    rows = {}
    for j in range(indices.shape[1]):
        for t in range(indices.shape[0]):
            if kept[t, j]:
                rows.setdefault(int(indices[t, j]), []).append(t)
    return rows, kept


@pytest.mark.parametrize("num_tokens, top_k, num_experts, cap", [(37, 2, 5, 8), (64, 1, 4, 16), (20, 3, 6, 8)])
def test_capacity_plan_matches_priority_loop(num_tokens, top_k, num_experts, cap):
    indices, active = random_routing(num_tokens, top_k, num_experts, seed=num_tokens)
    plan = dispatch.plan_capacity_dispatch(
        ops.convert_to_tensor(indices), ops.convert_to_tensor(active), num_experts, cap
    )
    rows, kept = expected_rows(indices, active, num_experts, cap)
    got = rows_by_expert(plan, num_tokens)
    assert {e: r for e, r in got.items() if r} == rows
    np.testing.assert_array_equal(numpy_of(plan.kept), kept)
    assert numpy_of(plan.row_token).shape == (num_experts, cap)
    load = np.array([np.sum((indices == e) & active) for e in range(num_experts)])
    np.testing.assert_array_equal(numpy_of(plan.routed_per_expert), load)
    np.testing.assert_array_equal(numpy_of(plan.processed_per_expert), np.minimum(load, cap))


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [(37, 2, 5), (64, 1, 4), (9, 3, 6)])
def test_dropless_plan_keeps_everything_within_the_static_bound(num_tokens, top_k, num_experts, block):
    indices, active = random_routing(num_tokens, top_k, num_experts, seed=block + num_tokens)
    plan = dispatch.plan_dropless_dispatch(
        ops.convert_to_tensor(indices), ops.convert_to_tensor(active), num_experts, block
    )
    rows, kept = expected_rows(indices, active, num_experts, cap=None)
    got = rows_by_expert(plan, num_tokens)
    assert {e: r for e, r in got.items() if r} == rows
    np.testing.assert_array_equal(numpy_of(plan.kept), active)
    row_token = numpy_of(plan.row_token)
    assert row_token.shape[1] == block
    assert row_token.size <= num_tokens * top_k + num_experts * (block - 1)
    # Every assignment's slot is a row that holds its token, owned by its expert.
    slots = numpy_of(plan.assignment_row)
    owners = numpy_of(plan.group_expert)
    for t, j in zip(*np.nonzero(active)):
        g, r = divmod(int(slots[t, j]), block)
        assert row_token[g, r] == t and owners[g] == indices[t, j]


def test_dispatch_and_combine_round_trip_with_feature_axes():
    indices, active = random_routing(12, 2, 3, seed=1, inactive=0.0)
    plan = dispatch.plan_dropless_dispatch(ops.convert_to_tensor(indices), ops.convert_to_tensor(active), 3, 8)
    tokens = np.random.default_rng(2).normal(size=(12, 2, 3)).astype("float32")
    buffers = dispatch.dispatch(ops.convert_to_tensor(tokens), plan)
    assert tuple(buffers.shape)[1:] == (8, 2, 3)
    # Distinct weights per token and slot: an identity expert returns sum_j w[t, j] * x[t],
    # which a combine that mixed up slots or tokens, or averaged, would not.
    weights = np.random.default_rng(3).uniform(0.1, 2.0, size=(12, 2)).astype("float32")
    out = numpy_of(dispatch.combine(buffers, plan, ops.convert_to_tensor(weights)))
    np.testing.assert_allclose(out, weights.sum(-1)[:, None, None] * tokens, rtol=1e-6, atol=1e-6)
    # Experts that tell themselves apart: in capacity mode group e is expert e; expert e
    # scales its rows by e + 1, so out[t] = sum_j w[t, j] * (e_tj + 1) * x[t], which a
    # combine that gave slot j another slot's weight or output would not return.
    plan = dispatch.plan_capacity_dispatch(ops.convert_to_tensor(indices), ops.convert_to_tensor(active), 3, 16)
    buffers = numpy_of(dispatch.dispatch(ops.convert_to_tensor(tokens), plan))  # [3, 16, 2, 3]
    scaled = buffers * np.arange(1, 4, dtype="float32")[:, None, None, None]
    out = numpy_of(dispatch.combine(ops.convert_to_tensor(scaled), plan, ops.convert_to_tensor(weights)))
    factor = (weights * (indices + 1)).sum(-1)
    np.testing.assert_allclose(out, factor[:, None, None] * tokens, rtol=1e-6, atol=1e-6)


def test_expert_capacity_rounds_up_to_multiple_of_eight():
    assert dispatch.expert_capacity(4096, 2, 8, 1.0) == 1024
    assert dispatch.expert_capacity(4096, 2, 8, 1.25) == 1280
    assert dispatch.expert_capacity(100, 1, 8, 1.0) == 16  # ceil(12.5) = 13 -> 16
    assert dispatch.expert_capacity(4, 1, 8, 1.0) == 8
    dynamic = dispatch.dynamic_expert_capacity(ops.convert_to_tensor(100), 1, 8, 1.0)
    assert int(numpy_of(dynamic)) == 16


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_gather_gradients_equal_plain_autodiff(mode):
    from tests.autodiff import gradients

    indices, active = random_routing(30, 2, 4, seed=5, inactive=0.2)
    idx, act = ops.convert_to_tensor(indices), ops.convert_to_tensor(active)
    plan = (
        dispatch.plan_capacity_dispatch(idx, act, 4, 8) if mode == "capacity" else dispatch.plan_dropless_dispatch(idx, act, 4, 8)
    )
    plain = plan._replace(row_assignment=None)  # the autodiff-through-gathers path
    rng = np.random.default_rng(6)
    tokens = rng.normal(size=(30, 5)).astype("float32")
    weights = (rng.random((30, 2)) * active).astype("float32")
    scale = rng.normal(size=(5, 5)).astype("float32")
    probe = rng.normal(size=(30, 5)).astype("float32")

    def loss(p):
        def f(t, w):
            buffers = dispatch.dispatch(t, p)
            out = ops.tanh(ops.matmul(buffers, ops.convert_to_tensor(scale)))  # a per-row "expert"
            return ops.sum(dispatch.combine(out, p, w) * ops.convert_to_tensor(probe))

        return f

    fast = gradients(loss(plan), tokens, weights)
    reference_grads = gradients(loss(plain), tokens, weights)
    for got, want in zip(fast, reference_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(fast[0]).sum() > 0 and np.abs(fast[1]).sum() > 0
