"""`dl-moe compare`: the demo's digits classifier trained with different routers.

Every router trains the same model (`dl_moe.tools.digits.build_classifier`: 8 row-tokens per
digit, 2 residual MoE blocks of E = 8 MLP experts of width 64 on d = 32) with the same
optimiser, epochs and seeds (a seed fixes the train/test split and the initialisation,
so router r and the baseline see the same splits; the training set is trimmed to a
multiple of the batch size, 1344 of 1347 digits, the test set is 450 digits evaluated in
batches of 90). Reported per router, over seeds:

* test accuracy mean ± sample std (ddof = 1);
* experts/token: the layers' measured `avg_experts_per_token` on the test set (routed
  assignments per token, averaged over the MoE layers);
* FLOPs vs top-2: expert FFN evaluations per token / 2, measured on the test set, so
  top-2 is 1.0 (up to dropped assignments). Token-choice routers: assignments actually
  computed per token (routed minus dropped). Expert choice: filled expert slots per
  token, E * C / T with C = ceil(T * c / E) (about c = 1). Soft MoE: every expert
  processes `num_slots` slot mixtures per group of S tokens, so E * slots / S
  evaluations per token (here 8 * 1 / 8 = 1); its experts/token column is the layer's
  statistic (combine-weight mass, 1 per token). Router, dispatch/combine and
  capacity padding costs are not counted;
* load CV: coefficient of variation of the per-expert load on the test set (0 is
  perfectly balanced), averaged over layers;
* dropped: share of routed assignments not computed (capacity overflow);
* train time: seconds of `fit` per run, without compilation (each router's model is
  compiled once, by a warm-up step, and re-initialised per seed); noisy on shared
  machines, a benchmark and never an assertion;
* Welch's t-test p-value (`scipy.stats.ttest_ind(equal_var=False)`) and Cohen's d
  (pooled std) of the accuracies against the top-2 baseline. With 2-5 seeds these are
  weak tests: read them as a hint, not as evidence.
"""

import csv
import json
import math
import os
import time

import keras
import numpy as np

BASELINE = "top2"

# Router name -> build_classifier overrides. Names are the CLI's `--routers` values.
ROUTERS = {
    "top1": {"top_k": 1},
    "top2": {"top_k": 2},
    "top_p": {"gating_type": "top_p"},
    "conditional": {"gating_type": "conditional"},
    "expert_choice": {"gating_type": "expert_choice"},
    "soft_moe": {"gating_type": "softmoe"},
    "top_any": {"gating_type": "top_any"},
    "aux_free_top2": {"top_k": 2, "balancing": "aux_free"},
}

DESCRIPTIONS = {
    "top1": "linear router, top-1 (Switch)",
    "top2": "linear router, top-2 (baseline)",
    "top_p": "top-p nucleus, threshold 0.4",
    "conditional": "difficulty head picks k in [1, 4]",
    "expert_choice": "each expert picks C = ceil(T / E) tokens",
    "soft_moe": "Soft MoE, 1 slot per expert",
    "top_any": "per-expert thresholds (DynMoE)",
    "aux_free_top2": "top-2, aux-loss-free bias balancing",
}

QUICK = {"epochs": 10, "seeds": 3}
DEFAULT = {"epochs": 20, "seeds": 5}


# ----------------------------------------------------------------------------
# Statistics (plain functions of numbers, tested on fixed inputs).
# ----------------------------------------------------------------------------


def mean_std(values):
    """(mean, sample standard deviation with ddof=1); the std of one value is 0."""
    values = np.asarray(values, dtype="float64")
    if values.size == 0:
        raise ValueError("mean_std needs at least one value.")
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), std


