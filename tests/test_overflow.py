"""Overflow rerouting (`dl_moe.overflow`): which assignments move where, against a
loop written from the documented rule."""

import keras
import numpy as np
import pytest
from keras import ops

from dl_moe import overflow


def numpy_of(x):
    return np.asarray(ops.convert_to_numpy(x))


def reference_reroute(indices, active, probs, cap, max_attempts=None):
    """Loop version of the rule in `dl_moe/overflow.py`'s docstring."""
    num_tokens, top_k = indices.shape
    num_experts = probs.shape[1]
    indices = indices.copy()
    fill = np.zeros(num_experts, dtype=int)
    kept = np.zeros((num_tokens, top_k), dtype=bool)
    for j in range(top_k):  # first choices before second choices, then token order
        for t in range(num_tokens):
            if active[t, j] and fill[indices[t, j]] < cap:
                kept[t, j] = True
                fill[indices[t, j]] += 1
    rerouted = np.zeros_like(kept)
    fallbacks = []
    for t in range(num_tokens):
        chosen = {int(indices[t, j]) for j in range(top_k) if active[t, j]}
        fallbacks.append([int(e) for e in np.argsort(-probs[t], kind="stable") if int(e) not in chosen])
    tried = [0] * num_tokens
    rounds = num_experts - 1 if max_attempts is None else max_attempts
    for _ in range(rounds):
        proposals = []  # (priority, token, choice, expert)
        for t in range(num_tokens):
            waiting = [j for j in range(top_k) if active[t, j] and not kept[t, j]]
            if waiting and tried[t] < len(fallbacks[t]):
                proposals.append((waiting[0] * num_tokens + t, t, waiting[0], fallbacks[t][tried[t]]))
                tried[t] += 1
        for _, t, j, e in sorted(proposals):
            if fill[e] < cap:
                fill[e] += 1
                indices[t, j] = e
                kept[t, j] = rerouted[t, j] = True
    return indices, kept, rerouted


def random_case(num_tokens, top_k, num_experts, seed, skew=2.0, inactive=0.1):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(num_tokens, num_experts)) + skew * np.linspace(1, 0, num_experts)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    indices = np.argsort(-probs, axis=1, kind="stable")[:, :top_k].astype("int32")
    active = rng.random((num_tokens, top_k)) >= inactive
    return probs.astype("float32"), indices, active


