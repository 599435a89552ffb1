"""Configuration dataclasses: `ExpertConfig`, `GatingConfig` and `MoEConfig`.

Every field is checked when the config is created *and* when a field is assigned
later (`config.gating_config.top_k = 3`), so a bad value fails where it is written,
with a `ValueError` that names the field, the value and what is allowed.
Cross-field rules (e.g. `top_k <= num_experts`) are checked by `MoEConfig.validate()`,
which `MixtureOfExperts` calls again when it is constructed.
"""

import dataclasses
import math
from typing import Optional

from dl_moe.registry import EXPERT_TYPES, GATING_TYPES

FFN_TYPES = ("mlp", "swiglu", "geglu")
ROUTING_DTYPES = ("float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------
# Field checks. Each returns the (possibly normalised) value or raises.
# ----------------------------------------------------------------------------


def _fail(owner, name, value, allowed):
    raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}.")


def _positive_int(optional=False):
    def check(owner, name, value):
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(owner, name, value, "a positive integer" + (" or None" if optional else ""))
        return value

    return check


def _non_negative_float(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        _fail(owner, name, value, "a finite number >= 0")
    return float(value)


def _positive_float(optional=False):
    def check(owner, name, value):
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            _fail(owner, name, value, "a finite number > 0" + (" or None" if optional else ""))
        return float(value)

    return check


def _probability(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        _fail(owner, name, value, "a number in [0, 1)")
    return float(value)


def _boolean(owner, name, value):
    if not isinstance(value, bool):
        _fail(owner, name, value, "True or False")
    return value


def _one_of(choices):
    def check(owner, name, value):
        if value not in choices:
            _fail(owner, name, value, f"one of {list(choices)}")
        return value

    return check


def _registered(registry):
    def check(owner, name, value):
        _load_builtins()
        if value not in registry:
            _fail(owner, name, value, f"one of {registry.names()}")
        return value

    return check


def _activation(owner, name, value):
    import keras

    try:
        keras.activations.get(value)
    except Exception:
        _fail(owner, name, value, "a Keras activation name such as 'gelu', 'relu', 'silu'")
    if not isinstance(value, str):
        _fail(owner, name, value, "the name of a Keras activation (a string)")
    return value


def _load_builtins():
    # Importing these packages registers the built-in expert and router types.
    import dl_moe.experts  # noqa: F401
    import dl_moe.gating  # noqa: F401


def _field(default, check, **kwargs):
    return dataclasses.field(default=default, metadata={"check": check}, **kwargs)


class _CheckedConfig:
    """Mixin: validates every field on creation and on assignment."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            self._check_field(f.name, getattr(self, f.name))
        self._initialised = True
        self.validate()

    def __setattr__(self, name, value):
        if getattr(self, "_initialised", False) and name in self._field_names():
            value = self._checked(name, value)
        object.__setattr__(self, name, value)

    @classmethod
    def _field_names(cls):
        return [f.name for f in dataclasses.fields(cls)]

    def _checked(self, name, value):
        check = {f.name: f.metadata.get("check") for f in dataclasses.fields(self)}[name]
        return check(type(self).__name__, name, value) if check else value

    def _check_field(self, name, value):
        object.__setattr__(self, name, self._checked(name, value))

    def validate(self):
        """Checks rules that involve more than one field."""

    def to_dict(self):
        """Returns a JSON-serialisable dict (nested configs become dicts)."""
        out = {}
        for name in self._field_names():
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, _CheckedConfig) else value
        return out

    @classmethod
    def from_dict(cls, data):
        """Builds a config from `to_dict()` output; unknown keys are a `ValueError`."""
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}.")
        names = cls._field_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"Unknown {cls.__name__} field(s) {unknown}. Valid fields: {sorted(names)}."
            )
        return cls(**cls._nested_from_dict(dict(data)))

    @classmethod
    def _nested_from_dict(cls, data):
        return data


@dataclasses.dataclass
class ExpertConfig(_CheckedConfig):
    """What each expert computes.

    Attributes:
        expert_type: Registered expert type; built-in: "ffn".
        hidden_dim: Model width d: the last axis of the layer's input.
        output_dim: Width of the layer's output; None means `hidden_dim`.
        intermediate_size: Hidden width h of each FFN expert; None means 4 * hidden_dim.
        ffn_type: "mlp" (act(x W_up) W_down), "swiglu" (silu(x W_gate) * x W_up, then
            W_down) or "geglu" (gelu instead of silu).
        activation: Activation of the "mlp" variant (any Keras activation name).
        dropout_rate: Dropout on the expert's hidden activations, in training only.
        use_bias: Whether expert matmuls add a bias.
    """

    expert_type: str = _field("ffn", _registered(EXPERT_TYPES))
    hidden_dim: int = _field(768, _positive_int())
    output_dim: Optional[int] = _field(None, _positive_int(optional=True))
    intermediate_size: Optional[int] = _field(None, _positive_int(optional=True))
    ffn_type: str = _field("mlp", _one_of(FFN_TYPES))
    activation: str = _field("gelu", _activation)
    dropout_rate: float = _field(0.0, _probability)
    use_bias: bool = _field(True, _boolean)

    @property
    def resolved_intermediate_size(self):
        """`intermediate_size`, with None resolved to 4 * hidden_dim."""
        return self.intermediate_size or 4 * self.hidden_dim

    @property
    def resolved_output_dim(self):
        """`output_dim`, with None resolved to `hidden_dim`."""
        return self.output_dim or self.hidden_dim


@dataclasses.dataclass
class GatingConfig(_CheckedConfig):
    """How tokens are routed to experts.

    Attributes:
        gating_type: Registered router type; built-in: "linear", "cosine", "softmoe".
        top_k: Experts per token (token-choice routers).
        capacity_factor: When set, the capacity factor for training *and* inference,
            taking precedence over `MoEConfig.train/eval_capacity_factor`.
        aux_loss_weight: Weight of the Switch load-balancing loss (0 disables it).
        z_loss_weight: Weight of the router z-loss (0 disables it).
        add_noise: Shazeer noisy top-k in training: logits += N(0, 1) *
            softplus(x W_noise) * noise_std.
        noise_std: Scale of that noise.
        temperature: Softmax temperature of the router logits. For "cosine" it is the
            initial temperature tau (None: 1.0 for linear, 0.07 for cosine).
        embedding_dim: Projection width of the cosine router (None: min(hidden_dim, 256)).
        learnable_temperature: Cosine and Soft MoE routers learn their logit scale.
        num_slots: Soft MoE slots per expert (None: ceil(sequence_length / num_experts)).
        normalize_top_k: Renormalise the selected top-k weights to sum to 1 (Mixtral).
    """

    gating_type: str = _field("linear", _registered(GATING_TYPES))
    top_k: int = _field(2, _positive_int())
    capacity_factor: Optional[float] = _field(None, _positive_float(optional=True))
    aux_loss_weight: float = _field(0.01, _non_negative_float)
    z_loss_weight: float = _field(1e-3, _non_negative_float)
    add_noise: bool = _field(False, _boolean)
    noise_std: float = _field(1.0, _positive_float())
    temperature: Optional[float] = _field(None, _positive_float(optional=True))
    embedding_dim: Optional[int] = _field(None, _positive_int(optional=True))
    learnable_temperature: bool = _field(True, _boolean)
    num_slots: Optional[int] = _field(None, _positive_int(optional=True))
    normalize_top_k: bool = _field(False, _boolean)


@dataclasses.dataclass
class MoEConfig(_CheckedConfig):
    """The whole Mixture-of-Experts layer.

    Attributes:
        num_experts: Number of routed experts E.
        expert_config: An `ExpertConfig` (or its dict).
        gating_config: A `GatingConfig` (or its dict).
        train_capacity_factor: Capacity factor cf in training: each expert takes at most
            C = ceil(cf * T * k / E) assignments, rounded up to a multiple of 8.
        eval_capacity_factor: The same outside training.
        drop_tokens: True: capacity mode (overflow assignments are dropped and counted).
            False: dropless mode (every assignment is computed).
        use_residual_connection: A token whose every assignment was dropped outputs its
            input unchanged (when input and output widths match) instead of zeros.
        jitter_noise: Multiplicative uniform noise U(1 - j, 1 + j) on the router input in
            training (Switch Transformer). 0 disables it.
        routing_dtype: Dtype of router math (logits, softmax, losses); "float32" unless
            memory demands otherwise.
        dropless_block_size: Rows per block in dropless mode (None: chosen from T*k/E).
            Each expert's group is padded to a multiple of it, so at most
            E * (block - 1) padding rows are computed.
    """

    num_experts: int = _field(8, _positive_int())
    expert_config: ExpertConfig = dataclasses.field(default_factory=ExpertConfig)
    gating_config: GatingConfig = dataclasses.field(default_factory=GatingConfig)
    train_capacity_factor: float = _field(1.25, _positive_float())
    eval_capacity_factor: float = _field(2.0, _positive_float())
    drop_tokens: bool = _field(True, _boolean)
    use_residual_connection: bool = _field(True, _boolean)
    jitter_noise: float = _field(0.0, _probability)
    routing_dtype: str = _field("float32", _one_of(ROUTING_DTYPES))
    dropless_block_size: Optional[int] = _field(None, _positive_int(optional=True))

    def __post_init__(self):
        if isinstance(self.expert_config, dict):
            object.__setattr__(self, "expert_config", ExpertConfig.from_dict(self.expert_config))
        if isinstance(self.gating_config, dict):
            object.__setattr__(self, "gating_config", GatingConfig.from_dict(self.gating_config))
        for name, cls in (("expert_config", ExpertConfig), ("gating_config", GatingConfig)):
            if not isinstance(getattr(self, name), cls):
                _fail("MoEConfig", name, getattr(self, name), f"a {cls.__name__} or a dict")
        super().__post_init__()

    def validate(self):
        top_k = self.gating_config.top_k
        if top_k > self.num_experts:
            raise ValueError(
                f"GatingConfig.top_k must be between 1 and num_experts={self.num_experts}, "
                f"got {top_k}."
            )

    def capacity_factor(self, training):
        """The capacity factor in force for `training` (bool)."""
        if self.gating_config.capacity_factor is not None:
            return self.gating_config.capacity_factor
        return self.train_capacity_factor if training else self.eval_capacity_factor

    @classmethod
    def _nested_from_dict(cls, data):
        if "expert_config" in data:
            data["expert_config"] = ExpertConfig.from_dict(data["expert_config"])
        if "gating_config" in data:
            data["gating_config"] = GatingConfig.from_dict(data["gating_config"])
        return data


def split_overrides(overrides, owner="overrides"):
    """Sorts flat keyword overrides into the three configs' fields.

    Args:
        overrides: Mapping of field name → value; each name belongs to exactly one of
            `MoEConfig`, `ExpertConfig` or `GatingConfig`.
        owner: Name used in error messages (e.g. the factory's name).

    Returns:
        `(moe_fields, expert_fields, gating_fields)` dicts.
    """
    moe_names = set(MoEConfig._field_names()) - {"expert_config", "gating_config"}
    expert_names = set(ExpertConfig._field_names())
    gating_names = set(GatingConfig._field_names())
    parts = ({}, {}, {})
    for key, value in overrides.items():
        for part, names in zip(parts, (moe_names, expert_names, gating_names)):
            if key in names:
                part[key] = value
                break
        else:
            valid = sorted(moe_names | expert_names | gating_names)
            raise ValueError(f"Unknown {owner} key {key!r}. Valid keys: {valid}.")
    return parts
