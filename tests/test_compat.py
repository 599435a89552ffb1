"""`.keras` files saved by earlier code load and predict what they predicted then.

The files and their inputs/predictions were written by `tests/data/compat/make_compat.py`
(on JAX, before the layer was split by routing kind); they are loaded here in safe mode
on the backend under test.
"""

import os

import keras
import numpy as np
import pytest

import dl_moe  # noqa: F401  (registers the layers)

COMPAT_DIR = os.path.join(os.path.dirname(__file__), "data", "compat")
CASES = sorted(name[: -len(".keras")] for name in os.listdir(COMPAT_DIR) if name.endswith(".keras"))


def test_the_compatibility_files_are_there():
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_saved_model_loads_and_predicts_the_stored_outputs(name):
    stored = np.load(os.path.join(COMPAT_DIR, f"{name}.npz"))
    model = keras.models.load_model(os.path.join(COMPAT_DIR, f"{name}.keras"))  # safe mode
    moe = model.layers[0]
    assert isinstance(moe, dl_moe.MixtureOfExperts)
    # Paths below the layer; seed generators are numbered by a process-wide counter.
    paths = sorted(v.path.partition("moe/")[2] for v in moe.variables if "seed_generator" not in v.path)
    assert paths == list(stored["variable_paths"])
    prediction = keras.ops.convert_to_numpy(model(stored["x"], training=False))
    np.testing.assert_allclose(prediction, stored["y"], rtol=1e-5, atol=1e-5)