def compiled(fn):
    """`fn` under XLA on JAX and TensorFlow (the static shapes are part of the contract), eager on torch."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def run_reroute(probs, indices, active, cap, max_attempts=None):
    num_experts = probs.shape[1]

    def reroute(probs, indices, active):
        preference = overflow.preference_order(probs, num_experts)
        return tuple(overflow.reroute_overflow(indices, active, preference, num_experts, cap, max_attempts))

    outputs = compiled(reroute)(*(ops.convert_to_tensor(a) for a in (probs, indices, active)))
    return overflow.RerouteDecision(*outputs)


@pytest.mark.parametrize(
    "num_tokens, top_k, num_experts, cap, max_attempts",
    [(40, 1, 4, 8, None), (37, 2, 5, 8, 2), (24, 3, 6, 16, None)],
)
def test_reroute_moves_the_assignments_the_loop_moves(num_tokens, top_k, num_experts, cap, max_attempts):
    probs, indices, active = random_case(num_tokens, top_k, num_experts, seed=num_tokens)
    decision = run_reroute(probs, indices, active, cap, max_attempts)
    want_index, want_kept, want_rerouted = reference_reroute(indices, active, probs, cap, max_attempts)
    assert want_rerouted.any(), "the case must overflow"
    np.testing.assert_array_equal(numpy_of(decision.kept), want_kept)
    np.testing.assert_array_equal(numpy_of(decision.rerouted), want_rerouted)
    got_index = numpy_of(decision.expert_index)
    np.testing.assert_array_equal(np.where(want_kept, got_index, -1), np.where(want_kept, want_index, -1))
    np.testing.assert_array_equal(
        numpy_of(decision.routed_per_expert), [np.sum((indices == e) & active) for e in range(num_experts)]
    )


def test_reroute_invariants_capacity_no_duplicates_and_nothing_left_with_room():
    num_tokens, top_k, num_experts, cap = 64, 2, 8, 8
    probs, indices, active = random_case(num_tokens, top_k, num_experts, seed=7, skew=4.0, inactive=0.0)
    decision = run_reroute(probs, indices, active, cap)
    index, kept = numpy_of(decision.expert_index), numpy_of(decision.kept)
    for t in range(num_tokens):
        mine = index[t][kept[t]]
        assert len(set(mine.tolist())) == len(mine), f"token {t} holds an expert twice"
    # 128 assignments for 8 * 8 rows, skewed to the first experts: rerouting fills
    # every expert's rows exactly, and drops only what no expert has room for.
    load = np.array([np.sum((index == e) & kept) for e in range(num_experts)])
    np.testing.assert_array_equal(load, np.full(num_experts, cap))
    assert int(np.sum(active & ~kept)) == num_tokens * top_k - num_experts * cap


def test_rerouted_weights_take_the_new_experts_probability():
    probs = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.7, 0.2, 0.1]], "float32")
    indices = np.array([[0], [0], [0]], "int32")
    active = np.ones((3, 1), bool)
    # C = 1: token 0 keeps expert 0, token 1 moves to its best fallback 2, token 2 to 1.
    decision = run_reroute(probs, indices, active, 1)
    np.testing.assert_array_equal(numpy_of(decision.expert_index)[:, 0], [0, 2, 1])
    weights = overflow.rerouted_weights(
        ops.convert_to_tensor(probs[:, :1]), ops.convert_to_tensor(probs), ops.convert_to_tensor(indices), decision
    )
    np.testing.assert_allclose(numpy_of(weights)[:, 0], [0.5, 0.3, 0.2], atol=1e-6)
    # Normalised top-k keeps the normaliser: weight 1.0 of expert 0 (p 0.6) -> 0.3 / 0.6.
    weights = overflow.rerouted_weights(
        ops.convert_to_tensor(np.ones((3, 1), "float32")), ops.convert_to_tensor(probs),
        ops.convert_to_tensor(indices), decision,
    )
    np.testing.assert_allclose(numpy_of(weights)[:, 0], [1.0, 0.3 / 0.6, 0.2 / 0.7], atol=1e-6)


# ------------------------------------------------------------------ the layer

def layer_case(skew=1.5):
    """T=48 tokens, E=4, k=2, C=ceil(1.0*48*2/4)=24 rows; inputs pushed towards expert 0."""
    import dl_moe

    layer = dl_moe.create_ffn_moe(
        4, 8, top_k=2, intermediate_size=16, capacity_factor=1.0, overflow="reroute", aux_loss_weight=0.0,
        z_loss_weight=0.0, name="moe",
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 8)).astype("float32")
    layer.build(x.shape)
    kernel = rng.normal(size=(8, 4)).astype("float32")
    kernel[:, 0] += skew * x.mean(0) / np.linalg.norm(x.mean(0)) ** 2
    layer.gating_network.router_kernel.assign(kernel)
    return layer, x


def expected_layer(layer_weights, x, cap):
    """Reference output and decision of `layer_case`'s layer with these weights."""
    from tests import reference

    probs = reference.softmax(x.astype("float64") @ layer_weights["router_kernel"])
    _, indices = reference.top_k_decision(probs, 2, False)
    new_index, kept, rerouted = reference_reroute(indices, np.ones_like(indices, bool), probs, cap)
    out = np.zeros_like(x, dtype="float64")
    for t in range(len(x)):
        for j in range(2):
            if kept[t, j]:
                e = new_index[t, j]
                out[t] += probs[t, e] * reference.ffn_expert(layer_weights, e, x[t : t + 1], "mlp")[0]
    fully_dropped = ~kept.any(-1)
    out[fully_dropped] = x[fully_dropped]
    return out, indices, kept, rerouted


