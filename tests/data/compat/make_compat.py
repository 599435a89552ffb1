"""Writes the `.keras` compatibility files under tests/data/compat/ (not run by the suite).

Each case is a tiny model saved by the code of the day it was made, with its fixed
input (`NAME.npz["x"]`) and the predictions that code gave (`NAME.npz["y"]`) and the MoE layer's variable paths below the layer (`NAME.npz["variable_paths"]`).
`tests/test_compat.py` loads every file on every backend and checks the predictions,
so a refactoring that renames a variable or changes the forward pass fails there.

Run from the repository root (JAX writes the files):
    PYTHONPATH=$PWD KERAS_BACKEND=jax python tests/data/compat/make_compat.py
"""

import os
import warnings

import keras
import numpy as np

import dl_moe

HERE = os.path.dirname(os.path.abspath(__file__))

# name -> (input shape without batch, create_ffn_moe arguments)
CASES = {
    "linear_top2_capacity": ((16, 8), dict(top_k=2, capacity_factor=0.5, ffn_type="swiglu")),
    "linear_top2_dropless": ((4, 8), dict(top_k=2, drop_tokens=False, add_noise=True)),
    "top_p_dropless": ((4, 8), dict(gating_type="top_p", top_k=1, drop_tokens=False)),
    "expert_choice": ((4, 8), dict(gating_type="expert_choice", top_k=1)),
    "softmoe": ((4, 8), dict(gating_type="softmoe", top_k=1, num_slots=2)),
    "cosine_capacity": ((4, 8), dict(gating_type="cosine", embedding_dim=4)),
    "shared_experts": ((4, 8), dict(num_shared_experts=1, ffn_type="geglu")),
    "hierarchical": ((4, 8), dict(hierarchical_routing=True, num_experts=4, top_k=2)),
    "aux_free_dropless": ((4, 8), dict(balancing="aux_free", drop_tokens=False)),
    "int8_bank": ((4, 8), dict(ffn_type="swiglu")),
}


def make_model(input_shape, arguments):
    arguments = dict(arguments)
    num_experts = arguments.pop("num_experts", 4)
    top_k = arguments.pop("top_k", 2)
    moe = dl_moe.create_ffn_moe(num_experts, input_shape[-1], top_k=top_k, intermediate_size=8, name="moe", **arguments)
    return keras.Sequential([keras.Input(input_shape), moe, keras.layers.Dense(3, name="head")])


def main():
    keras.utils.set_random_seed(13)
    for index, (name, (input_shape, arguments)) in enumerate(CASES.items()):
        model = make_model(input_shape, arguments)
        if name == "int8_bank":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.quantize("int8")
        x = np.random.default_rng(index).normal(size=(3,) + input_shape).astype("float32")
        y = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        model.save(os.path.join(HERE, f"{name}.keras"))
        variables = model.layers[0].variables
        paths = np.array(sorted(v.path.partition("moe/")[2] for v in variables if "seed_generator" not in v.path))
        np.savez(os.path.join(HERE, f"{name}.npz"), x=x, y=y, variable_paths=paths)
        print(name, y.shape)


if __name__ == "__main__":
    main()
