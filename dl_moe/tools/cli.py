"""The `dl-moe` command: `demo`, `compare`, `bench` and `presets`.

Usage errors and expected failures print one line (`dl-moe: error: ...`) on stderr and
exit non-zero; set DL_MOE_DEBUG=1 to get the traceback of the latter instead.
"""

import argparse
import os
import sys

PROG = "dl-moe"


class UsageError(Exception):
    """A bad command-line value: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (`dl-moe: error: ...`), exit 2."""

    def error(self, message):
        raise UsageError(message)


# Top-level module a command may need -> (PyPI name, dl_moe extra that installs it).
EXTRAS = {
    "sklearn": ("scikit-learn", "demo"),
    "scipy": ("scipy", "demo"),
    "matplotlib": ("matplotlib", "demo"),
    "keras_hub": ("keras-hub", "keras-hub"),
    "keras_tuner": ("keras-tuner", "tuner"),
    "jax": ("jax", "jax"),
    "tensorflow": ("tensorflow", "tensorflow"),
    "torch": ("torch", "torch"),
}


def missing_extra_message(module):
    """One line naming the package a command needs and the extra that installs it.

    Args:
        module: The dotted name of the module that failed to import.

    Returns:
        The message, e.g. `this command needs scikit-learn: pip install "dl_moe[demo]"`.
    """
    top = (module or "").split(".")[0]
    if top in EXTRAS:
        package, extra = EXTRAS[top]
        return f'this command needs {package}, which is not installed: pip install "dl_moe[{extra}]"'
    return f"this command needs the Python module {module!r}, which is not installed"


def _parser():
    parser = _Parser(prog=PROG, description="Sparse Mixture-of-Experts layers for Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,compare,bench,presets}")
    demo = commands.add_parser("demo", help="train a small MoE classifier on scikit-learn's digits")
    demo.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    demo.add_argument(
        "--output-dir", default="outputs", help="folder for the saved model and the plots (default outputs)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of the split and the initialisation (default 0)")

    compare = commands.add_parser(
        "compare", help="train the demo model (or, with --task lm, a byte-level language model) with several "
        "routers over several seeds and compare them"
    )
    compare.add_argument(
        "--task", choices=("digits", "lm"), default="digits",
        help="digits: the demo classifier (default); lm: byte-level language model on the Python stdlib, "
        "dense vs MoE at matched FLOPs and parameters",
    )
    compare.add_argument(
        "--quick", action="store_true",
        help="a smaller run (digits: 10 epochs, 3 seeds; lm: d=64, context 64, 200 steps; minutes on 2 cores)",
    )
    # The router lists come from the tables the runs read, so the help cannot drift.
    from dl_moe.tools.compare import ROUTERS
    from dl_moe.tools.compare_lm import VARIANTS

    compare.add_argument(
        "--routers", default=None,
        help=f"comma-separated routers (default: all). digits: {','.join(ROUTERS)}; lm: {','.join(VARIANTS)}",
    )
    compare.add_argument("--seeds", type=int, default=None, help="seeds per router (default 5, --quick 3; lm: 3)")
    compare.add_argument("--epochs", type=int, default=None, help="digits only: epochs per run (default 20, --quick 10)")
    compare.add_argument("--steps", type=int, default=None, help="lm only: training steps per run (default 400, --quick 200)")
    compare.add_argument(
        "--batch-size", type=int, default=None, help="lm only: windows per training batch (default 16)"
    )
    compare.add_argument(
        "--learning-rate", type=float, default=None,
        help="lm only: peak learning rate of every model (default 2e-3, --quick 3e-3)",
    )
    compare.add_argument("--output-dir", default="outputs", help="folder for the CSV, JSON and plots (default outputs)")

    commands.add_parser(
        "bench", help="benchmark the MoE layer against the dense equivalent and the all-experts layer",
        add_help=False,
    )
    presets = commands.add_parser("presets", help="list the presets with their key settings")
    presets.add_argument("--descriptions", action="store_true", help="also print each preset's description")
    return parser


