"""Options that today's MoE language models need, each against a numpy reference.

Router bias and GPT-OSS's top-k-then-softmax, `normalize_top_k=False` (Qwen3-MoE),
expert biases with GPT-OSS's clamped gated unit (loaded from a fused interleaved
gate/up tensor), tanh-gelu experts with a per-expert output scale (Gemma 4), and a
shared expert of its own width behind a per-token sigmoid gate (Qwen-MoE).

The references below are written from the model families' formulas, loop over tokens
and read every setting from the test, never from the layer under test.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from dl_moe.experts.fused import fuse_gate_up, split_gate_up

ATOL = 1e-5
E, D, H = 4, 8, 6
_erf = np.vectorize(math.erf)


def softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def gelu_exact(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def gelu_tanh(z):
    return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z**3)))


def numpy_weights(layer):
    """{path relative to the MoE layer: numpy value}, e.g. 'experts/gate_kernel'."""
    return {v.path.split("/", 1)[1]: np.asarray(ops.convert_to_numpy(v), "float64") for v in layer.weights}


def randomize(layer, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))


def top_k(scores, k):
    """Indices of the k largest scores per row, best first."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


def moe_reference(x, route, expert):
    """sum_j weight_j * expert(indices_j, x) per token; route(x_t) -> (indices, weights)."""
    out = np.zeros((x.shape[0], D))
    for t in range(x.shape[0]):
        indices, weights = route(x[t])
        for e, w in zip(indices, weights):
            out[t] += w * expert(e, x[t])
    return out


def layer_output(layer, x, **kwargs):
    return np.asarray(ops.convert_to_numpy(layer(x, **kwargs)), "float64")


# --------------------------------------------------------------- router bias


@pytest.mark.parametrize("normalize", [True, False])
def test_router_bias_and_normalize_top_k_match_reference(normalize):
    # Mixtral/Qwen3-MoE routing (softmax, top-2, renormalise or not) with a router bias.
    x = np.random.default_rng(1).normal(size=(2, 12, D)).astype("float32")
    layer = dl_moe.create_ffn_moe(
        num_experts=E, hidden_dim=D, top_k=2, intermediate_size=H, ffn_type="swiglu", use_bias=False,
        use_router_bias=True, normalize_top_k=normalize, drop_tokens=False,
    )
    layer.build(x.shape)
    randomize(layer)
    w = numpy_weights(layer)
    assert w["router/router_bias"].shape == (E,)

    def route(xt):
        p = softmax(xt @ w["router/router_kernel"] + w["router/router_bias"])
        idx = top_k(p[None], 2)[0]
        weights = p[idx] / p[idx].sum() if normalize else p[idx]
        return idx, weights

    def expert(e, xt):
        gate = xt @ w["experts/gate_kernel"][e]
        return (gate * sigmoid(gate) * (xt @ w["experts/up_kernel"][e])) @ w["experts/down_kernel"][e]

    ref = moe_reference(x.reshape(-1, D).astype("float64"), route, expert)
    np.testing.assert_allclose(layer_output(layer, x).reshape(-1, D), ref, atol=ATOL, rtol=1e-5)


def test_normalized_top_k_equals_gpt_oss_softmax_over_selected_logits():
    # GPT-OSS: top-k of the logits first, then a softmax over those k logits.
    x = np.random.default_rng(2).normal(size=(24, D)).astype("float32")
    layer = dl_moe.create_ffn_moe(num_experts=8, hidden_dim=D, top_k=3, use_router_bias=True, normalize_top_k=True)
    layer.build(x.shape)
    randomize(layer, scale=1.0)
    w = numpy_weights(layer)
    logits = x.astype("float64") @ w["router/router_kernel"] + w["router/router_bias"]
    indices = top_k(logits, 3)
    expected = softmax(np.take_along_axis(logits, indices, -1))
    decision = layer.route(x)
    np.testing.assert_array_equal(decision["indices"], indices)
    np.testing.assert_allclose(decision["weights"], expected, atol=1e-6)


# ------------------------------------------------- GPT-OSS experts (clamped)


