"""Communication and memory of expert parallelism, read from the compiled program (JAX).

For meshes of 2, 4 and 8 virtual CPU devices, compiles one training step (the gradient
of mean(y^2) + the balancing losses through one MoE layer; no step runs) and reports,
per device: the collectives by kind with their bytes, XLA's temporaries
(`memory_analysis().temp_size_in_bytes`) and the all-to-all floor
2 · k·cf·T/P·d·4 bytes forward plus the same backward. Weights are never allocated
(the layer is built inside a `StatelessScope` and the step is lowered on shapes), so
real widths compile on a small machine.

    python benchmarks/expert_parallel.py              # every case
    python benchmarks/expert_parallel.py --cases toy --before 106de0e \\
        --json docs/benchmarks/expert_parallel.json

`--before REV` adds rows compiled with the `dl_moe` of git revision REV (exported to a
temporary directory and run in a child process), for a before/after table.
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_DEVICES = 8

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "f64": 8}
# `%name = <result type> <op>(`: the result type is one shape or a tuple of shapes.
_INSTRUCTION = re.compile(r"=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+([a-z\-]+)\(")
_SHAPE = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


class Case(NamedTuple):
    """One MoE layer and batch: E experts, top-k, widths d and h, B × S tokens."""

    name: str
    num_experts: int
    top_k: int
    hidden_dim: int
    intermediate_size: int
    batch: int
    sequence: int
    capacity_factor: float = 1.25
    drop_tokens: bool = True

    @property
    def tokens(self):
        return self.batch * self.sequence


CASES = {
    # The toy case.
    "toy": Case("toy", 8, 2, 256, 512, 16, 128),
    # Dropless: C = T/P rows per expert and device; the floor counts k·T/P rows (cf 1).
    "toy-dropless": Case("toy-dropless", 8, 2, 256, 512, 16, 128, capacity_factor=1.0, drop_tokens=False),
    # GPT-OSS-20B's MoE widths, 8 sequences of 2048 tokens (compiled only).
    "gpt-oss-20b": Case("gpt-oss-20b", 32, 4, 2880, 2880, 8, 2048),
    # Qwen3-30B-A3B's: many small experts.
    "qwen3-30b-a3b": Case("qwen3-30b-a3b", 128, 8, 2048, 768, 8, 2048),
}

# (label, mesh shape, axis names, batch axis): the batch axis of ModelParallel; the
# expert axis is always "expert".
LAYOUTS = {
    "1d": lambda p: (f"{p}", (p,), ("expert",), "expert"),
    "2x4": lambda p: ("2 × 4", (2, 4), ("batch", "expert"), "batch"),
}


def shape_bytes(text):
    """Bytes of every array shape in an HLO type string (tuples summed)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text):
    """Collectives of a compiled (SPMD-partitioned) HLO module.

    Returns:
        `{kind: {"count": n, "bytes": b, "shapes": [...]}}` for the kinds in
        `COLLECTIVES`: b sums the result sizes per device (an all-gather's gathered
        result, an all-reduce's reduced operand, an all-to-all's whole exchanged
        buffer). Async `-start` ops count once, by their last tuple element (the
        result); `-done` ops are not counted.
    """
    found = {kind: {"count": 0, "bytes": 0, "shapes": []} for kind in COLLECTIVES}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.search(line)
        if match is None:
            continue
        result, op = match.groups()
        kind = op[: -len("-start")] if op.endswith("-start") else op
        if kind not in found:
            continue
        if op.endswith("-start") and result.startswith("("):
            result = result.rstrip(")").split(", ")[-1]
        found[kind]["count"] += 1
        found[kind]["bytes"] += shape_bytes(result)
        found[kind]["shapes"].append(result)
    return found


def all_to_all_floor(case, devices):
    """Bytes per device of the two all-to-alls forward and two backward:
    2 · 2 · k·cf·T/P·d·4 (float32)."""
    per_exchange = case.top_k * case.capacity_factor * case.tokens / devices * case.hidden_dim * 4
    return 4 * per_exchange


def compile_step(case, mesh_shape, axis_names, batch_axis, expert_parallel=True):
    """Compiles one training step under `ModelParallel` with the experts sharded by "expert".

    Returns:
        `(compiled, devices)`: the `jax.stages.Compiled` step and the number of devices.
    """
    import jax
    import keras
    from keras.src.backend.jax.distribution_lib import _to_backend_layout

    import dl_moe
    from dl_moe.distribution import expert_parallel_layout_map

    devices = keras.distribution.list_devices()[: math.prod(mesh_shape)]
    mesh = keras.distribution.DeviceMesh(mesh_shape, axis_names=axis_names, devices=devices)
    layout_map = expert_parallel_layout_map(mesh, expert_axis="expert")
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name=batch_axis)
    )
    try:
        layer = dl_moe.create_ffn_moe(
            case.num_experts, case.hidden_dim, top_k=case.top_k, intermediate_size=case.intermediate_size,
            ffn_type="swiglu", use_bias=False, drop_tokens=case.drop_tokens,
            train_capacity_factor=case.capacity_factor, expert_parallel=expert_parallel, name="moe",
        )
        input_shape = (case.batch, case.sequence, case.hidden_dim)
        # Deferred initialization: the variables get shapes and layouts, no values.
        with keras.StatelessScope(initialize_variables=False):
            layer.build(input_shape)
        distribution = keras.distribution.distribution()

        def spec(variable):
            layout = distribution.get_variable_layout(variable)
            return jax.ShapeDtypeStruct(variable.shape, variable.dtype, sharding=_to_backend_layout(layout))

        trainable = [spec(v) for v in layer.trainable_variables]
        non_trainable = [spec(v) for v in layer.non_trainable_variables]
        data_layout = distribution.get_data_layout(input_shape)
        inputs = jax.ShapeDtypeStruct(input_shape, "float32", sharding=_to_backend_layout(data_layout))

        def loss_fn(trainable_values, non_trainable_values, x):
            out, _, losses = layer.stateless_call(
                trainable_values, non_trainable_values, x, training=True, return_losses=True
            )
            return keras.ops.mean(keras.ops.square(out)) + sum(losses)

        # Inputs are differentiated too, as for a layer inside a model: the backward
        # pass then has both all-to-alls of the dispatch as well.
        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2)))
        return step.lower(trainable, non_trainable, inputs).compile(), len(devices)
    finally:
        keras.distribution.set_distribution(None)


