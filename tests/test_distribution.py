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


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """The JSON of tests/distributed_training.py, run once in a child process."""
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        PYTHONPATH=ROOT,
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    completed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "distributed_training.py"), str(tmp_path_factory.mktemp("ep"))],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="expert parallelism (shard_map + all_to_all over a keras.distribution mesh) is JAX-only; "
    "runs in the JAX session",
)


@jax_only
def test_expert_parallel_losses_equal_single_device(distributed):
    losses = distributed["losses"]
    assert distributed["devices"] == 8
    for mode in ("dropless", "capacity"):  # capacity factor 4: no token drops
        single = np.asarray(losses[f"{mode}/single"])
        assert single[-1] < single[0]
        for mesh in ("1d", "2x4"):
            np.testing.assert_allclose(losses[f"{mode}/{mesh}"], single, rtol=1e-5, err_msg=f"{mode} on {mesh}")
    np.testing.assert_allclose(losses["capacity/data_parallel"], losses["capacity/single"], rtol=1e-5)
    assert distributed["shards"]["up_kernel"] == [2, 16, 32]  # 8 experts over a 4-way axis
    assert distributed["shards"]["router_kernel"] == [16, 8]  # the router stays replicated


@jax_only
def test_compiled_step_moves_only_routed_tokens(distributed):
    compiled = distributed["compiled"]
    eight = compiled["8"]
    # Dispatch and combine: one all-to-all each, forward and backward.
    assert eight["collectives"]["all-to-all"]["count"] == 4
    # Tokens stay sharded: nothing is gathered (the router's scores neither).
    assert eight["collectives"]["all-gather"]["count"] == 0
    assert eight["collectives"]["reduce-scatter"]["count"] == 0
    assert eight["collective_bytes"] <= 1.5 * eight["all_to_all_floor_bytes"]
    # Fixed global batch, 2 → 8 devices: bytes and temporaries fall as 1/P (±20%).
    two = compiled["2"]
    for key in ("collective_bytes", "temp_bytes"):
        assert 0.8 * 4 <= two[key] / eight[key] <= 1.2 * 4, (key, two[key], eight[key])
    # 2 × 4: the all-to-alls run over the expert axis; no token is gathered either.
    assert compiled["2x4"]["all-to-all"]["count"] == 4
    assert compiled["2x4"]["all-gather"]["count"] == 0


@jax_only
def test_sharded_fit_reports_global_routing_and_saves(distributed):
    fit = distributed["fit"]
    np.testing.assert_allclose(fit["1d"]["loss"], fit["single"]["loss"], rtol=1e-5)
    # RoutingMonitor and get_expert_utilization see every device's tokens.
    np.testing.assert_allclose(fit["1d"]["utilization"], fit["single"]["utilization"], atol=1e-7)
    assert fit["1d"]["avg_experts"] == fit["single"]["avg_experts"] == [2.0, 2.0]
    assert fit["1d"]["dropped"] == fit["single"]["dropped"]
    assert fit["reloaded_expert_parallel"]
    assert fit["reloaded_max_abs_diff"] < 1e-6
    assert fit["one_device_max_abs_diff"] < 1e-5


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


def test_expert_parallel_without_a_sharding_distribution_keeps_the_single_program_path():
    """Every backend: no distribution (or another backend) → the plans of one device."""
    from dl_moe.expert_parallel import expert_parallel_applies

    import dl_moe

    x = np.random.default_rng(0).normal(size=(4, 8, 16)).astype("float32")
    outputs = {}
    for flag in (False, True):
        keras.utils.set_random_seed(0)
        layer = dl_moe.create_ffn_moe(8, 16, top_k=2, intermediate_size=32, expert_parallel=flag, name="moe")
        outputs[flag] = keras.ops.convert_to_numpy(layer(x, training=True))
        assert not expert_parallel_applies(layer, True, 32)
    np.testing.assert_allclose(outputs[True], outputs[False], rtol=1e-6, atol=1e-6)
