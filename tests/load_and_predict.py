"""Loads .keras files on this process's backend and writes their predictions.

Usage: KERAS_BACKEND=... python tests/load_and_predict.py OUT_DIR MODEL.keras...
(each MODEL.keras is predicted on the MODEL.x.npy beside it).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import dl_moe  # noqa: E402, F401  (registers the layers)


def main(out_dir, *model_paths):
    for path in model_paths:
        name = os.path.splitext(os.path.basename(path))[0]
        x = np.load(os.path.join(os.path.dirname(path), f"{name}.x.npy"))
        model = keras.models.load_model(path)  # default safe mode
        prediction = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        np.save(os.path.join(out_dir, f"{name}.{keras.backend.backend()}.npy"), prediction)


if __name__ == "__main__":
    main(*sys.argv[1:])
