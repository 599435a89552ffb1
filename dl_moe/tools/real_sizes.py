"""One MoE FFN layer at the widths of real models: memory, FLOPs and decode speed.

Four configurations (d, h, E, k), float32, SwiGLU experts, `normalize_top_k=True`,
random weights (no downloads):

    Mixtral-8x7B        4096  14336    8  2
    Qwen1.5-MoE-A2.7B   2048   1408   60  4
    Qwen3-30B-A3B       2048    768  128  8
    GPT-OSS-20B         2880   2880   32  4

Each is compared with the dense-equivalent (a SwiGLU FFN of width k·h: the same
active FLOPs) and keras-hub's all-experts block (every expert on every token).

Studies (`--parts`):

* `xla` (JAX; deterministic, nothing runs): XLA's temporaries and FLOPs of the
  compiled training step (the gradient of the layer, T = 4096) and of inference at
  T = 4096, 1 and 8, from `compiled.memory_analysis()` / `cost_analysis()`. XLA counts
  a while-loop body once whatever its trip count, so the grouped plan's FLOPs are
  also given as the matmul FLOPs of the rows it computes at most (`expert_gflops`).
  The target of a sparse layer: temporaries <= 1.3 x (the dense-equivalent's + the
  dispatched copies 3·T·k·d·4 bytes).
* `tf_xla` (TensorFlow): the same temporaries for `tf.function(jit_compile=True)`,
  training at T = 4096 and inference at T = 1. TensorFlow gives them only in XLA's
  buffer-assignment dump, written when the function first runs, so each layer runs
  one step, in a fresh process (`TF_XLA_CASES`).
* `torch`: peak resident memory of an eager PyTorch training step (T = 2048), one
  fresh process per layer.
* `decode` (every backend): wall time of the forward pass in inference at T = 1, 8
  and 64, interleaved medians, as shares of the dense-equivalent's speed and of the
  touched-experts limit: the larger of the dense-equivalent's time and the time of a
  dense SwiGLU of width h x (experts this batch routes to), which reads each touched
  expert's weights once.
* `keras_hub` (JAX): one keras-hub Qwen3-MoE decoder layer at its real widths (a
  one-layer backbone: hidden 2048, 128 experts of 768, k = 8, 32 query heads of 128,
  4 KV heads, vocabulary 1,000), 8 x 512 tokens: XLA temporaries of a training step,
  stock against `sparsify()` (dropless) and `sparsify(drop_tokens=True)`.

    KERAS_BACKEND=jax python benchmarks/real_sizes.py --parts xla,keras_hub --json out.json
    dl-moe bench --real-sizes --parts decode
"""

import dataclasses
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import keras
import numpy as np

from dl_moe import dispatch as dispatch_lib
from dl_moe.dispatch_plans import GROUPED_DECODE_ASSIGNMENTS
from dl_moe.tools import bench

CONFIGS = {
    "Mixtral-8x7B": (4096, 14336, 8, 2),
    "Qwen1.5-MoE-A2.7B": (2048, 1408, 60, 4),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
    "GPT-OSS-20B": (2880, 2880, 32, 4),
}
CAPACITY_FACTOR = 1.25
LAYER_KINDS = ("dense", "all_experts", "capacity", "dropless")
XLA_CASES = (("train", 4096), ("infer", 4096), ("infer", 1), ("infer", 8))
DECODE_TOKENS = (1, 8, 64)
TF_XLA_CASES = (("train", 4096), ("infer", 1))
TF_XLA_KINDS = ("dense", "capacity", "dropless")
MIB = 2**20


@dataclasses.dataclass
class Widths:
    name: str
    hidden_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int


def widths(name):
    return Widths(name, *CONFIGS[name])


