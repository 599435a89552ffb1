"""Routers: map tokens to a routing decision (which experts, with what weight)."""

from dl_moe.gating.base import BaseGating, select_top_k
from dl_moe.gating.cosine import CosineGating
from dl_moe.gating.linear import LinearGating
from dl_moe.gating.soft_moe import SoftMoEGating
from dl_moe.registry import GATING_TYPES

GATING_TYPES.register("linear", LinearGating)
GATING_TYPES.register("cosine", CosineGating)
GATING_TYPES.register("softmoe", SoftMoEGating)


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
    "CosineGating",
    "LinearGating",
    "SoftMoEGating",
    "register_gating",
    "select_top_k",
]