ALPHA, LIMIT = 1.702, 0.8  # a small limit so that the clamps act on these inputs


def gpt_oss_reference(x, router_kernel, router_bias, gate_up, gate_up_bias, down, down_bias, k):
    """keras-hub 0.32's GptOssSparseMoeBlock, token by token, from its fused tensors."""

    def route(xt):
        logits = xt @ router_kernel + router_bias
        idx = top_k(logits[None], k)[0]
        return idx, softmax(logits[idx])

    def expert(e, xt):
        fused = xt @ gate_up[e] + gate_up_bias[e]  # [2h], gate and up interleaved
        gate = np.minimum(fused[0::2], LIMIT)
        up = np.clip(fused[1::2], -LIMIT, LIMIT)
        return ((up + 1.0) * gate * sigmoid(ALPHA * gate)) @ down[e] + down_bias[e]

    return moe_reference(x, route, expert)


@pytest.mark.parametrize("drop_tokens", [False, True])
def test_clamped_swiglu_loaded_from_fused_interleaved_tensor(drop_tokens):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 12, D)).astype("float32")
    fused = dict(
        router_kernel=rng.normal(size=(D, E)), router_bias=rng.normal(size=(E,)),
        gate_up=rng.normal(scale=0.5, size=(E, D, 2 * H)), gate_up_bias=rng.normal(scale=0.5, size=(E, 2 * H)),
        down=rng.normal(scale=0.5, size=(E, H, D)), down_bias=rng.normal(scale=0.5, size=(E, D)),
    )
    layer = dl_moe.create_ffn_moe(
        num_experts=E, hidden_dim=D, top_k=2, intermediate_size=H, ffn_type="clamped_swiglu",
        glu_alpha=ALPHA, glu_limit=LIMIT, use_router_bias=True, normalize_top_k=True,
        drop_tokens=drop_tokens, eval_capacity_factor=4.0,  # capacity 4*24*2/4: nothing dropped
    )
    layer.build(x.shape)
    gate, up = split_gate_up(fused["gate_up"], "interleaved")
    gate_bias, up_bias = split_gate_up(fused["gate_up_bias"], "interleaved")
    values = {
        "router_kernel": fused["router_kernel"], "router_bias": fused["router_bias"],
        "gate_kernel": gate, "up_kernel": up, "down_kernel": fused["down"],
        "gate_bias": gate_bias, "up_bias": up_bias, "down_bias": fused["down_bias"],
    }
    for v in layer.weights:
        if v.name in values:
            v.assign(values.pop(v.name).astype("float32"))
    assert not values  # every tensor found its weight
    xf = x.reshape(-1, D).astype("float64")
    # The clamps matter on these inputs: some gates exceed the limit, some ups leave ±limit.
    pre = np.einsum("td,edm->etm", xf, fused["gate_up"]) + fused["gate_up_bias"][:, None]
    assert (pre[..., 0::2] > LIMIT).mean() > 0.1 and (np.abs(pre[..., 1::2]) > LIMIT).mean() > 0.1
    ref = gpt_oss_reference(xf, k=2, **fused)
    np.testing.assert_allclose(layer_output(layer, x).reshape(-1, D), ref, atol=ATOL, rtol=1e-5)


