"""dl_moe: sparse Mixture-of-Experts layers for Keras 3 (TensorFlow, JAX, PyTorch)."""

from dl_moe import experts, gating  # noqa: F401  (registers the built-in types)
from dl_moe.config import ExpertConfig, GatingConfig, MoEConfig
from dl_moe.factories import create_attention_moe, create_conv_moe, create_ffn_moe
from dl_moe.layer import MixtureOfExperts
from dl_moe.presets import get_preset_moe, list_presets

__version__ = "0.1.0"

__all__ = [
    "ExpertConfig",
    "GatingConfig",
    "MixtureOfExperts",
    "MoEConfig",
    "create_attention_moe",
    "create_conv_moe",
    "create_ffn_moe",
    "get_preset_moe",
    "list_presets",
]
