"""Throughput and memory benchmark of the MoE layer against its two anchors.

* dense equivalent: one SwiGLU FFN with k*h hidden units, the same active FLOPs as a
  top-k MoE with experts of width h: the practical limit of a sparse layer;
* all-experts: every expert runs on every token and the outputs are weighted by the
  (mostly zero) routing weights, which is what keras-hub's Mixtral/Qwen MoE blocks do.

It also times the layer's expert bank alone on balanced rows ("experts only"): the
matmuls without routing, dispatch or combine, the ceiling of any dispatch design.

Every measurement is forward + backward in training mode, compiled (XLA on JAX and
TensorFlow, eager PyTorch), float32, the median of `repeats` timed runs after warm-up.
Results are ratios measured in one process, so machine noise mostly cancels.

`--inference` times the forward pass alone in inference mode instead (compiled on
JAX and TensorFlow, eager under `torch.no_grad()` on PyTorch) at decode- to
prefill-sized token counts (`--tokens`, default 1, 8, 64, 256, 4096), capacity mode
and dropless, against the same two anchors.

Every result reports `plan`, the row of the dispatch plan table
(`dl_moe.dispatch_plans`) that `MoEConfig.dispatch="auto"` runs for the case.
`--compare-plans` also times, on the same weights, the layer under every other plan
that can run the case (`MoEConfig.dispatch=<name>`; `plans_ms` maps each plan that
can run it, the auto choice included, to its median ms).
"""

import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import keras
import numpy as np
from keras import ops

from dl_moe import dispatch_plans
from dl_moe.factories import create_ffn_moe
from dl_moe.forward import token_choice


@dataclasses.dataclass
class Case:
    """One benchmark configuration."""

    name: str
    tokens: int
    hidden_dim: int
    intermediate_size: int
    num_experts: int
    top_k: int
    capacity_factor: float = 1.0
    drop_tokens: bool = True

    @property
    def mode(self):
        return f"cf={self.capacity_factor:g}" if self.drop_tokens else "dropless"


STANDARD_CASES = [
    Case("a", 4096, 256, 512, 8, 2, 1.0),
    Case("a", 4096, 256, 512, 8, 2, 1.25),
    Case("a", 4096, 256, 512, 8, 2, drop_tokens=False),
    Case("b", 4096, 256, 128, 64, 8, 1.0),
    Case("b", 4096, 256, 128, 64, 8, 1.25),
    Case("b", 4096, 256, 128, 64, 8, drop_tokens=False),
    Case("c", 256, 256, 512, 8, 2, 1.0),
    Case("c", 256, 256, 512, 8, 2, 1.25),
    Case("c", 256, 256, 512, 8, 2, drop_tokens=False),
]


@keras.saving.register_keras_serializable(package="dl_moe_bench")
class DenseSwiGLU(keras.layers.Layer):
    """Dense SwiGLU FFN `[T, d] -> [T, d]` with `units` hidden units."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        d = input_shape[-1]
        self.gate_kernel = self.add_weight(name="gate_kernel", shape=(d, self.units))
        self.up_kernel = self.add_weight(name="up_kernel", shape=(d, self.units))
        self.down_kernel = self.add_weight(name="down_kernel", shape=(self.units, d))

    def call(self, inputs, training=None):
        hidden = ops.silu(ops.matmul(inputs, self.gate_kernel)) * ops.matmul(inputs, self.up_kernel)
        return ops.matmul(hidden, self.down_kernel)


@keras.saving.register_keras_serializable(package="dl_moe_bench")
class AllExpertsSwiGLU(keras.layers.Layer):
    """Top-k routed SwiGLU experts computed densely: every expert sees every token."""

    def __init__(self, num_experts, units, top_k, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.units = units
        self.top_k = top_k

    def build(self, input_shape):
        d, e, h = input_shape[-1], self.num_experts, self.units
        self.router_kernel = self.add_weight(name="router_kernel", shape=(d, e))
        self.gate_kernel = self.add_weight(name="gate_kernel", shape=(e, d, h))
        self.up_kernel = self.add_weight(name="up_kernel", shape=(e, d, h))
        self.down_kernel = self.add_weight(name="down_kernel", shape=(e, h, d))

    def call(self, inputs, training=None):
        probs = ops.softmax(ops.matmul(inputs, self.router_kernel), axis=-1)  # [T, E]
        top_weights, top_indices = ops.top_k(probs, self.top_k)
        dense_weights = ops.sum(ops.one_hot(top_indices, self.num_experts) * top_weights[..., None], axis=1)
        gate = ops.einsum("td,edh->eth", inputs, self.gate_kernel)
        up = ops.einsum("td,edh->eth", inputs, self.up_kernel)
        out = ops.einsum("eth,ehd->etd", ops.silu(gate) * up, self.down_kernel)  # [E, T, d]
        return ops.einsum("etd,te->td", out, dense_weights)


def build_moe(case, **overrides):
    """The case's MoE layer (`overrides`: further `create_ffn_moe` fields)."""
    return create_ffn_moe(
        case.num_experts,
        case.hidden_dim,
        top_k=case.top_k,
        intermediate_size=case.intermediate_size,
        ffn_type="swiglu",
        use_bias=False,
        drop_tokens=case.drop_tokens,
        train_capacity_factor=case.capacity_factor,
        eval_capacity_factor=case.capacity_factor,
        **overrides,
    )


