"""`dl-moe compare --task lm`: dense vs MoE byte-level language models at matched budgets.

Every model is the transformer of `dl_moe.tools.lm_model.build_lm` trained for the same
number of steps on the same batches (`lm_data.training_order(seed)`: for a given seed,
every model reads the same bytes in the same order; the seed also fixes the
initialisation). Models (`VARIANTS`, names are the `--routers` values):

* `dense_flop`: dense FFN of width k * h, the same FFN FLOPs per token as top-2 MoE;
* `dense_param`: dense FFN with as many FFN weights as the MoE (E experts + router);
* MoE, E experts of width h: `top1` (Switch), `top2`, `top_p`, `aux_free_top2`, and
  top-2 at training capacity factor 1.0 (`top2_cf1.0`), 1.25 (`top2`, the library
  default) and dropless (`top2_dropless`), and the sigmoid router of DeepSeek-V3 at
  top-2 (`sigmoid`).

Only causal routers qualify: a language model must not let a token's output depend
on later tokens (`EXCLUDED` says why expert choice and Soft MoE are left out).

Reported per model, over seeds (mean ± sample std):

* validation bits/byte (the cross-entropy in nats / ln 2 on fixed validation windows,
  after the last step) and the same on the test split;
* training tokens/s (wall time of `fit`, compilation excluded; a benchmark on a shared
  machine, never an assertion);
* active forward FLOPs per token: `lm_model.forward_flops_per_token` with each MoE
  layer's FFN cost = (expert evaluations actually computed per token, read from the
  layer's routing counters on the validation windows) * the MLP's FLOPs, plus the
  router; capacity padding rows are not counted;
* experts/token: routed assignments per token on the validation windows (counters);
* load CV and dropped fraction (training and validation);
* Welch's t-test p-value and Cohen's d of the validation bits/byte against `dense_flop`.

Training FLOPs (the x axis of the second plot) are 3 x forward FLOPs per token (the
usual backward = 2 x forward estimate) x tokens seen, with the MoE cost read from the
training steps' own counters.
"""

import csv
import json
import math
import os
import time

import keras
import numpy as np

from dl_moe.tools.compare import mean_std, versus_baseline
from dl_moe.tools.lm_data import LMWindows, evaluation_order, load_stdlib_corpus, training_order
from dl_moe.tools.lm_model import (
    build_lm, forward_flops_per_token, mlp_flops, moe_layers, parameter_count, parameter_matched_width,
)

BASELINE = "dense_flop"

# name -> how the FFN is built. "dense" entries name their width rule; "moe" entries
# hold `create_ffn_moe` overrides. To compare another causal router, add an entry
# here (and to DESCRIPTIONS); nothing else needs to change.
VARIANTS = {
    "dense_flop": {"ffn": "dense", "width": "flop_matched"},
    "dense_param": {"ffn": "dense", "width": "param_matched"},
    "top1": {"ffn": "moe", "top_k": 1},
    "top2": {"ffn": "moe", "top_k": 2},
    "top_p": {"ffn": "moe", "gating_type": "top_p"},
    "aux_free_top2": {"ffn": "moe", "top_k": 2, "balancing": "aux_free"},
    "top2_cf1.0": {"ffn": "moe", "top_k": 2, "train_capacity_factor": 1.0},
    "top2_dropless": {"ffn": "moe", "top_k": 2, "drop_tokens": False},
    "sigmoid": {"ffn": "moe", "gating_type": "sigmoid", "top_k": 2},
}

DESCRIPTIONS = {
    "dense_flop": "dense FFN, width k*h (same active FLOPs as top-2)",
    "dense_param": "dense FFN, as many FFN weights as the MoE",
    "top1": "MoE top-1 (Switch)",
    "top2": "MoE top-2, capacity 1.25 in training",
    "top_p": "MoE top-p, threshold 0.4",
    "aux_free_top2": "MoE top-2, aux-loss-free bias balancing",
    "top2_cf1.0": "MoE top-2, capacity 1.0 in training",
    "top2_dropless": "MoE top-2, dropless",
    "sigmoid": "MoE sigmoid router (DeepSeek-V3), top-2",
}


