"""Matplotlib plots of routing behaviour (written with the non-interactive Agg backend).

* `plot_expert_utilization(fractions, path)`: bar chart of each MoE layer's share of
  assignments per expert (what `dl-moe demo` writes as `expert_utilization.png`).
* `plot_routing_heatmap(expert_fractions, path)`: per layer, experts x epochs heatmap of
  the share of assignments (`RoutingMonitor.expert_fractions`).
* `plot_load_balance(expert_fractions, path)`: per layer, the load coefficient of
  variation (std / mean of the per-expert load; 0 is perfectly balanced) over epochs.
* `plot_accuracy_vs_experts(summary, path)`: the router comparison of `dl-moe compare`.
* `plot_specialization(reports, path)`: per layer, labels x experts share of assignments
  (`dl_moe.analysis.specialization_report`), written by `dl-moe demo`.
* `plot_live_experts(runs, path)`: live experts over training steps of
  `ExpertLifecycle` runs (`dl_moe.lifecycle`, `benchmarks/lifecycle_digits.py`).
* `plot_capacity_trace(runs, path)`: dropped share and training capacity factor per
  epoch (`benchmarks/adaptive_capacity.py`).

Each function takes plain numbers (dicts of lists / numpy arrays), saves a PNG and
returns its path.
"""

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, plt):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def load_cv(fractions):
    """Coefficient of variation std / mean of a per-expert load (any scale); 0 if empty."""
    fractions = np.asarray(fractions, dtype="float64")
    mean = fractions.mean() if fractions.size else 0.0
    return float(fractions.std() / mean) if mean > 0 else 0.0


