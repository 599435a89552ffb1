"""Behaviours the README promises, each checked against values written here.

Dropped tokens with another output width, the routers' training noise (jitter, Shazeer
noisy top-k, reproducible from a seed), Soft MoE's losses, the cosine router's
temperature defaults and top-any's straight-through threshold gradient.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops

import dl_moe
from tests import reference
from tests.autodiff import gradients

E, D = 4, 4


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


def randomize(layer, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    for v in layer.trainable_weights:
        v.assign(rng.normal(scale=scale, size=v.shape).astype("float32"))


def variable(layer, name):
    """The layer's variable whose path ends with `name` (exactly one)."""
    found = [v for v in layer.weights if v.path.split("/")[-1] == name]
    assert len(found) == 1, [v.path for v in layer.weights]
    return found[0]


# ------------------------------------------------------------------ dropping


def test_fully_dropped_token_outputs_zeros_when_the_width_changes():
    # Every token wants expert 2; C = 16 of 40 tokens fit. The residual cannot apply
    # (output_dim 5 != d 8), so the 24 dropped tokens output zeros.
    x = np.random.default_rng(0).normal(size=(40, 8)).astype("float32")
    x[:, 0] = 20.0
    layer = dl_moe.create_ffn_moe(4, 8, top_k=1, intermediate_size=12, output_dim=5, eval_capacity_factor=1.0,
                                  use_residual_connection=True)
    layer.build(x.shape)
    randomize(layer)
    kernel = np.zeros((8, 4), "float32")
    kernel[0, 2] = 1.0
    variable(layer, "router_kernel").assign(kernel)
    out = numpy_of(layer(x, training=False))
    assert out.shape == (40, 5)
    np.testing.assert_array_equal(out[16:], 0.0)
    w = reference.weights_of(layer)
    weight = reference.softmax(x[:16] @ kernel)[:, 2:3]
    np.testing.assert_allclose(out[:16], weight * reference.ffn_expert(w, 2, x[:16], "mlp"), rtol=1e-5, atol=1e-5)
    assert layer.get_routing_stats()["dropped_token_fraction"] == pytest.approx(24 / 40)


# --------------------------------------------------------------------- noise


def test_jitter_multiplies_the_router_input_by_uniform_noise():
    # Router kernel = identity and tokens a * one_hot(e): the logits are a * u_e on expert
    # e and 0 elsewhere, so u_e = (log p_e - log p_other) / a for each token.
    jitter, a, num_tokens = 0.3, 2.0, 800
    layer = dl_moe.create_ffn_moe(E, D, top_k=1, intermediate_size=8, jitter_noise=jitter, drop_tokens=False)
    layer.build((None, D))
    variable(layer, "router_kernel").assign(np.eye(D, E, dtype="float32"))
    hot = np.arange(num_tokens) % E
    x = (a * np.eye(E)[hot]).astype("float32")
    log_p = np.log(layer.route(x, training=True)["probs"].astype("float64"))
    other = (hot + 1) % E
    u = (log_p[np.arange(num_tokens), hot] - log_p[np.arange(num_tokens), other]) / a
    # U(0.7, 1.3): inside the interval, reaching both ends, mean 1 (sd of the mean 0.006).
    assert u.min() >= 1 - jitter - 1e-4 and u.max() <= 1 + jitter + 1e-4
    assert u.min() < 1 - 0.95 * jitter and u.max() > 1 + 0.95 * jitter
    assert abs(u.mean() - 1.0) < 0.03
    # The spread of U(1 - j, 1 + j): sd j / sqrt(3) = 0.173 (the sample's sd is within 5%).
    assert u.std() == pytest.approx(jitter / math.sqrt(3), rel=0.08)
    # No jitter outside training: log-odds exactly a.
    eval_log_p = np.log(layer.route(x)["probs"].astype("float64"))
    eval_u = (eval_log_p[np.arange(num_tokens), hot] - eval_log_p[np.arange(num_tokens), other]) / a
    np.testing.assert_allclose(eval_u, 1.0, atol=1e-5)