EXCLUDED = {
    "expert_choice": "each expert picks its top tokens among all tokens of the batch, so whether a "
    "token is computed depends on later tokens",
    "soft_moe": "every slot is a softmax-weighted mix of all tokens of the sequence, so each output "
    "depends on later tokens",
}

CAUSALITY_NOTE = (
    "Capacity-mode MoE (all but top2_dropless) is causal up to drops: a full expert drops the "
    "lowest-priority assignments of the batch, and priority puts every first choice before any "
    "second choice, so a later token can push out an earlier token's second choice. Dropless "
    "routing is strictly causal."
)

# Model and budget. QUICK: <= 5 min on 2 cores for all variants and seeds; FULL: <= 45 min.
FULL = {
    "sequence_length": 128, "width": 128, "num_layers": 2, "num_heads": 4, "expert_width": 256,
    "num_experts": 8, "top_k": 2, "batch_size": 16, "steps": 400, "eval_every": 50, "eval_batches": 8,
    "learning_rate": 2e-3, "warmup_steps": 40, "seeds": 3, "max_files_per_split": None,
    "jit_compile": "auto", "run_eagerly": False,  # model.compile's arguments
}
QUICK = {
    **FULL, "sequence_length": 64, "width": 64, "expert_width": 128, "batch_size": 16, "steps": 200,
    "eval_every": 25, "eval_batches": 8, "learning_rate": 3e-3, "warmup_steps": 20,
}


def parse_variants(text):
    """Comma-separated variant names -> list (order kept, duplicates removed).

    Raises:
        ValueError: Empty list, an excluded (non-causal) router or an unknown name.
    """
    names = [] if text is None else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--routers needs at least one name; choose from {', '.join(VARIANTS)}")
    for name in names:
        if name in EXCLUDED:
            raise ValueError(f"router {name!r} is not causal ({EXCLUDED[name]}); choose from {', '.join(VARIANTS)}")
        if name not in VARIANTS:
            raise ValueError(f"unknown router {name!r} for --task lm; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def build_variant(name, setup):
    """The (uncompiled) model of variant `name` under `setup` (a FULL/QUICK-like dict)."""
    spec = dict(VARIANTS[name])
    ffn = spec.pop("ffn")
    common = {
        "sequence_length": setup["sequence_length"], "width": setup["width"],
        "num_layers": setup["num_layers"], "num_heads": setup["num_heads"],
    }
    if ffn == "dense":
        rule = spec.pop("width")
        if rule == "flop_matched":
            ffn_width = setup["top_k"] * setup["expert_width"]
        else:
            ffn_width = parameter_matched_width(setup["width"], setup["expert_width"], setup["num_experts"])
        return build_lm(ffn="dense", ffn_width=ffn_width, **common)
    spec.setdefault("top_k", setup["top_k"])
    return build_lm(
        ffn="moe", ffn_width=setup["expert_width"], num_experts=setup["num_experts"], **common, **spec
    )


# ----------------------------------------------------------------------------
# Measuring one model.
# ----------------------------------------------------------------------------


def layer_counters(model):
    """Each MoE layer's routing counters since its last reset, as plain numbers.

    Returns:
        A list (depth order) of dicts: `tokens`, `routed` (assignments routed),
        `computed` (assignments computed = routed minus dropped), `load_cv` and
        `expert_fraction` (list `[E]`).
    """
    counters = []
    for layer in moe_layers(model):
        stats = layer.get_routing_stats()
        routed = stats["avg_experts_per_token"] * stats["tokens"]
        counters.append({
            "tokens": float(stats["tokens"]),
            "routed": float(routed),
            "computed": float(routed * (1.0 - stats["dropped_fraction"])),
            "load_cv": float(stats["load_cv"]),
            "expert_fraction": [float(v) for v in stats["expert_fraction"]],
        })
        layer.reset_routing_stats()
    return counters


def ffn_flops_per_layer(name, setup, counters):
    """Per layer, the FFN's forward FLOPs per token (MoE: from the routing counters)."""
    d, h = setup["width"], setup["expert_width"]
    spec = VARIANTS[name]
    if spec["ffn"] == "dense":
        width = setup["top_k"] * h if spec["width"] == "flop_matched" else parameter_matched_width(
            d, h, setup["num_experts"]
        )
        return [mlp_flops(d, width)] * setup["num_layers"]
    return [c["computed"] / c["tokens"] * mlp_flops(d, h) if c["tokens"] else 0.0 for c in counters]


def forward_flops(name, setup, counters):
    """Active forward FLOPs per token of variant `name` (MoE: measured by `counters`)."""
    router = 2 * setup["width"] * setup["num_experts"] if VARIANTS[name]["ffn"] == "moe" else 0.0
    return forward_flops_per_token(
        setup["width"], setup["sequence_length"], setup["num_layers"], ffn_flops_per_layer(name, setup, counters),
        router_flops_per_layer=router,
    )


def _routing_summary(counters):
    """Experts/token, load CV and dropped fraction averaged over the MoE layers."""
    if not counters:
        return {"experts_per_token": math.nan, "load_cv": math.nan, "dropped": math.nan}
    return {
        "experts_per_token": float(np.mean([c["routed"] / c["tokens"] for c in counters])),
        "load_cv": float(np.mean([c["load_cv"] for c in counters])),
        "dropped": float(np.mean([1.0 - c["computed"] / c["routed"] if c["routed"] else 0.0 for c in counters])),
    }


def evaluate_bits_per_byte(model, dataset):
    """Mean next-byte cross-entropy on `dataset` in bits (the MoE adds no loss outside training)."""
    loss = model.evaluate(dataset, verbose=0, return_dict=True)["loss"]
    return float(loss) / math.log(2.0)


# ----------------------------------------------------------------------------
# Training runs.
# ----------------------------------------------------------------------------


def _compile(model, setup):
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=setup["learning_rate"], warmup_steps=setup["warmup_steps"],
        decay_steps=max(1, setup["steps"] - setup["warmup_steps"]), alpha=0.1,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule, global_clipnorm=1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=setup["jit_compile"],
        run_eagerly=setup["run_eagerly"],
    )
    model.optimizer.build(model.trainable_variables)