def welch_t_test(treatment, baseline):
    """Welch's unequal-variance t-test of two samples.

    Returns:
        `(t, p)`: t statistic of mean(treatment) - mean(baseline) and the two-sided
        p-value (`scipy.stats.ttest_ind(equal_var=False)`). NaN when a sample has fewer
        than two values or both have zero variance (the test is undefined); p = 1.0
        when the samples are identical constants.
    """
    from scipy import stats

    a = np.asarray(treatment, dtype="float64")
    b = np.asarray(baseline, dtype="float64")
    if a.size < 2 or b.size < 2:
        return math.nan, math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return (0.0, 1.0) if a.mean() == b.mean() else (math.nan, math.nan)
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def cohens_d(treatment, baseline):
    """Cohen's d = (mean(treatment) - mean(baseline)) / pooled sample std.

    pooled = sqrt(((n1 - 1) s1^2 + (n2 - 1) s2^2) / (n1 + n2 - 2)). NaN when a sample
    has fewer than two values or the pooled std is 0 with different means; 0 when the
    samples are identical constants.
    """
    a = np.asarray(treatment, dtype="float64")
    b = np.asarray(baseline, dtype="float64")
    if a.size < 2 or b.size < 2:
        return math.nan
    pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
    diff = float(a.mean() - b.mean())
    if pooled == 0:
        return 0.0 if diff == 0 else math.nan
    return diff / pooled


def flops_ratio(expert_evaluations_per_token, baseline_k=2):
    """Expert FLOPs per token relative to a top-`baseline_k` layer of the same experts.

    Every expert evaluation of a token costs the same (same expert FFN), so the ratio is
    evaluations per token / baseline_k.
    """
    if baseline_k <= 0:
        raise ValueError(f"baseline_k must be > 0, got {baseline_k!r}.")
    return float(expert_evaluations_per_token) / baseline_k


def expert_evaluations_per_token(stats, gating_type, num_experts=None, num_slots=None, sequence_length=None):
    """Expert FFN evaluations per token of one layer from its routing statistics.

    Args:
        stats: `MixtureOfExperts.get_routing_stats()` (test-set values).
        gating_type: The layer's router type.
        num_experts, num_slots, sequence_length: Soft MoE only (E, slots per expert, S).

    Returns:
        Soft MoE: E * num_slots / S. Others: `avg_experts_per_token * (1 -
        dropped_fraction)`, the assignments actually computed (for expert choice the
        filled expert slots) per token.
    """
    if gating_type == "softmoe":
        return num_experts * num_slots / sequence_length
    return stats["avg_experts_per_token"] * (1.0 - stats["dropped_fraction"])


# ----------------------------------------------------------------------------
# Training runs.
# ----------------------------------------------------------------------------


def parse_routers(text):
    """Comma-separated router names -> list (order kept, duplicates removed).

    Raises:
        ValueError: Empty list or an unknown name (the message lists the valid ones).
    """
    names = [] if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--routers needs at least one router name; choose from {', '.join(ROUTERS)}")
    unknown = [n for n in names if n not in ROUTERS]
    if unknown:
        raise ValueError(f"unknown router {unknown[0]!r}; choose from {', '.join(ROUTERS)}")
    return list(dict.fromkeys(names))


def _trim(x, y, batch_size):
    """Drops the last `len(x) % batch_size` examples so that every batch has one shape
    (a partial last batch would make JAX and TensorFlow compile a second step)."""
    keep = len(x) - len(x) % batch_size if len(x) >= batch_size else len(x)
    return x[:keep], y[:keep]


