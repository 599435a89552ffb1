"""Overflow rerouting against dropping: dropped fraction and training-step cost.

    PYTHONPATH=. KERAS_BACKEND=jax python benchmarks/reroute.py

One FFN MoE layer (E=8, k=2, d=64, h=128, T=2048 tokens) whose router sees inputs with
a shared offset, so the load is uneven the way an untrained or drifting router's is
(the script prints the load CV). For capacity factors 1.0 and 1.25 it reports, with
overflow="drop" and overflow="reroute": the share of assignments dropped and rerouted
(from `get_routing_stats()` after one training call), and the median time of a
compiled forward+backward step (`dl_moe.tools.bench.make_train_step`; the variants'
steps are interleaved, so machine load hits them alike) as a ratio to "drop".
"""

import argparse
import json

import keras
import numpy as np

import dl_moe
from dl_moe.tools.bench import make_train_step, time_steps


def make_layer(overflow, capacity_factor, num_experts, top_k, hidden_dim, intermediate_size, seed):
    keras.utils.set_random_seed(seed)  # same weights for every variant
    layer = dl_moe.create_ffn_moe(
        num_experts, hidden_dim, top_k=top_k, intermediate_size=intermediate_size, ffn_type="swiglu",
        train_capacity_factor=capacity_factor, overflow=overflow,
    )
    return layer


def routing_shares(layer, x):
    layer(x, training=True)  # builds the layer; statistics of this one call
    stats = layer.get_routing_stats()
    return stats["dropped_fraction"], stats.get("rerouted_fraction", 0.0), stats["load_cv"]


def main(tokens=2048, num_experts=8, top_k=2, hidden_dim=64, intermediate_size=128, offset=0.6, repeats=7, seed=0):
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=hidden_dim)
    x = (rng.normal(size=(tokens, hidden_dim)) + offset * direction).astype("float32")
    x = keras.ops.convert_to_tensor(x)
    rows, steps = [], {}
    for capacity_factor in (1.0, 1.25):
        for overflow in ("drop", "reroute"):
            name = f"cf={capacity_factor} {overflow}"
            layer = make_layer(overflow, capacity_factor, num_experts, top_k, hidden_dim, intermediate_size, seed)
            dropped, rerouted, load_cv = routing_shares(layer, x)
            rows.append({"variant": name, "dropped": dropped, "rerouted": rerouted, "load_cv": load_cv})
            steps[name] = make_train_step(layer, x)
    times = time_steps(steps, repeats=repeats)
    print(f"backend {keras.backend.backend()}  T={tokens} E={num_experts} k={top_k} d={hidden_dim} h={intermediate_size}")
    print("variant             dropped  rerouted  load_cv  step_ms  time/drop")
    for row in rows:
        base = times[row["variant"].replace("reroute", "drop")]
        row["step_ms"] = 1e3 * times[row["variant"]]
        row["time_vs_drop"] = times[row["variant"]] / base
        print(f"{row['variant']:<18}  {row['dropped']:.4f}   {row['rerouted']:.4f}   {row['load_cv']:.3f}  "
              f"{row['step_ms']:7.2f}  {row['time_vs_drop']:.2f}")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    args = parser.parse_args()
    result = main(tokens=args.tokens, repeats=args.repeats)
    if args.json:
        print(json.dumps(result))