def build_layer(w, kind):
    """The `kind` layer ("dense", "all_experts", "capacity", "dropless") of widths `w`, unbuilt."""
    if kind == "dense":
        return bench.DenseSwiGLU(w.top_k * w.intermediate_size)
    if kind == "all_experts":
        return bench.AllExpertsSwiGLU(w.num_experts, w.intermediate_size, w.top_k)
    case = bench.Case(
        w.name, 0, w.hidden_dim, w.intermediate_size, w.num_experts, w.top_k,
        CAPACITY_FACTOR, drop_tokens=(kind == "capacity"),
    )
    return bench.build_moe(case, normalize_top_k=True)


def dispatched_copies_mib(w, tokens):
    """3·T·k·d float32 values: the dispatched rows, their outputs and one gradient."""
    return 3 * tokens * w.top_k * w.hidden_dim * 4 / MIB


def one_expert_mib(w):
    """One expert's three matrices, float32."""
    return 3 * w.hidden_dim * w.intermediate_size * 4 / MIB


def target_mib(w, tokens, dense_temp_mib):
    """The temporaries a sparse layer should stay within: 1.3 x (the dense-equivalent's
    + the dispatched copies) at T = 4096; at decode sizes (T <= 64), one expert's
    weights (the only copy a step that reads its experts one at a time holds)."""
    if tokens <= 64:
        return one_expert_mib(w)
    return 1.3 * (dense_temp_mib + dispatched_copies_mib(w, tokens))


def expert_gflops(w, kind, tokens, training):
    """Matmul GFLOPs of the expert rows a layer computes (at most, for dropless)."""
    d, h, e, k = w.hidden_dim, w.intermediate_size, w.num_experts, w.top_k
    per_row = 2 * 3 * d * h
    if kind == "dense":
        rows, per_row = tokens, 2 * 3 * d * k * h
    elif kind == "all_experts":
        rows = tokens * e
    elif kind == "capacity" and (training or tokens * k > GROUPED_DECODE_ASSIGNMENTS):
        rows = e * dispatch_lib.expert_capacity(tokens, k, e, CAPACITY_FACTOR)
    else:  # the grouped plan (dropless, and decode-sized inference in capacity mode)
        block = dispatch_lib.grouped_block_size(tokens, k, e)
        rows = min(tokens * k + e * (block - 1), tokens * e)
    return rows * per_row * (3 if training else 1) / 1e9


def _jax_compiled(layer, tokens, d, training):
    """The compiled JAX program (not run) of the layer's training step or inference call."""
    import jax

    layer.build((tokens, d))
    spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)  # noqa: E731
    trainable = [spec(v) for v in layer.trainable_variables]
    non_trainable = [spec(v) for v in layer.non_trainable_variables]
    x = jax.ShapeDtypeStruct((tokens, d), "float32")
    if training:
        fn = bench._jax_grad_fn(layer)
    else:
        fn = jax.jit(lambda tv, nv, x: layer.stateless_call(tv, nv, x, training=False)[0])
    return fn.lower(trainable, non_trainable, x).compile()