def plot_expert_utilization(fractions, path):
    """Bar chart per layer of `{layer name: [E] share of assignments}`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3), squeeze=False)
    for axis, (name, values) in zip(axes[0], fractions.items()):
        values = np.asarray(values, dtype="float64")
        axis.bar(np.arange(len(values)), values, color="tab:blue")
        axis.axhline(1.0 / len(values), color="gray", linestyle="--", label="balanced")
        axis.set_title(name)
        axis.set_xlabel("expert")
        axis.set_ylabel("share of assignments")
        axis.legend()
    return _save(fig, path, plt)


def _check_history(expert_fractions):
    if not expert_fractions or not any(len(v) for v in expert_fractions.values()):
        raise ValueError("No routing history to plot: train with a RoutingMonitor for at least one epoch first.")


def plot_routing_heatmap(expert_fractions, path):
    """Heatmap per layer: experts (rows) x epochs (columns), colour = share of assignments.

    Args:
        expert_fractions: `{layer name: [per-epoch [E] share of assignments]}`, e.g.
            `RoutingMonitor.expert_fractions`.
        path: PNG file to write.
    """
    _check_history(expert_fractions)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    layers = list(expert_fractions)
    fig, axes = plt.subplots(
        1, len(layers), figsize=(4.5 * len(layers) + 1, 3.5), squeeze=False, layout="constrained"
    )
    vmax = max(float(np.max(np.stack(v))) for v in expert_fractions.values() if len(v))
    image = None
    for axis, name in zip(axes[0], layers):
        history = np.stack([np.asarray(f, dtype="float64") for f in expert_fractions[name]], axis=1)  # [E, epochs]
        epochs = history.shape[1]
        image = axis.imshow(
            history, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=vmax,
            extent=(0.5, epochs + 0.5, -0.5, history.shape[0] - 0.5), interpolation="nearest",
        )
        axis.set_title(f"{name} (balanced = {1.0 / history.shape[0]:.3f})")
        axis.set_xlabel("epoch")
        axis.set_ylabel("expert")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=list(axes[0]), label="share of assignments")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_load_balance(expert_fractions, path):
    """Load CV (std / mean of the per-expert load) of each layer over epochs."""
    _check_history(expert_fractions)
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axis = plt.subplots(figsize=(5.5, 3.5))
    for name, history in expert_fractions.items():
        values = [load_cv(f) for f in history]
        axis.plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
    axis.axhline(0.0, color="gray", linestyle="--", label="balanced")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("epoch")
    axis.set_ylabel("load CV (std / mean)")
    axis.set_title("Expert load imbalance")
    axis.legend()
    return _save(fig, path, plt)


def plot_accuracy_vs_experts(summary, path, baseline="top2"):
    """Test accuracy (mean ± std over seeds) against expert FLOPs per token.

    Args:
        summary: rows with `router`, `accuracy_mean`, `accuracy_std` and
            `flops_vs_top2` (as `dl_moe.tools.compare.summarize` returns).
        path: PNG file to write.
        baseline: Router drawn with a dashed reference line.
    """
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    markers = "osD^vP*Xh<>p"
    colours = plt.get_cmap("tab10")
    seen = {}
    for index, row in enumerate(summary):
        x = row["flops_vs_top2"]
        # Routers at the same compute are spread a little so their error bars stay apart.
        shift = seen.get(round(x, 2), 0)
        seen[round(x, 2)] = shift + 1
        axis.errorbar(
            x + 0.015 * shift, row["accuracy_mean"], yerr=row["accuracy_std"], fmt=markers[index % len(markers)],
            color=colours(index % 10), capsize=4, markersize=7, label=row["router"],
        )
        if row["router"] == baseline:
            axis.axhline(row["accuracy_mean"], color=colours(index % 10), linestyle="--", linewidth=0.8)
    axis.set_xlabel("expert FLOPs per token relative to top-2")
    axis.set_ylabel("test accuracy (mean ± std over seeds)")
    axis.set_title("Routers on digits: accuracy vs expert compute")
    axis.grid(alpha=0.3)
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lm_curves(runs, path, x="steps", baseline="dense_flop"):
    """Validation bits/byte (mean over seeds, band = ± std) against steps or training FLOPs.

    Two panels: the whole run, and its second half magnified (where the models differ
    by hundredths of a bit and the first panel's scale hides it).

    Args:
        runs: dicts with `variant` and `curve` (`steps`, `train_flops`,
            `val_bits_per_byte` lists), as `dl_moe.tools.compare_lm.run_variant` returns.
        path: PNG file to write.
        x: "steps" or "train_flops" (the x of each seed's curve is averaged too).
        baseline: Variant drawn as a dashed black line.
    """
    if x not in ("steps", "train_flops"):
        raise ValueError(f"x must be 'steps' or 'train_flops', got {x!r}.")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    colours = plt.get_cmap("tab10")
    names = list(dict.fromkeys(run["variant"] for run in runs))
    for index, name in enumerate(names):
        curves = [run["curve"] for run in runs if run["variant"] == name]
        xs = np.mean([c[x] for c in curves], axis=0)
        ys = np.asarray([c["val_bits_per_byte"] for c in curves], dtype="float64")
        mean, std = ys.mean(axis=0), ys.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros(ys.shape[1])
        style = {"color": "black", "linestyle": "--"} if name == baseline else {"color": colours(index % 10)}
        half = len(xs) // 2
        for axis, first in zip(axes, (0, half)):
            axis.plot(xs[first:], mean[first:], marker="o", markersize=3, label=name, **style)
            axis.fill_between(xs[first:], (mean - std)[first:], (mean + std)[first:], alpha=0.12, color=style["color"])
    label = "training steps" if x == "steps" else "training FLOPs (3 x forward matmul FLOPs x tokens)"
    for axis, title in zip(axes, ("whole run", "second half, magnified")):
        axis.set_xlabel(label)
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation bits/byte (mean ± std over seeds)")
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.suptitle("Byte-level LM on the Python stdlib")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_specialization(reports, path):
    """Heatmap per MoE layer: labels (rows) x experts (columns), colour = share of the
    label's assignments that went to the expert; each expert's purity under its column.

    Args:
        reports: `{layer name: dl_moe.analysis.SpecializationReport}`.
        path: PNG file to write.
    """
    if not reports:
        raise ValueError("No specialization report to plot.")
    plt = _pyplot()
    layers = list(reports)
    fig, axes = plt.subplots(
        1, len(layers), figsize=(4.5 * len(layers) + 1, 4.2), squeeze=False, layout="constrained"
    )
    image = None
    for axis, name in zip(axes[0], layers):
        report = reports[name]
        share = np.asarray(report.label_share)  # [L, E]
        num_labels, num_experts = share.shape
        image = axis.imshow(share, aspect="auto", origin="lower", cmap="magma", vmin=0.0, vmax=1.0)
        axis.set_xticks(np.arange(num_experts))
        axis.set_xticklabels([f"{e}\n{p:.2f}" for e, p in enumerate(report.purity)], fontsize=7)
        axis.set_yticks(np.arange(num_labels))
        axis.set_yticklabels(report.label_names or [str(label) for label in range(num_labels)], fontsize=7)
        axis.set_xlabel("expert (purity below)")
        axis.set_ylabel("label")
        axis.set_title(f"{name}: mean purity {report.mean_purity:.2f}")
    fig.colorbar(image, ax=list(axes[0]), label="share of the label's assignments")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_live_experts(runs, path, max_experts=None):
    """Live experts over training steps, one line per run and MoE layer.

    Args:
        runs: `{run label: ExpertLifecycle.history}`, each history a list of
            `{"step": s, "live": {layer name: live experts}}`.
        path: PNG file to write.
        max_experts: Draws the maximum E as a dashed line when given.
    """
    if not runs or not any(len(history) for history in runs.values()):
        raise ValueError("No lifecycle history to plot: train with an ExpertLifecycle callback first.")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axis = plt.subplots(figsize=(6, 3.5))
    for label, history in runs.items():
        steps = [entry["step"] for entry in history]
        for layer in history[0]["live"]:
            axis.step(steps, [entry["live"][layer] for entry in history], where="post", label=f"{label} {layer}")
    if max_experts is not None:
        axis.axhline(max_experts, color="gray", linestyle="--", label="max E")
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("training step")
    axis.set_ylabel("live experts")
    axis.set_title("Experts split / retired by ExpertLifecycle")
    axis.legend(fontsize="small")
    return _save(fig, path, plt)


def plot_capacity_trace(runs, path):
    """Dropped share and training capacity factor per epoch, one line per run.

    Args:
        runs: `{run label: [{"epoch": e, "dropped": share of assignments dropped in
            the epoch, "capacity_factor": training capacity factor (None when the
            run has none: dropless)}]}`.
        path: PNG file to write.
    """
    if not runs or not any(len(trace) for trace in runs.values()):
        raise ValueError("No capacity trace to plot: give at least one run with one epoch.")
    plt = _pyplot()
    fig, (dropped_axis, factor_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    for label, trace in runs.items():
        epochs = [entry["epoch"] for entry in trace]
        dropped_axis.plot(epochs, [entry["dropped"] for entry in trace], marker=".", label=label)
        factors = [entry["capacity_factor"] for entry in trace]
        if all(factor is not None for factor in factors):
            factor_axis.step(epochs, factors, where="mid", label=label)
    dropped_axis.set_xlabel("epoch")
    dropped_axis.set_ylabel("assignments dropped")
    dropped_axis.set_title("Dropped share per epoch")
    dropped_axis.legend(fontsize="small")
    factor_axis.set_xlabel("epoch")
    factor_axis.set_ylabel("training capacity factor")
    factor_axis.set_title("Capacity factor in use")
    factor_axis.legend(fontsize="small")
    return _save(fig, path, plt)
