"""Expert banks: the computation each expert applies to its dispatched tokens."""

from dl_moe.experts.base import ExpertBank
from dl_moe.experts.ffn import FFNExpertBank
from dl_moe.registry import EXPERT_TYPES

EXPERT_TYPES.register("ffn", FFNExpertBank)

__all__ = ["ExpertBank", "FFNExpertBank"]
