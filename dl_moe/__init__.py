"""dl_moe: sparse Mixture-of-Experts layers for Keras 3 (TensorFlow, JAX, PyTorch)."""

import os as _os
import sys as _sys

# The `dl-moe` command defaults to JAX. Keras fixes its backend when it is first
# imported, which the imports below do, so the default must be set here.
if _os.path.basename(_sys.argv[0] or "") == "dl-moe":
    _os.environ.setdefault("KERAS_BACKEND", "jax")
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dl_moe import experts, gating  # noqa: F401  (registers the built-in types)
from dl_moe.callbacks import RoutingMonitor
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
    "RoutingMonitor",
    "create_attention_moe",
    "create_conv_moe",
    "create_ffn_moe",
    "get_preset_moe",
    "list_presets",
]
# `dl_moe.sparsify` also works (below); it is left out of `__all__` so that
# `from dl_moe import *` does not need keras-hub.


def __getattr__(name):
    # `sparsify` lives in the keras-hub integration, which imports keras-hub: load it
    # on first use so that `import dl_moe` does not need keras-hub.
    if name == "sparsify":
        from dl_moe.integrations.keras_hub import sparsify

        return sparsify
    raise AttributeError(f"module 'dl_moe' has no attribute {name!r}")
