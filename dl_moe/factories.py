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
        ffn_type: "mlp", "swiglu" or "geglu".
        name: Layer name.
        **overrides: Any other field of `MoEConfig`, `ExpertConfig` or `GatingConfig`
            (e.g. `drop_tokens=False`, `aux_loss_weight=0.1`, `output_dim=128`).

    Returns:
        An unbuilt `MixtureOfExperts`.

    Raises:
        ValueError: For an unknown override key or an invalid value.
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
