"""Mutation check: do the tests catch hand-written bugs? (not part of `make test`)

Each mutant is a text patch: a short, distinctive snippet of the package's source and
what to put in its place. The patch is applied to a temporary copy of the package
(the working tree is never touched), the tests that should notice it run on one
backend, and the table says which test failed first, or SURVIVED.

The snippet is searched in every file of the package, so a mutant keeps applying when
code moves between modules; it must occur exactly once, otherwise the mutant is
reported as "mutant no longer applies" and the run fails.

Usage (from the repository root):

    KERAS_BACKEND=torch python benchmarks/mutation_check.py   # every mutant (eager torch is quickest)
    KERAS_BACKEND=torch python benchmarks/mutation_check.py --only swap_gate_up,drop_z_loss
    python benchmarks/mutation_check.py --list     # or --check: does every mutant still apply?

Exit status 0 when every mutant is caught, 1 otherwise.
"""

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "dl_moe"


@dataclasses.dataclass(frozen=True)
class Mutant:
    """A one-place change of the package and the tests that must notice it.

    Attributes:
        name: Short identifier.
        description: The bug it simulates.
        old: Source snippet to replace (must occur exactly once in the package).
        new: Replacement.
        tests: pytest node ids or files (relative to the repository root); a
            "file::-k expr" entry selects tests by keyword.
        backend: Backend these tests need (None: the run's backend).
    """

    name: str
    description: str
    old: str
    new: str
    tests: tuple
    backend: str = None


REF = "tests/test_layer_reference.py"
ROUTERS_REF = "tests/test_routers_reference.py"
DOCUMENTED = "tests/test_documented_behaviours.py"

