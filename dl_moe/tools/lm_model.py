"""A small decoder-only byte-level transformer whose FFN is dense or a `MixtureOfExperts`.

Layout (pre-norm, as GPT-2):

    bytes [B, S] -> Embedding(256, d) + learned positions [S, d]
    num_layers x:  x = x + CausalSelfAttention(LayerNorm(x))
                   x = x + FFN(LayerNorm(x))        (dense MLP or MoE of MLP experts)
    LayerNorm -> Dense(256) next-byte logits [B, S, 256]

The dense FFN is `Dense(width, gelu) -> Dense(d)`, the same MLP each MoE expert
computes (with its own width), so the two differ only in routing. Dropped MoE
assignments contribute nothing (`use_residual_connection=False`: the block's own
residual already carries the token).

`forward_flops_per_token` counts the matmul FLOPs (2 per multiply-add) of one token's
forward pass; `parameter_count` the weights, both from the architecture alone.
"""

import math

import keras

from dl_moe.factories import create_ffn_moe
from dl_moe.layer import MixtureOfExperts
from dl_moe.tools.lm_data import VOCAB_SIZE


@keras.saving.register_keras_serializable(package="dl_moe")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned `[S, d]` position embedding to `[B, S, d]` inputs."""

    def build(self, input_shape):
        self.embedding = self.add_weight(
            name="embedding", shape=tuple(input_shape[1:]), initializer=keras.initializers.RandomNormal(stddev=0.02)
        )

    def call(self, inputs):
        return inputs + self.embedding


def build_lm(
    sequence_length=128,
    width=128,
    num_layers=2,
    num_heads=4,
    ffn="dense",
    ffn_width=512,
    num_experts=8,
    top_k=2,
    **moe_overrides,
):
    """The byte-level decoder-only transformer.

    Args:
        sequence_length: Context S.
        width: Model width d.
        num_layers: Transformer blocks.
        num_heads: Attention heads (d must be divisible by it).
        ffn: "dense" or "moe".
        ffn_width: Hidden width of the dense FFN, or of each MoE expert (h).
        num_experts, top_k: MoE only: E and k.
        **moe_overrides: MoE only: any `create_ffn_moe` override (gating_type,
            balancing, capacity_factor, drop_tokens, ...).

    Returns:
        An uncompiled `keras.Model` mapping `int32 [B, S]` bytes to logits `[B, S, 256]`.

    Raises:
        ValueError: For an unknown `ffn` or dense-only/MoE-only arguments mixed up.
    """
    if ffn not in ("dense", "moe"):
        raise ValueError(f"ffn must be 'dense' or 'moe', got {ffn!r}.")
    if ffn == "dense" and moe_overrides:
        raise ValueError(f"MoE overrides {sorted(moe_overrides)} given for a dense FFN.")
    if width % num_heads:
        raise ValueError(f"width={width} must be divisible by num_heads={num_heads}.")
    inputs = keras.Input((sequence_length,), dtype="int32", name="bytes")
    x = keras.layers.Embedding(VOCAB_SIZE, width, name="byte_embedding")(inputs)
    x = PositionEmbedding(name="positions")(x)
    for i in range(num_layers):
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"attention_norm_{i}")(x)
        h = keras.layers.MultiHeadAttention(num_heads, width // num_heads, name=f"attention_{i}")(
            h, h, use_causal_mask=True
        )
        x = keras.layers.Add(name=f"attention_residual_{i}")([x, h])
        h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"ffn_norm_{i}")(x)
        if ffn == "dense":
            h = keras.layers.Dense(ffn_width, activation="gelu", name=f"ffn_up_{i}")(h)
            h = keras.layers.Dense(width, name=f"ffn_down_{i}")(h)
        else:
            overrides = {"use_residual_connection": False, **moe_overrides}
            h = create_ffn_moe(
                num_experts, width, top_k=top_k, intermediate_size=ffn_width, name=f"moe_{i}", **overrides
            )(h)
        x = keras.layers.Add(name=f"ffn_residual_{i}")([x, h])
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(x)
    logits = keras.layers.Dense(VOCAB_SIZE, name="next_byte")(x)
    return keras.Model(inputs, logits, name=f"byte_lm_{ffn}")


def moe_layers(model):
    """The model's `MixtureOfExperts` layers, in depth order."""
    return [layer for layer in model.layers if isinstance(layer, MixtureOfExperts)]


def attention_flops_per_token(width, sequence_length):
    """One attention block's forward matmul FLOPs per token.

    Q, K, V and output projections (4 * 2 d^2) plus scores and the weighted sum over all
    S positions (2 * 2 S d): Keras's attention computes the full S x S score matrix and
    masks it, so the causal half is computed too.
    """
    return 8 * width * width + 4 * sequence_length * width


def mlp_flops(width, hidden):
    """Forward matmul FLOPs of one MLP (d -> hidden -> d) on one token."""
    return 4 * width * hidden


def forward_flops_per_token(width, sequence_length, num_layers, ffn_flops_per_layer, router_flops_per_layer=0.0):
    """Forward matmul FLOPs per token of the whole model.

    Args:
        ffn_flops_per_layer: Per layer, the FFN's FLOPs per token: `mlp_flops(d, w)` for
            a dense FFN, (expert evaluations per token) * `mlp_flops(d, h)` for an MoE.
            A number (same for every layer) or a list of `num_layers` numbers.
        router_flops_per_layer: Linear router, 2 * d * E per token and layer.
    """
    if not isinstance(ffn_flops_per_layer, (list, tuple)):
        ffn_flops_per_layer = [ffn_flops_per_layer] * num_layers
    if len(ffn_flops_per_layer) != num_layers:
        raise ValueError(f"ffn_flops_per_layer has {len(ffn_flops_per_layer)} entries for {num_layers} layers.")
    blocks = num_layers * (attention_flops_per_token(width, sequence_length) + router_flops_per_layer)
    return float(blocks + sum(ffn_flops_per_layer) + 2 * width * VOCAB_SIZE)


def parameter_matched_width(width, expert_width, num_experts):
    """Dense FFN width with as many FFN weights as an MoE of E MLP experts plus router.

    MoE: E * (2 d h + h + d) + d E (router kernel); dense: 2 d w + w + d. Rounded to a
    multiple of 8.
    """
    moe = num_experts * (2 * width * expert_width + expert_width + width) + width * num_experts
    return int(8 * round((moe - width) / (2 * width + 1) / 8))


def parameter_count(model):
    """Trainable weights of `model` (a count, not bytes)."""
    return int(sum(math.prod(v.shape) for v in model.trainable_weights))
