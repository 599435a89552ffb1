"""Routers' decisions against hand-computed values and a numpy reference."""

import math

import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe.config import ExpertConfig, GatingConfig, MoEConfig
from dl_moe.registry import GATING_TYPES

E, D = 4, 4


def make_router(gating_type, num_experts=E, dim=D, **gating_fields):
    config = MoEConfig(
        num_experts=num_experts,
        expert_config=ExpertConfig(hidden_dim=dim, intermediate_size=8),
        gating_config=GatingConfig(gating_type=gating_type, **gating_fields),
        # Routers under test never see the z-loss; keep default otherwise.
    )
    router = GATING_TYPES.get(gating_type).from_moe_config(config, name="router")
    router.build((None, dim))
    return router


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


def decide(router, x, mask=None, training=False):
    kwargs = {} if mask is None else {"mask": mask}
    weights, indices, info = router(ops.convert_to_tensor(x), training=training, **kwargs)
    active = info.get("active")
    active = np.ones(numpy_of(indices).shape, bool) if active is None else numpy_of(active)
    return numpy_of(weights), numpy_of(indices), active, {k: numpy_of(v) for k, v in info.items()}


def as_sets(weights, indices, active):
    """Per token: {expert: weight} over the active slots."""
    return [
        {int(i): float(w) for w, i, a in zip(wr, ir, ar) if a} for wr, ir, ar in zip(weights, indices, active)
    ]


def assert_same_decision(got, want, atol=1e-5):
    assert len(got) == len(want)
    for t, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), (t, g, w)
        for e in w:
            assert g[e] == pytest.approx(w[e], abs=atol), (t, e, g, w)


