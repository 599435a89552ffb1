"""Switch Transformer block: self-attention, then a top-1 MoE in place of the FFN.

Trains a tiny sequence classifier on a synthetic task (the label is the sign pattern of
the sequence mean) and prints the measured expert utilization.

    KERAS_BACKEND=jax python examples/switch_transformer.py
"""

import keras
import numpy as np

from dl_moe import create_ffn_moe


def create_switch_transformer_layer(hidden_dim, num_heads, num_experts, **moe_overrides):
    """The seed README's block: attention + LayerNorm, MoE (k=1) + LayerNorm."""
    inputs = keras.Input(shape=(None, hidden_dim))
    attn_output = keras.layers.MultiHeadAttention(num_heads=num_heads, key_dim=hidden_dim // num_heads)(inputs, inputs)
    x = keras.layers.LayerNormalization()(inputs + attn_output)
    moe_output = create_ffn_moe(num_experts=num_experts, hidden_dim=hidden_dim, top_k=1, name="switch_moe",
                                **moe_overrides)(x)
    outputs = keras.layers.LayerNormalization()(x + moe_output)
    return keras.Model(inputs, outputs, name="switch_block")


def make_data(num_examples, seq_len, hidden_dim, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, seq_len, hidden_dim)).astype("float32")
    y = (x.mean(axis=1)[:, :2] > 0).astype("int64") @ np.array([1, 2])  # 4 classes
    return x, y


def main(hidden_dim=32, num_heads=4, num_experts=4, seq_len=16, num_examples=256, epochs=3, verbose=1):
    x, y = make_data(num_examples, seq_len, hidden_dim)
    block = create_switch_transformer_layer(hidden_dim, num_heads, num_experts, intermediate_size=2 * hidden_dim)
    inputs = keras.Input((seq_len, hidden_dim))
    h = block(inputs)
    outputs = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.AdamW(1e-3, weight_decay=0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, epochs=epochs, batch_size=32, verbose=verbose)
    moe = block.get_layer("switch_moe")
    utilization = moe.get_expert_utilization()
    print(f"Expert utilization: {np.round(utilization, 3)}")
    return {"loss": history.history["loss"], "utilization": utilization}


if __name__ == "__main__":
    main()