def make_datasets(splits, setup, seed):
    """(train, validation, test) `LMWindows` for one seed."""
    s, b = setup["sequence_length"], setup["batch_size"]
    train = LMWindows(splits["train"], training_order(splits["train"].size, s, b, setup["steps"], seed), s)
    held_out = [
        LMWindows(splits[name], evaluation_order(splits[name].size, s, b, setup["eval_batches"]), s)
        for name in ("validation", "test")
    ]
    return (train, *held_out)


def run_variant(name, seeds, setup, splits, on_run=None):
    """Trains and measures variant `name` once per seed; returns one dict per run.

    The model is compiled once (a warm-up step and evaluation, timed as
    `compile_seconds`); each seed then starts from the weights of a freshly built model
    under `keras.utils.set_random_seed(seed)` (routing counters and the aux-free bias
    included) and a fresh optimizer state. Every `eval_every` steps the validation
    bits/byte and the counters of the steps just trained are recorded.
    """
    keras.utils.set_random_seed(seeds[0])
    model = build_variant(name, setup)
    _compile(model, setup)
    optimizer_start = [keras.ops.convert_to_numpy(v) for v in model.optimizer.variables]
    train, validation, test = make_datasets(splits, setup, seeds[0])
    start = time.perf_counter()
    model.fit(train.slice(0, 1), epochs=1, verbose=0)
    model.evaluate(validation.slice(0, 1), verbose=0)
    compile_seconds = time.perf_counter() - start
    tokens_per_step = setup["batch_size"] * setup["sequence_length"]

    runs = []
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        model.set_weights(build_variant(name, setup).get_weights())
        # Back to the seed the functions were compiled under: TensorFlow keys its traced
        # functions on the global seed and would retrace them (seconds each) for every
        # seed. Training draws no random numbers, so this changes no result.
        keras.utils.set_random_seed(seeds[0])
        for variable, value in zip(model.optimizer.variables, optimizer_start):
            variable.assign(value)
        train, validation, test = make_datasets(splits, setup, seed)
        curve = {"steps": [], "val_bits_per_byte": [], "train_flops": []}
        train_counters = []
        train_seconds, train_flops, done = 0.0, 0.0, 0
        while done < setup["steps"]:
            chunk = min(setup["eval_every"], setup["steps"] - done)
            begin = time.perf_counter()
            model.fit(train.slice(done, done + chunk), epochs=1, verbose=0)
            train_seconds += time.perf_counter() - begin
            done += chunk
            counters = layer_counters(model)
            train_counters.append(counters)
            train_flops += 3.0 * forward_flops(name, setup, counters) * chunk * tokens_per_step
            curve["steps"].append(done)
            curve["train_flops"].append(train_flops)
            curve["val_bits_per_byte"].append(evaluate_bits_per_byte(model, validation))
            val_counters = layer_counters(model)  # the last one is reported
        test_bpb = evaluate_bits_per_byte(model, test)
        layer_counters(model)
        run = {
            "variant": name, "seed": seed, "val_bits_per_byte": curve["val_bits_per_byte"][-1],
            "test_bits_per_byte": test_bpb, "tokens_per_second": done * tokens_per_step / train_seconds,
            "forward_flops_per_token": forward_flops(name, setup, val_counters),
            **_routing_summary(val_counters),
            "train_dropped": _routing_summary(train_counters[-1])["dropped"],
            "parameters": parameter_count(model), "train_seconds": train_seconds,
            "compile_seconds": compile_seconds, "train_flops": train_flops,
            "curve": curve, "val_counters": val_counters, "train_counters": train_counters,
        }
        runs.append(run)
        if on_run is not None:
            on_run(run)
    return runs