def test_fused_gate_up_layouts_round_trip():
    fused = np.arange(2 * 3 * 8).reshape(2, 3, 8)
    gate, up = split_gate_up(fused, "interleaved")
    np.testing.assert_array_equal(gate[0, 0], [0, 2, 4, 6])
    np.testing.assert_array_equal(up[0, 0], [1, 3, 5, 7])
    np.testing.assert_array_equal(fuse_gate_up(gate, up, "interleaved"), fused)
    gate, up = split_gate_up(fused, "halves")
    np.testing.assert_array_equal(gate[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(up[0, 0], [4, 5, 6, 7])
    np.testing.assert_array_equal(fuse_gate_up(gate, up, "halves"), fused)
    with pytest.raises(ValueError, match="layout"):
        split_gate_up(fused, "stacked")
    with pytest.raises(ValueError, match="even"):
        split_gate_up(fused[..., :7], "halves")


# ------------------------------------------- Gemma 4 experts (tanh gelu, scale)


@pytest.mark.parametrize("ffn_type, gelu", [("geglu_tanh", gelu_tanh), ("geglu", gelu_exact)])
def test_gelu_glu_with_per_expert_scale_matches_reference(ffn_type, gelu):
    x = np.random.default_rng(4).normal(size=(24, D)).astype("float32")
    layer = dl_moe.create_ffn_moe(
        num_experts=E, hidden_dim=D, top_k=2, intermediate_size=H, ffn_type=ffn_type, use_bias=False,
        use_expert_scale=True, normalize_top_k=True, drop_tokens=False,
    )
    layer.build(x.shape)
    randomize(layer, scale=1.0)
    w = numpy_weights(layer)
    assert w["experts/expert_scale"].shape == (E,)

    def route(xt):
        p = softmax(xt @ w["router/router_kernel"])
        idx = top_k(p[None], 2)[0]
        return idx, p[idx] / p[idx].sum()

    def expert(e, xt):
        hidden = gelu(xt @ w["experts/gate_kernel"][e]) * (xt @ w["experts/up_kernel"][e])
        return (hidden @ w["experts/down_kernel"][e]) * w["experts/expert_scale"][e]

    ref = moe_reference(x.astype("float64"), route, expert)
    np.testing.assert_allclose(layer_output(layer, x), ref, atol=ATOL, rtol=1e-5)


def test_tanh_and_exact_gelu_differ_here():
    # The two gelu variants must not be interchangeable on these inputs (else the test
    # above could not tell them apart).
    z = np.random.default_rng(4).normal(scale=2.0, size=1000)
    assert np.abs(gelu_tanh(z) - gelu_exact(z)).max() > 1e-4


# ------------------------------------------------ gated shared expert (Qwen)


@pytest.mark.parametrize("gating_type", ["linear", "softmoe"])
def test_gated_shared_expert_of_own_width_matches_reference(gating_type):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 12, D)).astype("float32")
    mask = np.array([[1] * 8 + [0] * 4, [1] * 12], bool)
    kwargs = dict(num_experts=E, hidden_dim=D, top_k=2, intermediate_size=H, ffn_type="swiglu", use_bias=False,
                  gating_type=gating_type, drop_tokens=False)
    layer = dl_moe.create_ffn_moe(num_shared_experts=1, shared_expert_intermediate_size=10,
                                  shared_expert_gate=True, **kwargs)
    layer.build(x.shape)
    randomize(layer)
    w = numpy_weights(layer)
    assert w["shared_experts/gate_kernel"].shape == (1, D, 10)
    assert w["shared_expert_gate/kernel"].shape == (D, 1)
    # The routed part alone: the same router and experts without the shared path.
    routed = dl_moe.create_ffn_moe(**kwargs)
    routed.build(x.shape)
    for v in routed.weights:
        name = v.path.split("/", 1)[1]
        if name in w:
            v.assign(w[name].astype("float32"))
    xf = x.astype("float64")
    gate = xf @ w["shared_experts/gate_kernel"][0]
    shared = (gate * sigmoid(gate) * (xf @ w["shared_experts/up_kernel"][0])) @ w["shared_experts/down_kernel"][0]
    expected = layer_output(routed, x, mask=mask) + sigmoid(xf @ w["shared_expert_gate/kernel"]) * shared
    expected *= mask[..., None]
    np.testing.assert_allclose(layer_output(layer, x, mask=mask), expected, atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------- config rules


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(ffn_type="swiglu", glu_limit=7.0), "glu_limit"),
        (dict(ffn_type="mlp", glu_alpha=1.0), "glu_alpha"),
        (dict(gating_type="cosine", use_router_bias=True), "use_router_bias"),
        (dict(shared_expert_gate=True), "shared_expert_gate.*num_shared_experts"),
        (dict(shared_expert_intermediate_size=16), "shared_expert_intermediate_size.*num_shared_experts"),
        (dict(ffn_type="clamped_swiglu", glu_limit=0.0), "glu_limit"),
    ],
)
def test_invalid_settings_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, **overrides)


