"""Mutation check: do the tests catch hand-written bugs? (not part of `make test`)

Each mutant is a text patch: a short, distinctive snippet of the package's source and
what to put in its place. The patch is applied to a temporary copy of the package
(the working tree is never touched), the tests that should notice it run on one
backend, and the table says which test failed first, or SURVIVED.

The snippet is searched in every file of the package, so a mutant keeps applying when
code moves between modules; it must occur exactly once, otherwise the mutant is
reported as "mutant no longer applies" and the run fails.

Usage (from the repository root):

    KERAS_BACKEND=jax python benchmarks/mutation_check.py            # every mutant
    KERAS_BACKEND=jax python benchmarks/mutation_check.py --only swap_gate_up,skip_renormalisation
    python benchmarks/mutation_check.py --list

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
    """

    name: str
    description: str
    old: str
    new: str
    tests: tuple


MUTANTS = [
    # ------------------------------------------------------------- experts
    Mutant(
        "swap_gate_up",
        "GLU experts use the up matrix as the gate and vice versa",
        "gate = self._project(rows, self.gate_kernel",
        "gate = self._project(rows, self.up_kernel",
        ("tests/test_layer_reference.py::-k dropless_matches_reference",),
    ),
    # ------------------------------------------------------------ dispatch
    Mutant(
        "reverse_drop_priority",
        "capacity priority puts later tokens first (choice * T - token)",
        "priority = choice * num_tokens + token",
        "priority = choice * num_tokens + (num_tokens - 1 - token)",
        ("tests/test_layer_reference.py::-k capacity_mode_drops",),
    ),
    Mutant(
        "capacity_off_by_one",
        "expert capacity one row short of ceil(cf * T * k / E) rounded up to 8",
        "return round_up_rows(math.ceil(capacity_factor * num_tokens * top_k / num_experts))",
        "return round_up_rows(math.ceil(capacity_factor * num_tokens * top_k / num_experts)) - 1",
        ("tests/test_dispatch.py::-k capacity", "tests/test_layer_reference.py::-k capacity"),
    ),
    # -------------------------------------------------------------- routing
    Mutant(
        "skip_top_k_renormalisation",
        "normalize_top_k=True keeps the raw selected probabilities",
        "weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)",
        "weights = weights",
        ("tests/test_layer_reference.py::-k dropless_matches_reference",),
    ),
    Mutant(
        "aux_free_bias_on_weights",
        "the aux-free bias is added to the weights instead of the selection scores",
        "_, indices = ops.top_k(probs + ops.cast(bias, probs.dtype), top_k)\n"
        "        weights = ops.take_along_axis(probs, indices, axis=-1)",
        "_, indices = ops.top_k(probs, top_k)\n"
        "        weights = ops.take_along_axis(probs + ops.cast(bias, probs.dtype), indices, axis=-1)",
        ("tests/test_routers_reference.py::-k aux_free", "tests/test_balancing.py"),
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


def run_tests(mutant, workdir, backend, python, timeout):
    """Runs the mutant's tests; returns `(caught, detail)`."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=workdir, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    for arguments in pytest_commands(mutant.tests):
        command = [python, "-m", "pytest", "-x", "-q", "-p", "no:xdist", "-p", "no:cacheprovider",
                   "--no-header", "-rf"] + arguments
        try:
            result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return True, f"timed out after {timeout}s ({' '.join(arguments)})"
        if result.returncode == 5:
            return False, f"no test selected by {' '.join(arguments)}"
        if result.returncode != 0:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, flags=re.MULTILINE)
            return True, failed[0] if failed else f"pytest exit {result.returncode}: {result.stdout[-300:]}"
    return False, "SURVIVED"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
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
    backend = os.environ.get("KERAS_BACKEND", "jax")
    rows, all_caught = [], True
    for mutant in mutants:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as workdir:
            copy_tree(workdir)
            error = apply(mutant, workdir)
            if error:
                caught, detail = False, error
            else:
                caught, detail = run_tests(mutant, workdir, backend, sys.executable, args.timeout)
        all_caught &= caught
        rows.append((mutant.name, detail if caught or error else "SURVIVED", time.time() - start))
        print(f"{mutant.name}: {rows[-1][1]} ({rows[-1][2]:.0f}s)", file=sys.stderr, flush=True)
    print(f"\nMutation check on {backend}:\n")
    print("| mutant | caught by | s |")
    print("|---|---|---|")
    for name, detail, seconds in rows:
        print(f"| {name} | {detail} | {seconds:.0f} |")
    print(f"\n{sum(d != 'SURVIVED' and not d.startswith('mutant no longer') for _, d, _ in rows)}"
          f"/{len(rows)} mutants caught")
    return 0 if all_caught else 1


if __name__ == "__main__":
    sys.exit(main())