def softmax(z, axis=-1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def identity_router(gating_type, **fields):
    """A router whose kernel is the identity, so inputs log(p) give probabilities p."""
    router = make_router(gating_type, **fields)
    router.router_kernel.assign(np.eye(D, E, dtype="float32"))
    return router


# ---------------------------------------------------------------- hand-computed


def test_top_p_hand_computed():
    probs = np.array(
        [
            [0.50, 0.30, 0.15, 0.05],  # mass before expert 1 is 0.5 >= 0.4: one expert
            [0.30, 0.35, 0.20, 0.15],  # 0.35 < 0.4 keeps a second, 0.65 stops: {1, 0}
            [0.25, 0.25, 0.25, 0.25],  # 0, 0.25 keep; 0.5 stops: two experts
        ],
        dtype="float32",
    )
    router = identity_router("top_p")
    assert router.top_k == 2  # floor(0.4 * 4) + 1 slots suffice
    weights, indices, active, _ = decide(router, np.log(probs))
    got = as_sets(weights, indices, active)
    assert_same_decision(got[:2], [{0: 0.50}, {1: 0.35, 0: 0.30}])
    assert len(got[2]) == 2 and all(v == pytest.approx(0.25) for v in got[2].values())


def test_top_p_max_experts_and_normalisation():
    probs = np.array([[0.2, 0.2, 0.3, 0.3]], dtype="float32")
    router = identity_router("top_p", top_p_threshold=0.9, max_experts=3, normalize_top_k=True)
    weights, indices, active, _ = decide(router, np.log(probs))
    assert active.sum() == 3  # the threshold would keep 4; max_experts caps it
    np.testing.assert_allclose(weights[active].sum(), 1.0, rtol=1e-6)


def test_confidence_hand_computed():
    probs = np.array([[0.97, 0.01, 0.01, 0.01], [0.25, 0.25, 0.25, 0.25], [0.55, 0.15, 0.15, 0.15]], "float32")
    # complexity = 0.6 (1 - max p) + 0.4 H(p) / log 4:
    #   row 0: 0.6*0.03 + 0.4*0.1677/1.3863 = 0.0664 -> k = 1 + round(0.20) = 1
    #   row 1: 0.6*0.75 + 0.4*1             = 0.85   -> k = 1 + round(2.55) = 4
    #   row 2: 0.6*0.45 + 0.4*1.1825/1.3863 = 0.6112 -> k = 1 + round(1.83) = 3
    router = identity_router("confidence")
    weights, indices, active, info = decide(router, np.log(probs))
    np.testing.assert_allclose(info["complexity"], [0.0664, 0.85, 0.6112], atol=1e-3)
    np.testing.assert_array_equal(active.sum(-1), [1, 4, 3])
    assert as_sets(weights, indices, active)[0] == {0: pytest.approx(0.97)}


def test_confidence_layer_depth_scale():
    probs = np.array([[0.55, 0.15, 0.15, 0.15]], "float32")
    router = identity_router("confidence", layer_depth_scale=0.5)  # 0.6112 * 0.5 -> k = 1 + round(0.92)
    _, _, active, _ = decide(router, np.log(probs))
    assert active.sum() == 2


def test_conditional_hand_computed():
    router = make_router("conditional", threshold_low=0.2, threshold_high=0.6, max_experts=4)
    # Make the difficulty head output sigmoid(b2) for every token: zero the second kernel.
    router.difficulty_kernel_2.assign(np.zeros(router.difficulty_kernel_2.shape, "float32"))
    x = np.random.default_rng(0).normal(size=(3, D)).astype("float32")
    # k = 1 + round(clip((D - 0.2) / 0.4, 0, 1) * 3): D = 0.1 -> 1, 0.45 -> 1 + round(1.875) = 3, 0.9 -> 4.
    for difficulty, experts in ((0.1, 1), (0.45, 3), (0.9, 4)):
        router.difficulty_bias_2.assign(np.array([math.log(difficulty / (1 - difficulty))], "float32"))
        _, _, active, info = decide(router, x)
        np.testing.assert_allclose(info["difficulty"], difficulty, rtol=1e-5)
        np.testing.assert_array_equal(active.sum(-1), experts)


def test_top_any_hand_computed():
    router = make_router("top_any", top_k=1)
    router.expert_embeddings.assign(np.eye(E, D, dtype="float32"))
    router.thresholds.assign(np.array([0.5, 0.5, 0.9, 0.99], "float32"))
    x = np.array(
        [
            [1.0, 1.0, 0.0, 0.0],  # cos 0.707 with experts 0 and 1: both fire, weight 1/2
            [0.0, 0.0, 1.0, 0.1],  # cos 0.995 with expert 2 only
            [0.1, 0.1, 0.1, 0.1],  # cos 0.5 everywhere: none fires -> argmax of cos - g (expert 0/1 tie)
        ],
        "float32",
    )
    weights, indices, active, _ = decide(router, x)
    got = as_sets(weights, indices, active)
    assert_same_decision(got[:2], [{0: 0.5, 1: 0.5}, {2: 1.0}])
    assert len(got[2]) == 1 and list(got[2].values()) == [pytest.approx(1.0)]  # fallback outside training
    _, _, active_train, _ = decide(router, x, training=True)
    assert not active_train[2].any()  # no fallback in training


def test_expert_choice_hand_computed():
    probs = np.array(
        [[0.7, 0.1, 0.08, 0.12], [0.6, 0.2, 0.11, 0.09], [0.1, 0.1, 0.1, 0.7], [0.4, 0.3, 0.2, 0.1]], "float32"
    )
    router = identity_router("expert_choice")  # c = 1: C = ceil(4 * 1 / 4) = 1 token per expert
    weights, token_index, _, _ = decide(router, np.log(probs))
    np.testing.assert_array_equal(token_index[:, 0], [0, 3, 3, 2])  # token 1 gets no expert, token 3 two
    np.testing.assert_allclose(weights[:, 0], [0.7, 0.3, 0.2, 0.7], rtol=1e-5)
    masked = np.array([True, True, False, True])
    weights, token_index, _, _ = decide(router, np.log(probs), mask=masked)
    np.testing.assert_array_equal(token_index[:, 0], [0, 3, 3, 0])  # expert 3 can no longer take token 2
    assert weights[3, 0] == pytest.approx(0.12)


def test_aux_free_bias_changes_the_selection_not_the_weights():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], "float32")
    router = identity_router("linear", top_k=1, balancing="aux_free")
    router.expert_bias.assign(np.array([0.0, 0.0, 0.4, 0.0], "float32"))  # 0.15 + 0.4 > 0.5
    weights, indices, _, _ = decide(router, np.log(probs))
    assert indices[0, 0] == 2 and weights[0, 0] == pytest.approx(0.15)
    router.update_expert_bias(np.array([10.0, 0.0, 2.0, 0.0], "float32"))  # mean load 3
    np.testing.assert_allclose(numpy_of(router.expert_bias), [-1e-3, 1e-3, 0.4 + 1e-3, 1e-3], rtol=1e-5)