def test_expert_scale_needs_ffn_experts():
    with pytest.raises(ValueError, match="use_expert_scale"):
        dl_moe.create_attention_moe(num_experts=E, hidden_dim=D, num_heads=2, use_expert_scale=True)


def compiled_fit_and_round_trip(layer, tmp_path, steps=3):
    """A compiled (XLA on JAX/TF) fit whose loss falls, then a `.keras` round trip."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5, D)).astype("float32")
    y = rng.normal(size=(16, 5, D)).astype("float32")
    inputs = keras.Input((5, D))
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse", jit_compile=keras.backend.backend() != "torch")
    losses = model.fit(x, y, epochs=steps, batch_size=16, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored(x)), ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )
    return restored.layers[-1]


def test_expert_scale_survives_int8_quantization_and_reload(tmp_path):
    x = np.random.default_rng(6).normal(size=(2, 12, D)).astype("float32")
    inputs = keras.Input((12, D))
    layer = dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, intermediate_size=H, ffn_type="geglu_tanh",
                                  use_expert_scale=True, drop_tokens=False)
    model = keras.Model(inputs, layer(inputs))
    layer.experts.expert_scale.assign(np.array([0.5, 2.0, -1.0, 3.0], "float32"))
    model.quantize("int8")
    assert layer.experts.quantization_mode == "int8"
    np.testing.assert_array_equal(ops.convert_to_numpy(layer.experts.expert_scale), [0.5, 2.0, -1.0, 3.0])
    path = str(tmp_path / "q.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    np.testing.assert_allclose(
        ops.convert_to_numpy(restored(x)), ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6
    )


# ------------------------------------------- sigmoid router (DeepSeek-V3, Llama 4)


def deepseek_v3_route(logits, bias, k, groups, top_k_groups, normalize, scale):
    """DeepSeek-V3's routing of one token's logits `[E]`, written from the paper/HF code."""
    scores = sigmoid(logits)
    choice = scores + bias
    if groups:
        size = len(scores) // groups
        group_scores = [np.sort(choice[g * size:(g + 1) * size])[-2:].sum() for g in range(groups)]
        kept = np.argsort(-np.array(group_scores), kind="stable")[:top_k_groups]
        allowed = np.zeros(len(scores), bool)
        for g in kept:
            allowed[g * size:(g + 1) * size] = True
        choice = np.where(allowed, choice, -np.inf)
    idx = np.argsort(-choice, kind="stable")[:k]
    weights = scores[idx]
    if normalize:
        weights = weights / (weights.sum() + 1e-20)
    return idx, weights * scale


SIGMOID_CASES = {
    # name: (num_experts, top_k, groups, top_k_groups, normalize, scale)
    "deepseek_v3_groups": (8, 3, 4, 2, True, 2.5),
    "no_groups": (8, 2, None, 1, True, 1.0),
    "unnormalised": (8, 2, None, 1, False, 1.5),
}


@pytest.mark.parametrize("case", sorted(SIGMOID_CASES))
def test_sigmoid_router_matches_deepseek_v3_reference(case):
    num_experts, k, groups, top_k_groups, normalize, scale = SIGMOID_CASES[case]
    rng = np.random.default_rng(7)
    x = rng.normal(size=(24, D)).astype("float32")
    extra = {} if groups is None else dict(num_expert_groups=groups, top_k_groups=top_k_groups)
    layer = dl_moe.create_ffn_moe(
        num_experts=num_experts, hidden_dim=D, top_k=k, gating_type="sigmoid", intermediate_size=H,
        ffn_type="swiglu", use_bias=False, normalize_top_k=normalize, routed_scaling_factor=scale,
        balancing="aux_free", drop_tokens=False, **extra,
    )
    layer.build(x.shape)
    randomize(layer, scale=1.0)
    bias = rng.normal(scale=0.3, size=num_experts).astype("float32")
    layer.gating_network.expert_bias.assign(bias)
    w = numpy_weights(layer)
    logits = x.astype("float64") @ w["router/router_kernel"]

    def route(xt):
        return deepseek_v3_route(xt @ w["router/router_kernel"], bias, k, groups, top_k_groups, normalize, scale)

    decision = layer.route(x)
    expected = [route(xt) for xt in x.astype("float64")]
    np.testing.assert_array_equal(decision["indices"], np.stack([i for i, _ in expected]))
    np.testing.assert_allclose(decision["weights"], np.stack([v for _, v in expected]), atol=1e-6)
    np.testing.assert_allclose(decision["probs"], sigmoid(logits) / sigmoid(logits).sum(-1, keepdims=True), atol=1e-6)
    if groups:
        # The group limit changes some selections (else this case would not test it).
        free = [deepseek_v3_route(l, bias, k, None, 1, normalize, scale)[0] for l in logits]
        assert any(set(a) != set(b) for a, b in zip(free, decision["indices"]))

    def expert(e, xt):
        gate = xt @ w["experts/gate_kernel"][e]
        return (gate * sigmoid(gate) * (xt @ w["experts/up_kernel"][e])) @ w["experts/down_kernel"][e]

    ref = moe_reference(x.astype("float64"), route, expert)
    np.testing.assert_allclose(layer_output(layer, x), ref, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("scale_inputs", [True, False])
def test_llama4_routing_top1_sigmoid_with_shared_expert(scale_inputs):
    # Llama 4: top-1, weight s = sigmoid(best logit), expert(s * x) + shared(x).
    # With scale_expert_inputs=False the same router gives s * expert(x) + shared(x).
    x = np.random.default_rng(8).normal(size=(24, D)).astype("float32")
    layer = dl_moe.create_ffn_moe(
        num_experts=E, hidden_dim=D, top_k=1, gating_type="sigmoid", intermediate_size=H, ffn_type="swiglu",
        use_bias=False, num_shared_experts=1, drop_tokens=False, scale_expert_inputs=scale_inputs,
    )
    layer.build(x.shape)
    randomize(layer, scale=1.0)
    w = numpy_weights(layer)
    logits = x.astype("float64") @ w["router/router_kernel"]
    decision = layer.route(x)
    np.testing.assert_array_equal(decision["indices"][:, 0], logits.argmax(-1))
    np.testing.assert_allclose(decision["weights"][:, 0], sigmoid(logits.max(-1)), atol=1e-6)

    def swiglu(xt, prefix, e):
        gate = xt @ w[prefix + "gate_kernel"][e]
        return (gate * sigmoid(gate) * (xt @ w[prefix + "up_kernel"][e])) @ w[prefix + "down_kernel"][e]

    def routed(xt, s, e):
        return swiglu(s * xt, "experts/", e) if scale_inputs else s * swiglu(xt, "experts/", e)

    ref = np.stack([
        routed(xt, sigmoid(l.max()), l.argmax()) + swiglu(xt, "shared_experts/", 0)
        for xt, l in zip(x.astype("float64"), logits)
    ])
    np.testing.assert_allclose(layer_output(layer, x), ref, atol=ATOL, rtol=1e-5)


def test_scale_expert_inputs_needs_top_1():
    with pytest.raises(ValueError, match="scale_expert_inputs"):
        dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, top_k=2, scale_expert_inputs=True)
    with pytest.raises(ValueError, match="scale_expert_inputs"):
        dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, top_k=1, gating_type="softmoe", scale_expert_inputs=True)


def test_all_options_capacity_mask_compiled_fit_and_round_trip(tmp_path):
    # Every new option at once, in capacity mode, compiled on JAX/TF: the sigmoid
    # router's aux-free bias moves in fit, the model round-trips, masks hold.
    layer = dl_moe.create_ffn_moe(
        num_experts=8, hidden_dim=D, top_k=2, gating_type="sigmoid", intermediate_size=H,
        ffn_type="clamped_swiglu", use_router_bias=True, use_expert_scale=True, num_shared_experts=1,
        shared_expert_intermediate_size=5, shared_expert_gate=True, num_expert_groups=4, top_k_groups=2,
        normalize_top_k=True, routed_scaling_factor=2.0, balancing="aux_free", train_capacity_factor=1.0,
    )
    restored = compiled_fit_and_round_trip(layer, tmp_path)
    assert restored.config == layer.config
    assert np.abs(ops.convert_to_numpy(restored.gating_network.expert_bias)).sum() > 0
    x = np.random.default_rng(9).normal(size=(2, 5, D)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    out = layer_output(restored, x, mask=mask)
    assert np.all(out[0, 3:] == 0) and np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, :3], layer_output(restored, x[:1, :3])[0], atol=ATOL)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts=8, num_expert_groups=3), "num_expert_groups"),
        (dict(num_experts=8, top_k_groups=2), "top_k_groups"),
        (dict(num_experts=8, top_k=5, num_expert_groups=4, top_k_groups=2), "num_expert_groups"),
        (dict(num_experts=8, hierarchical_routing=True), "hierarchical_routing"),
    ],
)
def test_sigmoid_router_group_settings_are_checked(overrides, message):
    with pytest.raises(ValueError, match=message):
        dl_moe.create_ffn_moe(hidden_dim=D, gating_type="sigmoid", **overrides)


def test_routed_scaling_factor_is_only_for_the_sigmoid_router():
    with pytest.raises(ValueError, match="routed_scaling_factor"):
        dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, routed_scaling_factor=2.0)


# -------------------------------------------------- Gemma 4 router and block


def test_gemma4_router_and_experts_match_reference():
    # Router on the raw block input; experts on another tensor (Gemma 4 feeds them a
    # normalised copy), tanh-gelu GLU experts with a per-expert output scale.
    rng = np.random.default_rng(10)
    router_x = rng.normal(scale=3.0, size=(2, 12, D)).astype("float32")
    expert_x = rng.normal(size=(2, 12, D)).astype("float32")
    eps = 1e-5
    layer = dl_moe.create_ffn_moe(
        num_experts=E, hidden_dim=D, top_k=2, gating_type="rmsnorm_linear", intermediate_size=H,
        ffn_type="geglu_tanh", use_bias=False, use_expert_scale=True, normalize_top_k=True,
        router_norm_epsilon=eps, drop_tokens=False,
    )
    layer.build(expert_x.shape)
    randomize(layer, scale=1.0)
    w = numpy_weights(layer)
    assert w["router/router_input_scale"].shape == (D,)

    def gemma4_route(xt):
        normed = xt / np.sqrt(np.mean(xt**2) + eps) * D**-0.5 * w["router/router_input_scale"]
        p = softmax(normed @ w["router/router_kernel"])
        idx = top_k(p[None], 2)[0]
        return idx, p[idx] / p[idx].sum()

    def expert(e, xt):
        hidden = gelu_tanh(xt @ w["experts/gate_kernel"][e]) * (xt @ w["experts/up_kernel"][e])
        return (hidden @ w["experts/down_kernel"][e]) * w["experts/expert_scale"][e]

    rx, ex = router_x.reshape(-1, D).astype("float64"), expert_x.reshape(-1, D).astype("float64")
    ref = np.zeros_like(ex)
    for t in range(len(ex)):
        for e, weight in zip(*gemma4_route(rx[t])):
            ref[t] += weight * expert(e, ex[t])
    out = layer_output(layer, expert_x, router_inputs=router_x)
    np.testing.assert_allclose(out.reshape(-1, D), ref, atol=ATOL, rtol=1e-5)
    # Routing on the expert inputs instead gives another answer.
    assert np.abs(layer_output(layer, expert_x) - out).max() > 1e-3


def test_router_inputs_are_checked():
    x = np.zeros((2, 3, D), "float32")
    layer = dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, gating_type="softmoe")
    with pytest.raises(ValueError, match="router_inputs"):
        layer(x, router_inputs=x)
    layer = dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D)
    with pytest.raises(ValueError, match="router_inputs"):
        layer(x, router_inputs=x[:, :2])


def test_router_norm_epsilon_is_only_for_rmsnorm_linear():
    with pytest.raises(ValueError, match="router_norm_epsilon"):
        dl_moe.create_ffn_moe(num_experts=E, hidden_dim=D, router_norm_epsilon=1e-5)
