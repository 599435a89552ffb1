"""Capacity that follows the load (`adaptive_capacity`) against fixed capacity factors and dropless, on digits.

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/adaptive_capacity.py --epochs 20

Every variant is the digits classifier of `dl_moe.tools.digits` (one MoE block, E=8,
k=2, d=64, MLP experts of width 128), trained from the same seed on the
same batches:

* "cf=1.0", "cf=1.25", "cf=2.0": capacity mode, fixed `train_capacity_factor`;
* "adaptive 1-2", "adaptive 1-4": `adaptive_capacity=True` with
  `min_capacity_factor=1.0` and `max_capacity_factor` 2.0 or 4.0;
* "dropless": `drop_tokens=False`.

The variants train one epoch each in turn (round-robin), so machine load hits them
alike. Per epoch it records the share of routed assignments dropped (the layer's
routing counters, reset every epoch), the capacity factor in use at the epoch's end
(for "adaptive", the class factor its `capacity_load_factor` picks) and the epoch's
wall time. It prints, per variant: the dropped share over all epochs and over the
last half, the test accuracy, and the median epoch time (epochs after the first,
which compiles) as a ratio to "cf=1.0". It writes `capacity_trace.png` and
`adaptive_capacity.json` to `--output-dir`. `--aux-loss-weight` (0.01, the layer's
default) sets how hard the router is pushed to balance.
"""

import argparse
import json
import os
import time

import keras
import numpy as np

from dl_moe import capacity_classes
from dl_moe.tools.digits import build_classifier, load_digits_tokens, moe_layers
from dl_moe.tools.plots import plot_capacity_trace

VARIANTS = {
    "cf=1.0": {"train_capacity_factor": 1.0},
    "cf=1.25": {"train_capacity_factor": 1.25},
    "cf=2.0": {"train_capacity_factor": 2.0},
    "adaptive 1-2": {"adaptive_capacity": True, "min_capacity_factor": 1.0, "max_capacity_factor": 2.0},
    "adaptive 1-4": {"adaptive_capacity": True, "min_capacity_factor": 1.0, "max_capacity_factor": 4.0},
    "dropless": {"drop_tokens": False},
}


def factor_in_use(layer):
    """The training capacity factor the layer's next call uses (None in dropless mode)."""
    config = layer.config
    if not config.drop_tokens:
        return None
    if not config.adaptive_capacity:
        return config.train_capacity_factor
    factors = capacity_classes.adaptive_factors(config.min_capacity_factor, config.max_capacity_factor)
    load_factor = float(np.clip(layer.get_routing_stats()["capacity_load_factor"], factors[0], factors[-1]))
    return float(factors[int(capacity_classes.class_of_factor(load_factor, factors))])


def build(overrides, args):
    keras.utils.set_random_seed(args.seed)  # the same initial weights for every variant
    model = build_classifier(
        hidden_dim=args.hidden_dim, num_experts=args.experts, top_k=args.top_k, num_blocks=1,
        aux_loss_weight=args.aux_loss_weight, **overrides,
    )
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128, help="images a batch (8 tokens each)")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aux-loss-weight", type=float, default=0.01, help="Switch balancing loss weight")
    parser.add_argument("--output-dir", default="adaptive_capacity")
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)

    x_train, x_test, y_train, y_test = load_digits_tokens(args.seed)
    models = {name: build(overrides, args) for name, overrides in VARIANTS.items()}
    traces = {name: [] for name in models}
    epoch_seconds = {name: [] for name in models}
    for epoch in range(1, args.epochs + 1):
        # The same batch order for every variant in an epoch.
        order = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(x_train))
        for name, model in models.items():
            (layer,) = moe_layers(model)
            layer.reset_routing_stats()
            start = time.perf_counter()
            model.fit(x_train[order], y_train[order], epochs=1, batch_size=args.batch_size, shuffle=False, verbose=0)
            epoch_seconds[name].append(time.perf_counter() - start)
            stats = layer.get_routing_stats()
            traces[name].append(
                {"epoch": epoch, "dropped": stats["dropped_fraction"], "capacity_factor": factor_in_use(layer)}
            )
        print(f"epoch {epoch}: " + "  ".join(
            f"{name} {trace[-1]['dropped']:.3f}" for name, trace in traces.items()), flush=True)

    baseline = float(np.median(epoch_seconds["cf=1.0"][1:]))
    rows = []
    print(f"\nbackend {keras.backend.backend()}, {args.epochs} epochs, {args.batch_size * 8} tokens a batch")
    print("variant        dropped (all)  dropped (2nd half)  final factor  test accuracy  epoch time / cf=1.0")
    for name, model in models.items():
        dropped = np.array([entry["dropped"] for entry in traces[name]])
        _, accuracy = model.evaluate(x_test, y_test, verbose=0)
        row = {
            "variant": name,
            "dropped_mean": float(dropped.mean()),
            "dropped_second_half": float(dropped[len(dropped) // 2:].mean()),
            "final_factor": traces[name][-1]["capacity_factor"],
            "accuracy": float(accuracy),
            "epoch_time_vs_cf1": float(np.median(epoch_seconds[name][1:])) / baseline,
        }
        rows.append(row)
        factor = "-" if row["final_factor"] is None else f"{row['final_factor']:.2f}"
        print(f"{name:<14} {row['dropped_mean']:13.4f}  {row['dropped_second_half']:18.4f}  {factor:>12}  "
              f"{row['accuracy']:13.4f}  {row['epoch_time_vs_cf1']:.2f}")
    plot = plot_capacity_trace(traces, os.path.join(args.output_dir, "capacity_trace.png"))
    with open(os.path.join(args.output_dir, "adaptive_capacity.json"), "w") as f:
        json.dump({"args": vars(args), "backend": keras.backend.backend(), "rows": rows, "traces": traces,
                   "epoch_seconds": epoch_seconds}, f, indent=1)
    print(f"wrote {plot}")
    return rows


if __name__ == "__main__":
    main()