def _measure(model, x_test, y_test, batch_size):
    """Test accuracy and per-layer routing measurements of a trained model."""
    from dl_moe.tools.digits import moe_layers

    layers = moe_layers(model)
    for layer in layers:
        layer.reset_routing_stats()
    _, accuracy = model.evaluate(x_test, y_test, batch_size=batch_size, verbose=0)
    per_layer = []
    for layer in layers:
        stats = layer.get_routing_stats()
        evaluations = expert_evaluations_per_token(
            stats, layer.config.gating_config.gating_type, num_experts=layer.config.num_experts,
            num_slots=getattr(layer.gating_network, "num_slots", None), sequence_length=x_test.shape[1],
        )
        per_layer.append((stats, evaluations))
    mean = lambda values: float(np.mean(values))  # noqa: E731
    return {
        "accuracy": float(accuracy),
        "avg_experts": mean([s["avg_experts_per_token"] for s, _ in per_layer]),
        "expert_evaluations": mean([e for _, e in per_layer]),
        "load_cv": mean([s["load_cv"] for s, _ in per_layer]),
        "dropped": mean([s["dropped_fraction"] for s, _ in per_layer]),
    }


def run_router(router, seeds, epochs, batch_size=64, test_batch_size=90, learning_rate=3e-3, on_run=None):
    """Trains and evaluates `router` once per seed; returns one dict per run.

    The model is built and compiled once (a warm-up step compiles the train and test
    functions, timed as `compile_seconds`); each seed then gets freshly initialised
    weights (a new `build_classifier` under `keras.utils.set_random_seed(seed)`), a
    fresh optimizer state and its own train/test split, so `train_seconds` is training
    only. `on_run(run)` is called after each run.
    """
    from dl_moe.tools.digits import build_classifier, load_digits_tokens

    keras.utils.set_random_seed(seeds[0])
    model = build_classifier(**ROUTERS[router])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.optimizer.build(model.trainable_variables)
    optimizer_start = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]

    x_train, x_test, y_train, y_test = load_digits_tokens(seeds[0])
    start = time.perf_counter()
    model.fit(x_train[:batch_size], y_train[:batch_size], batch_size=batch_size, epochs=1, verbose=0)
    model.evaluate(x_test[:test_batch_size], y_test[:test_batch_size], batch_size=test_batch_size, verbose=0)
    compile_seconds = time.perf_counter() - start

    runs = []
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        model.set_weights(build_classifier(**ROUTERS[router]).get_weights())
        for variable, value in zip(model.optimizer.variables, optimizer_start):
            variable.assign(value)
        x_train, x_test, y_train, y_test = load_digits_tokens(seed)
        x_train, y_train = _trim(x_train, y_train, batch_size)
        start = time.perf_counter()
        model.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, shuffle=True, verbose=0)
        train_seconds = time.perf_counter() - start
        run = {"router": router, "seed": seed, **_measure(model, x_test, y_test, test_batch_size)}
        run.update(train_seconds=train_seconds, compile_seconds=compile_seconds)
        runs.append(run)
        if on_run is not None:
            on_run(run)
    return runs


def versus_baseline(values, baseline_values):
    """`(Welch's p, Cohen's d)` of `values` against `baseline_values`; NaNs when the
    baseline has no runs."""
    if not baseline_values:
        return math.nan, math.nan
    return welch_t_test(values, baseline_values)[1], cohens_d(values, baseline_values)


def summarize(runs, baseline=BASELINE):
    """Per-router summary rows (router order as first seen) with statistics vs `baseline`."""
    routers = list(dict.fromkeys(r["router"] for r in runs))
    base = [r["accuracy"] for r in runs if r["router"] == baseline]
    rows = []
    for router in routers:
        mine = [r for r in runs if r["router"] == router]
        accuracies = [r["accuracy"] for r in mine]
        acc_mean, acc_std = mean_std(accuracies)
        evaluations = float(np.mean([r["expert_evaluations"] for r in mine]))
        p_value, d = (math.nan, math.nan) if router == baseline else versus_baseline(accuracies, base)
        rows.append({
            "router": router,
            "seeds": len(mine),
            "accuracy_mean": acc_mean,
            "accuracy_std": acc_std,
            "avg_experts": float(np.mean([r["avg_experts"] for r in mine])),
            "flops_vs_top2": flops_ratio(evaluations),
            "load_cv": float(np.mean([r["load_cv"] for r in mine])),
            "dropped": float(np.mean([r["dropped"] for r in mine])),
            "train_seconds": float(np.mean([r["train_seconds"] for r in mine])),
            "compile_seconds": mine[0]["compile_seconds"],
            "p_value": p_value,
            "cohens_d": d,
        })
    return rows


