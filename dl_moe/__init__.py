"""dl_moe: sparse Mixture-of-Experts layers for Keras 3 (TensorFlow, JAX, PyTorch)."""

import os as _os
import sys as _sys

# The `dl-moe` command defaults to JAX. Keras fixes its backend when it is first
# imported, which the imports below do, so the default must be set here.
if _os.path.basename(_sys.argv[0] or "") == "dl-moe":
    _os.environ.setdefault("KERAS_BACKEND", "jax")
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dl_moe import experts, gating  # noqa: F401  (registers the built-in types)
from dl_moe.config import ExpertConfig, GatingConfig, MoEConfig
from dl_moe.factories import create_attention_moe, create_conv_moe, create_ffn_moe
from dl_moe.layer import MixtureOfExperts
from dl_moe.lifecycle import ExpertLifecycle
from dl_moe.presets import get_preset_moe, list_presets

__version__ = "0.1.0"

__all__ = [
    "ExpertConfig",
    "ExpertLifecycle",
    "GatingConfig",
    "MixtureOfExperts",
    "MoEConfig",
    "create_attention_moe",
    "create_conv_moe",
    "create_ffn_moe",
    "get_preset_moe",
    "list_presets",
]