MUTANTS = [
    # ------------------------------------------------------------- experts
    Mutant(
        "swap_gate_up",
        "GLU experts gate with the up matrix and scale with the gate matrix",
        "return self._activation(gate) * up",
        "return self._activation(up) * gate",
        (f"{REF}::-k dropless_matches_reference",),
    ),
    Mutant(
        "silu_derivative_without_its_second_term",
        "the grouped plan's fused backward pass uses sigmoid(g) as silu's derivative",
        "return s * (1.0 + x * (1.0 - s))",
        "return s",
        ("tests/test_plans.py::-k grouped_gradients",),
    ),
    Mutant(
        "swap_gate_up_on_load",
        "loading a .keras file puts the saved gate matrix into up_kernel and vice versa",
        "getattr(self, name).assign(store[str(index)])",
        'getattr(self, {"gate_kernel": "up_kernel", "up_kernel": "gate_kernel"}.get(name, name))'
        ".assign(store[str(index)])",
        ("tests/test_portability.py",),
    ),
    Mutant(
        "bias_without_gradient",
        "expert biases take part in the forward pass but get no gradient",
        '                bias = getattr(self, name + "_bias")\n                if group_expert',
        '                bias = ops.stop_gradient(getattr(self, name + "_bias"))\n                if group_expert',
        ("tests/test_gradients.py",),
    ),
    # ------------------------------------------------------------ dispatch
    Mutant(
        "reverse_drop_priority",
        "a full expert keeps the latest assignments instead of the earliest",
        'order = ops.cast(ops.argsort(flat_expert * num_assignments + position), "int32")',
        'order = ops.cast(ops.argsort(flat_expert * num_assignments + (num_assignments - 1 - position)), "int32")',
        (f"{REF}::-k capacity_mode_drops",),
    ),
    Mutant(
        "capacity_off_by_one",
        "expert capacity from ceil(cf * T * k / E) + 1",
        "return round_up_rows(math.ceil(capacity_factor * num_tokens * top_k / num_experts), multiple)",
        "return round_up_rows(math.ceil(capacity_factor * num_tokens * top_k / num_experts) + 1, multiple)",
        ("tests/test_dispatch.py::-k capacity",),
    ),
    Mutant(
        "combine_swaps_slot_weights",
        "combine weights each token's j-th expert output with the weight of another slot",
        'summed = ops.einsum("tk,tkf->tf", ops.cast(w, gathered.dtype), flat)',
        'summed = ops.einsum("tk,tkf->tf", ops.cast(ops.flip(w, axis=-1), gathered.dtype), flat)',
        ("tests/test_dispatch.py::-k round_trip",),
    ),
    Mutant(
        "layer_combines_with_other_weights",
        "the layer combines with the routing weights of the other slots (router unchanged)",
        "return dispatch_lib.combine(expert_outputs, plan, call.weights)",
        "return dispatch_lib.combine(expert_outputs, plan, ops.flip(call.weights, axis=-1))",
        ("tests/test_properties.py::-k layer_invariants",),
    ),
    Mutant(
        "residual_without_gradient",
        "a fully dropped token's residual passes its value but not its gradient",
        "outputs = outputs + ops.where(rows, tokens, ops.zeros_like(tokens))",
        "outputs = outputs + ops.where(rows, ops.stop_gradient(tokens), ops.zeros_like(tokens))",
        ("tests/test_gradients.py",),
    ),
    Mutant(
        "residual_cut_to_output_width",
        "a fully dropped token with output_dim != d outputs its input cut to the output width",
        "layer.config.use_residual_connection and tuple(outputs.shape[1:]) == tuple(\n        tokens.shape[1:]\n    ):\n"
        "        rows = ops.reshape(unrouted, (-1,) + (1,) * (len(tokens.shape) - 1))\n"
        "        outputs = outputs + ops.where(rows, tokens, ops.zeros_like(tokens))",
        "layer.config.use_residual_connection:\n"
        "        rows = ops.reshape(unrouted, (-1,) + (1,) * (len(tokens.shape) - 1))\n"
        "        outputs = outputs + ops.where(rows, tokens, ops.zeros_like(tokens))[..., : outputs.shape[-1]]",
        (f"{DOCUMENTED}::-k fully_dropped",),
    ),
    Mutant(
        "expert_choice_capacity_plus_one",
        "expert choice takes ceil(T * c / E) + 1 tokens per expert",
        "return max(1, min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts)))",
        "return max(1, min(num_tokens, math.ceil(num_tokens * capacity_factor / num_experts) + 1))",
        (f"{ROUTERS_REF}::-k expert_choice_layer_output",),
    ),
    Mutant(
        "layer_ignores_gating_capacity_factor",
        "the layer sizes buffers from train/eval_capacity_factor, ignoring GatingConfig.capacity_factor",
        "capacity_factor = layer.config.capacity_factor(bool(training))\n    if export_compat",
        "capacity_factor = layer.config.train_capacity_factor if training else layer.config.eval_capacity_factor\n"
        "    if export_compat",
        (f"{REF}::-k overrides_both_phases",),
    ),
    # -------------------------------------------------------------- routing
    Mutant(
        "skip_top_k_renormalisation",
        "normalize_top_k=True keeps the raw selected probabilities",
        "    if normalize:\n        weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)\n"
        '    return weights, ops.cast(indices, "int32")',
        '    return weights, ops.cast(indices, "int32")',
        (f"{REF}::-k dropless_matches_reference",),
    ),
    Mutant(
        "aux_free_bias_on_weights",
        "the aux-free bias is added to the weights instead of the selection scores",
        "_, indices = export_compat.top_k(probs + ops.cast(bias, probs.dtype), top_k)\n"
        "        weights = ops.take_along_axis(probs, indices, axis=-1)",
        "_, indices = export_compat.top_k(probs, top_k)\n"
        "        weights = ops.take_along_axis(probs + ops.cast(bias, probs.dtype), indices, axis=-1)",
        (f"{ROUTERS_REF}::-k aux_free",),
    ),
    Mutant(
        "expert_choice_ignores_mask",
        "the expert-choice router lets experts pick padding tokens",
        'scores = ops.where(ops.expand_dims(ops.cast(mask, "bool"), -1), probs, -1.0)',
        "scores = probs",
        (f"{ROUTERS_REF}::-k expert_choice_hand",),
    ),
    Mutant(
        "top_p_ignores_threshold",
        "top-p routing uses the default threshold 0.4 whatever top_p_threshold says",
        "threshold=DEFAULT_THRESHOLD if gating.top_p_threshold is None else gating.top_p_threshold,",
        "threshold=DEFAULT_THRESHOLD,",
        (f"{ROUTERS_REF}::-k numpy_reference and top_p",),
    ),
    Mutant(
        "resonance_ignores_strength",
        "resonance uses the default bidirectional_strength 0.5",
        "bidirectional_strength=DEFAULT_STRENGTH if strength is None else strength,",
        "bidirectional_strength=DEFAULT_STRENGTH,",
        (f"{ROUTERS_REF}::-k numpy_reference and resonance",),
    ),
    Mutant(
        "ensemble_ignores_member_weights",
        "every ensemble member gets weight 1",
        "weights.append(weight)",
        "weights.append(1.0)",
        (f"{ROUTERS_REF}::-k numpy_reference and ensemble",),
    ),
    Mutant(
        "conditional_ignores_threshold_low",
        "the conditional router uses the default threshold_low 0.3",
        "threshold_low=pick(gating.threshold_low, DEFAULT_THRESHOLD_LOW),",
        "threshold_low=DEFAULT_THRESHOLD_LOW,",
        (f"{ROUTERS_REF}::-k numpy_reference and conditional",),
    ),
    Mutant(
        "confidence_ignores_min_experts",
        "the confidence router always starts from 1 expert",
        "min_experts=gating.min_experts or 1,\n            max_experts=gating.max_experts,\n            layer_depth_scale",
        "min_experts=1,\n            max_experts=gating.max_experts,\n            layer_depth_scale",
        (f"{ROUTERS_REF}::-k numpy_reference and confidence",),
    ),
    Mutant(
        "hierarchical_without_group_probability",
        "hierarchical p(node) = p(node | parent), leaving out p(parent)",
        "probs = ops.reshape(ops.expand_dims(probs, -1) * within, (-1, nodes))",
        "probs = ops.reshape(within + 0 * ops.expand_dims(probs, -1), (-1, nodes))",
        ("tests/test_hierarchical.py::-k numpy_reference",),
    ),
    Mutant(
        "difficulty_head_never_trained",
        "the conditional router registers no difficulty loss, so its head never learns",
        "if training and self.difficulty_loss_weight > 0:",
        "if False:",
        ("tests/test_routers_battery.py::-k layer_checks and conditional",),
    ),
    # ---------------------------------------------------------------- noise
    Mutant(
        "jitter_half_range",
        "input jitter drawn from U(1 - j/2, 1 + j)",
        "minval=1.0 - self.jitter_noise,",
        "minval=1.0 - 0.5 * self.jitter_noise,",
        (f"{DOCUMENTED}::-k jitter",),
    ),
    Mutant(
        "jitter_in_eval",
        "outside training the router input is scaled by 1 - j",
        "if not training or self.jitter_noise == 0:\n            return inputs",
        "if self.jitter_noise == 0:\n            return inputs\n"
        "        if not training:\n            return inputs * (1.0 - self.jitter_noise)",
        (f"{REF}::-k noise_only_in_training",),
    ),
    Mutant(
        "noisy_top_k_without_softplus",
        "noisy top-k scales the noise by x W_noise instead of softplus(x W_noise)",
        "# [..., E]\n        selection_logits = logits\n        if training and self.add_noise:\n"
        "            noise_scale = ops.softplus(ops.matmul(x, self.noise_kernel)) * self.noise_std",
        "# [..., E]\n        selection_logits = logits\n        if training and self.add_noise:\n"
        "            noise_scale = ops.matmul(x, self.noise_kernel) * self.noise_std",
        (f"{DOCUMENTED}::-k shazeer",),
    ),
    Mutant(
        "noise_not_from_the_seed",
        "router noise comes from a clock-seeded generator, not from the seed",
        "self.seed_generator = keras.random.SeedGenerator(seed)",
        'self.seed_generator = keras.random.SeedGenerator(seed if seed is not None else __import__("time").time_ns() % 2**31)',
        (f"{DOCUMENTED}::-k same_seed",),
    ),
    # ------------------------------------------------------------- cosine/top-any
    Mutant(
        "cosine_default_temperature",
        "the cosine router's default tau is 0.1",
        "temperature=gating.temperature or 0.07,",
        "temperature=gating.temperature or 0.1,",
        (f"{DOCUMENTED}::-k cosine",),
    ),
    Mutant(
        "cosine_scale_always_trainable",
        "learnable_temperature=False still trains the cosine logit scale",
        "initializer=keras.initializers.Constant(math.log(1.0 / self.temperature)),\n"
        "            trainable=self.learnable_temperature,",
        "initializer=keras.initializers.Constant(math.log(1.0 / self.temperature)),\n            trainable=True,",
        (f"{DOCUMENTED}::-k cosine",),
    ),
    Mutant(
        "top_any_without_straight_through",
        "top-any uses the hard gate, so thresholds get no gradient",
        "gate = hard + soft - ops.stop_gradient(soft)",
        "gate = hard + 0 * soft",
        (f"{DOCUMENTED}::-k straight_through",),
    ),
    # --------------------------------------------------------------- losses
    Mutant(
        "drop_z_loss",
        "no router registers its z-loss",
        '_register_loss(layer, "z", gating.z_loss_weight, lambda: router_z_loss(logits, token_mask))',
        "pass",
        (f"{REF}::-k losses_match_reference",),
    ),
    Mutant(
        "soft_moe_drops_z_loss",
        "Soft MoE registers no z-loss",
        'statistics.add_training_losses(layer, {"gate_logits": logits}, token_mask)',
        "pass",
        (f"{DOCUMENTED}::-k soft_moe",),
    ),
    Mutant(
        "importance_cv_not_squared",
        "the importance loss is CV, not CV^2",
        "return ops.mean(ops.square(values - mean)) / (ops.square(mean) + epsilon)",
        "return ops.sqrt(ops.mean(ops.square(values - mean))) / (ops.abs(mean) + epsilon)",
        ("tests/test_balancing.py::-k numpy",),
    ),
    Mutant(
        "entropy_in_bits",
        "the entropy loss is measured in bits instead of nats",
        "entropy = -ops.sum(router_probs * ops.log(router_probs + epsilon), axis=-1)",
        "entropy = -ops.sum(router_probs * ops.log(router_probs + epsilon), axis=-1) / 0.6931471805599453",
        ("tests/test_balancing.py::-k numpy",),
    ),
    # ------------------------------------------------- precision, fast paths
    Mutant(
        "router_in_compute_dtype",
        "the router runs in the layer's compute dtype (bfloat16 under mixed precision)",
        '"dtype": config.routing_dtype,',
        '"dtype": None,',
        ("tests/test_layer_reference.py::-k mixed_precision_keeps_router",),
    ),
    Mutant(
        "eager_plans_never_taken",
        "eager PyTorch's plans (slices, host_slices) never run",
        "    if not facts.eager_torch:\n",
        "    if True:\n",
        ("tests/test_fast_paths.py::-k masked_tokens_and_idle_experts", "tests/test_plans.py::-k auto"),
        backend="torch",
    ),
    Mutant(
        "host_plan_ignores_capacity",
        "host-planned slices compute every active assignment in capacity mode too",
        "        keep &= rank < capacity",
        "        pass",
        ("tests/test_small_batch.py::-k T12_skewed",),
        backend="torch",
    ),
    Mutant(
        "host_plan_unweighted_combine",
        "host-planned slices add the expert outputs without their combine weights",
        "index_add(0, row_token, rows * row_weight[:, None])",
        "index_add(0, row_token, rows)",
        ("tests/test_small_batch.py::-k decode_plan_equals",),
        backend="torch",
    ),
    # ---------------------------------------------------- the grouped plan
    Mutant(
        "grouped_backward_overwrites_weight_gradient",
        "the grouped matmul's backward writes each block's weight gradient over its expert's, "
        "instead of adding it (wrong for experts of several blocks)",
        "grad_w = _put_block(grad_w, expert, _block(grad_w, expert) + grad_w_g)",
        "grad_w = _put_block(grad_w, expert, grad_w_g)",
        ("tests/test_capacity_classes.py::-k gradients", "tests/test_plans.py::-k gradients"),
        backend="jax",  # the GLU case's grouped gradient runs on JAX only (see the xfails)
    ),
    Mutant(
        "grouped_forward_first_expert_weights",
        "the grouped matmul multiplies every expert's blocks by the first touched expert's weights",
        "w_e = _expert(w, expert, x.dtype)",
        "w_e = _expert(w, ops.take(blocks.touched, 0), x.dtype)",
        ("tests/test_plans.py::-k every_plan_matches", "tests/test_small_batch.py::-k decode_plan_equals"),
        backend="jax",
    ),
    Mutant(
        "grouped_capacity_mode_drops_nothing",
        "the grouped plan computes every active assignment in capacity mode (C ignored)",
        "            active = active & kept\n",
        "            pass\n",
        ("tests/test_plans.py::-k every_plan_matches", "tests/test_small_batch.py::-k T12_skewed"),
        backend="jax",
    ),
    Mutant(
        "slices_call_idle_experts",
        "the slice path calls a bank for experts without rows too",
        "        if count == 0:\n            continue\n        kwargs = dict(extra)",
        "        kwargs = dict(extra)",
        ("tests/test_fast_paths.py::-k once_per_expert",),
    ),
    Mutant(
        "expert_parallel_no_constraint",
        "expert_parallel=True leaves the [E, C, d] buffers unconstrained",
        "return constrain_to_expert_axis(expert_inputs, stacked)",
        "return expert_inputs",
        ("tests/test_distribution.py::-k single_device",),
        backend="jax",  # keras.distribution's SPMD sharding is JAX's
    ),
    # ------------------------------------------------------------ callbacks
    Mutant(
        "monitor_reads_every_batch",
        "RoutingMonitor(update_freq=N) reads every batch instead of every N",
        "if (batch + 1) % self.update_freq == 0:",
        "if True:",
        ("tests/test_callbacks.py::-k every_n",),
    ),
    Mutant(
        "monitor_logs_wrong_statistic",
        "RoutingMonitor logs the dropped fraction as the load CV",
        '"load_cv": "load_cv",',
        '"load_cv": "dropped_fraction",',
        ("tests/test_callbacks.py::-k history_for_every",),
    ),
]


