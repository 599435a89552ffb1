import keras
import numpy as np
import pytest

import dl_moe
from dl_moe.callbacks import RoutingMonitor, find_moe_layers

BACKEND = keras.backend.backend()


def _model(num_layers=2, gating_type="linear", **overrides):
    inputs = keras.Input((6, 8))
    x = inputs
    for index in range(num_layers):
        x = dl_moe.create_ffn_moe(
            num_experts=4, hidden_dim=8, top_k=2, gating_type=gating_type, intermediate_size=16,
            name=f"moe_{index}", **overrides,
        )(x)
    outputs = keras.layers.Dense(3)(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=BACKEND != "torch",
    )
    return model


def _data(n=32):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6, 8)).astype("float32"), rng.integers(0, 3, size=(n,))


def test_stats_appear_in_history_for_every_moe_layer():
    model = _model()
    x, y = _data()
    monitor = RoutingMonitor()
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[monitor])
    for name in ("moe_0", "moe_1"):
        for suffix in ("avg_experts", "dropped", "load_cv"):
            values = history.history[f"{name}_{suffix}"]
            assert len(values) == 3 and np.all(np.isfinite(values)), (name, suffix, values)
        # top-2 routes exactly 2 assignments per token (dropped ones included).
        np.testing.assert_allclose(history.history[f"{name}_avg_experts"], 2.0, rtol=1e-6)
        # The last epoch's values are the layer's statistics after fit (reset each epoch).
        stats = model.get_layer(name).get_routing_stats()
        assert history.history[f"{name}_load_cv"][-1] == pytest.approx(stats["load_cv"], rel=1e-6)
        assert history.history[f"{name}_dropped"][-1] == pytest.approx(stats["dropped_fraction"], abs=1e-7)
        np.testing.assert_allclose(monitor.expert_fractions[name][-1], stats["expert_fraction"], rtol=1e-6)
        assert len(monitor.expert_fractions[name]) == 3
        for fractions in monitor.expert_fractions[name]:
            assert fractions.shape == (4,)
            np.testing.assert_allclose(fractions.sum(), 1.0, rtol=1e-6)


def test_per_epoch_values_match_the_layer_and_exclude_validation():
    model = _model(num_layers=1, gating_type="top_p")
    x, y = _data()
    monitor = RoutingMonitor()
    history = model.fit(
        x, y, epochs=2, batch_size=8, verbose=0, callbacks=[monitor], validation_data=(x[:8], y[:8])
    )
    # Tokens seen in the last epoch = training tokens only (32 examples * 6 positions).
    assert monitor.epoch_stats["moe_0"][-1]["tokens"] == 32 * 6
    assert history.history["moe_0_avg_experts"][-1] == pytest.approx(
        monitor.epoch_stats["moe_0"][-1]["avg_experts_per_token"]
    )
    # top-p with 4 experts and threshold 0.4 keeps 1 or 2 experts.
    assert 1.0 <= history.history["moe_0_avg_experts"][-1] <= 2.0


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(dict(logs or {}))


def test_batch_logs_every_n_batches():
    model = _model(num_layers=1)
    x, y = _data()
    recorder = _BatchLogs()
    model.fit(x, y, epochs=1, batch_size=8, verbose=0, callbacks=[RoutingMonitor(update_freq=2), recorder])
    history = model.history.history
    keys = ("moe_0_avg_experts", "moe_0_dropped", "moe_0_load_cv")
    assert "moe_0_avg_experts" not in recorder.seen[0]
    assert all(key in logs for logs in recorder.seen[1:] for key in keys)
    # Read after 2 of 4 batches (stats over those 16 examples); batch 3 repeats them;
    # batch 4 reads again: the stats over the whole epoch, as the epoch logs say.
    assert recorder.seen[1]["moe_0_avg_experts"] == pytest.approx(2.0)
    assert all(recorder.seen[2][key] == recorder.seen[1][key] for key in keys)
    assert recorder.seen[3]["moe_0_load_cv"] != recorder.seen[1]["moe_0_load_cv"]
    assert recorder.seen[3]["moe_0_load_cv"] == pytest.approx(history["moe_0_load_cv"][-1], rel=1e-6)


def test_finds_nested_layers_and_rejects_bad_arguments():
    inner = keras.Sequential([keras.Input((6, 8)), dl_moe.create_ffn_moe(4, 8, intermediate_size=16, name="inner_moe")])
    inputs = keras.Input((6, 8))
    model = keras.Model(inputs, inner(inputs))
    assert [layer.name for layer in find_moe_layers(model)] == ["inner_moe"]
    with pytest.raises(ValueError, match="update_freq"):
        RoutingMonitor(update_freq=0)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="no MixtureOfExperts"):
        plain.fit(np.zeros((4, 3)), np.zeros((4, 1)), verbose=0, callbacks=[RoutingMonitor()])
