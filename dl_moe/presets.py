"""Named MoE configurations stored as JSON files (`presets/<name>.json`).

A preset file is a (possibly partial) `MoEConfig.to_dict()` plus a `description`:

    {"description": "...", "num_experts": 8,
     "expert_config": {"expert_type": "ffn", "hidden_dim": 768, ...},
     "gating_config": {"gating_type": "linear", "top_k": 2, ...}}

Fields left out take the dataclass defaults. The files live in the repository's
top-level `presets/` folder; the wheel ships them as `dl_moe/preset_files/`.
"""

import copy
import json
import os
from pathlib import Path

from dl_moe.factories import build_config
from dl_moe.layer import MixtureOfExperts

PACKAGE_DIR = Path(__file__).resolve().parent
# Installed wheel first, then a source checkout (editable install or PYTHONPATH).
PRESET_DIRS = (PACKAGE_DIR / "preset_files", PACKAGE_DIR.parent / "presets")

_cache = {}


def preset_dir():
    """The folder the presets are read from.

    Raises:
        FileNotFoundError: When neither the installed nor the source folder exists.
    """
    for folder in PRESET_DIRS:
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"No preset folder found; looked in {[str(p) for p in PRESET_DIRS]}.")


def list_presets():
    """Sorted names of the available presets.

    Example:
        ```python
        from dl_moe import list_presets

        print(list_presets())  # ['attention', 'deepseek', 'default', ...]
        ```
    """
    return sorted(p.stem for p in preset_dir().glob("*.json"))


def _load(name):
    """The parsed preset file (a fresh copy; the cache is never handed out)."""
    if not isinstance(name, str) or name not in list_presets():
        raise ValueError(f"Unknown preset {name!r}. Available presets: {list_presets()}.")
    path = preset_dir() / f"{name}.json"
    stamp = os.stat(path).st_mtime_ns
    if name not in _cache or _cache[name][0] != stamp:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"Preset file {path} is not valid JSON: {error}") from error
        if not isinstance(data, dict):
            raise ValueError(f"Preset file {path} must hold a JSON object, got {type(data).__name__}.")
        _cache[name] = (stamp, data)
    return copy.deepcopy(_cache[name][1])


def get_preset_config(name, **overrides):
    """The `MoEConfig` of preset `name` with flat field `overrides` applied.

    Args:
        name: A name from `list_presets()`.
        **overrides: Any field of `MoEConfig`, `ExpertConfig` or `GatingConfig`
            (e.g. `num_experts=32`, `hidden_dim=64`, `top_k=1`).

    Returns:
        A new, validated `MoEConfig` (the stored preset is never changed).

    Raises:
        ValueError: Unknown preset (the message lists the available ones), unknown
            override key (named), invalid value, or a malformed preset file (named).
    """
    data = _load(name)
    path = preset_dir() / f"{name}.json"
    data.pop("description", None)
    expert = data.pop("expert_config", {}) or {}
    gating = data.pop("gating_config", {}) or {}
    # Keys of the file itself must be valid fields; report them with the file's name.
    try:
        build_config(base_moe=data, base_expert=expert, base_gating=gating, owner=f"preset file {path}")
    except (TypeError, ValueError) as error:
        raise ValueError(f"Preset file {path} is invalid: {error}") from error
    return build_config(
        base_moe=data, base_expert=expert, base_gating=gating, owner=f"get_preset_moe({name!r})", **overrides
    )


def get_preset_moe(name, name_of_layer=None, **overrides):
    """A `MixtureOfExperts` built from preset `name`.

    Args:
        name: A name from `list_presets()` ("default", "large", "attention", "vision",
            "switch", "mixtral", "deepseek", "soft_moe", ...).
        name_of_layer: Optional Keras layer name.
        **overrides: Any field of `MoEConfig`, `ExpertConfig` or `GatingConfig`, e.g.
            `get_preset_moe("large", num_experts=32)`.

    Returns:
        An unbuilt `MixtureOfExperts`; `layer.config` is its `MoEConfig`.

    Raises:
        ValueError: As `get_preset_config`.

    Example:
        ```python
        from dl_moe import get_preset_moe

        layer = get_preset_moe("mixtral", hidden_dim=32, intermediate_size=64)
        print(layer.config.gating_config.normalize_top_k)  # True: Mixtral's rule
        ```
    """
    return MixtureOfExperts(get_preset_config(name, **overrides), name=name_of_layer)


def preset_description(name):
    """The one-line description stored in the preset file."""
    return _load(name).get("description", "")