def find_snippet(package_dir, snippet):
    """`[path]` of the package files containing `snippet`, once per occurrence."""
    hits = []
    for directory, _, files in os.walk(package_dir):
        for file_name in files:
            if file_name.endswith(".py"):
                path = os.path.join(directory, file_name)
                with open(path, encoding="utf-8") as handle:
                    hits += [path] * handle.read().count(snippet)
    return hits


def copy_tree(destination):
    """Copies the package and the tests (no caches) into `destination`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in (PACKAGE, "tests", "presets", "examples"):
        source = os.path.join(ROOT, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(destination, name), ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if os.path.exists(os.path.join(ROOT, name)):
            shutil.copy(os.path.join(ROOT, name), destination)


def apply(mutant, workdir):
    """Applies `mutant` inside `workdir`; returns an error message or None."""
    hits = find_snippet(os.path.join(workdir, PACKAGE), mutant.old)
    if len(hits) != 1:
        return f"mutant no longer applies: snippet found {len(hits)} times, expected once: {mutant.old!r}"
    with open(hits[0], encoding="utf-8") as handle:
        text = handle.read()
    with open(hits[0], "w", encoding="utf-8") as handle:
        handle.write(text.replace(mutant.old, mutant.new))
    return None


def pytest_commands(tests):
    """One pytest argument list per test entry ("file::-k expr" selects by keyword)."""
    commands = []
    for entry in tests:
        if "::-k " in entry:
            path, expr = entry.split("::-k ", 1)
            commands.append([path, "-k", expr])
        else:
            commands.append([entry])
    return commands


def preload(backend):
    """Imports the heavy, unmutated modules once, so forked runs start without them."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import hypothesis  # noqa: F401
    import keras  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401


