"""Multimodal MoE with modality-aware routing.

Text tokens and image patches share one sequence. A learned modality embedding is
added to every token before the MoE layer, so the cosine router can separate the
modalities; after training we measure, per modality, which experts its tokens use.

    KERAS_BACKEND=jax python examples/multimodal_moe.py
"""

import keras
import numpy as np

from dl_moe import ExpertConfig, GatingConfig, MixtureOfExperts, MoEConfig


def make_data(num_examples, text_len, num_patches, patch_dim, vocab, seed=0):
    rng = np.random.default_rng(seed)
    text = rng.integers(0, vocab, size=(num_examples, text_len))
    patches = rng.normal(size=(num_examples, num_patches, patch_dim)).astype("float32")
    # Label: is the text "large" (mean id above half the vocabulary) XOR the image bright?
    y = ((text.mean(axis=1) > vocab / 2) ^ (patches.mean(axis=(1, 2)) > 0)).astype("int64")
    return text, patches, y


def build_model(hidden_dim, num_experts, text_len, num_patches, patch_dim, vocab):
    text_in = keras.Input((text_len,), dtype="int32", name="text")
    image_in = keras.Input((num_patches, patch_dim), name="patches")
    text_tokens = keras.layers.Embedding(vocab, hidden_dim)(text_in)
    image_tokens = keras.layers.Dense(hidden_dim)(image_in)
    modality = keras.layers.Embedding(2, hidden_dim, name="modality_embedding")
    # Modality ids derived from the inputs, so they stay part of the graph.
    text_tokens = text_tokens + modality(keras.ops.zeros_like(text_in))
    image_tokens = image_tokens + modality(keras.ops.ones_like(keras.ops.cast(image_in[..., 0], "int32")))
    tokens = keras.layers.Concatenate(axis=1, name="tokens")([text_tokens, image_tokens])

    multimodal_config = MoEConfig(
        num_experts=num_experts,
        expert_config=ExpertConfig(expert_type="ffn", hidden_dim=hidden_dim, intermediate_size=2 * hidden_dim),
        gating_config=GatingConfig(gating_type="cosine", top_k=2, aux_loss_weight=0.1),
    )
    multimodal_moe = MixtureOfExperts(config=multimodal_config, name="multimodal_moe")
    h = keras.layers.LayerNormalization()(tokens + multimodal_moe(tokens))
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling1D()(h))
    return keras.Model([text_in, image_in], outputs), multimodal_moe


def expert_share_per_modality(model, moe, inputs, text_len, num_experts):
    """Share of routed assignments per expert, for text tokens and image tokens."""
    tokens = keras.Model(model.inputs, model.get_layer("tokens").output).predict(inputs, verbose=0)
    shares = {}
    for name, part in (("text", tokens[:, :text_len]), ("image", tokens[:, text_len:])):
        _, indices, _ = moe.gating_network(keras.ops.reshape(part, (-1, part.shape[-1])))
        counts = np.bincount(keras.ops.convert_to_numpy(indices).ravel(), minlength=num_experts)
        shares[name] = counts / counts.sum()
    return shares


def main(hidden_dim=32, num_experts=8, text_len=8, num_patches=8, patch_dim=12, vocab=50, num_examples=256,
         epochs=3, verbose=1):
    text, patches, y = make_data(num_examples, text_len, num_patches, patch_dim, vocab)
    model, moe = build_model(hidden_dim, num_experts, text_len, num_patches, patch_dim, vocab)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit({"text": text, "patches": patches}, y, epochs=epochs, batch_size=32, verbose=verbose)
    shares = expert_share_per_modality(model, moe, {"text": text, "patches": patches}, text_len, num_experts)
    overlap = float(np.minimum(shares["text"], shares["image"]).sum())
    print(f"text  tokens per expert: {np.round(shares['text'], 2)}")
    print(f"image tokens per expert: {np.round(shares['image'], 2)}")
    print(f"overlap of the two distributions (1 = same experts, 0 = disjoint): {overlap:.2f}")
    return {"loss": history.history["loss"], "shares": shares, "overlap": overlap}


if __name__ == "__main__":
    main()
