"""Experts that split as load demands (`ExpertLifecycle`) against a fixed-E model, on digits.

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/lifecycle_digits.py --seeds 3 --epochs 20

Both models are the digits classifier of `dl_moe.tools.digits` with the same expert
width and top_k in dropless mode, so they spend the same expert FLOPs per token:

* "lifecycle": `--max-experts` slots of which `--initial-experts` are live at first
  (`MoEConfig.initial_active_experts`); every `--every` steps `ExpertLifecycle` splits
  an expert whose share of the assignments is above `--split-threshold` and retires
  one below `--retire-threshold`;
* "fixed": `--max-experts` experts, all live from the start.

Prints the test accuracy (mean +- std over the seeds) of both, the live experts at the
end, and writes `live_experts.png` (live experts over steps, one line per seed and
layer) and `lifecycle_digits.json` to `--output-dir`.
"""

import argparse
import json
import os

import keras
import numpy as np

from dl_moe.lifecycle import ExpertLifecycle
from dl_moe.tools.digits import build_classifier, load_digits_tokens, moe_layers
from dl_moe.tools.plots import plot_live_experts


def train(seed, lifecycle, args):
    """Trains one model; returns (test accuracy, final live experts per layer, history)."""
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_digits_tokens(seed)
    overrides = {"drop_tokens": False}
    if lifecycle:
        overrides["initial_active_experts"] = args.initial_experts
    model = build_classifier(
        hidden_dim=args.hidden_dim, num_experts=args.max_experts, top_k=args.top_k, num_blocks=args.blocks, **overrides
    )
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    callbacks = []
    if lifecycle:
        callback = ExpertLifecycle(
            every_n_steps=args.every, split_threshold=args.split_threshold, retire_threshold=args.retire_threshold,
            patience=args.patience, seed=seed, min_active_experts=args.top_k,
        )
        callbacks.append(callback)
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, verbose=0, callbacks=callbacks)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    live = {layer.name: int(layer.get_active_experts().sum()) for layer in moe_layers(model)}
    history = callbacks[0].history if lifecycle else None
    events = callbacks[0].events if lifecycle else None
    return float(accuracy), live, history, events


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-dim", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=1)
    parser.add_argument("--max-experts", type=int, default=8)
    parser.add_argument("--initial-experts", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--every", type=int, default=20, help="steps between lifecycle checks")
    parser.add_argument("--split-threshold", type=float, default=0.2)
    parser.add_argument("--retire-threshold", type=float, default=0.01)
    parser.add_argument("--patience", type=int, default=2, help="checks a split/retire condition must hold")
    parser.add_argument("--output-dir", default="lifecycle_digits")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)

    results = {"lifecycle": [], "fixed": []}
    histories = {}
    for seed in range(args.seeds):
        for name in results:
            accuracy, live, history, events = train(seed, name == "lifecycle", args)
            results[name].append({"seed": seed, "accuracy": accuracy, "live": live, "events": events})
            if history is not None:
                histories[f"seed {seed}"] = history
            print(f"seed {seed} {name:9s} accuracy {accuracy:.4f} live experts {live}", flush=True)

    print(f"\nexpert FLOPs per token equal (top_k={args.top_k}, same expert width, dropless)")
    summary = {}
    for name, runs in results.items():
        accuracies = np.array([run["accuracy"] for run in runs])
        live = [sum(run["live"].values()) / len(run["live"]) for run in runs]
        summary[name] = {"mean": float(accuracies.mean()), "std": float(accuracies.std()), "live": float(np.mean(live))}
        print(
            f"{name:9s} test accuracy {accuracies.mean():.4f} +- {accuracies.std():.4f} "
            f"(n={len(runs)}), live experts per layer at the end {np.mean(live):.1f} / {args.max_experts}"
        )
    plot = plot_live_experts(histories, os.path.join(args.output_dir, "live_experts.png"), args.max_experts)
    with open(os.path.join(args.output_dir, "lifecycle_digits.json"), "w") as f:
        json.dump({"args": vars(args), "summary": summary, "runs": results, "histories": histories}, f, indent=1)
    print(f"wrote {plot}")
    return summary


if __name__ == "__main__":
    main()
