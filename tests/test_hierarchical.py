"""Hierarchical (tree) routing: groups, subgroups inside them, ..., experts."""

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
    layer = make_layer(dispatch="capacity")  # [E, C] buffers, one group per expert
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
    buffers, _ = calls[-1]
    # The other experts' rows are all empty (zero).
    assert np.all(buffers[[0, 1, 2, 3, 6, 7]] == 0) and np.any(buffers[[4, 5]] != 0)


def test_seed_config_and_validation():
    config = MoEConfig(num_experts=64, hierarchical_routing=True, num_routing_levels=2)
    assert config.resolved_routing_tree_shape == (8, 8)
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, hierarchical_routing=True, num_expert_groups=3)
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, num_expert_groups=4)  # without hierarchical_routing
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=8, hierarchical_routing=True, num_expert_groups=8, gating_config={"top_k": 2})
    with pytest.raises(ValueError, match="token-choice"):
        MoEConfig(num_experts=8, hierarchical_routing=True, gating_config={"gating_type": "softmoe"})


@pytest.mark.parametrize(
    "experts, levels, top_k, top_k_groups, groups, want",
    [
        (64, 2, 2, 1, None, (8, 8)),
        (64, 3, 2, 1, None, (4, 4, 4)),
        (128, 3, 2, 1, None, (4, 4, 8)),  # 8 x 4 x 4 reordered: the smaller factors first
        (12, 3, 2, 1, None, (2, 2, 3)),
        (32, 3, 2, 1, 2, (2, 4, 4)),  # num_expert_groups fixes the root
        (16, 3, 4, 1, None, (2, 2, 4)),  # top_k=4 needs 4 experts per bottom group
        (8, 2, 1, 1, None, (2, 4)),  # two levels: the divisor closest to sqrt(8), ties to the smaller
    ],
)
def test_default_tree_split(experts, levels, top_k, top_k_groups, groups, want):
    config = MoEConfig(
        num_experts=experts, hierarchical_routing=True, num_routing_levels=levels, num_expert_groups=groups,
        top_k_groups=top_k_groups, gating_config={"top_k": top_k},
    )
    assert config.resolved_routing_tree_shape == want


def test_tree_config_errors_name_the_field():
    tree = dict(num_experts=64, hierarchical_routing=True)
    assert MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(2, 8, 4)).resolved_routing_tree_shape == (2, 8, 4)
    assert MoEConfig.from_dict(
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=[4, 4, 4]).to_dict()
    ).routing_tree_shape == (4, 4, 4)
    with pytest.raises(ValueError, match="num_routing_levels=3"):
        MoEConfig(**tree, routing_tree_shape=(4, 4, 4))  # num_routing_levels left at 2
    with pytest.raises(ValueError, match="routing_tree_shape"):
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(4, 4, 2))  # product 32
    with pytest.raises(ValueError, match="routing_tree_shape"):
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(1, 8, 8))  # a level that does not split
    with pytest.raises(ValueError, match="routing_tree_shape"):
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(4, 8, 2), gating_config={"top_k": 4})
    with pytest.raises(ValueError, match="routing_tree_shape"):
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(4,))
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(**tree, num_routing_levels=3, routing_tree_shape=(4, 4, 4), num_expert_groups=4)
    with pytest.raises(ValueError, match="num_routing_levels"):
        MoEConfig(**tree, num_routing_levels=1)
    with pytest.raises(ValueError, match="num_routing_levels"):
        MoEConfig(num_experts=7, hierarchical_routing=True, num_routing_levels=3, gating_config={"top_k": 1})
    with pytest.raises(ValueError, match="num_expert_groups"):
        MoEConfig(num_experts=16, hierarchical_routing=True, num_routing_levels=3, num_expert_groups=8)
    with pytest.raises(ValueError, match="num_routing_levels"):
        MoEConfig(num_experts=64, num_routing_levels=3)  # without hierarchical_routing
    with pytest.raises(ValueError, match="routing_tree_shape"):
        MoEConfig(num_experts=64, routing_tree_shape=(8, 8))


def test_layer_checks(tmp_path):
    run_moe_layer_checks(lambda: make_layer(hidden_dim=8), (6, 8), tmp_path)


def test_three_level_layer_checks(tmp_path):
    run_moe_layer_checks(
        lambda: make_layer(hidden_dim=8, num_experts=12, num_routing_levels=3, routing_tree_shape=(3, 2, 2),
                           num_expert_groups=None, top_k_groups=2),
        (6, 8), tmp_path,
    )


@pytest.mark.parametrize(
    "tree, top_k_groups, top_k, normalize",
    [((4, 2), 2, 3, False), ((4, 2), 2, 3, True), ((3, 2, 2), 2, 3, False), ((2, 2, 2, 2), 1, 2, True)],
)
def test_decision_and_output_match_numpy_reference(tree, top_k_groups, top_k, normalize):
    # p(node) = p(parent) * softmax over its siblings of its level's logits, computed here
    # from each level's router kernel; at each level above the experts the token keeps
    # its top_k_groups best nodes among the children of the nodes kept above, then the
    # top_k experts among the children of the kept bottom groups; weights p(e).
    from tests import reference

    num_experts = int(np.prod(tree))
    layer = make_layer(
        num_experts=num_experts, num_routing_levels=len(tree), routing_tree_shape=tree, num_expert_groups=None,
        top_k_groups=top_k_groups, top_k=top_k, drop_tokens=False, normalize_top_k=normalize,
    )
    x = np.random.default_rng(2).normal(size=(30, 6)).astype("float32")
    layer.build(x.shape)
    rng = np.random.default_rng(3)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=0.8, size=v.shape).astype("float32"))
    router = layer.gating_network
    routers = [router.group_router, *router.inner_routers, router.expert_router]
    assert len(routers) == len(tree)
    probs, level_probs = np.ones((len(x), 1)), []  # p of every node of each level [T, N_l]
    for router_level, branching in zip(routers, tree):
        logits = x @ ops.convert_to_numpy(router_level.router_kernel)  # [T, N_l]
        within = reference.softmax(logits.reshape(len(x), probs.shape[1], branching))
        probs = (probs[:, :, None] * within).reshape(len(x), -1)
        level_probs.append(probs)
    p = level_probs[-1]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    want_out = np.zeros_like(x)
    w = reference.weights_of(layer)
    decision = layer.route(x)
    for t in range(len(x)):
        candidates = np.arange(tree[0])
        for level in range(len(tree)):
            keep = top_k if level == len(tree) - 1 else top_k_groups
            kept = candidates[np.argsort(-level_probs[level][t, candidates], kind="stable")[:keep]]
            if level < len(tree) - 1:
                candidates = np.concatenate([np.arange(n * tree[level + 1], (n + 1) * tree[level + 1]) for n in kept])
        weights = p[t, kept] / (p[t, kept].sum() if normalize else 1.0)
        got = dict(zip(decision["indices"][t].tolist(), decision["weights"][t].tolist()))
        assert set(got) == set(kept.tolist()), t
        np.testing.assert_allclose([got[e] for e in kept], weights, rtol=1e-5, atol=1e-7)
        for e, weight in zip(kept, weights):
            want_out[t] += weight * reference.ffn_expert(w, e, x[t : t + 1], "mlp")[0]
    np.testing.assert_allclose(ops.convert_to_numpy(layer(x)), want_out, rtol=1e-5, atol=1e-5)