def measure(case, layout, devices, label="after"):
    """One row: collectives by kind, temporaries and the floor, per device."""
    name, mesh_shape, axis_names, batch_axis = LAYOUTS[layout](devices)
    started = time.perf_counter()
    compiled, count = compile_step(case, mesh_shape, axis_names, batch_axis)
    found = collectives(compiled.as_text())
    floor = all_to_all_floor(case, count)
    total = sum(kind["bytes"] for kind in found.values())
    return {
        "case": case.name, "label": label, "mesh": name, "devices": count,
        "tokens_per_device": case.tokens // count,
        "collectives": {kind: {"count": v["count"], "bytes": v["bytes"]} for kind, v in found.items()},
        "collective_bytes": total,
        "all_to_all_floor_bytes": floor,
        "collective_over_floor": total / floor,
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
        "compile_seconds": round(time.perf_counter() - started, 1),
    }


def environment():
    import jax
    import keras

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {MAX_DEVICES} virtual CPU devices",
        "python": platform.python_version(),
        "keras": keras.__version__,
        "jax": jax.__version__,
    }


def run_rows(cases, device_counts, label):
    rows = []
    for case in cases:
        for devices in device_counts:
            rows.append(measure(case, "1d", devices, label))
            print(json.dumps(rows[-1]), file=sys.stderr)
        if MAX_DEVICES in device_counts:
            rows.append(measure(case, "2x4", MAX_DEVICES, label))
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def before_rows(revision, args):
    """Rows compiled with the `dl_moe` of `revision`, in a child process."""
    with tempfile.TemporaryDirectory() as source:
        archive = subprocess.run(["git", "archive", revision, "dl_moe"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", source], input=archive.stdout, check=True)
        env = dict(os.environ, PYTHONPATH=source)
        command = [sys.executable, os.path.abspath(__file__), "--cases", args.cases, "--devices", args.devices,
                   "--label", f"before ({revision})", "--rows-only"]
        completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(completed.stdout)


def mib(value):
    return f"{value / 2**20:.2f}"


def markdown_table(rows):
    lines = [
        "| case | code | mesh (devices) | tokens / device | all-to-all MiB | all-gather MiB | all-reduce MiB "
        "| other MiB | collectives MiB | all-to-all floor MiB | collectives / floor | temporaries MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = row["collectives"]
        other = c["reduce-scatter"]["bytes"] + c["collective-permute"]["bytes"]
        lines.append(
            f"| {row['case']} | {row['label']} | {row['mesh']} ({row['devices']}) | {row['tokens_per_device']} "
            f"| {mib(c['all-to-all']['bytes'])} | {mib(c['all-gather']['bytes'])} | {mib(c['all-reduce']['bytes'])} "
            f"| {mib(other)} | {mib(row['collective_bytes'])} | {mib(row['all_to_all_floor_bytes'])} "
            f"| {row['collective_over_floor']:.2f} | {mib(row['temp_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cases", default="toy,toy-dropless,gpt-oss-20b,qwen3-30b-a3b", help=f"comma-separated, of {sorted(CASES)}"
    )
    parser.add_argument("--devices", default="2,4,8", help="device counts of the 1-D meshes")
    parser.add_argument("--before", default=None, help="git revision whose dl_moe gives the 'before' rows")
    parser.add_argument("--label", default="after")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = [CASES[name] for name in args.cases.split(",")]
    device_counts = [int(n) for n in args.devices.split(",")]
    rows = run_rows(cases, device_counts, args.label)
    if args.rows_only:
        print(json.dumps(rows))
        return 0
    if args.before:
        rows = before_rows(args.before, args) + rows
    command = " ".join(["python", "benchmarks/expert_parallel.py"] + list(argv or sys.argv[1:]))
    result = {"environment": environment(), "command": command, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown_table(rows))
    return 0


def _configure():
    """Virtual devices and the JAX backend, before jax or keras is imported."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={MAX_DEVICES}".strip()
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "PYTHONPATH" not in os.environ:
        sys.path.insert(0, ROOT)  # this checkout's dl_moe, not an installed one


if __name__ == "__main__":
    _configure()
    sys.exit(main())
