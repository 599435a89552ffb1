"""Hierarchical (two-level) routing: groups first, then experts inside them."""

import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import MoEConfig
from dl_moe.gating.hierarchical import HierarchicalGating
from tests.layer_checks import run_moe_layer_checks


def make_layer(**overrides):
    kwargs = dict(num_experts=8, hidden_dim=6, top_k=2, intermediate_size=8, hierarchical_routing=True,
                  num_expert_groups=4, eval_capacity_factor=4.0)
    kwargs.update(overrides)
    return dl_moe.create_ffn_moe(**kwargs)


def test_experts_come_from_chosen_groups():
    layer = make_layer(top_k_groups=2, top_k=3)
    x = np.random.default_rng(0).normal(size=(40, 6)).astype("float32")
    layer.build(x.shape)
    router = layer.gating_network
    assert isinstance(router, HierarchicalGating) and router.num_groups == 4
    weights, indices, info = router(x)
    groups = ops.convert_to_numpy(info["group_indices"])  # [T, 2]
    chosen_groups = ops.convert_to_numpy(indices) // 2  # group of each chosen expert
    assert all(set(c) <= set(g) for c, g in zip(chosen_groups, groups))
    probs = ops.convert_to_numpy(info["raw_gate_probs"])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(weights), np.take_along_axis(probs, ops.convert_to_numpy(indices), -1))


def test_only_experts_of_the_chosen_group_get_tokens():
    layer = make_layer()
    x = np.abs(np.random.default_rng(1).normal(size=(32, 6))).astype("float32") + 0.1
    layer.build(x.shape)
    # Group 2 (experts 4 and 5) wins for every positive input.
    kernel = np.full((6, 4), -1.0, "float32")
    kernel[:, 2] = 1.0
    layer.gating_network.group_router.router_kernel.assign(kernel)

    calls = []
    bank_call = layer.experts.call

    def recording_call(inputs, training=None, **kwargs):
        calls.append((ops.convert_to_numpy(inputs), kwargs.get("slice_counts")))
        return bank_call(inputs, training=training, **kwargs)

    layer.experts.call = recording_call
    layer(x, training=False)
    routed = ops.convert_to_numpy(layer.routed_tokens_per_expert)
    np.testing.assert_array_equal(routed, [0, 0, 0, 0, 32, 32, 0, 0])
    buffers, slice_counts = calls[-1]
    if slice_counts is None:
        # [E, C] buffers: the other experts' rows are all empty (zero).
        assert np.all(buffers[[0, 1, 2, 3, 6, 7]] == 0) and np.any(buffers[[4, 5]] != 0)
    else:
        # Eager torch slices: only experts 4 and 5 have rows at all.
        assert slice_counts == [0, 0, 0, 0, 32, 32, 0, 0]


def test_seed_config_and_validation():
    config = MoEConfig(num_experts=64, hierarchical_routing=True, num_routing_levels=2)
    assert config.resolved_num_expert_groups == 8
    with pytest.raises(ValueError, match="num_routing_levels"):
        MoEConfig(num_experts=64, hierarchical_routing=True, num_routing_levels=3)
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, hierarchical_routing=True, num_expert_groups=3)
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, num_expert_groups=4)  # without hierarchical_routing
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, hierarchical_routing=True, num_expert_groups=8, gating_config={"top_k": 2})
    with pytest.raises(ValueError, match="token-choice"):
        MoEConfig(num_experts=8, hierarchical_routing=True, gating_config={"gating_type": "softmoe"})


def test_layer_checks(tmp_path):
    run_moe_layer_checks(lambda: make_layer(hidden_dim=8), (6, 8), tmp_path)


@pytest.mark.parametrize("normalize", [False, True])
def test_decision_and_output_match_numpy_reference(normalize):
    # p(e) = p(group) * p(e | group), computed here from the two routers' kernels; the
    # top-3 experts by p(e) inside the 2 best of 4 groups, weights p(e) (renormalised).
    from tests import reference

    num_experts, groups, group_size, top_k = 8, 4, 2, 3
    layer = make_layer(top_k_groups=2, top_k=top_k, drop_tokens=False, normalize_top_k=normalize)
    x = np.random.default_rng(2).normal(size=(30, 6)).astype("float32")
    layer.build(x.shape)
    rng = np.random.default_rng(3)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=0.8, size=v.shape).astype("float32"))
    router = layer.gating_network
    group_kernel = ops.convert_to_numpy(router.group_router.router_kernel)  # [d, 4]
    expert_kernel = ops.convert_to_numpy(router.expert_router.router_kernel)  # [d, 8]
    p_group = reference.softmax(x @ group_kernel)  # [T, 4]
    p_within = reference.softmax((x @ expert_kernel).reshape(-1, groups, group_size))  # [T, 4, 2]
    p = (p_group[:, :, None] * p_within).reshape(-1, num_experts)
    want_out = np.zeros_like(x)
    w = reference.weights_of(layer)
    decision = layer.route(x)
    for t in range(len(x)):
        best_groups = np.argsort(-p_group[t], kind="stable")[:2]
        allowed = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in best_groups])
        chosen = allowed[np.argsort(-p[t, allowed], kind="stable")[:top_k]]
        weights = p[t, chosen] / (p[t, chosen].sum() if normalize else 1.0)
        got = dict(zip(decision["indices"][t].tolist(), decision["weights"][t].tolist()))
        assert set(got) == set(chosen.tolist()), t
        np.testing.assert_allclose([got[e] for e in chosen], weights, rtol=1e-5, atol=1e-7)
        for e, weight in zip(chosen, weights):
            want_out[t] += weight * reference.ffn_expert(w, e, x[t : t + 1], "mlp")[0]
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), want_out, rtol=1e-5, atol=1e-5)