def with_plan(case, moe, x, plan):
    """The case's MoE layer with `MoEConfig.dispatch=plan` and `moe`'s weights."""
    if not moe.built:
        moe.build(x.shape)
    layer = build_moe(case, dispatch=plan)
    layer.build(x.shape)
    layer.set_weights(moe.get_weights())
    return layer


def plans_of(case, moe, x, training):
    """`(auto, runnable)`: the plan "auto" runs for the case's layer `moe` on `x`, and
    every plan of the table that can run that call, in table order.

    Only the shapes of the routing decision matter to the choice (`CallFacts`).
    """
    if not moe.built:
        moe.build(x.shape)
    indices = ops.zeros((case.tokens, case.top_k), "int32")
    auto = token_choice.choose_plan(moe, indices, training).name
    facts = dispatch_plans.call_facts(moe, indices, training)
    runnable = [row.name for row in dispatch_plans.PLAN_TABLE if row.unavailable_reason(facts) is None]
    return auto, runnable


def other_plan_steps(case, moe, x, training, make_step):
    """`({"plan:<name>": step}, {name: error})` for every plan but the auto choice that
    can run the case (`plans_of`), each on a copy of `moe` with the same weights.

    A plan whose first step raises is left out of the timing and reported with its
    error (`plans_failed`), so one broken plan does not end the whole run.
    """
    auto, runnable = plans_of(case, moe, x, training)
    steps, failed = {}, {}
    for name in runnable:
        if name == auto:
            continue
        step = make_step(with_plan(case, moe, x, name), x)
        try:
            step()
        except Exception as error:  # noqa: BLE001 (reported in the results)
            failed[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            continue
        steps[f"plan:{name}"] = step
    return steps, failed


def plan_fields(auto, medians, failed=None):
    """`plans_ms`: `{plan: ms}` of the auto choice (the "moe" step) and every other
    plan timed (`other_plan_steps`), and `plans_failed` when some raised; nothing when
    no other plan was tried."""
    others = {name.split(":", 1)[1]: value * 1e3 for name, value in medians.items() if name.startswith("plan:")}
    fields = {}
    if others or failed:
        fields["plans_ms"] = {auto: medians["moe"] * 1e3, **others}
    if failed:
        fields["plans_failed"] = dict(failed)
    return fields


def format_plans(result):
    """`plans_ms` as "name ms, ..." (the auto choice first), or "–"."""
    plans = result.get("plans_ms")
    if not plans:
        return "–"
    timed = [f"{name} {ms:.3f}" for name, ms in plans.items()]
    return ", ".join(timed + [f"{name} failed" for name in result.get("plans_failed", {})])


def max_load_factor(moe, x):
    """The largest expert load over the mean load when `moe` routes `x` (1: balanced).

    Buffers that drop nothing (e.g. eager PyTorch's dropless `[E, C]` buffers, sized
    to the largest load) compute E rows for each row of that load: 1/factor bounds
    their MoE/dense against capacity 1.0's.
    """
    decision = moe.route(x)
    loads = np.bincount(decision["indices"][decision["active"]], minlength=moe.config.num_experts)
    return float(loads.max() / loads.mean())


def build_layers(case):
    """The three layers of a case: `{"moe": ..., "dense": ..., "all_experts": ...}`."""
    return {
        "moe": build_moe(case),
        "dense": DenseSwiGLU(case.top_k * case.intermediate_size),
        "all_experts": AllExpertsSwiGLU(case.num_experts, case.intermediate_size, case.top_k),
    }


def _jax_grad_fn(layer):
    """Jitted `(trainable, non_trainable, inputs) -> (loss, grads)` of sum(layer(x)^2) + losses."""
    import jax

    def loss_fn(trainable_values, non_trainable_values, inputs):
        out, _, losses = layer.stateless_call(
            trainable_values, non_trainable_values, inputs, training=True, return_losses=True
        )
        return ops.mean(ops.square(out)) + sum(losses)

    return jax.jit(jax.value_and_grad(loss_fn))


def make_train_step(layer, x):
    """A compiled forward+backward step of sum(layer(x)^2) + layer losses."""
    if not layer.built:
        layer.build(x.shape)
    backend = keras.backend.backend()
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]
    if backend == "jax":
        import jax

        grad_fn = _jax_grad_fn(layer)

        def step():
            loss, grads = grad_fn(trainable, non_trainable, x)
            jax.block_until_ready(grads)
            return loss

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        variables = layer.trainable_variables

        @tf.function(jit_compile=True)
        def tf_step(inputs):
            with tf.GradientTape() as tape:
                out = layer(inputs, training=True)
                loss = tf.reduce_mean(tf.square(out)) + tf.add_n([0.0] + list(layer.losses))
            grads = tape.gradient(loss, [v.value for v in variables])
            # Dense tensors (a gathered weight's gradient is IndexedSlices) and one
            # scalar that depends on all of them, so nothing is skipped.
            return loss + tf.add_n([tf.reduce_sum(tf.convert_to_tensor(g)) for g in grads if g is not None])

        def step():
            return tf_step(x).numpy()

        return step
    import torch

    variables = [v.value for v in layer.trainable_variables]

    def step():
        out = layer(x, training=True)
        loss = torch.mean(torch.square(out)) + sum(layer.losses)
        grads = torch.autograd.grad(loss, variables, allow_unused=True)
        del grads
        return loss

    return step