def test_layer_reroutes_like_the_reference_compiled_and_round_trips(tmp_path):
    """One compiled training step (XLA on JAX/TF): its statistics against the reference
    with the initial weights; the compiled forward against it with the trained ones."""
    from tests import reference

    layer, x = layer_case()
    inputs = keras.Input((8,), batch_size=48)
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=keras.backend.backend() != "torch")
    cap = reference.capacity(48, 2, 4, 1.0)
    _, indices, kept, rerouted = expected_layer(reference.weights_of(layer), x, cap)
    layer.reset_routing_stats()
    model.fit(x, x, epochs=1, batch_size=48, shuffle=False, verbose=0)  # token order is priority order
    stats = layer.get_routing_stats()
    assert rerouted.sum() > 0 and not kept.all(), "the case must reroute and still drop"
    assert stats["rerouted_fraction"] == pytest.approx(rerouted.sum() / 96)
    assert stats["dropped_fraction"] == pytest.approx(1 - kept.sum() / 96)
    routed = np.array([(indices == e).sum() for e in range(4)]) / 96
    np.testing.assert_allclose(stats["expert_fraction"], routed)  # the router's choice, not the moved load
    # Dropping instead would lose more.
    drop = reference.assign_with_capacity(indices, np.ones_like(indices, bool), 4, cap)[0]
    assert (1 - drop.sum() / 96) > stats["dropped_fraction"]

    out = model.predict(x, batch_size=48, verbose=0)
    want, _, _, rerouted = expected_layer(reference.weights_of(layer), x, cap)
    assert rerouted.sum() > 0
    np.testing.assert_allclose(out, want, atol=1e-5)

    path = str(tmp_path / "reroute.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.get_layer("moe").config.overflow == "reroute"
    np.testing.assert_allclose(restored.predict(x, batch_size=48, verbose=0), out, atol=1e-6)
    layer.reset_routing_stats()
    assert layer.get_routing_stats()["rerouted_fraction"] == 0.0


def test_eager_torch_slices_run_the_rerouted_decision_like_the_buffers(monkeypatch):
    if keras.backend.backend() != "torch":
        pytest.skip("eager PyTorch's 'slices' plan; the portable plans run the rerouted decision on every backend")
    from dl_moe import backend_fast_paths, dispatch

    layer, x = layer_case()
    layer.config.dispatch = "capacity"
    buffers = numpy_of(layer(ops.convert_to_tensor(x), training=True))
    used = []
    real_plan = dispatch.plan_ragged_dispatch

    def ragged(*args, **kwargs):
        used.append(True)
        return real_plan(*args, **kwargs)

    # 4 experts of C = 24 rows leave too little padding for the slices to pay off on
    # their own; this test is about their result, so they are made to.
    monkeypatch.setattr(backend_fast_paths, "capacity_slices_pay_off", lambda loads, capacity: True)
    monkeypatch.setattr(dispatch, "plan_ragged_dispatch", ragged)
    layer.config.dispatch = "slices"
    layer.reset_routing_stats()
    slices = numpy_of(layer(ops.convert_to_tensor(x), training=True))
    assert used, "the slice path must have run"
    np.testing.assert_allclose(slices, buffers, atol=1e-5)
    assert layer.get_routing_stats()["rerouted_fraction"] > 0


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"overflow": "spill"}, r"MoEConfig.overflow must be one of \['drop', 'reroute'\], got 'spill'"),
        ({"overflow": "reroute", "drop_tokens": False}, "needs drop_tokens=True"),
        ({"reroute_attempts": 2}, "reroute_attempts is only used with overflow='reroute'"),
        ({"overflow": "reroute", "reroute_attempts": 0}, "reroute_attempts must be a positive integer or None"),
        ({"overflow": "reroute", "gating_config": {"gating_type": "expert_choice"}}, "needs a token-choice router"),
        ({"overflow": "reroute", "gating_config": {"gating_type": "softmoe"}}, "needs a token-choice router"),
    ],
)
def test_overflow_config_errors(fields, message):
    from dl_moe import MoEConfig

    with pytest.raises(ValueError, match=message):
        MoEConfig(**fields)
