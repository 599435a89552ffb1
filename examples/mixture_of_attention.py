"""Mixture of Attention heads (MoA): each token picks 2 of 8 attention experts.

Keys/values are shared by the experts; every expert has its own query and output
projections. A tiny transformer block classifies synthetic sequences.

    KERAS_BACKEND=jax python examples/mixture_of_attention.py
"""

import keras
import numpy as np

from dl_moe import create_attention_moe


def main(hidden_dim=32, num_heads=4, num_experts=8, seq_len=16, num_examples=256, epochs=3, verbose=1):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_examples, seq_len, hidden_dim)).astype("float32")
    # Label: does the first token resemble the last one? (needs attention across tokens)
    x[: num_examples // 2, -1] = x[: num_examples // 2, 0] + 0.1 * x[: num_examples // 2, -1]
    y = (np.arange(num_examples) < num_examples // 2).astype("int64")

    moa_layer = create_attention_moe(num_experts=num_experts, hidden_dim=hidden_dim, num_heads=num_heads, top_k=2,
                                     gating_type="cosine", name="moa")
    inputs = keras.Input(shape=(seq_len, hidden_dim))
    attention_output = moa_layer(inputs)
    h = keras.layers.LayerNormalization()(inputs + attention_output)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=verbose)
    stats = moa_layer.get_routing_stats()
    print(f"Expert utilization: {np.round(stats['expert_fraction'], 3)}; "
          f"experts per token: {stats['avg_experts_per_token']:.2f}")
    return {"loss": history.history["loss"], "stats": stats}


if __name__ == "__main__":
    main()