INFERENCE_TOKENS = (1, 8, 64, 256, 4096)


def inference_cases(tokens=INFERENCE_TOKENS, capacity_factor=1.0):
    """Case (a)'s layer (E=8, k=2, d=256, h=512, SwiGLU) at each token count, in capacity
    mode (`capacity_factor` in inference) and dropless."""
    return [
        Case(f"T={t}", t, 256, 512, 8, 2, capacity_factor, drop_tokens)
        for t in tokens
        for drop_tokens in (True, False)
    ]


def make_inference_step(layer, x):
    """A forward-only step in inference mode (training=False): compiled on JAX
    (jax.jit of a stateless call) and TensorFlow (tf.function, jit_compile=True),
    eager under `torch.no_grad()` on PyTorch."""
    if not layer.built:
        layer.build(x.shape)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        forward = jax.jit(lambda t, n, inputs: layer.stateless_call(t, n, inputs, training=False)[0])

        def step():
            return jax.block_until_ready(forward(trainable, non_trainable, x))

        return step
    if backend == "tensorflow":
        import tensorflow as tf

        forward = tf.function(lambda inputs: layer(inputs, training=False), jit_compile=True)

        def step():
            return forward(x).numpy()

        return step
    import torch

    def step():
        with torch.no_grad():
            return layer(x, training=False)

    return step