def _number(value, spec):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows, baseline=BASELINE):
    """The summary as a Markdown table."""
    header = (
        "| router | accuracy (mean ± std) | experts/token | FLOPs vs top-2 | load CV | dropped "
        f"| train s | p vs {baseline} | d vs {baseline} |"
    )
    lines = [header, "|" + "---|" * 9]
    for row in rows:
        lines.append(
            f"| {row['router']} | {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} | {row['avg_experts']:.2f} "
            f"| {row['flops_vs_top2']:.2f} | {row['load_cv']:.3f} | {row['dropped']:.3f} "
            f"| {row['train_seconds']:.1f} | {_number(row['p_value'], '.3f')} | {_number(row['cohens_d'], '+.2f')} |"
        )
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(runs, rows, output_dir, settings):
    """Writes compare.csv (summary), compare_runs.csv, compare.json and accuracy_vs_experts.png."""
    from dl_moe.tools.plots import plot_accuracy_vs_experts

    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "summary_csv": os.path.join(output_dir, "compare.csv"),
        "runs_csv": os.path.join(output_dir, "compare_runs.csv"),
        "json": os.path.join(output_dir, "compare.json"),
        "plot": os.path.join(output_dir, "accuracy_vs_experts.png"),
    }
    for path, table in ((paths["summary_csv"], rows), (paths["runs_csv"], runs)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_json_safe({"settings": settings, "summary": rows, "runs": runs}), f, indent=2)
    plot_accuracy_vs_experts(rows, paths["plot"])
    return paths


def run_compare(routers=None, seeds=None, epochs=None, output_dir="outputs", quick=False, first_seed=0):
    """Trains every (router, seed), prints the table, writes the files; returns the summary rows."""
    preset = QUICK if quick else DEFAULT
    routers = list(ROUTERS) if routers is None else list(routers)
    epochs = preset["epochs"] if epochs is None else epochs
    seeds = preset["seeds"] if seeds is None else seeds
    seed_list = list(range(first_seed, first_seed + seeds))
    os.makedirs(output_dir, exist_ok=True)  # fail before training, not after
    settings = {
        "backend": keras.backend.backend(), "routers": routers, "seeds": seed_list, "epochs": epochs,
        "baseline": BASELINE, "model": "demo.build_classifier: d=32, E=8 MLP experts (h=64), 2 MoE blocks",
    }
    print(
        f"Backend: {settings['backend']}  routers: {', '.join(routers)}  seeds: {seeds}  epochs: {epochs}"
        f"  ({len(routers) * seeds} runs)"
    )
    progress = keras.utils.Progbar(len(routers) * seeds, stateful_metrics=["accuracy"], unit_name="run")
    runs = []
    start = time.perf_counter()
    for router in routers:
        runs += run_router(
            router, seed_list, epochs,
            on_run=lambda run: progress.add(1, values=[("accuracy", run["accuracy"])]),
        )
    settings["wall_seconds"] = time.perf_counter() - start
    rows = summarize(runs)
    print()
    print(format_table(rows))
    print(
        "experts/token: measured on the test set; FLOPs vs top-2: expert evaluations per token / 2 "
        "(soft MoE: E*slots/S; expert choice: filled slots per token)."
    )
    if BASELINE not in routers:
        print(f"(p and d need the {BASELINE} baseline among --routers.)")
    paths = write_outputs(runs, rows, output_dir, settings)
    print(f"Wrote {paths['summary_csv']}, {paths['runs_csv']}, {paths['json']}, {paths['plot']}")
    print(f"Total {settings['wall_seconds']:.0f}s")
    return rows