def run_pytest_forked(arguments, workdir, timeout):
    """pytest in a forked child of this (preloaded) process; returns `(exit code, output)`.

    The child imports the package from `workdir`: the parent never imports it.
    """
    output_path = os.path.join(workdir, "pytest_output.txt")
    pid = os.fork()
    if pid == 0:  # child
        code = 3
        try:
            os.chdir(workdir)
            sys.path.insert(0, workdir)
            os.environ["PYTHONPATH"] = workdir  # for the tests' own subprocesses
            with open(output_path, "w") as output:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                import pytest

                code = pytest.main(arguments)
        finally:
            os._exit(int(code))
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None, ""
        time.sleep(0.5)
    with open(output_path) as output:
        return os.waitstatus_to_exitcode(status), output.read()


def run_tests(mutant, workdir, backend, python, timeout, forked=False):
    """Runs the mutant's tests; returns `(caught, detail)`."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=workdir, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for arguments in pytest_commands(mutant.tests):
        command = [python, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                   "--no-header", "-rf"] + arguments
        if forked:
            returncode, stdout = run_pytest_forked(command[3:], workdir, timeout)
        else:
            try:
                result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
                returncode, stdout = result.returncode, result.stdout
            except subprocess.TimeoutExpired:
                returncode, stdout = None, ""
        if returncode is None:
            return True, f"timed out after {timeout}s ({' '.join(arguments)})"
        if returncode == 5:
            return False, f"no test selected by {' '.join(arguments)}"
        if returncode != 0:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", stdout, flags=re.MULTILINE)
            return True, failed[0] if failed else f"pytest exit {returncode}: {stdout[-300:]}"
    return False, "SURVIVED"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("--no-fork", action="store_true",
                        help="one fresh interpreter per run (default: fork a process that imported keras once)")
    args = parser.parse_args(argv)
    mutants = MUTANTS
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - {m.name for m in MUTANTS})
        if unknown:
            parser.error(f"unknown mutants {unknown}; known: {[m.name for m in MUTANTS]}")
        mutants = [m for m in MUTANTS if m.name in wanted]
    if args.list:
        for mutant in mutants:
            print(f"{mutant.name}: {mutant.description}")
        return 0
    if args.check:
        stale = []
        with tempfile.TemporaryDirectory(prefix="mutants_") as workdir:
            copy_tree(workdir)
            for mutant in mutants:
                hits = find_snippet(os.path.join(workdir, PACKAGE), mutant.old)
                if len(hits) != 1:
                    stale.append(mutant.name)
                    print(f"{mutant.name}: mutant no longer applies (snippet found {len(hits)} times)")
        print(f"{len(mutants) - len(stale)}/{len(mutants)} mutants apply")
        return 1 if stale else 0
    backend = os.environ.get("KERAS_BACKEND", "torch")
    forked = hasattr(os, "fork") and not args.no_fork
    if forked:
        preload(backend)
    rows, all_caught = [], True
    for mutant in mutants:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as workdir:
            copy_tree(workdir)
            error = apply(mutant, workdir)
            if error:
                caught, detail = False, error
            else:
                own_backend = mutant.backend or backend
                caught, detail = run_tests(
                    mutant, workdir, own_backend, sys.executable, args.timeout, forked and own_backend == backend
                )
        all_caught &= caught
        rows.append((mutant.name, mutant.backend or backend, detail,
                     time.time() - start))
        print(f"{mutant.name}: {rows[-1][2]} ({rows[-1][3]:.0f}s)", file=sys.stderr, flush=True)
    print("\n| mutant | backend | caught by | s |")
    print("|---|---|---|---|")
    for name, used_backend, detail, seconds in rows:
        print(f"| {name} | {used_backend} | {detail} | {seconds:.0f} |")
    caught_count = sum(d != "SURVIVED" and not d.startswith("mutant no longer") for _, _, d, _ in rows)
    print(f"\n{caught_count}/{len(rows)} mutants caught")
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