# ------------------------------------------------------------ numpy reference

# Each router's settings, written here and read by both the router (through its
# GatingConfig) and the numpy reference: a router that ignored or altered a setting
# would route differently from the reference. Values differ from the defaults.
REFERENCE_ROUTERS = {
    "top_p": {"top_p_threshold": 0.6},
    "confidence": {"min_experts": 2, "max_experts": 4},
    "conditional": {"max_experts": 4, "min_experts": 1, "threshold_low": 0.2, "threshold_high": 0.8},
    "top_any": {"top_k": 2, "max_experts": 3},
    "resonance": {"bidirectional_strength": 0.7, "top_k": 2},
    "ensemble": {"top_k": 3, "ensemble_members": [{"gating_type": "linear", "top_k": 1, "weight": 3.0},
                                                  {"gating_type": "top_p", "top_p_threshold": 0.7}]},
}


def top_k_sets(scores, counts, values=None):
    """Per token {e: values[t, e]} over the counts[t] highest scores."""
    values = scores if values is None else values
    return [{int(e): float(v[e]) for e in np.argsort(-row, kind="stable")[:k]}
            for row, v, k in zip(scores, values, counts)]


def top_p_sets(p, threshold):
    out = []
    for row in p:
        kept, mass = {}, 0.0
        for e in np.argsort(-row, kind="stable"):
            if kept and mass >= threshold:
                break
            kept[int(e)] = float(row[e])
            mass += row[e]
        out.append(kept)
    return out


def reference_decision(gating_type, settings, router, x):
    """Numpy reimplementation of each router from `settings` (never from the router's
    attributes) on the router's current weights: per-token {e: w}."""
    w = numpy_of(router.router_kernel) if hasattr(router, "router_kernel") else None
    num_tokens = len(x)
    if gating_type == "linear":
        return top_k_sets(softmax(x @ w), [settings.get("top_k", 2)] * num_tokens)
    if gating_type == "top_p":
        return top_p_sets(softmax(x @ w), settings["top_p_threshold"])
    if gating_type in ("confidence", "conditional"):
        p = softmax(x @ w)
        low_k, high_k = settings["min_experts"], settings["max_experts"]
        if gating_type == "confidence":
            entropy = -(p * np.log(p + 1e-9)).sum(-1) / math.log(E)
            score = np.clip(0.6 * (1 - p.max(-1)) + 0.4 * entropy, 0, 1)
        else:
            hidden = np.maximum(x @ numpy_of(router.difficulty_kernel_1) + numpy_of(router.difficulty_bias_1), 0)
            logit = (hidden @ numpy_of(router.difficulty_kernel_2) + numpy_of(router.difficulty_bias_2))[:, 0]
            difficulty = 1 / (1 + np.exp(-logit))
            low, high = settings["threshold_low"], settings["threshold_high"]
            score = np.clip((difficulty - low) / (high - low), 0, 1)
        counts = low_k + np.round(score * (high_k - low_k)).astype(int)
        return top_k_sets(p, counts)
    if gating_type == "top_any":
        emb = numpy_of(router.expert_embeddings)
        cos = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (emb / np.linalg.norm(emb, axis=-1, keepdims=True)).T
        s = cos - numpy_of(router.thresholds)
        out = []
        for row in s:
            ranked = np.argsort(-row, kind="stable")[: settings.get("max_experts", E)]
            fired = [int(e) for e in ranked if row[e] > 0] or [int(np.argmax(row))]
            out.append({e: 1.0 / len(fired) for e in fired})
        return out
    if gating_type == "resonance":
        beta = settings["bidirectional_strength"]
        token_side = softmax(x @ w)
        expert_side = softmax(x @ numpy_of(router.expert_kernel), axis=0) * num_tokens / E
        blend = (1 - beta) * token_side + beta * expert_side
        r = blend / blend.sum(-1, keepdims=True)
        return top_k_sets(r, [settings["top_k"]] * num_tokens)
    if gating_type == "ensemble":
        members = settings["ensemble_members"]
        alphas = [m.get("weight", 1.0) for m in members]
        combined = np.zeros((num_tokens, E))
        for member_settings, member, alpha in zip(members, router.members, alphas):
            member_settings = {"top_k": settings["top_k"], **member_settings}
            chosen_sets = reference_decision(member_settings["gating_type"], member_settings, member, x)
            for t, chosen in enumerate(chosen_sets):
                for e, weight in chosen.items():
                    combined[t, e] += alpha / sum(alphas) * weight
        return [{e: v for e, v in row.items() if v > 0}
                for row in top_k_sets(combined, [settings["top_k"]] * num_tokens)]
    raise AssertionError(gating_type)