def run_inference_case(case, repeats=5, compare_plans=False, seed=0):
    """Times the forward pass of the case's MoE layer and its two anchors in inference.

    Args:
        compare_plans: Also time the layer under every other plan that can run the
            case, on the same weights (`plans_ms`, `plan_fields`).

    Returns:
        A dict of medians (ms) and ratios: `vs_dense` (dense-equivalent time over
        MoE time; 1 is the limit) and `vs_all_experts` (all-experts time over MoE
        time), and `plan`, the dispatch plan "auto" runs.
    """
    keras.utils.set_random_seed(seed)
    x = case_inputs(case, seed)
    layers = build_layers(case)
    steps = {name: make_inference_step(layers[name], x) for name in ("moe", "dense", "all_experts")}
    auto, _ = plans_of(case, layers["moe"], x, training=False)
    failed = {}
    if compare_plans:
        others, failed = other_plan_steps(case, layers["moe"], x, False, make_inference_step)
        steps.update(others)
    medians = time_steps(steps, repeats=repeats)
    result = {
        **case_fields(case),
        "plan": auto,
        "moe_ms": medians["moe"] * 1e3,
        "dense_ms": medians["dense"] * 1e3,
        "all_experts_ms": medians["all_experts"] * 1e3,
        "vs_dense": medians["dense"] / medians["moe"],
        "vs_all_experts": medians["all_experts"] / medians["moe"],
    }
    result.update(plan_fields(auto, medians, failed))
    if not case.drop_tokens:
        result["max_load_factor"] = max_load_factor(layers["moe"], x)
    return result


def format_inference_table(results):
    """Markdown table of `run_inference_case` results."""
    lines = [
        "| T | mode | plan | MoE ms | dense ms | all-experts ms | MoE/dense | × all-experts | each plan ms |",
        "|" + "---|" * 9,
    ]
    for r in results:
        lines.append(
            f"| {r['T']} | {r['mode']} | {r['plan']} | {r['moe_ms']:.3f} | {r['dense_ms']:.3f} | "
            f"{r['all_experts_ms']:.3f} | {r['vs_dense']:.2f} | {r['vs_all_experts']:.1f}× | {format_plans(r)} |"
        )
    return "\n".join(lines)


def inference_main(args, env):
    """`dl-moe bench --inference`: the inference table, printed and (with --output) saved."""
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        tokens = []
    if not tokens or min(tokens) < 1:
        raise SystemExit(f"--tokens must be comma-separated positive integers, got {args.tokens!r}")
    report = {"environment": env, "inference": []}
    for case in inference_cases(tokens, args.capacity_factor):
        result = run_inference_case(case, repeats=args.repeats, compare_plans=args.compare_plans)
        report["inference"].append(result)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)
    print(format_inference_table(report["inference"]))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def time_steps(steps, repeats=5, warmup=2, settle=1):
    """Median seconds of each step over `repeats` interleaved rounds after warm-up.

    Interleaving (A, B, C, A, B, C, ...) exposes every step to the same machine load,
    so the ratios stay meaningful on a busy machine.

    Args:
        steps: `{name: zero-argument callable}`.
        settle: Untimed calls of a step just before each timed one. The steps
            differ widely in size (the all-experts layer is several times the bank
            alone, T=16384 is 64 times T=256), and a small step right after a large
            one pays for freeing the large one's buffers and refilling the caches;
            one settling call absorbs that.

    Returns:
        `{name: median seconds}`.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            for _ in range(settle):
                step()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    # Writing 5 to clear_refs resets the VmHWM peak mark (Linux).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def case_inputs(case, seed=0):
    rng = np.random.default_rng(seed)
    return ops.convert_to_tensor(rng.normal(size=(case.tokens, case.hidden_dim)).astype("float32"))


def balanced_expert_rows(case, seed=0):
    """`[E, T*k/E, d]` rows: what a perfectly balanced router would hand the experts."""
    rng = np.random.default_rng(seed)
    rows = case.tokens * case.top_k // case.num_experts
    return ops.convert_to_tensor(rng.normal(size=(case.num_experts, rows, case.hidden_dim)).astype("float32"))


def case_fields(case):
    """The case's name, mode and sizes, as every result row reports them."""
    return {
        "case": case.name, "mode": case.mode, "T": case.tokens, "d": case.hidden_dim,
        "h": case.intermediate_size, "E": case.num_experts, "k": case.top_k,
    }


