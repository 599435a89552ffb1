"""keras-hub MoE models, stock against sparsified: train-step time and greedy decoding.

For the current KERAS_BACKEND, in one process, with interleaved timed runs (median):

* train step (`train_on_batch`, compiled on JAX/TF, eager PyTorch) of the stock
  Mixtral CausalLM, the sparsified one (dropless, and capacity mode with
  `train_capacity_factor=1.25`) and the dense equivalent: keras-hub's Mistral with the
  same attention and a SwiGLU FFN of width k·h (the same active FLOPs), the limit;
* greedy `generate()` time per new token of the stock and the sparsified (dropless)
  model at batch 1 and 8, checking that both give the same tokens.

    KERAS_BACKEND=jax python benchmarks/keras_hub.py --repeats 5
    dl-moe bench --keras-hub --repeats 5

Random weights built from constructor arguments: no downloads.
"""

import argparse
import json
import time

import keras
import numpy as np

from dl_moe.tools.bench import environment, time_steps


def _mixtral_kwargs(args):
    return dict(
        vocabulary_size=args.vocab,
        num_layers=args.layers,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=args.hidden,
        intermediate_dim=args.intermediate,
        num_experts=args.experts,
        top_k=args.top_k,
        sliding_window=args.seq,
    )


def build_models(args):
    """`{name: CausalLM}`: stock, dropless, capacity 1.25 (same weights) and dense equivalent."""
    import keras_hub

    from dl_moe.integrations.keras_hub import sparsify

    keras.utils.set_random_seed(0)
    kwargs = _mixtral_kwargs(args)
    stock_backbone = keras_hub.models.MixtralBackbone(**kwargs)
    weights = stock_backbone.get_weights()

    def twin(**overrides):
        backbone = keras_hub.models.MixtralBackbone(**kwargs)
        backbone.set_weights(weights)
        return sparsify(keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None), **overrides)

    dense_kwargs = {k: v for k, v in kwargs.items() if k not in ("num_experts", "top_k")}
    dense_kwargs["intermediate_dim"] = args.top_k * args.intermediate
    return {
        "stock": keras_hub.models.MixtralCausalLM(backbone=stock_backbone, preprocessor=None),
        "dropless": twin(),
        "capacity_1.25": twin(drop_tokens=True, train_capacity_factor=1.25),
        "dense_equivalent": keras_hub.models.MistralCausalLM(
            backbone=keras_hub.models.MistralBackbone(**dense_kwargs), preprocessor=None
        ),
    }


def time_train_steps(models, args):
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(1, args.vocab, size=(args.batch, args.seq)).astype("int32"),
        "padding_mask": np.ones((args.batch, args.seq), dtype=bool),
    }
    y = np.roll(x["token_ids"], -1, axis=1)
    steps = {}
    for name, model in models.items():
        model.compile(
            optimizer=keras.optimizers.SGD(1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        steps[name] = lambda model=model: model.train_on_batch(x, y)
    medians = time_steps(steps, repeats=args.repeats, warmup=1, settle=0)
    tokens = args.batch * args.seq
    return {
        name: {
            "ms": seconds * 1e3,
            "tokens_per_s": tokens / seconds,
            "vs_stock": medians["stock"] / seconds,
            "vs_dense_equivalent": medians["dense_equivalent"] / seconds,
        }
        for name, seconds in medians.items()
    }


def time_generate(models, args, batch):
    rng = np.random.default_rng(1)
    length = args.prompt + args.new_tokens
    token_ids = np.zeros((batch, length), dtype="int32")
    token_ids[:, : args.prompt] = rng.integers(1, args.vocab, size=(batch, args.prompt))
    padding_mask = np.zeros((batch, length), dtype=bool)
    padding_mask[:, : args.prompt] = True
    prompt = {"token_ids": token_ids, "padding_mask": padding_mask}
    outputs = {}

    def step(model, name):
        outputs[name] = keras.ops.convert_to_numpy(model.generate(dict(prompt), stop_token_ids=None)["token_ids"])

    chosen = {name: models[name] for name in ("stock", "dropless")}
    for model in chosen.values():
        model.compile(sampler="greedy")
    medians = time_steps(
        {name: (lambda m=model, n=name: step(m, n)) for name, model in chosen.items()},
        repeats=args.repeats,
        warmup=1,
        settle=0,
    )
    same = bool(np.array_equal(outputs["stock"], outputs["dropless"]))
    return {
        name: {"ms_per_token": seconds * 1e3 / args.new_tokens, "vs_stock": medians["stock"] / seconds}
        for name, seconds in medians.items()
    } | {"same_tokens": same}


def format_tables(report):
    env = report["environment"]
    backend = env["backend"]
    lines = [
        f"| {backend}: train step | ms | tokens/s | × stock | × dense equivalent |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["train"].items():
        lines.append(
            f"| {name} | {row['ms']:.0f} | {row['tokens_per_s']:.0f} | {row['vs_stock']:.2f} | "
            f"{row['vs_dense_equivalent']:.2f} |"
        )
    lines += ["", f"| {backend}: greedy generate | batch | ms/token | × stock | same tokens |", "|---|---|---|---|---|"]
    for batch, result in report["generate"].items():
        for name in ("stock", "dropless"):
            row = result[name]
            lines.append(
                f"| {name} | {batch} | {row['ms_per_token']:.1f} | {row['vs_stock']:.2f} | {result['same_tokens']} |"
            )
    return "\n".join(lines)


def main(argv=None):
    """`dl-moe bench --keras-hub` / `python benchmarks/keras_hub.py`."""
    parser = argparse.ArgumentParser(prog="dl-moe bench --keras-hub", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512, help="expert width h")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8, help="train batch")
    parser.add_argument("--seq", type=int, default=512, help="train sequence length")
    parser.add_argument("--prompt", type=int, default=8, help="generate: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=56, help="generate: new tokens")
    parser.add_argument("--generate-batches", default="1,8")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step timing")
    parser.add_argument("--output", help="write results as JSON to this path")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    env = environment()
    env["config"] = {k: v for k, v in vars(args).items() if k not in ("output",)}
    print(json.dumps(env), flush=True)
    start = time.perf_counter()
    models = build_models(args)
    report = {"environment": env, "train": {}, "generate": {}}
    if not args.no_train:
        report["train"] = time_train_steps(models, args)
        print(json.dumps({"train": report["train"]}), flush=True)
    for batch in [int(b) for b in args.generate_batches.split(",") if b.strip()]:
        report["generate"][batch] = time_generate(models, args, batch)
        print(json.dumps({"generate": {batch: report["generate"][batch]}}), flush=True)
    report["seconds"] = time.perf_counter() - start
    print(format_tables(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
