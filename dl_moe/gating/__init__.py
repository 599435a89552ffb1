"""Routers: map tokens to a routing decision (which experts, with what weight)."""

from dl_moe.gating.base import BaseGating, call_router, select_top_k
from dl_moe.gating.conditional import ConditionalGating
from dl_moe.gating.confidence import ConfidenceGating
from dl_moe.gating.cosine import CosineGating
from dl_moe.gating.ensemble import EnsembleGating
from dl_moe.gating.expert_choice import ExpertChoiceGating
from dl_moe.gating.linear import LinearGating
from dl_moe.gating.resonance import ResonanceGating
from dl_moe.gating.rmsnorm_linear import RMSNormLinearGating
from dl_moe.gating.sigmoid import SigmoidGating
from dl_moe.gating.soft_moe import SoftMoEGating
from dl_moe.gating.top_any import TopAnyGating
from dl_moe.gating.top_p import TopPGating
from dl_moe.registry import GATING_TYPES

GATING_TYPES.register("linear", LinearGating)
GATING_TYPES.register("cosine", CosineGating)
GATING_TYPES.register("softmoe", SoftMoEGating)
GATING_TYPES.register("expert_choice", ExpertChoiceGating)
GATING_TYPES.register("top_p", TopPGating)
GATING_TYPES.register("conditional", ConditionalGating)
GATING_TYPES.register("confidence", ConfidenceGating)
GATING_TYPES.register("top_any", TopAnyGating)
GATING_TYPES.register("resonance", ResonanceGating)
GATING_TYPES.register("ensemble", EnsembleGating)
GATING_TYPES.register("sigmoid", SigmoidGating)
GATING_TYPES.register("rmsnorm_linear", RMSNormLinearGating)


def register_gating(name, cls, overwrite=False):
    """Makes `GatingConfig(gating_type=name)` build routers of class `cls`.

    Args:
        name: The new `gating_type` name.
        cls: A `BaseGating` subclass.
        overwrite: Replace an existing registration of `name`.

    Returns:
        `cls`, so this can be used as a decorator factory's inner call.
    """
    if not (isinstance(cls, type) and issubclass(cls, BaseGating)):
        raise ValueError(f"register_gating({name!r}, ...) expects a BaseGating subclass, got {cls!r}.")
    return GATING_TYPES.register(name, cls, overwrite=overwrite)


__all__ = [
    "BaseGating",
    "ConditionalGating",
    "ConfidenceGating",
    "CosineGating",
    "EnsembleGating",
    "ExpertChoiceGating",
    "LinearGating",
    "RMSNormLinearGating",
    "ResonanceGating",
    "SigmoidGating",
    "SoftMoEGating",
    "TopAnyGating",
    "TopPGating",
    "call_router",
    "register_gating",
    "select_top_k",
]
