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
