"""Int8 quantization of FFN expert banks: memory of the expert weights, and accuracy.

Run: `KERAS_BACKEND=jax python benchmarks/quantization.py` (any backend). Prints the
bytes held by expert weights before and after `model.quantize("int8")` and the
relative error of the MoE output against the float model.
"""

import argparse
import json

import keras
import numpy as np
from keras import ops


def expert_weight_bytes(moe_layer):
    """Bytes of the expert-bank variables of a built `MixtureOfExperts`.

    Args:
        moe_layer: A built `MixtureOfExperts`.

    Returns:
        dict: `experts` (routed + shared expert banks: kernels, biases, scales),
        `router` (router weights) and `kernels` (expert kernels alone, int8 or float).
    """

    def size(variable):
        return int(np.prod(variable.shape)) * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize

    banks = [moe_layer.experts] + ([moe_layer.shared_experts] if moe_layer.shared_experts is not None else [])
    expert_vars = [v for bank in banks for v in bank.weights]
    return {
        "experts": sum(size(v) for v in expert_vars),
        "kernels": sum(size(v) for v in expert_vars if "_kernel" in v.path and "_scale" not in v.path),
        "router": sum(size(v) for v in moe_layer.gating_network.weights),
    }


def quantization_report(num_experts=8, hidden_dim=256, intermediate_size=512, ffn_type="swiglu", tokens=512, seed=0):
    """Quantizes one FFN MoE layer to int8 and measures memory and output error.

    Args:
        num_experts: E.
        hidden_dim: d.
        intermediate_size: h.
        ffn_type: "mlp", "swiglu" or "geglu".
        tokens: Tokens `[tokens, d]` used to measure the output error.
        seed: Seed of the weights and inputs.

    Returns:
        dict with the layer shape, `float_bytes` / `int8_bytes` of the expert weights,
        `saved_bytes`, `ratio` (int8 / float) and `relative_error` (L2 norm of the
        output difference over the float output's norm).
    """
    import dl_moe

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((hidden_dim,))
    moe = dl_moe.create_ffn_moe(
        num_experts, hidden_dim, intermediate_size=intermediate_size, ffn_type=ffn_type, drop_tokens=False
    )
    model = keras.Model(inputs, moe(inputs))
    x = np.random.default_rng(seed).normal(size=(tokens, hidden_dim)).astype("float32")
    reference = np.asarray(ops.convert_to_numpy(model(x)))
    before = expert_weight_bytes(moe)
    model.quantize("int8")
    after = expert_weight_bytes(moe)
    quantized = np.asarray(ops.convert_to_numpy(model(x)))
    return {
        "backend": keras.backend.backend(),
        "num_experts": num_experts,
        "hidden_dim": hidden_dim,
        "intermediate_size": intermediate_size,
        "ffn_type": ffn_type,
        "float_bytes": before["experts"],
        "int8_bytes": after["experts"],
        "saved_bytes": before["experts"] - after["experts"],
        "ratio": after["experts"] / before["experts"],
        "router_bytes": after["router"],
        "relative_error": float(np.linalg.norm(quantized - reference) / np.linalg.norm(reference)),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--intermediate-size", type=int, default=512)
    parser.add_argument("--ffn-type", default="swiglu")
    args = parser.parse_args()
    report = quantization_report(args.num_experts, args.hidden_dim, args.intermediate_size, args.ffn_type)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