def run_case(case, repeats=5, include_all_experts=True, seed=0, compare_plans=False):
    """Times the case's layers; returns a dict of medians and ratios.

    Besides the two anchors it times the MoE layer's expert bank alone on balanced
    `[E, T*k/E, d]` rows (`experts_only`): the expert matmuls with no routing,
    dispatch or combine, i.e. the ceiling of the layer on this backend.

    Every result reports `plan`, the dispatch plan "auto" runs in training;
    `compare_plans` also times the layer under every other plan that can run the
    case, on the same weights (`plans_ms`, `plan_fields`).
    """
    keras.utils.set_random_seed(seed)
    x = case_inputs(case, seed)
    layers = build_layers(case)
    names = ["moe", "dense"] + (["all_experts"] if include_all_experts else [])
    steps = {name: make_train_step(layers[name], x) for name in names}
    steps["experts_only"] = make_train_step(layers["moe"].experts, balanced_expert_rows(case, seed))
    auto, _ = plans_of(case, layers["moe"], x, training=True)
    failed = {}
    if compare_plans:
        others, failed = other_plan_steps(case, layers["moe"], x, True, make_train_step)
        steps.update(others)
    medians = time_steps(steps, repeats=repeats)
    result = {
        **case_fields(case),
        "plan": auto,
        "moe_ms": medians["moe"] * 1e3,
        "dense_ms": medians["dense"] * 1e3,
        "vs_dense": medians["dense"] / medians["moe"],
        "experts_only_ms": medians["experts_only"] * 1e3,
        "experts_only_vs_dense": medians["dense"] / medians["experts_only"],
    }
    if include_all_experts:
        result["all_experts_ms"] = medians["all_experts"] * 1e3
        result["vs_all_experts"] = medians["all_experts"] / medians["moe"]
    result.update(plan_fields(auto, medians, failed))
    if not case.drop_tokens:
        result["max_load_factor"] = max_load_factor(layers["moe"], x)
    return result


def measure_peak_memory(case, kind, seed=0, xla_dump_dir=None):
    """Peak memory (MiB) of a training step beyond the weights and inputs.

    JAX and TensorFlow: XLA's own figure for the compiled step, the size of its
    temporary buffers (activations and gradients in flight), which is exact and free
    of allocator noise. JAX reports it directly; TensorFlow only writes it into XLA's
    buffer-assignment dump, so the process must start with
    `XLA_FLAGS=--xla_dump_to=<xla_dump_dir>` (`memory_table` arranges it).
    PyTorch: peak resident memory above the pre-step level during two steps (Linux
    only, reads /proc/self/status), in a fresh process per (case, kind) started with
    `MEMORY_CHILD_ENV`, so that freed buffers leave the resident set.
    """
    x = case_inputs(case, seed)
    layer = build_layers(case)[kind]
    backend = keras.backend.backend()
    if backend == "jax":
        layer.build(x.shape)
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        compiled = _jax_grad_fn(layer).lower(trainable, non_trainable, x).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20
    step = make_train_step(layer, x)
    step()  # compile and allocate the weights first
    if backend == "tensorflow":
        if xla_dump_dir is None:
            raise ValueError("On TensorFlow, measure_peak_memory needs xla_dump_dir (see the docstring).")
        return xla_dumped_temp_bytes(xla_dump_dir, module="tf_step") / 2**20
    before = _proc_status_mb("VmRSS")
    _reset_peak_rss()
    step()
    step()
    return _proc_status_mb("VmHWM") - before


