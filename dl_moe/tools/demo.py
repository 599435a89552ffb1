"""The demo job: a small MoE classifier on scikit-learn's digits (no network needed),
trained, evaluated, saved, reloaded and plotted (the task is in `dl_moe.tools.digits`)."""

import os
import time

import keras
import numpy as np
from dl_moe.callbacks import RoutingMonitor
from dl_moe.tools.digits import build_classifier, load_digits_tokens, moe_layers


def format_stats(layer):
    stats = layer.get_routing_stats()
    fractions = " ".join(f"{f:.2f}" for f in stats["expert_fraction"])
    return (
        f"{layer.name}: experts/token {stats['avg_experts_per_token']:.2f}  dropped {stats['dropped_fraction']:.3f}  "
        f"load CV {stats['load_cv']:.3f}  expert fractions [{fractions}]"
    )


def plot_utilization(model, path):
    """Bar chart of each MoE layer's measured expert fractions."""
    from dl_moe.tools.plots import plot_expert_utilization

    return plot_expert_utilization({layer.name: layer.get_expert_utilization() for layer in moe_layers(model)}, path)


def run_demo(epochs=20, output_dir="outputs", seed=0, verbose=1):
    """Trains, evaluates, saves, reloads and compares; returns a summary dict."""
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_digits_tokens(seed)
    model = build_classifier()
    model.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    print(f"Backend: {keras.backend.backend()}  train {len(x_train)}  test {len(x_test)} digits")
    monitor = RoutingMonitor()
    start = time.perf_counter()
    model.fit(
        x_train, y_train, validation_split=0.1, epochs=epochs, batch_size=64, verbose=verbose, callbacks=[monitor]
    )
    train_seconds = time.perf_counter() - start

    for layer in moe_layers(model):
        layer.reset_routing_stats()
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(f"\nTest accuracy: {accuracy:.4f}  (training took {train_seconds:.1f}s)")
    print("Routing statistics on the test set:")
    for layer in moe_layers(model):
        print("  " + format_stats(layer))

    os.makedirs(output_dir, exist_ok=True)
    model_path = os.path.join(output_dir, "demo.keras")
    model.save(model_path)
    restored = keras.models.load_model(model_path)
    original = model.predict(x_test, verbose=0)
    reloaded = restored.predict(x_test, verbose=0)
    max_diff = float(np.max(np.abs(original - reloaded)))
    agree = bool(np.array_equal(original.argmax(-1), reloaded.argmax(-1)) and max_diff < 1e-5)
    print(f"Saved {model_path}; reloaded model agrees: {agree} (max |diff| {max_diff:.2e})")

    plot_path = os.path.join(output_dir, "expert_utilization.png")
    plot_utilization(model, plot_path)
    monitor_plots = monitor.save_plots(output_dir)
    heatmap_path, balance_path = monitor_plots["heatmap"], monitor_plots["load_balance"]
    print(f"Wrote {plot_path}, {heatmap_path} (expert shares per epoch), {balance_path} (load CV per epoch)")
    specialization_path = write_specialization(model, x_test, y_test, os.path.join(output_dir, "specialization.png"))
    return {
        "accuracy": float(accuracy), "reload_agrees": agree, "model_path": model_path, "plot_path": plot_path,
        "heatmap_path": heatmap_path, "load_balance_path": balance_path, "specialization_path": specialization_path,
    }


def write_specialization(model, x, y, path):
    """Digit classes x experts share of assignments per MoE layer (test set), plotted and summarised."""
    from dl_moe.analysis import specialization_report
    from dl_moe.tools.plots import plot_specialization

    reports = specialization_report(model, x, y, num_labels=10)
    for name, report in reports.items():
        print(f"  {name}: mean expert purity {report.mean_purity:.2f}, mean label entropy {report.entropy.mean():.2f}")
    plot_specialization(reports, path)
    print(f"Wrote {path} (digit classes x experts)")
    return path
