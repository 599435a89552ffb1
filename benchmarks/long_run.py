"""Long-run stability check: 2,000 training steps, noisy gating, mixed_bfloat16.

Passes when every loss is finite and no expert starves: each keeps at least
1/(4E) of the routed assignments over the last 200 steps, with balancing on.

    KERAS_BACKEND=jax python benchmarks/long_run.py [--steps 2000] [--experts 8]
"""

import argparse
import math
import sys
import time

import keras
import numpy as np

import dl_moe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--policy", default="mixed_bfloat16")
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy(args.policy)
    num_experts, width, seq = args.experts, 32, 16
    moe = dl_moe.create_ffn_moe(
        num_experts, width, top_k=2, intermediate_size=64, add_noise=True, noise_std=1.0,
        aux_loss_weight=0.01, z_loss_weight=1e-3, name="moe",
    )
    inputs = keras.Input((seq, width))
    x = keras.layers.Dense(width)(inputs)
    x = x + moe(keras.layers.LayerNormalization()(x))
    outputs = keras.layers.Dense(4, dtype="float32")(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    # A learnable task: the class is which quarter of the features carries the signal.
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=4096)
    data = rng.normal(size=(4096, seq, width)).astype("float32") * 0.5
    for c in range(4):
        data[labels == c, :, c * 8 : (c + 1) * 8] += 1.0

    losses, start = [], time.perf_counter()
    batch = 32
    for step in range(args.steps):
        i = (step * batch) % (len(data) - batch)
        if step == args.steps - 200:
            moe.reset_routing_stats()
        losses.append(float(model.train_on_batch(data[i : i + batch], labels[i : i + batch])))
    seconds = time.perf_counter() - start

    fractions = moe.get_expert_utilization()
    finite = all(math.isfinite(v) for v in losses)
    floor = 1.0 / (4 * num_experts)
    print(f"backend {keras.backend.backend()}, policy {args.policy}, {args.steps} steps in {seconds:.0f}s")
    print(f"loss: first {losses[0]:.3f}, last {losses[-1]:.3f}, all finite: {finite}")
    print(f"expert fractions (last 200 steps): {np.round(fractions, 3).tolist()}  floor 1/(4E) = {floor:.4f}")
    ok = finite and fractions.min() >= floor
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