@pytest.mark.parametrize("gating_type", sorted(REFERENCE_ROUTERS))
def test_router_matches_numpy_reference(gating_type):
    settings = REFERENCE_ROUTERS[gating_type]
    router = make_router(gating_type, **settings)
    rng = np.random.default_rng(7)
    for variable in router.weights:
        if variable.trainable and len(variable.shape) >= 1 and "threshold" not in variable.path:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    if gating_type == "top_any":
        router.thresholds.assign(rng.uniform(-0.2, 0.3, size=(E,)).astype("float32"))
    x = rng.normal(size=(24, D)).astype("float32")
    weights, indices, active, _ = decide(router, x)
    got = as_sets(weights, indices, active)
    want = reference_decision(gating_type, settings, router, x)
    # The settings matter on this batch: some tokens differ in their expert count.
    assert len({len(chosen) for chosen in want}) > 1 or gating_type in ("resonance",)
    assert_same_decision(got, want, atol=1e-5)


def test_expert_choice_matches_numpy_reference():
    router = make_router("expert_choice", capacity_factor=2.0)
    rng = np.random.default_rng(3)
    router.router_kernel.assign(rng.normal(size=(D, E)).astype("float32"))
    x = rng.normal(size=(10, D)).astype("float32")
    weights, token_index, _, _ = decide(router, x)
    p = softmax(x @ numpy_of(router.router_kernel))
    capacity = math.ceil(10 * 2.0 / E)
    assert token_index.shape == (E, capacity)
    for e in range(E):
        want = np.argsort(-p[:, e])[:capacity]
        np.testing.assert_array_equal(np.sort(token_index[e]), np.sort(want))
        np.testing.assert_allclose(np.sort(weights[e]), np.sort(p[want, e]), rtol=1e-5)


def test_expert_choice_layer_output_matches_reference():
    layer = dl_moe.create_ffn_moe(E, D, gating_type="expert_choice", intermediate_size=8, use_bias=False,
                                  capacity_factor=1.5, activation="relu")
    x = np.random.default_rng(4).normal(size=(2, 5, D)).astype("float32")
    layer.build(x.shape)
    rng = np.random.default_rng(8)  # leaves one token that no expert picks
    for variable in layer.trainable_weights:
        variable.assign(rng.normal(scale=0.7, size=variable.shape).astype("float32"))
    out = numpy_of(layer(x))
    tokens = x.reshape(-1, D)
    kernels = {v.path.split("/")[-1]: numpy_of(v) for v in layer.weights}
    up, down = kernels["up_kernel"], kernels["down_kernel"]  # [E, d, h], [E, h, d]
    # The picks from the documented rule alone: expert e takes its C = ceil(T * 1.5 / E)
    # tokens of highest p[:, e], with weight p[t, e].
    p = softmax(tokens @ kernels["router_kernel"])
    capacity = math.ceil(len(tokens) * 1.5 / E)  # 4 of 10 tokens
    want = np.zeros_like(tokens)
    picked = np.zeros(len(tokens), bool)
    for e in range(E):
        for t in np.argsort(-p[:, e], kind="stable")[:capacity]:
            want[t] += p[t, e] * (np.maximum(tokens[t] @ up[e], 0) @ down[e])
            picked[t] = True
    want[~picked] = tokens[~picked]  # residual for a token no expert picked
    assert (~picked).any() and picked.any()
    np.testing.assert_allclose(out.reshape(-1, D), want, rtol=1e-5, atol=1e-5)