def _require_positive(args, *names):
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _k_and_capacity(config):
    """The presets table's "k" and "capacity" cells for one `MoEConfig`."""
    gating = config.gating_config
    kind = gating.gating_type
    if kind == "softmoe":
        return "soft (all)", f"{gating.num_slots or 'auto'} slot(s)/expert"
    if kind == "expert_choice":
        factor = gating.capacity_factor or 1.0
        return f"~{factor:g} avg", f"C=ceil({factor:g}T/E)"
    if kind == "top_p":
        k = f"top-p {gating.top_p_threshold or 0.4:g}, <={gating.max_experts or config.num_experts}"
    elif kind in ("conditional", "confidence"):
        k = f"{gating.min_experts or 1}..{gating.max_experts or min(4, config.num_experts)}"
    elif kind == "top_any":
        k = f"any, <={gating.max_experts or config.num_experts}"
    else:
        k = str(gating.top_k)
    if not config.drop_tokens:
        capacity = "dropless"
    elif gating.capacity_factor is not None:
        capacity = f"cf {gating.capacity_factor:g}"
    else:
        capacity = f"cf {config.train_capacity_factor:g}/{config.eval_capacity_factor:g}"
    return k, capacity


def preset_table(descriptions=False):
    """Every preset's key settings as a Markdown table (and descriptions below it)."""
    from dl_moe.presets import get_preset_config, list_presets, preset_description

    header = ["preset", "experts", "expert type", "ffn type", "d", "router", "k", "capacity", "shared"]
    rows = []
    for name in list_presets():
        config = get_preset_config(name)
        expert = config.expert_config
        k, capacity = _k_and_capacity(config)
        balancing = "" if config.gating_config.balancing == "aux_loss" else f" ({config.gating_config.balancing})"
        rows.append([
            name, str(config.num_experts), expert.expert_type,
            expert.ffn_type if expert.expert_type == "ffn" else "-",
            "input" if expert.hidden_dim is None else str(expert.hidden_dim),
            config.gating_config.gating_type + balancing, k, capacity, str(config.num_shared_experts),
        ])
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    lines = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(row) for row in rows]
    if descriptions:
        lines.append("")
        lines += [f"{name}: {preset_description(name)}" for name in list_presets()]
    return "\n".join(lines)


def _run(argv):
    if argv[:1] == ["bench"]:
        # The benchmark owns its options (`dl-moe bench --help`).
        os.environ.setdefault("KERAS_BACKEND", "jax")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from dl_moe.tools.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        _require_positive(args, "epochs")
        from dl_moe.tools.demo import run_demo

        summary = run_demo(epochs=args.epochs, output_dir=args.output_dir, seed=args.seed)
        return 0 if summary["reload_agrees"] else 1
    if args.command == "compare" and args.task == "lm":
        _require_positive(args, "steps", "seeds", "batch_size")
        if args.learning_rate is not None and not args.learning_rate > 0:
            raise UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
        if args.epochs is not None:
            raise UsageError("--epochs is for --task digits; --task lm counts --steps")
        from dl_moe.tools.compare_lm import parse_variants, run_lm_compare

        try:
            variants = None if args.routers is None else parse_variants(args.routers)
        except ValueError as error:
            raise UsageError(str(error)) from None
        run_lm_compare(
            routers=variants, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
            output_dir=args.output_dir, quick=args.quick,
            setup=None if args.learning_rate is None else {"learning_rate": args.learning_rate},
        )
        return 0
    if args.command == "compare":
        _require_positive(args, "epochs", "seeds")
        if args.steps is not None or args.batch_size is not None or args.learning_rate is not None:
            raise UsageError("--steps, --batch-size and --learning-rate are for --task lm")
        from dl_moe.tools.compare import parse_routers, run_compare

        try:
            routers = None if args.routers is None else parse_routers(args.routers)
        except ValueError as error:
            raise UsageError(str(error)) from None
        run_compare(
            routers=routers, seeds=args.seeds, epochs=args.epochs, output_dir=args.output_dir, quick=args.quick
        )
        return 0
    if args.command == "presets":
        print(preset_table(descriptions=args.descriptions))
        return 0
    return 2


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except UsageError as error:
        print(f"{PROG}: error: {error} (see `{PROG} --help`)", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if os.environ.get("DL_MOE_DEBUG"):
            raise
        print(f"{PROG}: error: {missing_extra_message(error.name)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        if os.environ.get("DL_MOE_DEBUG"):
            raise
        # Expected failures (unwritable output folder, invalid preset file, ...): one line.
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