def xla_dumped_temp_bytes(dump_dir, module):
    """Size of the preallocated temporary buffer in XLA's buffer-assignment dump of the
    compiled module whose name contains `module` (0 if it needs none)."""
    import glob
    import re

    paths = [
        p for p in glob.glob(os.path.join(dump_dir, "*buffer-assignment.txt")) if module in os.path.basename(p)
    ]
    if len(paths) != 1:
        raise RuntimeError(f"Expected one XLA buffer assignment for {module!r} in {dump_dir}, found {len(paths)}.")
    with open(paths[0]) as f:
        sizes = re.findall(r"^allocation \d+: size (\d+), preallocated-temp", f.read(), flags=re.MULTILINE)
    return sum(int(size) for size in sizes)


def scaling_cases(base, num_experts=(8, 16, 32, 64, 128), tokens=(256, 1024, 4096, 16384)):
    """Cases for cost vs E (fixed k, h, T) and cost vs T (fixed E)."""
    by_experts = [dataclasses.replace(base, name=f"E={e}", num_experts=e) for e in num_experts]
    by_tokens = [dataclasses.replace(base, name=f"T={t}", tokens=t) for t in tokens]
    return by_experts, by_tokens


def time_scaling(cases, repeats=5, seed=0):
    """MoE step times of several cases, interleaved so drift hits them all alike.

    Each case's expert bank is also timed alone on balanced rows (as in `run_case`),
    so growth that comes from the expert matmuls themselves shows apart from growth
    in routing, dispatch and combine.

    Returns:
        `[{"case", "T", "E", "moe_ms", "vs_first", "experts_only_ms",
        "experts_only_vs_first"}]`, `*_vs_first` being a step time over that of the
        first case.
    """
    steps = {}
    for case in cases:
        keras.utils.set_random_seed(seed)
        moe = build_layers(case)["moe"]
        steps[case.name] = make_train_step(moe, case_inputs(case, seed))
        steps[case.name + "/experts"] = make_train_step(moe.experts, balanced_expert_rows(case, seed))
    medians = time_steps(steps, repeats=repeats)
    first = cases[0].name
    return [
        {
            "case": c.name,
            "T": c.tokens,
            "E": c.num_experts,
            "moe_ms": medians[c.name] * 1e3,
            "vs_first": medians[c.name] / medians[first],
            "experts_only_ms": medians[c.name + "/experts"] * 1e3,
            "experts_only_vs_first": medians[c.name + "/experts"] / medians[first + "/experts"],
        }
        for c in cases
    ]