def test_noisy_top_k_follows_shazeer_rule():
    # logits += N(0, 1) * softplus(x W_noise) * noise_std. With a zero router kernel and
    # x W_noise = c, log p_e - log p_f = n_e s_e - n_f s_f, s = softplus(c) * noise_std,
    # so its variance over tokens is s_e^2 + s_f^2 and its mean 0.
    noise_std, num_tokens = 0.5, 2000
    c = np.array([-1.0, 0.0, 1.0, 2.0], "float32")
    layer = dl_moe.create_ffn_moe(E, D, top_k=1, intermediate_size=8, add_noise=True, noise_std=noise_std,
                                  drop_tokens=False)
    layer.build((None, D))
    variable(layer, "router_kernel").assign(np.zeros((D, E), "float32"))
    noise_kernel = np.zeros((D, E), "float32")
    noise_kernel[0] = c
    variable(layer, "noise_kernel").assign(noise_kernel)
    x = np.zeros((num_tokens, D), "float32")
    x[:, 0] = 1.0
    log_p = np.log(layer.route(x, training=True)["probs"].astype("float64"))
    s = np.log1p(np.exp(c.astype("float64"))) * noise_std  # [0.157, 0.347, 0.657, 1.063]
    for e in range(E):
        for f in range(e + 1, E):
            diff = log_p[:, e] - log_p[:, f]
            want_var = s[e] ** 2 + s[f] ** 2
            # 2000 samples: the variance is within 3.2% per sd, the mean within
            # sqrt(want_var / 2000); 15% and 5 sd leave room for the fixed draw.
            assert diff.var() == pytest.approx(want_var, rel=0.15), (e, f)
            assert abs(diff.mean()) < 5 * math.sqrt(want_var / num_tokens), (e, f)
    # The selection follows the noise: the noisiest expert wins most often.
    wins = np.bincount(layer.route(x, training=True)["indices"][:, 0], minlength=E)
    assert wins.argmax() == 3 and wins.min() > 0
    # Outside training there is no noise: uniform probabilities.
    np.testing.assert_allclose(layer.route(x)["probs"], 0.25, atol=1e-6)


@pytest.mark.parametrize("noise", [{"jitter_noise": 0.2}, {"add_noise": True, "noise_std": 1.0}])
def test_the_same_seed_gives_the_same_noisy_output(noise):
    x = np.random.default_rng(1).normal(size=(24, 8)).astype("float32")

    def noisy_outputs(seed):
        keras.utils.set_random_seed(seed)
        layer = dl_moe.create_ffn_moe(E, 8, top_k=2, intermediate_size=8, drop_tokens=False, **noise)
        layer.build(x.shape)
        randomize(layer, seed=2, scale=1.0)
        return [numpy_of(layer(x, training=True)) for _ in range(2)]

    first, again, other = noisy_outputs(3), noisy_outputs(3), noisy_outputs(4)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert np.abs(first[0] - first[1]).max() > 1e-3  # each call draws new noise
    assert np.abs(first[0] - other[0]).max() > 1e-3  # another seed, other noise


# ------------------------------------------------------------------ Soft MoE


def test_soft_moe_adds_the_z_loss_and_no_balancing_loss():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 8)).astype("float32")
    layer = dl_moe.create_ffn_moe(E, 8, gating_type="softmoe", num_slots=2, intermediate_size=8,
                                  aux_loss_weight=0.5, z_loss_weight=0.1, importance_loss_weight=0.0)
    layer.build(x.shape)
    randomize(layer, seed=3)
    layer(x, training=False)
    assert layer.losses == []
    layer(x, training=True)
    losses = [float(numpy_of(loss)) for loss in layer.losses]
    # logits [m, n*p] = normalise(x_m) . normalise(slot_n,p) * scale; z = mean logsumexp^2.
    slots = reference.l2_normalize(numpy_of(variable(layer, "slot_embeddings")), axis=0)
    scale = float(numpy_of(variable(layer, "scale")))
    logits = (reference.l2_normalize(x) @ slots * scale).reshape(-1, E * 2)
    z = reference.z_loss(logits)
    assert z > 1.0  # a value the weight 0.1 shows in
    np.testing.assert_allclose(losses, [0.1 * z], rtol=1e-5)  # one loss: the z-loss only


# -------------------------------------------------------------------- cosine


