"""dl_moe.tools.plots and the RoutingMonitor's plots: files are written from fixed inputs."""

import math

import keras
import numpy as np
import pytest

import dl_moe
from dl_moe.tools import plots
from dl_moe.callbacks import RoutingMonitor

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_MAGIC


def test_load_cv_known_values():
    assert plots.load_cv([0.25, 0.25, 0.25, 0.25]) == 0.0
    assert plots.load_cv([0.5, 0.5, 0.0, 0.0]) == pytest.approx(1.0)
    # Everything on one of E experts: the largest CV, sqrt(E - 1); the scale does not matter.
    assert plots.load_cv([1.0, 0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(3.0))
    assert plots.load_cv([40.0, 0.0, 0.0, 0.0]) == pytest.approx(math.sqrt(3.0))
    assert plots.load_cv([0.0, 0.0]) == 0.0


HISTORY = {
    "moe_0": [np.array([0.4, 0.3, 0.2, 0.1]), np.array([0.3, 0.3, 0.2, 0.2]), np.full(4, 0.25)],
    "moe_1": [np.array([0.7, 0.1, 0.1, 0.1]), np.array([0.5, 0.2, 0.2, 0.1]), np.array([0.4, 0.2, 0.2, 0.2])],
}


def test_history_plots_write_pngs(tmp_path):
    assert _is_png(plots.plot_routing_heatmap(HISTORY, str(tmp_path / "heatmap.png")))
    assert _is_png(plots.plot_load_balance(HISTORY, str(tmp_path / "balance.png")))
    assert _is_png(plots.plot_expert_utilization({k: v[-1] for k, v in HISTORY.items()}, str(tmp_path / "util.png")))
    with pytest.raises(ValueError, match="No routing history"):
        plots.plot_routing_heatmap({"moe_0": []}, str(tmp_path / "empty.png"))


def test_accuracy_vs_experts_plot(tmp_path):
    rows = [
        {"router": "top2", "accuracy_mean": 0.95, "accuracy_std": 0.01, "flops_vs_top2": 1.0},
        {"router": "top1", "accuracy_mean": 0.93, "accuracy_std": 0.0, "flops_vs_top2": 0.5},
    ]
    assert _is_png(plots.plot_accuracy_vs_experts(rows, str(tmp_path / "acc.png")))


def test_monitor_records_one_entry_per_epoch_and_saves_plots(tmp_path):
    inputs = keras.Input((6, 8))
    x = dl_moe.create_ffn_moe(4, 8, top_k=2, intermediate_size=16, name="moe_a")(inputs)
    x = dl_moe.create_ffn_moe(4, 8, top_k=1, intermediate_size=16, name="moe_b")(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x_data, y_data = rng.normal(size=(40, 6, 8)).astype("float32"), rng.integers(0, 3, size=(40,))
    monitor = RoutingMonitor()
    # Validation runs the layers too; still exactly one entry per epoch.
    model.fit(x_data, y_data, epochs=2, batch_size=8, validation_split=0.2, verbose=0, callbacks=[monitor])
    assert sorted(monitor.expert_fractions) == ["moe_a", "moe_b"]
    for history in monitor.expert_fractions.values():
        assert len(history) == 2
        for fractions in history:
            assert fractions.shape == (4,) and fractions.sum() == pytest.approx(1.0)
    paths = monitor.save_plots(str(tmp_path / "plots"))
    assert paths["heatmap"].endswith("routing_heatmap.png") and _is_png(paths["heatmap"])
    assert paths["load_balance"].endswith("load_balance.png") and _is_png(paths["load_balance"])


def test_capacity_trace_plot(tmp_path):
    runs = {
        "cf=1.0": [{"epoch": 1, "dropped": 0.2, "capacity_factor": 1.0}, {"epoch": 2, "dropped": 0.1, "capacity_factor": 1.0}],
        "dropless": [{"epoch": 1, "dropped": 0.0, "capacity_factor": None}],
    }
    assert _is_png(plots.plot_capacity_trace(runs, str(tmp_path / "capacity.png")))
    with pytest.raises(ValueError, match="No capacity trace"):
        plots.plot_capacity_trace({"cf=1.0": []}, str(tmp_path / "empty.png"))
