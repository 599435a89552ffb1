"""Trains a tiny sparsified keras-hub Mixtral on one device and expert-parallel.

Run with KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=8;
prints one JSON line with the per-step losses of both runs, the expert weights'
sharding and whether the sharded forward exchanges tokens with all-to-all (used by
tests/test_keras_hub.py).
"""

import json
import os
import sys

import keras
import keras_hub
import numpy as np

from dl_moe.integrations.keras_hub import expert_parallel_layout_map, moe_layers, sparsify

STEPS = 4
# Capacity mode, cf 2: each device's 8 tokens fit their experts' C = 8 rows, so
# nothing drops and the losses equal one device's. The expert-parallel path moves
# the routed tokens with all-to-alls (dl_moe.expert_parallel).
OVERRIDES = dict(drop_tokens=True, train_capacity_factor=2.0)


def build(expert_parallel):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=2, hidden_dim=16,
        intermediate_dim=32, num_experts=8, top_k=2, sliding_window=8,
    )
    model = sparsify(keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None),
                     expert_parallel=expert_parallel, **OVERRIDES)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def train(model, weights_path):
    model.load_weights(weights_path)
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(1, 64, size=(8, 8)).astype("int32"), "padding_mask": np.ones((8, 8), bool)}
    y = np.roll(x["token_ids"], -1, axis=1)
    # train_on_batch returns [loss, accuracy] (CausalLM.compile adds an accuracy metric).
    return [float(np.ravel(model.train_on_batch(x, y))[0]) for _ in range(STEPS)]


def lowered_forward(model):
    """The StableHLO text of the model's training forward (lowered, not compiled)."""
    import jax

    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(1, 64, size=(8, 8)).astype("int32"), "padding_mask": np.ones((8, 8), bool)}
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=True)[0])
    return forward.lower(trainable, non_trainable, x).as_text()


def main(work_dir):
    weights_path = os.path.join(work_dir, "init.weights.h5")
    single = build(expert_parallel=False)
    single.save_weights(weights_path)
    result = {"devices": len(keras.distribution.list_devices()), "single": train(single, weights_path)}

    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "expert"), devices=devices)
    layout_map = expert_parallel_layout_map(mesh, expert_axis="expert")
    keras.distribution.set_distribution(keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    parallel = build(expert_parallel=True)
    layer = moe_layers(parallel)[0]
    kernel = layer.experts.gate_kernel
    result["gate_kernel_path"] = kernel.path
    result["gate_kernel_shard_shape"] = list(kernel.value.sharding.shard_shape(kernel.value.shape))
    router = layer.gating_network.router_kernel
    result["router_shard_shape"] = list(router.value.sharding.shard_shape(router.value.shape))
    result["expert_parallel"] = train(parallel, weights_path)
    result["all_to_all_in_forward"] = "all_to_all" in lowered_forward(parallel)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
