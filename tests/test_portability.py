"""A .keras file saved on this backend loads on the other two with the same predictions."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import dl_moe

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One small layer per router and option family; each is saved, reloaded elsewhere.
LAYERS = {
    "linear_capacity": dict(gating_type="linear", top_k=2, add_noise=True, jitter_noise=0.1),
    "linear_dropless_swiglu": dict(gating_type="linear", top_k=2, drop_tokens=False, ffn_type="swiglu"),
    "cosine_geglu": dict(gating_type="cosine", top_k=1, ffn_type="geglu", normalize_top_k=True),
    "softmoe": dict(gating_type="softmoe", num_slots=2),
}


def build_model(options):
    inputs = keras.Input((6, 8))
    x = dl_moe.create_ffn_moe(4, 8, intermediate_size=12, **options)(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("target", [b for b in BACKENDS if b != keras.backend.backend()])
def test_saved_models_load_on_other_backend(target, tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 6, 8)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    expected, paths = {}, []
    for name, options in LAYERS.items():
        model = build_model(options)
        for v in model.trainable_variables:  # non-trivial weights everywhere
            v.assign(np.random.default_rng(len(paths)).normal(scale=0.3, size=v.shape).astype("float32"))
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        paths.append(path)
        expected[name] = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    env = dict(os.environ, KERAS_BACKEND=target, PYTHONPATH=ROOT)
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "load_and_predict.py"), str(tmp_path / "x.npy"), str(tmp_path)] + paths,
        check=True, env=env, capture_output=True, timeout=300,
    )
    for name in LAYERS:
        got = np.load(tmp_path / f"{name}.{target}.npy")
        np.testing.assert_allclose(got, expected[name], atol=1e-5, rtol=1e-5, err_msg=name)