def environment():
    info = {
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        info["jax"] = jax.__version__
    elif backend == "tensorflow":
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
    else:
        import torch

        info["torch"] = torch.__version__
    return info


def format_table(results):
    header = (
        "| case | mode | T | E | k | h | plan | MoE ms | dense ms | MoE/dense throughput | × all-experts "
        "| experts only/dense | each plan ms |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in results:
        all_experts = f"{r['vs_all_experts']:.1f}×" if "vs_all_experts" in r else "–"
        lines.append(
            f"| {r['case']} | {r['mode']} | {r['T']} | {r['E']} | {r['k']} | {r['h']} | {r['plan']} | "
            f"{r['moe_ms']:.1f} | {r['dense_ms']:.1f} | {r['vs_dense']:.2f} | {all_experts} | "
            f"{r['experts_only_vs_dense']:.2f} | {format_plans(r)} |"
        )
    return "\n".join(lines)


# glibc raises its mmap threshold each time a large block is freed, so a step's
# buffers come from the heap after the first step and stay resident: the peak of the
# next steps would not show. A fixed threshold keeps every block over 128 KiB mmapped
# and returns it when freed, so the resident set follows the live buffers.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def memory_table(cases, kinds=("moe", "dense")):
    """Peak memory of each kind, each measured in a fresh subprocess."""
    import subprocess
    import sys

    rows = []
    for case in cases:
        row = {"case": case.name, "mode": case.mode}
        for kind in kinds:
            spec = json.dumps(dataclasses.asdict(case))
            with tempfile.TemporaryDirectory() as dump_dir:
                env = {**os.environ, **MEMORY_CHILD_ENV}
                if keras.backend.backend() == "tensorflow":
                    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir}".strip()
                out = subprocess.run(
                    [sys.executable, "-m", "dl_moe.tools.bench", "--memory-child", spec, kind, dump_dir],
                    check=True, capture_output=True, text=True, env=env,
                ).stdout
            row[f"{kind}_mb"] = float(out.strip().splitlines()[-1])
        row["moe_vs_dense"] = row["moe_mb"] / row["dense_mb"]
        rows.append(row)
    return rows


def main(argv=None):
    """`dl-moe bench` / `python benchmarks/throughput.py`; `dl-moe bench --keras-hub ...`
    runs the keras-hub model benchmark instead (dl_moe/tools/bench_keras_hub.py), and
    `dl-moe bench --real-sizes ...` the real-size one (dl_moe/tools/real_sizes.py)."""
    import argparse

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--keras-hub"]:
        from dl_moe.tools.bench_keras_hub import main as keras_hub_main

        return keras_hub_main(argv[1:])
    if argv[:1] == ["--real-sizes"]:
        from dl_moe.tools.real_sizes import main as real_sizes_main

        return real_sizes_main(argv[1:])

    parser = argparse.ArgumentParser(prog="dl-moe bench", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="a,b,c", help="comma-separated case names among a, b, c")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per layer (median reported)")
    parser.add_argument("--scaling", action="store_true", help="also time cost vs E and vs T")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (subprocesses)")
    parser.add_argument("--output", help="write results as JSON to this path")
    parser.add_argument("--keras-hub", action="store_true", help="benchmark keras-hub MoE models instead (first option)")
    parser.add_argument(
        "--real-sizes", action="store_true",
        help="benchmark one layer at the widths of Mixtral, Qwen-MoE, Qwen3-MoE and GPT-OSS instead (first option)",
    )
    parser.add_argument(
        "--inference", action="store_true",
        help="time the forward pass in inference mode at --tokens token counts instead (E=8, k=2, d=256, h=512)",
    )
    parser.add_argument(
        "--tokens", default=",".join(map(str, INFERENCE_TOKENS)), help="--inference: comma-separated token counts"
    )
    parser.add_argument("--capacity-factor", type=float, default=1.0, help="--inference: capacity factor")
    parser.add_argument(
        "--compare-plans", action="store_true",
        help="also time the layer under every other dispatch plan that can run each case (MoEConfig.dispatch), "
        "on the same weights",
    )
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        case = Case(**json.loads(args.memory_child[0]))
        print(measure_peak_memory(case, args.memory_child[1], xla_dump_dir=args.memory_child[2]))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.inference:
        env = environment()
        print(json.dumps(env))
        return inference_main(args, env)
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = sorted(set(names) - {c.name for c in STANDARD_CASES})
    if unknown or args.repeats < 1:
        parser.error(f"unknown case(s) {unknown}; valid: a, b, c" if unknown else "--repeats must be >= 1")

    env = environment()
    print(json.dumps(env))
    report = {"environment": env, "results": []}
    for case in [c for c in STANDARD_CASES if c.name in names]:
        result = run_case(case, repeats=args.repeats, compare_plans=args.compare_plans)
        report["results"].append(result)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)
    print(format_table(report["results"]))
    if args.scaling:
        by_experts, by_tokens = scaling_cases(Case("E", 4096, 256, 512, 8, 2, 1.0))
        for label, cases in (("experts", by_experts), ("tokens", by_tokens)):
            rows = time_scaling(cases, repeats=args.repeats)
            report[f"scaling_{label}"] = rows
            for r in rows:
                print(
                    f"{r['case']:>8}: MoE {r['moe_ms']:.1f} ms (x{r['vs_first']:.2f} of {rows[0]['case']}), "
                    f"experts only {r['experts_only_ms']:.1f} ms (x{r['experts_only_vs_first']:.2f})",
                    flush=True,
                )
    if args.memory:
        report["memory"] = memory_table([c for c in STANDARD_CASES if c.name == "a"])
        for row in report["memory"]:
            print(f"memory {row['case']} {row['mode']}: MoE {row['moe_mb']:.0f} MiB, dense {row['dense_mb']:.0f} MiB, "
                  f"ratio {row['moe_vs_dense']:.2f}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
