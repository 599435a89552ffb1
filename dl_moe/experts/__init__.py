"""Expert banks: the computation each expert applies to its dispatched tokens.

Built-in `expert_type`s: "ffn" (`FFNExpertBank`), "attention" (`AttentionExpertBank`,
Mixture of Attention heads) and "conv2d" (`Conv2DExpertBank`). `register_expert` adds
user types: either a whole `ExpertBank` subclass or a single-expert `BaseExpert`
subclass (wrapped in a `PerExpertBank`).
"""

from dl_moe.experts.attention import AttentionExpertBank
from dl_moe.experts.base import ExpertBank
from dl_moe.experts.conv import Conv2DExpertBank
from dl_moe.experts.ffn import FFNExpertBank
from dl_moe.experts.per_expert import BaseExpert, PerExpertBank
from dl_moe.registry import EXPERT_TYPES

EXPERT_TYPES.register("ffn", FFNExpertBank)
EXPERT_TYPES.register("attention", AttentionExpertBank)
EXPERT_TYPES.register("conv2d", Conv2DExpertBank)

# Names used in the spec and the seed README.
FFNExpert = FFNExpertBank
AttentionExpert = AttentionExpertBank
Conv2DExpert = Conv2DExpertBank


def register_expert(name, cls, overwrite=False):
    """Makes `ExpertConfig(expert_type=name)` build experts of class `cls`.

    Args:
        name: The new `expert_type` name.
        cls: A `BaseExpert` subclass (one expert; the layer makes `num_experts` of them
            with `cls(**ExpertConfig.expert_kwargs)`) or an `ExpertBank` subclass (all
            experts at once; it must implement `from_moe_config`).
        overwrite: Replace an existing registration of `name`.

    Returns:
        `cls`.

    To load a saved model that uses it, register the class again (same name) before
    `keras.models.load_model`.
    """
    if not (isinstance(cls, type) and issubclass(cls, (BaseExpert, ExpertBank))):
        raise ValueError(
            f"register_expert({name!r}, ...) expects a BaseExpert or ExpertBank subclass, got {cls!r}."
        )
    return EXPERT_TYPES.register(name, cls, overwrite=overwrite)


__all__ = [
    "AttentionExpert",
    "AttentionExpertBank",
    "BaseExpert",
    "Conv2DExpert",
    "Conv2DExpertBank",
    "ExpertBank",
    "FFNExpert",
    "FFNExpertBank",
    "PerExpertBank",
    "register_expert",
]
