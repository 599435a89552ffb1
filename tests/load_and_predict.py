"""Loads .keras files on this process's backend and writes their predictions.

Usage: KERAS_BACKEND=... python tests/load_and_predict.py INPUTS.npy OUT_DIR MODEL.keras...
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dl_moe  # noqa: E402, F401  (registers the layers)


def main(inputs_path, out_dir, *model_paths):
    x = np.load(inputs_path)
    for path in model_paths:
        model = keras.models.load_model(path)  # default safe mode
        prediction = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        name = os.path.splitext(os.path.basename(path))[0]
        np.save(os.path.join(out_dir, f"{name}.{keras.backend.backend()}.npy"), prediction)


if __name__ == "__main__":
    main(*sys.argv[1:])
