"""Dynamic-k routers: per-token expert counts, compute saved, expert-choice balance."""

import math

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe import dispatch, dispatch_plans
from tests.layer_checks import BACKEND

E, D = 8, 16


def _layer(gating_type, **overrides):
    layer = dl_moe.create_ffn_moe(E, D, gating_type=gating_type, intermediate_size=16, **overrides)
    layer.build((None, D))
    return layer


def _make_confident(layer, scale=8.0):
    """Scales the router kernel so that softmax(x W) is peaked for most tokens."""
    kernel = layer.gating_network.router_kernel
    kernel.assign(ops.convert_to_numpy(kernel) * scale)


def _tokens(n=256, seed=0):
    return np.random.default_rng(seed).normal(size=(n, D)).astype("float32")


@pytest.mark.parametrize(
    "gating_type, overrides, low, high",
    [
        ("top_p", {}, 1, 4),  # floor(0.4 * 8) + 1 = 4 slots
        ("top_p", {"max_experts": 2}, 1, 2),
        ("confidence", {"max_experts": 6}, 1, 6),
        ("confidence", {"min_experts": 2, "max_experts": 3}, 2, 3),
        ("conditional", {"min_experts": 1, "max_experts": 5}, 1, 5),
        ("top_any", {"max_experts": 3}, 0, 3),
    ],
)
def test_per_token_k_within_bounds(gating_type, overrides, low, high):
    layer = _layer(gating_type, **overrides)
    decision = layer.route(_tokens(), training=True)
    counts = decision["active"].sum(-1)
    assert decision["active"].shape[-1] == high
    assert counts.min() >= low and counts.max() <= high, np.bincount(counts)
    # Inactive slots carry no weight.
    assert np.all(decision["weights"][~decision["active"]] == 0)


@pytest.mark.parametrize("gating_type", ["top_p", "confidence"])
def test_confident_router_uses_fewer_experts_than_top_2(gating_type):
    layer = _layer(gating_type)
    x = _tokens()
    flat = layer.route(x)["active"].sum(-1).mean()
    _make_confident(layer)
    confident = layer.route(x)["active"].sum(-1).mean()
    assert confident < 2.0 and confident < flat, (flat, confident)
    layer(x)  # the statistics say the same
    assert layer.get_routing_stats()["avg_experts_per_token"] == pytest.approx(confident)


def test_conditional_head_learns_and_easy_tokens_use_fewer_experts():
    layer = dl_moe.create_ffn_moe(
        E, D, gating_type="conditional", intermediate_size=16, max_experts=4, difficulty_loss_weight=1.0,
    )
    model = keras.Sequential([keras.Input((D,)), layer])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=BACKEND != "torch")
    x = _tokens(128)
    x_tensor = ops.convert_to_tensor(x)
    _make_confident(layer, scale=20.0)  # a confident router: entropy (the head's target) is low
    router = layer.gating_network
    before = float(np.mean(ops.convert_to_numpy(router.difficulty(x_tensor))))
    model.fit(x, np.zeros((128, D), "float32"), batch_size=32, epochs=15, verbose=0)
    probs = ops.convert_to_numpy(ops.softmax(router.compute_gate_logits(x_tensor), axis=-1))
    target = -(probs * np.log(probs + 1e-9)).sum(-1).mean() / math.log(E)
    after = float(np.mean(ops.convert_to_numpy(router.difficulty(x_tensor))))
    assert abs(after - target) < abs(before - target)
    assert layer.route(x)["active"].sum(-1).mean() < 2.0