def summarize(runs, baseline=BASELINE):
    """Per-variant rows (order as first seen) with Welch's p and Cohen's d vs `baseline`."""
    names = list(dict.fromkeys(r["variant"] for r in runs))
    base = [r["val_bits_per_byte"] for r in runs if r["variant"] == baseline]
    rows = []
    for name in names:
        mine = [r for r in runs if r["variant"] == name]
        values = [r["val_bits_per_byte"] for r in mine]
        val_mean, val_std = mean_std(values)
        test_mean, test_std = mean_std([r["test_bits_per_byte"] for r in mine])
        p_value, d = (math.nan, math.nan) if name == baseline else versus_baseline(values, base)
        average = lambda key: float(np.mean([r[key] for r in mine]))  # noqa: E731
        rows.append({
            "variant": name, "seeds": len(mine), "parameters": mine[0]["parameters"],
            "val_bpb_mean": val_mean, "val_bpb_std": val_std, "test_bpb_mean": test_mean, "test_bpb_std": test_std,
            "tokens_per_second": average("tokens_per_second"),
            "forward_mflops_per_token": average("forward_flops_per_token") / 1e6,
            "experts_per_token": average("experts_per_token"), "load_cv": average("load_cv"),
            "train_dropped": average("train_dropped"), "val_dropped": average("dropped"),
            "compile_seconds": mine[0]["compile_seconds"], "p_value": p_value, "cohens_d": d,
        })
    return rows


def _number(value, spec):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_table(rows, baseline=BASELINE):
    """The summary as a Markdown table."""
    lines = [
        "| model | params | val bits/byte | test bits/byte | tokens/s | fwd MFLOPs/token | experts/token "
        f"| load CV | dropped (train) | p vs {baseline} | d vs {baseline} |",
        "|" + "---|" * 11,
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['parameters'] / 1e3:.0f}k | {row['val_bpb_mean']:.4f} ± {row['val_bpb_std']:.4f} "
            f"| {row['test_bpb_mean']:.4f} ± {row['test_bpb_std']:.4f} | {row['tokens_per_second']:.0f} "
            f"| {row['forward_mflops_per_token']:.3f} | {_number(row['experts_per_token'], '.2f')} "
            f"| {_number(row['load_cv'], '.3f')} | {_number(row['train_dropped'], '.3f')} "
            f"| {_number(row['p_value'], '.3f')} | {_number(row['cohens_d'], '+.2f')} |"
        )
    return "\n".join(lines)


