"""Expert parallelism on 8 virtual CPU devices with Keras's distribution API (JAX)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from dl_moe.distribution import expert_parallel_layout_map

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="SPMD sharding with keras.distribution is implemented by the JAX backend; runs in the JAX session",
)
def test_expert_parallel_training_matches_single_device(tmp_path):
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        PYTHONPATH=ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "distributed_training.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["up_kernel_shard_shape"] == [2, 16, 32]  # 8 experts over a 4-way axis
    assert result["router_shard_shape"] == [16, 8]  # the router stays replicated
    np.testing.assert_allclose(result["expert_parallel"], result["single"], atol=1e-4)
    np.testing.assert_allclose(result["data_parallel"], result["single"], atol=1e-4)
    assert result["single"][-1] < result["single"][0]
    # expert_parallel constrains the [E, C, d] buffers (E = 8, C = ceil(1.25 * 128 * 2 / 8)
    # = 40, d = 16) to the expert axis; without it the layer adds no constraint.
    on, off = result["constraints"]["on"], result["constraints"]["off"]
    buffers = [line for line in on if "tensor<8x40x16xf32>" in line]
    assert buffers and all('[{"expert"}, {}, {}]' in line for line in buffers), on
    assert off == [], off


def test_layout_map_names_mesh_axes_and_shards_expert_weights():
    mesh = keras.distribution.DeviceMesh((1, 1), axis_names=("data", "experts"), devices=["cpu:0"])
    layout_map = expert_parallel_layout_map(mesh, expert_axis="experts", model_axis="data")
    assert tuple(layout_map["moe/experts/up_kernel"].axes) == ("experts", None, "data")
    assert tuple(layout_map["block/moe/experts/down_kernel"].axes) == ("experts", "data", None)
    assert tuple(layout_map["moe/experts/down_bias"].axes) == ("experts", None)
    assert layout_map["moe/router/router_kernel"] is None
    assert layout_map["moe/shared_experts/up_kernel"] is None
    with pytest.raises(ValueError, match=r"expert_axis='expert' is not an axis of the device mesh"):
        expert_parallel_layout_map(mesh)
