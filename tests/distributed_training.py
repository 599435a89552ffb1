"""Trains one small MoE model single-device, expert-parallel and data-parallel.

Run with KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=8;
prints one JSON line with the per-step losses of each run, the expert weights'
sharding, and the sharding constraints of a compiled forward with and without
`expert_parallel`.
"""

import json
import os
import sys

import keras
import numpy as np

import dl_moe
from dl_moe.distribution import expert_parallel_layout_map

STEPS = 4


def build(expert_parallel):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16))
    x = dl_moe.create_ffn_moe(
        8, 16, top_k=2, intermediate_size=32, ffn_type="swiglu", expert_parallel=expert_parallel, name="moe"
    )(inputs)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def train(model, weights_path):
    model.load_weights(weights_path)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 8, 16)).astype("float32")
    y = rng.normal(size=(16, 4)).astype("float32")
    return [float(model.train_on_batch(x, y)) for _ in range(STEPS)]


def sharding_constraints(expert_parallel):
    """The sharding constraints in the lowered (StableHLO) training forward of one MoE
    layer, under the current distribution: one line per constraint."""
    import jax

    layer = dl_moe.create_ffn_moe(8, 16, top_k=2, intermediate_size=32, expert_parallel=expert_parallel, name="moe")
    x = np.random.default_rng(0).normal(size=(16, 8, 16)).astype("float32")
    layer.build(x.shape)
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    forward = jax.jit(lambda t, n, x: layer.stateless_call(t, n, x, training=True)[0])
    text = forward.lower(trainable, non_trainable, x).as_text()
    return [line.strip() for line in text.splitlines() if "sharding_constraint" in line or "@Sharding" in line]


def main(work_dir):
    weights_path = os.path.join(work_dir, "init.weights.h5")
    single = build(expert_parallel=False)
    single.save_weights(weights_path)
    result = {"devices": len(keras.distribution.list_devices()), "single": train(single, weights_path)}

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "expert"), devices=devices)
    layout_map = expert_parallel_layout_map(mesh, expert_axis="expert")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    expert_parallel = build(expert_parallel=True)
    kernel = expert_parallel.get_layer("moe").experts.up_kernel
    result["up_kernel_shard_shape"] = list(kernel.value.sharding.shard_shape(kernel.value.shape))
    result["router_shard_shape"] = list(
        expert_parallel.get_layer("moe").gating_network.router_kernel.value.sharding.shard_shape((16, 8))
    )
    result["expert_parallel"] = train(expert_parallel, weights_path)
    result["constraints"] = {flag: sharding_constraints(flag == "on") for flag in ("on", "off")}

    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    result["data_parallel"] = train(build(expert_parallel=False), weights_path)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