def _temporaries_rows(names, cases, kinds, measure, digits):
    """One row per (config, case, layer kind) of `measure(w, kind, mode, tokens)`, which
    gives `(temporaries MiB, other fields)`; each row's target comes from its case's
    dense row (measured first)."""
    rows = []
    for name in names:
        w = widths(name)
        for mode, tokens in cases:
            dense_temp = None
            for kind in kinds:
                temp, fields = measure(w, kind, mode, tokens)
                if kind == "dense":
                    dense_temp = temp
                row = {"config": name, "mode": mode, "tokens": tokens, "layer": kind, "temp_mib": round(temp, digits)}
                row.update(fields)
                if dense_temp is not None:
                    target = target_mib(w, tokens, dense_temp)
                    row["target_mib"] = round(target, digits)
                    row["vs_target"] = round(temp / target, 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def xla_analysis(names=None, cases=None, kinds=LAYER_KINDS):
    """Rows of XLA's compile-time figures (JAX), one per (config, case, layer kind)."""

    def measure(w, kind, mode, tokens):
        training = mode == "train"
        keras.utils.set_random_seed(0)
        compiled = _jax_compiled(build_layer(w, kind), tokens, w.hidden_dim, training)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        temp = compiled.memory_analysis().temp_size_in_bytes / MIB
        fields = {
            "xla_gflops": round(cost.get("flops", 0.0) / 1e9, 2),
            "expert_gflops": round(expert_gflops(w, kind, tokens, training), 2),
        }
        del compiled
        gc.collect()
        return temp, fields

    names = tuple(CONFIGS) if names is None else names
    return _temporaries_rows(names, XLA_CASES if cases is None else cases, kinds, measure, digits=1)


# ------------------------------------------------------------------ TensorFlow's XLA temporaries


def tf_xla_analysis(names=None, cases=None, kinds=TF_XLA_KINDS):
    """Rows of XLA's temporaries under TensorFlow, one fresh process per (config, case, layer)."""
    import tempfile

    def measure(w, kind, mode, tokens):
        with tempfile.TemporaryDirectory() as dump_dir:
            env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}".strip()
            spec = json.dumps(dataclasses.asdict(w))
            subprocess.run(
                [sys.executable, "-m", "dl_moe.tools.real_sizes", "--tf-child", spec, kind, mode, str(tokens)],
                env=env, capture_output=True, text=True, check=True,
            )
            return bench.xla_dumped_temp_bytes(dump_dir, module=TF_STEP_NAME) / MIB, {}

    names = tuple(CONFIGS) if names is None else names
    return _temporaries_rows(names, TF_XLA_CASES if cases is None else cases, kinds, measure, digits=3)


TF_STEP_NAME = "real_size_step"


def _tf_child(spec, kind, mode, tokens):
    """Runs the layer's compiled step once, so that XLA writes its buffer assignment.

    `spec`: the `Widths` as JSON."""
    import tensorflow as tf

    w = Widths(**json.loads(spec))
    layer = build_layer(w, kind)
    layer.build((tokens, w.hidden_dim))
    x = tf.constant(np.random.RandomState(0).standard_normal((tokens, w.hidden_dim)).astype("float32"))
    variables = [v.value for v in layer.trainable_variables]

    def real_size_step(inputs):
        if mode == "infer":
            return layer(inputs, training=False)
        with tf.GradientTape() as tape:
            out = layer(inputs, training=True)
            loss = tf.reduce_mean(tf.square(out)) + tf.add_n([0.0] + list(layer.losses))
        # The gradients are outputs, as in the JAX study (a gathered weight's is IndexedSlices).
        return loss, [tf.convert_to_tensor(g) for g in tape.gradient(loss, variables)]

    tf.function(real_size_step, jit_compile=True)(x)


# ------------------------------------------------------------------ PyTorch memory


def torch_peak_memory(names=None, kinds=("dense", "capacity", "dropless"), tokens=2048):
    """Peak resident-memory growth (MiB) of an eager PyTorch training step, one
    fresh process per (config, layer)."""
    names = tuple(CONFIGS) if names is None else names
    rows = []
    for name in names:
        for kind in kinds:
            out = subprocess.run(
                [sys.executable, "-m", "dl_moe.tools.real_sizes", "--torch-child", name, kind, str(tokens)],
                env={**os.environ, **bench.MEMORY_CHILD_ENV, "KERAS_BACKEND": "torch"},
                capture_output=True, text=True, check=True,
            )
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _torch_child(name, kind, tokens):
    w = widths(name)
    layer = build_layer(w, kind)
    x = np.random.RandomState(0).standard_normal((tokens, w.hidden_dim)).astype("float32")
    step = bench.make_train_step(layer, x)
    step()
    before = bench._proc_status_mb("VmRSS")
    bench._reset_peak_rss()
    step()
    step()
    peak = bench._proc_status_mb("VmHWM") - before
    weights_mib = sum(math.prod(v.shape) for v in layer.trainable_variables) * 4 / MIB
    print(json.dumps({"config": name, "layer": kind, "tokens": tokens, "peak_growth_mib": round(peak),
                      "weight_gradients_mib": round(weights_mib)}))


# ------------------------------------------------------------------ decode speed