def test_cosine_router_default_temperature_and_fixed_scale():
    # Default tau = 0.07: p = softmax(cos(x W_proj, embedding) / 0.07). With
    # learnable_temperature=False the scale is no trainable weight and fit leaves it.
    x = np.random.default_rng(4).normal(size=(32, 6, 8)).astype("float32")
    for learnable in (True, False):
        layer = dl_moe.create_ffn_moe(E, 8, gating_type="cosine", intermediate_size=8, embedding_dim=6,
                                      learnable_temperature=learnable, name="moe")
        model = keras.Sequential([keras.Input((6, 8)), layer, keras.layers.Flatten(), keras.layers.Dense(2)])
        tokens = x.reshape(-1, 8)
        projected = reference.l2_normalize(tokens @ numpy_of(variable(layer, "proj_kernel")))
        embeddings = reference.l2_normalize(numpy_of(variable(layer, "expert_embeddings")))
        want = reference.softmax(projected @ embeddings.T / 0.07)
        np.testing.assert_allclose(layer.route(x)["probs"], want, rtol=1e-4, atol=1e-6)
        scale = variable(layer, "log_logit_scale")
        assert any(v is scale for v in layer.trainable_weights) == learnable
        before = float(numpy_of(scale))
        model.compile(keras.optimizers.Adam(0.05), "mse", jit_compile=keras.backend.backend() != "torch")
        model.fit(x, np.ones((32, 2), "float32"), batch_size=16, epochs=1, verbose=0)
        moved = abs(float(numpy_of(scale)) - before)
        assert (moved > 1e-3) if learnable else (moved == 0.0), (learnable, moved)


# ------------------------------------------------------------------- top-any


def test_top_any_threshold_gets_the_straight_through_gradient():
    # Forward: weight 1/count on each firing expert. Backward: the hard gate is replaced
    # by sigmoid(s / tau), tau = 0.07, s = cos(x, w_e) - g_e, so
    # d weight[t, j] / d g_e = -sigma'(s / tau) / tau / count_t on e's firing slots.
    tau = 0.07
    layer = dl_moe.create_ffn_moe(E, D, gating_type="top_any", top_k=2, intermediate_size=8)
    layer.build((None, D))
    router = layer.gating_network
    rng = np.random.default_rng(5)
    embeddings = rng.normal(size=(E, D)).astype("float32")
    thresholds = rng.uniform(-0.1, 0.3, size=(E,)).astype("float32")
    variable(layer, "expert_embeddings").assign(embeddings)
    variable(layer, "thresholds").assign(thresholds)
    x = rng.normal(size=(20, D)).astype("float32")
    probe = rng.normal(size=(20, E)).astype("float32")
    names = [v.path.split("/")[-1] for v in router.trainable_variables]
    assert sorted(names) == ["expert_embeddings", "thresholds"]
    non_trainable = [v.value for v in router.non_trainable_variables]

    def weighted_sum(embedding_value, threshold_value):
        values = {"expert_embeddings": embedding_value, "thresholds": threshold_value}
        (weights, _, _), _ = router.stateless_call([values[n] for n in names], non_trainable, x, training=True)
        return ops.sum(weights * ops.convert_to_tensor(probe[:, : weights.shape[-1]]))

    _, threshold_grad = gradients(weighted_sum, embeddings, thresholds)

    cos = reference.l2_normalize(x) @ reference.l2_normalize(embeddings).T
    s = cos - thresholds  # [T, E]
    fired = s > 0
    count = np.maximum(fired.sum(-1, keepdims=True), 1)
    sig = 1 / (1 + np.exp(-s / tau))
    # The router's slot j holds its j-th highest-scoring expert.
    order = np.argsort(-s, axis=-1, kind="stable")
    want = np.zeros(E)
    for t in range(len(x)):
        for j, e in enumerate(order[t]):
            if fired[t, e]:
                want[e] += probe[t, j] * -(sig[t, e] * (1 - sig[t, e])) / tau / count[t, 0]
    assert (fired.sum(-1) > 1).any() and np.abs(want).min() > 0
    np.testing.assert_allclose(threshold_grad, want, rtol=1e-4, atol=1e-6)
    # The forward value is the hard average.
    decision = layer.route(x, training=True)
    np.testing.assert_array_equal(decision["active"].sum(-1), fired.sum(-1))
    np.testing.assert_allclose(decision["weights"].sum(-1), fired.any(-1), rtol=1e-6)
