"""A .keras file saved on this backend loads on another with the same predictions.

Each backend's session loads on the next backend of `BACKENDS` (tensorflow → jax →
torch → tensorflow), so over the three sessions every backend writes files that
another reads and reads files that another wrote (one subprocess a session instead
of two keeps the suite inside CI's time).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import dl_moe

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One small model per router, expert type and option family: (layer factory, input shape).
ROUTER_OPTIONS = {
    "linear_capacity": dict(gating_type="linear", top_k=2, add_noise=True, jitter_noise=0.1),
    "linear_dropless_swiglu": dict(gating_type="linear", top_k=2, drop_tokens=False, ffn_type="swiglu"),
    "linear_aux_free_shared": dict(gating_type="linear", balancing="aux_free", num_shared_experts=1),
    "hierarchical": dict(gating_type="linear", hierarchical_routing=True, num_expert_groups=2, top_k=1),
    "cosine_geglu": dict(gating_type="cosine", top_k=1, ffn_type="geglu", normalize_top_k=True),
    "softmoe": dict(gating_type="softmoe", num_slots=2),
    "expert_choice": dict(gating_type="expert_choice"),
    "top_p": dict(gating_type="top_p"),
    "conditional": dict(gating_type="conditional"),
    "confidence": dict(gating_type="confidence"),
    "top_any": dict(gating_type="top_any"),
    "resonance": dict(gating_type="resonance"),
    "ensemble": dict(gating_type="ensemble", ensemble_members=[{"gating_type": "linear"}, {"gating_type": "cosine"}]),
}
MODELS = {
    name: (lambda options=options: dl_moe.create_ffn_moe(4, 8, intermediate_size=12, **options), (6, 8))
    for name, options in ROUTER_OPTIONS.items()
}
MODELS["attention"] = (lambda: dl_moe.create_attention_moe(4, 8, num_heads=2, top_k=2), (6, 8))
MODELS["conv2d"] = (lambda: dl_moe.create_conv_moe(4, filters=3, kernel_size=3, top_k=1), (5, 5, 2))


def build_model(factory, shape):
    inputs = keras.Input(shape)
    x = factory()(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


NEXT_BACKEND = BACKENDS[(BACKENDS.index(keras.backend.backend()) + 1) % len(BACKENDS)]


@pytest.mark.parametrize("target", [NEXT_BACKEND])
def test_saved_models_load_on_other_backend(target, tmp_path):
    expected, paths = {}, []
    for name, (factory, shape) in MODELS.items():
        x = np.random.default_rng(0).normal(size=(5,) + shape).astype("float32")
        np.save(tmp_path / f"{name}.x.npy", x)
        model = build_model(factory, shape)
        # Non-trivial weights everywhere, from one generator per model: variables of the
        # same shape (gate/up, key/value, query/output) hold different values, so a swap
        # on load changes the predictions.
        rng = np.random.default_rng(len(paths))
        for v in model.trainable_variables:
            v.assign(rng.normal(scale=0.3, size=v.shape).astype("float32"))
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        paths.append(path)
        expected[name] = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    env = dict(os.environ, KERAS_BACKEND=target, PYTHONPATH=ROOT)
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "load_and_predict.py"), str(tmp_path)] + paths,
        check=True, env=env, capture_output=True, timeout=600,
    )
    for name in MODELS:
        got = np.load(tmp_path / f"{name}.{target}.npy")
        np.testing.assert_allclose(got, expected[name], atol=1e-5, rtol=1e-5, err_msg=name)
