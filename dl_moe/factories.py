"""Factories that build a `MixtureOfExperts` from a few arguments plus overrides."""

from dl_moe.config import ExpertConfig, GatingConfig, MoEConfig, split_overrides
from dl_moe.layer import MixtureOfExperts


def build_config(base_moe=None, base_expert=None, base_gating=None, owner="overrides", **overrides):
    """Merges flat `overrides` (any field of the three configs) into base field dicts.

    Returns:
        A validated `MoEConfig`.
    """
    moe_fields, expert_fields, gating_fields = split_overrides(overrides, owner=owner)
    expert = ExpertConfig(**{**(base_expert or {}), **expert_fields})
    gating = GatingConfig(**{**(base_gating or {}), **gating_fields})
    return MoEConfig(expert_config=expert, gating_config=gating, **{**(base_moe or {}), **moe_fields})


def create_ffn_moe(
    num_experts,
    hidden_dim,
    top_k=2,
    gating_type="linear",
    intermediate_size=None,
    ffn_type="mlp",
    name=None,
    **overrides,
):
    """A `MixtureOfExperts` with feed-forward experts.

    Args:
        num_experts: Number of experts E.
        hidden_dim: Input width d.
        top_k: Experts per token.
        gating_type: Router type ("linear", "cosine", "softmoe", or a registered name).
        intermediate_size: Expert hidden width h (None: 4 * hidden_dim).
        ffn_type: "mlp", "swiglu", "geglu", "geglu_tanh" or "clamped_swiglu".
        name: Layer name.
        **overrides: Any other field of `MoEConfig`, `ExpertConfig` or `GatingConfig`
            (e.g. `drop_tokens=False`, `aux_loss_weight=0.1`, `output_dim=128`).

    Returns:
        An unbuilt `MixtureOfExperts`.

    Raises:
        ValueError: For an unknown override key or an invalid value.

    Example:
        ```python
        import numpy as np
        from dl_moe import create_ffn_moe

        layer = create_ffn_moe(num_experts=8, hidden_dim=16, top_k=2, ffn_type="swiglu",
                               drop_tokens=False)  # any config field as an override
        print(layer(np.ones((4, 16), "float32")).shape)  # (4, 16)
        ```
    """
    config = build_config(
        base_moe={"num_experts": num_experts},
        base_expert={
            "expert_type": "ffn",
            "hidden_dim": hidden_dim,
            "intermediate_size": intermediate_size,
            "ffn_type": ffn_type,
        },
        base_gating={"gating_type": gating_type, "top_k": top_k},
        owner="create_ffn_moe",
        **overrides,
    )
    return MixtureOfExperts(config, name=name)


def create_attention_moe(
    num_experts=8,
    hidden_dim=768,
    num_heads=12,
    top_k=2,
    gating_type="cosine",
    head_dim=None,
    name=None,
    **overrides,
):
    """A `MixtureOfExperts` of attention experts (Mixture of Attention heads).

    Inputs are `[B, S, hidden_dim]`. Keys/values are shared by all experts; each expert
    has its own `num_heads` query heads and output projection (see
    `dl_moe.experts.AttentionExpertBank`).

    Args:
        num_experts: Number of experts E.
        hidden_dim: Input width d.
        num_heads: Query heads per expert.
        top_k: Experts per token.
        gating_type: Router type.
        head_dim: Width of each head (None: hidden_dim // num_heads).
        name: Layer name.
        **overrides: Any other field of `MoEConfig`, `ExpertConfig` or `GatingConfig`.

    Returns:
        An unbuilt `MixtureOfExperts`.

    Raises:
        ValueError: For an unknown override key or an invalid value.

    Example:
        ```python
        import numpy as np
        from dl_moe import create_attention_moe

        layer = create_attention_moe(num_experts=4, hidden_dim=16, num_heads=2, top_k=2)
        print(layer(np.ones((2, 5, 16), "float32")).shape)  # (2, 5, 16)
        ```
    """
    config = build_config(
        base_moe={"num_experts": num_experts},
        base_expert={"expert_type": "attention", "hidden_dim": hidden_dim, "num_heads": num_heads, "head_dim": head_dim},
        base_gating={"gating_type": gating_type, "top_k": top_k},
        owner="create_attention_moe",
        **overrides,
    )
    return MixtureOfExperts(config, name=name)


def create_conv_moe(
    num_experts=8,
    filters=256,
    kernel_size=3,
    top_k=1,
    gating_type="linear",
    strides=1,
    padding="same",
    hidden_dim=None,
    name=None,
    **overrides,
):
    """A `MixtureOfExperts` of 2-D convolution experts, routed per example.

    Inputs are `[B, H, W, C]`, outputs `[B, H', W', filters]`. The router sees each
    example's globally average-pooled features `[B, C]` and sends the whole example to
    its k experts (see `dl_moe.experts.Conv2DExpertBank`).

    Args:
        num_experts: Number of experts E.
        filters: Output channels of each expert.
        kernel_size: int or (kh, kw).
        top_k: Experts per example.
        gating_type: Router type (token-choice).
        strides: int or (sh, sw).
        padding: "same" or "valid".
        hidden_dim: Input channels C (None: taken from the input when built).
        name: Layer name.
        **overrides: Any other field of `MoEConfig`, `ExpertConfig` or `GatingConfig`
            (e.g. `activation="relu"`).

    Returns:
        An unbuilt `MixtureOfExperts`.

    Raises:
        ValueError: For an unknown override key or an invalid value.

    Example:
        ```python
        import numpy as np
        from dl_moe import create_conv_moe

        layer = create_conv_moe(num_experts=4, filters=8, kernel_size=3, top_k=1)
        print(layer(np.ones((2, 8, 8, 3), "float32")).shape)  # (2, 8, 8, 8)
        ```
    """
    config = build_config(
        base_moe={"num_experts": num_experts},
        base_expert={
            "expert_type": "conv2d",
            "hidden_dim": hidden_dim,
            "filters": filters,
            "kernel_size": kernel_size,
            "strides": strides,
            "padding": padding,
        },
        base_gating={"gating_type": gating_type, "top_k": top_k},
        owner="create_conv_moe",
        **overrides,
    )
    return MixtureOfExperts(config, name=name)