def decode_speed(names=None, tokens=None, repeats=7):
    """Forward-pass wall time in inference at decode sizes, interleaved medians."""
    names = tuple(CONFIGS) if names is None else names
    tokens = DECODE_TOKENS if tokens is None else tokens
    rows = []
    for name in names:
        w = widths(name)
        keras.utils.set_random_seed(0)
        layers = {kind: build_layer(w, kind) for kind in ("dense", "capacity", "dropless", "all_experts")}
        for layer in layers.values():
            layer.build((None, w.hidden_dim))
        layers["capacity"].set_weights(layers["dropless"].get_weights())
        for count in tokens:
            x = np.random.RandomState(count).standard_normal((count, w.hidden_dim)).astype("float32")
            touched = int(np.unique(layers["dropless"].route(x)["indices"]).size)
            limit = bench.DenseSwiGLU(w.intermediate_size * touched)
            limit.build((None, w.hidden_dim))
            steps = {kind: bench.make_inference_step(layer, x) for kind, layer in layers.items()}
            steps["touched_limit"] = bench.make_inference_step(limit, x)
            medians = bench.time_steps(steps, repeats=repeats)
            limit_s = max(medians["dense"], medians["touched_limit"])
            row = {"config": name, "tokens": count, "touched_experts": touched,
                   **{f"{kind}_ms": round(s * 1e3, 3) for kind, s in medians.items()}}
            for kind in ("capacity", "dropless", "all_experts"):
                row[f"{kind}_vs_dense"] = round(medians["dense"] / medians[kind], 3)
                row[f"{kind}_vs_limit"] = round(limit_s / medians[kind], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del steps, limit
    return rows


# ------------------------------------------------------------------ keras-hub layer


def keras_hub_qwen3_layer(batch=8, seq=512):
    """XLA temporaries (MiB) of a training step of one keras-hub Qwen3-MoE decoder
    layer at real widths: stock, `sparsify()` and `sparsify(drop_tokens=True)`."""
    import jax
    import keras_hub

    from dl_moe.integrations.keras_hub import sparsify

    kwargs = dict(
        vocabulary_size=1000, num_layers=1, num_query_heads=32, num_key_value_heads=4, head_dim=128,
        hidden_dim=2048, intermediate_dim=6144, moe_intermediate_dim=768, num_experts=128, top_k=8,
        norm_top_k_prob=True,
    )
    inputs = {
        "token_ids": jax.ShapeDtypeStruct((batch, seq), "int32"),
        "padding_mask": jax.ShapeDtypeStruct((batch, seq), "int32"),
    }
    rows = []
    for label, overrides in (("stock", None), ("sparsify()", {}), ("sparsify(drop_tokens=True)", {"drop_tokens": True})):
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.Qwen3MoeBackbone(**kwargs)
        if overrides is not None:
            sparsify(backbone, **overrides)

        def loss_fn(trainable, non_trainable, data, backbone=backbone):
            out, _ = backbone.stateless_call(trainable, non_trainable, data, training=True)
            return keras.ops.mean(keras.ops.square(out))

        spec = lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype)  # noqa: E731
        trainable = [spec(v) for v in backbone.trainable_variables]
        non_trainable = [spec(v) for v in backbone.non_trainable_variables]
        compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(trainable, non_trainable, inputs).compile()
        row = {"model": label, "tokens": batch * seq, "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / MIB)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del backbone, compiled
    stock = rows[0]["temp_mib"]
    for row in rows:
        row["vs_stock"] = round(row["temp_mib"] / stock, 3)
    return rows


PARTS = {
    "xla": xla_analysis,
    "tf_xla": tf_xla_analysis,
    "torch": torch_peak_memory,
    "decode": decode_speed,
    "keras_hub": keras_hub_qwen3_layer,
}


def add_arguments(parser):
    parser.add_argument("--parts", default="xla,keras_hub,decode",
                        help="Comma-separated studies: xla (JAX), tf_xla (TensorFlow), keras_hub (JAX), torch (PyTorch), "
                        "decode (any backend).")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"Comma-separated subset of {list(CONFIGS)}.")
    parser.add_argument("--repeats", type=int, default=7, help="Timed runs per layer in the decode study.")
    parser.add_argument("--json", help="Write the results and the environment to this JSON file.")


