"""Sparse MoE blocks inside a keras-hub Mixtral: same outputs, then train, decode, save.

Builds a small random Mixtral CausalLM from constructor arguments (no downloads),
sparsifies a copy with `dl_moe.integrations.keras_hub.sparsify`, checks that both give
the same logits and greedy tokens, trains the sparse one for a few steps with
`RoutingMonitor`, saves and reloads it as `.keras`, and writes its weights back into a
stock keras-hub model with `unsparsify`.

    KERAS_BACKEND=jax python examples/keras_hub_sparse_moe.py [--epochs 3] [--output-dir outputs]
"""

import argparse
import os

import keras
import keras_hub
import numpy as np

from dl_moe.callbacks import RoutingMonitor
from dl_moe.integrations.keras_hub import moe_layers, sparsify, unsparsify


def build_backbone(args):
    return keras_hub.models.MixtralBackbone(
        vocabulary_size=args.vocab, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=args.hidden,
        intermediate_dim=2 * args.hidden, num_experts=8, top_k=2, sliding_window=args.seq,
    )


def main(epochs=3, hidden=64, vocab=128, seq=32, num_examples=64, output_dir="outputs", generate=True, verbose=1):
    """Runs the walk-through; returns `{"loss": per-epoch losses, "reload_difference", "same_tokens"}`
    (`same_tokens` is None with `generate=False`)."""
    args = argparse.Namespace(hidden=hidden, vocab=vocab, seq=seq)
    say = print if verbose else (lambda *a, **k: None)
    keras.utils.set_random_seed(0)

    stock = keras_hub.models.MixtralCausalLM(backbone=build_backbone(args), preprocessor=None)
    copy = build_backbone(args)
    copy.set_weights(stock.backbone.get_weights())
    model = sparsify(keras_hub.models.MixtralCausalLM(backbone=copy, preprocessor=None))  # dropless by default
    say("sparse MoE layers:", [layer.name for layer in moe_layers(model)])

    rng = np.random.default_rng(0)
    token_ids = rng.integers(1, args.vocab, size=(8, args.seq)).astype("int32")
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids, dtype=bool)}
    stock_logits = keras.ops.convert_to_numpy(stock(inputs))
    sparse_logits = keras.ops.convert_to_numpy(model(inputs))
    scale = np.abs(stock_logits).max()
    say(f"max |logits difference| / max |logits|: {np.abs(sparse_logits - stock_logits).max() / scale:.2e}")

    same = None
    if generate:
        prompt = {"token_ids": token_ids[:2].copy(), "padding_mask": np.zeros((2, args.seq), dtype=bool)}
        prompt["padding_mask"][:, :4] = True
        prompt["token_ids"][:, 4:] = 0
        for m in (stock, model):
            m.compile(sampler="greedy")
        same = np.array_equal(
            keras.ops.convert_to_numpy(stock.generate(dict(prompt), stop_token_ids=None)["token_ids"]),
            keras.ops.convert_to_numpy(model.generate(dict(prompt), stop_token_ids=None)["token_ids"]),
        )
        say("greedy generate gives the stock tokens:", same)

    # Learn to echo the token at each position: a task the loss falls on quickly.
    model.compile(optimizer=keras.optimizers.Adam(1e-2),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = {"token_ids": rng.integers(1, args.vocab, size=(num_examples, args.seq)).astype("int32")}
    x["padding_mask"] = np.ones_like(x["token_ids"], dtype=bool)
    monitor = RoutingMonitor()
    history = model.fit(x, x["token_ids"], batch_size=8, epochs=epochs, verbose=0, callbacks=[monitor])
    say("loss per epoch:", [round(v, 3) for v in history.history["loss"]])
    for layer in moe_layers(model):
        stats = layer.get_routing_stats()
        say(f"  {layer.name}: experts/token {stats['avg_experts_per_token']:.2f}  load CV {stats['load_cv']:.3f}  "
              f"expert fractions {np.round(stats['expert_fraction'], 2)}")

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "sparse_mixtral.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    reload_difference = float(
        np.abs(keras.ops.convert_to_numpy(reloaded(inputs)) - keras.ops.convert_to_numpy(model(inputs))).max()
    )
    say(f"saved {path}; reloaded model: max |logits difference| {reload_difference:.2e}")
    back = unsparsify(model)
    diff = np.abs(keras.ops.convert_to_numpy(back(inputs)) - keras.ops.convert_to_numpy(model(inputs))).max()
    say(f"stock {type(back).__name__} with the trained weights: max |logits difference| {diff:.2e}")
    return {"loss": history.history["loss"], "reload_difference": reload_difference, "same_tokens": same if same is None else bool(same)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs")
    cli = parser.parse_args()
    main(epochs=cli.epochs, output_dir=cli.output_dir)
