"""Expert parallelism on 8 virtual CPU devices (JAX): losses, compiled collectives, fit.

Run with KERAS_BACKEND=jax and XLA_FLAGS=--xla_force_host_platform_device_count=8
(tests/test_distribution.py does); prints one JSON line with:

* `losses`: per-step losses of 4 `train_on_batch` steps, dropless and capacity mode
  (capacity factor 4: no token drops), on one device, on a 1-D mesh of 8 devices
  ("expert" as batch and expert axis), on a 2 × 4 (batch × expert) mesh, and
  data-parallel;
* `shards`: the expert and router weights' per-device shapes on the 2 × 4 mesh;
* `compiled`: collectives and temporaries of one compiled training step at toy
  widths on 2 and 8 devices (`benchmarks/expert_parallel.py`'s reader);
* `fit`: `RoutingMonitor` statistics of a sharded `fit`, the same on one device,
  and the predictions of the model before and after a `.keras` round trip.
"""

import json
import os
import sys

import keras
import numpy as np

import dl_moe
from dl_moe.callbacks import RoutingMonitor
from dl_moe.distribution import expert_parallel_layout_map

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import expert_parallel as bench  # noqa: E402

STEPS = 4
MESHES = {
    "1d": ((8,), ("expert",), "expert"),
    "2x4": ((2, 4), ("batch", "expert"), "batch"),
}


def set_mesh(name):
    shape, axis_names, batch_axis = MESHES[name]
    mesh = keras.distribution.DeviceMesh(shape, axis_names=axis_names, devices=keras.distribution.list_devices())
    layout_map = expert_parallel_layout_map(mesh, "expert")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)
    )


def build(expert_parallel, drop_tokens):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 16))
    x = dl_moe.create_ffn_moe(
        8, 16, top_k=2, intermediate_size=32, ffn_type="swiglu", expert_parallel=expert_parallel,
        drop_tokens=drop_tokens, train_capacity_factor=4.0, eval_capacity_factor=4.0, name="moe",
    )(inputs)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(x))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    return model


def data():
    rng = np.random.default_rng(1)
    return rng.normal(size=(16, 8, 16)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")


def train(model, weights_path):
    model.load_weights(weights_path)
    x, y = data()
    return [float(model.train_on_batch(x, y)) for _ in range(STEPS)]


def losses(work_dir):
    result = {}
    for drop_tokens in (False, True):
        mode = "capacity" if drop_tokens else "dropless"
        keras.distribution.set_distribution(None)
        weights_path = os.path.join(work_dir, f"{mode}.weights.h5")
        single = build(False, drop_tokens)
        single.save_weights(weights_path)
        result[f"{mode}/single"] = train(single, weights_path)
        for mesh in MESHES:
            set_mesh(mesh)
            result[f"{mode}/{mesh}"] = train(build(True, drop_tokens), weights_path)
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    result["capacity/data_parallel"] = train(build(False, True), os.path.join(work_dir, "capacity.weights.h5"))
    return result


def shards():
    set_mesh("2x4")
    layer = build(True, True).get_layer("moe")
    kernel, router = layer.experts.up_kernel, layer.gating_network.router_kernel
    return {
        "up_kernel": list(kernel.value.sharding.shard_shape(kernel.value.shape)),
        "router_kernel": list(router.value.sharding.shard_shape(router.value.shape)),
    }


def compiled():
    case = bench.Case("test", 8, 2, 64, 128, 16, 64)
    result = {}
    for devices in (2, 8):
        row = bench.measure(case, "1d", devices)
        keys = ("collectives", "collective_bytes", "all_to_all_floor_bytes", "temp_bytes")
        result[str(devices)] = {key: row[key] for key in keys}
    result["2x4"] = bench.measure(case, "2x4", 8)["collectives"]
    return result


def fit(work_dir):
    x, y = data()
    stats = {}
    for name in ("single", "1d"):
        keras.distribution.set_distribution(None)
        if name != "single":
            set_mesh(name)
        model = build(name != "single", True)
        model.load_weights(os.path.join(work_dir, "capacity.weights.h5"))
        monitor = RoutingMonitor()
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[monitor])
        layer = model.get_layer("moe")
        stats[name] = {
            "loss": [float(v) for v in history.history["loss"]],
            "utilization": layer.get_expert_utilization().tolist(),
            "avg_experts": [float(v) for v in history.history["moe_avg_experts"]],
            "dropped": [float(v) for v in history.history["moe_dropped"]],
        }
    path = os.path.join(work_dir, "sharded.keras")
    before = model.predict(x, batch_size=16, verbose=0)
    model.save(path)
    loaded = keras.saving.load_model(path)
    stats["reloaded_max_abs_diff"] = float(np.max(np.abs(loaded.predict(x, batch_size=16, verbose=0) - before)))
    stats["reloaded_expert_parallel"] = bool(loaded.get_layer("moe").config.expert_parallel)
    keras.distribution.set_distribution(None)
    on_one_device = keras.saving.load_model(path)
    one_device = on_one_device.predict(x, batch_size=16, verbose=0)
    stats["one_device_max_abs_diff"] = float(np.max(np.abs(one_device - before)))
    return stats


def main(work_dir):
    result = {"devices": len(keras.distribution.list_devices())}
    result["losses"] = losses(work_dir)
    result["shards"] = shards()
    result["fit"] = fit(work_dir)
    keras.distribution.set_distribution(None)
    result["compiled"] = compiled()
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
