"""Name → class registries for expert and router types.

`ExpertConfig.expert_type` and `GatingConfig.gating_type` are looked up here, so a
user class registered under a new name is as usable (and as validated) as a
built-in one. This is the one place the configs consult: a lookup first imports
`dl_moe.experts` and `dl_moe.gating`, whose modules register the built-in types, so
`dl_moe.config` never imports those packages (which import it back).
"""

import importlib

BUILTIN_PACKAGES = {"expert_type": "dl_moe.experts", "gating_type": "dl_moe.gating"}


class Registry:
    """A small case-sensitive mapping from type names to classes.

    Args:
        kind: What the registry holds, used in error messages (e.g. "expert_type").
    """

    def __init__(self, kind):
        self.kind = kind
        self._classes = {}

    def register(self, name, cls, overwrite=False):
        """Registers `cls` under `name` and returns `cls`."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}.")
        if not isinstance(cls, type):
            raise ValueError(f"register({name!r}, ...) expects a class, got {cls!r}.")
        if name in self._classes and self._classes[name] is not cls and not overwrite:
            raise ValueError(
                f"{self.kind} {name!r} is already registered to "
                f"{self._classes[name].__name__}; pass overwrite=True to replace it."
            )
        self._classes[name] = cls
        return cls

    def _load_builtins(self):
        package = BUILTIN_PACKAGES.get(self.kind)
        if package is not None:
            importlib.import_module(package)

    def get(self, name):
        """Returns the class registered under `name` or raises a `ValueError`."""
        if name not in self._classes:
            self._load_builtins()
        if name not in self._classes:
            raise ValueError(
                f"Unknown {self.kind} {name!r}. Valid values: {self.names()}."
            )
        return self._classes[name]

    def names(self):
        """Sorted list of the registered names."""
        self._load_builtins()
        return sorted(self._classes)

    def __contains__(self, name):
        if name not in self._classes:
            self._load_builtins()
        return name in self._classes


EXPERT_TYPES = Registry("expert_type")
GATING_TYPES = Registry("gating_type")