def _json_safe(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_outputs(runs, rows, output_dir, settings):
    """Writes lm_compare.csv, lm_compare_runs.csv, lm_compare.json and the two plots."""
    from dl_moe.tools.plots import plot_lm_curves

    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "summary_csv": os.path.join(output_dir, "lm_compare.csv"),
        "runs_csv": os.path.join(output_dir, "lm_compare_runs.csv"),
        "json": os.path.join(output_dir, "lm_compare.json"),
        "plot_steps": os.path.join(output_dir, "lm_bpb_vs_steps.png"),
        "plot_flops": os.path.join(output_dir, "lm_bpb_vs_flops.png"),
    }
    flat_runs = [{k: v for k, v in run.items() if k not in ("curve", "val_counters", "train_counters")} for run in runs]
    for path, table in ((paths["summary_csv"], rows), (paths["runs_csv"], flat_runs)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(_json_safe({"settings": settings, "summary": rows, "runs": runs}), f, indent=2)
    plot_lm_curves(runs, paths["plot_steps"], x="steps", baseline=BASELINE)
    plot_lm_curves(runs, paths["plot_flops"], x="train_flops", baseline=BASELINE)
    return paths


def run_lm_compare(
    routers=None, seeds=None, steps=None, batch_size=None, output_dir="outputs", quick=False, first_seed=0, setup=None
):
    """Trains every (variant, seed), prints the table, writes the files.

    Args:
        routers: Variant names (default: all of `VARIANTS`).
        seeds, steps, batch_size: Override the preset's number of seeds, training steps
            and windows per batch.
        quick: Use QUICK instead of FULL.
        setup: Overrides of individual preset fields (e.g. tiny models in tests).

    Returns:
        `(rows, runs)`: the summary rows and the per-run dicts.
    """
    setup = {**(QUICK if quick else FULL), **(setup or {})}
    if steps is not None:
        setup["steps"] = steps
    if seeds is not None:
        setup["seeds"] = seeds
    if batch_size is not None:
        setup["batch_size"] = batch_size
    setup["warmup_steps"] = min(setup["warmup_steps"], max(0, setup["steps"] - 1))
    names = list(VARIANTS) if routers is None else list(routers)
    seed_list = list(range(first_seed, first_seed + setup["seeds"]))
    os.makedirs(output_dir, exist_ok=True)  # fail before training, not after
    splits, corpus = load_stdlib_corpus(max_files_per_split=setup["max_files_per_split"])
    settings = {
        "backend": keras.backend.backend(), "keras": keras.__version__, "variants": names, "seeds": seed_list,
        "baseline": BASELINE, "setup": setup, "corpus": corpus, "excluded": EXCLUDED,
    }
    print(
        f"Corpus: Python {corpus['python_version']} stdlib ({corpus['root']}), without "
        f"{', '.join(corpus['excluded_dirs'])}: "
        + ", ".join(f"{n} {corpus[n]['files']} files / {corpus[n]['bytes'] / 1e6:.2f} MB" for n in ("train", "validation", "test"))
    )
    print(
        f"Model: d={setup['width']}, {setup['num_layers']} layers, context {setup['sequence_length']}, "
        f"E={setup['num_experts']} experts of width {setup['expert_width']}, k={setup['top_k']}; "
        f"{setup['steps']} steps of {setup['batch_size']}x{setup['sequence_length']} bytes"
    )
    print("Not compared (not causal): " + "; ".join(f"{k}: {v}" for k, v in EXCLUDED.items()) + ".")
    print(f"Backend: {settings['backend']}  models: {', '.join(names)}  seeds: {len(seed_list)}"
          f"  ({len(names) * len(seed_list)} runs)")
    progress = keras.utils.Progbar(len(names) * len(seed_list), stateful_metrics=["val_bpb"], unit_name="run")
    runs = []
    start = time.perf_counter()
    for name in names:
        runs += run_variant(
            name, seed_list, setup, splits,
            on_run=lambda run: progress.add(1, values=[("val_bpb", run["val_bits_per_byte"])]),
        )
        # Rewritten after every model, so an interrupted run keeps what it finished.
        settings["wall_seconds"] = time.perf_counter() - start
        paths = write_outputs(runs, summarize(runs), output_dir, settings)
    rows = summarize(runs)
    print()
    print(format_table(rows))
    print(
        "bits/byte after the last step on fixed held-out windows; experts/token, dropped and FLOPs measured "
        "by the routing counters (FLOPs: matmuls, 2 per multiply-add, capacity padding not counted)."
    )
    print(CAUSALITY_NOTE)
    if BASELINE not in names:
        print(f"(p and d need {BASELINE} among --routers.)")
    print("Wrote " + ", ".join(paths.values()))
    print(f"Total {settings['wall_seconds']:.0f}s")
    return rows, runs
