"""Keras callbacks that surface the routing statistics of `MixtureOfExperts` layers."""

import os

import keras
import numpy as np

from dl_moe.layer import MixtureOfExperts

# Log name suffix -> key of `MixtureOfExperts.get_routing_stats()`.
LOGGED_STATS = {
    "avg_experts": "avg_experts_per_token",
    "dropped": "dropped_fraction",
    "load_cv": "load_cv",
}


def find_moe_layers(model):
    """Every `MixtureOfExperts` inside `model` (nested models and layers included)."""
    found, seen, stack = [], set(), [model]
    while stack:
        layer = stack.pop(0)
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, MixtureOfExperts):
            found.append(layer)
            continue
        children = layer._flatten_layers(include_self=False, recursive=False) if hasattr(
            layer, "_flatten_layers"
        ) else getattr(layer, "layers", [])
        stack.extend(children)
    return found


class RoutingMonitor(keras.callbacks.Callback):
    """Adds each MoE layer's routing statistics to the `fit` logs.

    For every `MixtureOfExperts` layer `<name>` of the model, the logs get
    `<name>_avg_experts` (average experts per token), `<name>_dropped` (share of routed
    assignments dropped by capacity) and `<name>_load_cv` (coefficient of variation of
    the per-expert load; 0 is perfectly balanced). They appear in the epoch logs (so in
    `History` and any later callback) and in the batch logs (so in the progress bar).

    The statistics live in the layers' non-trainable variables, updated inside `call`;
    this callback only reads them, on every backend (under JAX it first syncs the
    trainer's state into the variables with `model.jax_state_sync()`). By default
    (`update_freq="epoch"`) it reads once per epoch, when the trainer syncs anyway, and
    does not hook the batch end at all, so training keeps Keras's asynchronous batch
    dispatch and pays nothing per batch. `update_freq=N` also reads every N batches
    into the batch logs (the batches in between repeat the last values); that costs a
    few small device-to-host copies per read (under JAX also a state sync) and turns
    off asynchronous batch dispatch.

    With `reset_each_epoch=True` (default) the layers' statistics are reset at the
    start of every epoch, so each epoch's values describe that epoch's training
    batches only (validation calls made by `fit` are excluded: the values are taken
    when validation starts). This also resets what `layer.get_routing_stats()` returns.

    Attributes:
        expert_fractions: `{layer name: [per-epoch numpy [E] share of assignments]}`.
        epoch_stats: `{layer name: [per-epoch dict of get_routing_stats()]}`.

    After training, `plot_heatmap(path)` and `plot_load_balance(path)` draw that history
    with matplotlib (`save_plots(output_dir)` writes both), see `dl_moe.tools.plots`.

    Args:
        layers: The MoE layers to watch (None: every `MixtureOfExperts` in the model).
        update_freq: "epoch", or a positive int N to also read every N batches.
        reset_each_epoch: Reset the layers' statistics when an epoch begins.

    Example:
        ```python
        import numpy as np
        import keras
        import dl_moe

        moe = dl_moe.create_ffn_moe(num_experts=4, hidden_dim=8, name="moe")
        model = keras.Sequential([keras.Input((6, 8)), moe, keras.layers.Flatten(), keras.layers.Dense(2)])
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(np.random.rand(32, 6, 8), np.random.randint(0, 2, 32), epochs=2,
                            verbose=0, callbacks=[dl_moe.RoutingMonitor()])
        print(history.history["moe_avg_experts"], history.history["moe_load_cv"])
        ```
    """

    def __init__(self, layers=None, update_freq="epoch", reset_each_epoch=True):
        super().__init__()
        if update_freq != "epoch" and (
            isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1
        ):
            raise ValueError(f"update_freq must be 'epoch' or a positive integer, got {update_freq!r}.")
        self.layers = layers
        self.update_freq = update_freq
        self.reset_each_epoch = reset_each_epoch
        self.expert_fractions = {}
        self.epoch_stats = {}
        self._watched = []
        self._last_logs = {}
        self._snapshot = None
        self._in_fit = False
        if update_freq != "epoch":
            # Only then hook the batch end: a callback overriding `on_train_batch_end`
            # turns off Keras's asynchronous batch dispatch (every step would wait for
            # its logs), which costs more than reading the statistics.
            self.on_train_batch_end = self._on_train_batch_end

    # --------------------------------------------------------------- helpers

    def _sync(self):
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()

    def _read(self):
        """`{layer name: get_routing_stats()}` of the watched layers."""
        self._sync()
        return {layer.name: layer.get_routing_stats() for layer in self._watched}

    @staticmethod
    def _to_logs(stats):
        logs = {}
        for name, layer_stats in stats.items():
            for suffix, key in LOGGED_STATS.items():
                logs[f"{name}_{suffix}"] = float(layer_stats[key])
        return logs

    # ------------------------------------------------------------- callbacks

    def on_train_begin(self, logs=None):
        self._watched = list(self.layers) if self.layers is not None else find_moe_layers(self.model)
        if not self._watched:
            raise ValueError("RoutingMonitor found no MixtureOfExperts layer in the model.")
        for layer in self._watched:
            self.expert_fractions.setdefault(layer.name, [])
            self.epoch_stats.setdefault(layer.name, [])
        self._in_fit = True
        self._last_logs = {}

    def on_train_end(self, logs=None):
        self._in_fit = False

    def on_epoch_begin(self, epoch, logs=None):
        self._snapshot = None
        if self.reset_each_epoch:
            self._sync()
            for layer in self._watched:
                layer.reset_routing_stats()

    def _on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % self.update_freq == 0:
            self._last_logs = self._to_logs(self._read())
        if logs is not None and self._last_logs:
            logs.update(self._last_logs)

    def on_test_begin(self, logs=None):
        # Validation inside fit also runs the layers: keep the training values.
        if self._in_fit and self._snapshot is None:
            self._snapshot = self._read()

    def on_epoch_end(self, epoch, logs=None):
        stats = self._snapshot if self._snapshot is not None else self._read()
        self._snapshot = None
        for name, layer_stats in stats.items():
            self.expert_fractions[name].append(np.asarray(layer_stats["expert_fraction"]).copy())
            self.epoch_stats[name].append(layer_stats)
        self._last_logs = self._to_logs(stats)
        if logs is not None:
            logs.update(self._last_logs)

    # ----------------------------------------------------------------- plots

    def plot_heatmap(self, path):
        """Writes a PNG heatmap per layer: experts x epochs, colour = share of assignments."""
        from dl_moe.tools.plots import plot_routing_heatmap

        return plot_routing_heatmap(self.expert_fractions, path)

    def plot_load_balance(self, path):
        """Writes a PNG of each layer's load CV (std / mean of the per-expert load) per epoch."""
        from dl_moe.tools.plots import plot_load_balance

        return plot_load_balance(self.expert_fractions, path)

    def save_plots(self, output_dir):
        """Writes `routing_heatmap.png` and `load_balance.png` to `output_dir`; returns their paths."""
        os.makedirs(output_dir, exist_ok=True)
        return {
            "heatmap": self.plot_heatmap(os.path.join(output_dir, "routing_heatmap.png")),
            "load_balance": self.plot_load_balance(os.path.join(output_dir, "load_balance.png")),
        }
