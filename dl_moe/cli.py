"""The `dl-moe` command."""

import argparse
import os
import sys


def _parser():
    parser = argparse.ArgumentParser(prog="dl-moe", description="Sparse Mixture-of-Experts layers for Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small MoE classifier on scikit-learn's digits")
    demo.add_argument("--epochs", type=int, default=20)
    demo.add_argument("--output-dir", default="outputs")
    demo.add_argument("--seed", type=int, default=0)
    commands.add_parser(
        "bench", help="benchmark the MoE layer against the dense equivalent and the all-experts layer",
        add_help=False,
    )
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        # The benchmark owns its options (`dl-moe bench --help`).
        os.environ.setdefault("KERAS_BACKEND", "jax")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from dl_moe.bench import main as bench_main

        return bench_main(argv[1:])
    args = _parser().parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.command == "demo":
        if args.epochs < 1:
            print("dl-moe: error: --epochs must be >= 1", file=sys.stderr)
            return 2
        from dl_moe.demo import run_demo

        summary = run_demo(epochs=args.epochs, output_dir=args.output_dir, seed=args.seed)
        return 0 if summary["reload_agrees"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