def _commit():
    """The checkout's short commit hash, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def run(args):
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}.")
    results = {"environment": {**bench.environment(), "commit": _commit()}, "command": " ".join(sys.argv)}
    for part in args.parts.split(","):
        if part not in PARTS:
            raise ValueError(f"--parts: unknown {part!r}; choose from {list(PARTS)}.")
        started = time.time()
        if part == "keras_hub":
            results[part] = PARTS[part]()
        elif part == "decode":
            results[part] = PARTS[part](names, repeats=args.repeats)
        else:
            results[part] = PARTS[part](names)
        results[f"{part}_seconds"] = round(time.time() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def main(argv=None):
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torch-child"]:
        _torch_child(argv[1], argv[2], int(argv[3]))
        return
    if argv[:1] == ["--tf-child"]:
        _tf_child(argv[1], argv[2], argv[3], int(argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


def _temporaries_table(rows, kinds):
    """Lines of a markdown table of XLA temporaries, one row per (config, step, T)."""
    header = {"dense": "dense-equivalent", "all_experts": "all-experts", "capacity": "capacity 1.25", "dropless": "dropless"}
    out = ["| config | step | T | " + " | ".join(header[k] for k in kinds) + " | target | dropless / target |"]
    out.append("|---|---|---|" + "---|" * (len(kinds) + 2))
    by_case = {}
    for row in rows:
        by_case.setdefault((row["config"], row["mode"], row["tokens"]), {})[row["layer"]] = row
    for (config, mode, tokens), by_kind in by_case.items():
        if "dropless" not in by_kind or "target_mib" not in by_kind["dropless"]:
            continue
        cells = [f"{by_kind[k]['temp_mib']:,.1f}" if k in by_kind else "–" for k in kinds]
        dropless = by_kind["dropless"]
        out.append(
            f"| {config} | {mode} | {tokens} | " + " | ".join(cells)
            + f" | {dropless['target_mib']:,.1f} | {dropless['vs_target']:.2f} |"
        )
    return out + [""]


def markdown_tables(results):
    """Markdown tables of whichever studies `results` (the `--json` output) holds."""
    out = []
    if "xla" in results:
        out += _temporaries_table(results["xla"], LAYER_KINDS)
    if "tf_xla" in results:
        out += _temporaries_table(results["tf_xla"], TF_XLA_KINDS)
    if "torch" in results:
        out.append("| config | layer | T | peak growth MiB | of which weight gradients |")
        out.append("|---|---|---|---|---|")
        for row in results["torch"]:
            out.append(f"| {row['config']} | {row['layer']} | {row['tokens']} | {row['peak_growth_mib']:,} | {row['weight_gradients_mib']:,} |")
        out.append("")
    if "decode" in results:
        out.append("| config | T | touched experts | capacity vs dense | dropless vs dense | all-experts vs dense | capacity vs limit | dropless vs limit |")
        out.append("|---|---|---|---|---|---|---|---|")
        for row in results["decode"]:
            out.append(
                f"| {row['config']} | {row['tokens']} | {row['touched_experts']} | {row['capacity_vs_dense']:.2f} | "
                f"{row['dropless_vs_dense']:.2f} | {row['all_experts_vs_dense']:.2f} | {row['capacity_vs_limit']:.2f} | "
                f"{row['dropless_vs_limit']:.2f} |"
            )
        out.append("")
    if "keras_hub" in results:
        out.append("| Qwen3-MoE decoder layer, 8 × 512 tokens | training temporaries MiB | vs stock |")
        out.append("|---|---|---|")
        for row in results["keras_hub"]:
            out.append(f"| {row['model']} | {row['temp_mib']:,} | {row['vs_stock']:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