def test_capacity_is_sized_from_the_expected_k():
    tokens, capacity_factor = 64, 1.25
    top2 = _layer("linear", top_k=2, train_capacity_factor=capacity_factor)
    top_p = _layer("top_p", expected_experts=1.3, train_capacity_factor=capacity_factor)
    assert top_p.gating_network.expected_k == pytest.approx(1.3)
    assert top_p.gating_network.top_k == 4  # slots per token

    def rows(layer, k):
        indices = ops.zeros((tokens, k), "int32")
        active = ops.ones((tokens, k), "bool")
        capacity = dispatch_plans.capacity_rows(layer, indices, training=True)
        plan = dispatch.plan_capacity_dispatch(indices, active, layer.config.num_experts, capacity)
        return tuple(plan.row_token.shape)

    # C = ceil(1.25 * 64 * k / 8) rounded up to a multiple of 8.
    assert rows(top2, 2) == (E, 24)
    assert rows(top_p, 4) == (E, 16)  # ceil(13.0) -> 16, not the 40 rows k_max = 4 would need
    # Default expected k of dynamic routers: midpoint of their range.
    assert _layer("confidence", max_experts=4).gating_network.expected_k == 2.5
    assert _layer("top_any", top_k=1).gating_network.expected_k == 1


def test_expert_choice_loads_are_exactly_equal():
    layer = _layer("expert_choice", capacity_factor=2.0)
    x = _tokens(50)
    capacity = math.ceil(50 * 2.0 / E)  # 13
    decision = layer.route(x)
    np.testing.assert_array_equal(decision["active"].sum(0), capacity)
    assert decision["expert_tokens"].shape == (E, capacity)
    layer(x, training=True)
    stats = layer.get_routing_stats()
    np.testing.assert_allclose(stats["expert_fraction"], 1.0 / E)
    assert stats["load_cv"] == 0.0 and stats["dropped_fraction"] == 0.0
    assert stats["avg_experts_per_token"] == pytest.approx(E * capacity / 50)
    # No balancing loss for expert choice, only the z-loss.
    assert len(layer.losses) == 1


def test_expert_choice_masked_tokens_are_never_selected():
    layer = _layer("expert_choice")
    x = _tokens(40).reshape(4, 10, D)
    mask = np.ones((4, 10), bool)
    mask[:, 6:] = False
    decision = layer.route(x, mask=mask)
    assert not decision["active"].reshape(4, 10, E)[:, 6:].any()
    out = ops.convert_to_numpy(layer(x, mask=mask))
    np.testing.assert_array_equal(out[:, 6:], 0.0)
    assert layer.get_routing_stats()["tokens"] == 24


def test_config_validation_of_the_new_fields():
    with pytest.raises(ValueError, match="top_p_threshold"):
        dl_moe.GatingConfig(gating_type="top_p", top_p_threshold=0.0)
    with pytest.raises(ValueError, match="threshold_low"):
        dl_moe.GatingConfig(gating_type="conditional", threshold_low=0.8, threshold_high=0.2)
    with pytest.raises(ValueError, match="bidirectional_strength.*only used by"):
        dl_moe.GatingConfig(gating_type="linear", bidirectional_strength=0.5)
    with pytest.raises(ValueError, match="balancing"):
        dl_moe.GatingConfig(balancing="sometimes")
    with pytest.raises(ValueError, match="max_experts must be at most num_experts"):
        dl_moe.create_ffn_moe(4, 8, gating_type="top_p", max_experts=5)
    with pytest.raises(ValueError, match="aux_free"):
        dl_moe.create_ffn_moe(4, 8, gating_type="expert_choice", balancing="aux_free")
    with pytest.raises(ValueError, match="ensemble_members"):
        dl_moe.GatingConfig(gating_type="ensemble")
    with pytest.raises(ValueError, match="token-choice"):
        dl_moe.GatingConfig(gating_type="ensemble", ensemble_members=[{"gating_type": "expert_choice"}])
    with pytest.raises(ValueError, match="weight"):
        dl_moe.GatingConfig(gating_type="ensemble", ensemble_members=[{"gating_type": "linear", "weight": -1}])
    with pytest.raises(ValueError, match="hierarchical_routing"):
        dl_moe.create_ffn_moe(8, 8, gating_type="top_p", hierarchical_routing=True)
    with pytest.raises(ValueError, match="aux_free"):
        dl_moe.create_ffn_moe(8, 8, balancing="aux_free", hierarchical_routing=True)
    config = dl_moe.GatingConfig(
        gating_type="ensemble", ensemble_members=[{"gating_type": "linear"}, {"gating_type": "cosine", "weight": 2}]
    )
    assert dl_moe.GatingConfig.from_dict(config.to_dict()) == config
