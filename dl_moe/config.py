"""Configuration dataclasses: `ExpertConfig`, `GatingConfig` and `MoEConfig`.

Every field is checked when the config is created *and* when a field is assigned
later (`config.gating_config.top_k = 3`), so a bad value fails where it is written,
with a `ValueError` that names the field, the value and what is allowed.
Cross-field rules (e.g. `top_k <= num_experts`) are checked by `MoEConfig.validate()`,
which `MixtureOfExperts` calls again when it is constructed.
"""

import dataclasses
import difflib
import math
from typing import Optional

from dl_moe.registry import EXPERT_TYPES, GATING_TYPES

FFN_TYPES = ("mlp", "swiglu", "geglu", "geglu_tanh", "clamped_swiglu")
ROUTING_DTYPES = ("float32", "bfloat16", "float16")
CONV_PADDINGS = ("same", "valid")
OVERFLOW_MODES = ("drop", "reroute")


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


def _optional_boolean(owner, name, value):
    if value is not None and not isinstance(value, bool):
        _fail(owner, name, value, "True, False or None")
    return value


def _one_of(choices):
    def check(owner, name, value):
        if value not in choices:
            _fail(owner, name, value, f"one of {list(choices)}")
        return value

    return check


def _dispatch_plan(owner, name, value):
    from dl_moe.dispatch_plans import plan_names

    if value not in plan_names():
        _fail(owner, name, value, f"one of {plan_names()}")
    return value


def _registered(registry):
    def check(owner, name, value):
        if value not in registry:
            _fail(owner, name, value, f"one of {registry.names()}")
        return value

    return check


def _non_negative_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(owner, name, value, "an integer >= 0")
    return value


def _int_or_pair(optional=False):
    """A positive int, or a pair of them (a JSON list becomes a tuple)."""

    def check(owner, name, value):
        if value is None and optional:
            return value
        if isinstance(value, (list, tuple)):
            value = tuple(value)
            if len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                return value
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        _fail(owner, name, value, "a positive integer or a pair of them" + (" or None" if optional else ""))

    return check


def _optional_one_of(choices):
    def check(owner, name, value):
        if value is not None and value not in choices:
            _fail(owner, name, value, f"one of {list(choices)} or None")
        return value

    return check


def _json_dict(owner, name, value):
    import json

    if value is None:
        return value
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        _fail(owner, name, value, "a dict with string keys or None")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        _fail(owner, name, value, "a JSON-serialisable dict (numbers, strings, lists, dicts)")
    return dict(value)


def _routing_levels(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        _fail(owner, name, value, "an integer >= 2 (levels of the routing tree, the experts included)")
    return value


def _routing_tree_shape(owner, name, value):
    """None, or a tuple of >= 2 positive ints (a JSON list becomes a tuple)."""
    if value is None:
        return value
    if isinstance(value, (list, tuple)):
        value = tuple(value)
        if len(value) >= 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
            return value
    _fail(owner, name, value, "None or a tuple of >= 2 positive integers (children per node, root level first)")


def _factorizations(number, levels):
    """Every ordered tuple of `levels` positive ints whose product is `number`."""
    if levels == 1:
        yield (number,)
        return
    for first in range(1, number + 1):
        if number % first == 0:
            for rest in _factorizations(number // first, levels - 1):
                yield (first, *rest)


def routing_tree_fits(shape, top_k, top_k_groups):
    """Whether a routing tree `shape` can serve `top_k` experts with a beam of `top_k_groups`.

    Every level above the experts splits each node into >= 2 children, the beam fits
    into the root level (`top_k_groups <= shape[0]`) and the kept leaves' parents hold
    at least `top_k` experts (`top_k <= top_k_groups * shape[-1]`).
    """
    return (
        all(b >= 2 for b in shape[:-1]) and shape[-1] >= 1
        and top_k_groups <= shape[0] and top_k <= top_k_groups * shape[-1]
    )


def default_routing_tree_shape(num_experts, levels, top_k, top_k_groups, root=None):
    """The most even split of `num_experts` into `levels` levels that fits (or None).

    Among the ordered splits E = b_1 * ... * b_L allowed by `routing_tree_fits` (with
    b_1 = `root` when given), the one
    whose factors, sorted from largest to smallest, are lexicographically smallest (the
    largest branching as small as possible, then the second largest, ...); among
    reorderings of the same factors, the smaller ones nearer the root. E.g. 64 experts:
    8 x 8 over two levels, 4 x 4 x 4 over three; 128 over three: 4 x 4 x 8. For two
    levels this is the number of groups closest to sqrt(E), ties to the smaller.
    """
    candidates = [
        s for s in _factorizations(num_experts, levels)
        if routing_tree_fits(s, top_k, top_k_groups) and root in (None, s[0])
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda s: (sorted(s, reverse=True), s))


def _activation(owner, name, value):
    import keras

    try:
        keras.activations.get(value)
    except Exception:
        _fail(owner, name, value, "a Keras activation name such as 'gelu', 'relu', 'silu'")
    if not isinstance(value, str):
        _fail(owner, name, value, "the name of a Keras activation (a string)")
    return value


def _field(default, check, **kwargs):
    return dataclasses.field(default=default, metadata={"check": check}, **kwargs)


def _config_classes():
    """The three config classes, in the order an error message names them."""
    return (MoEConfig, ExpertConfig, GatingConfig)


def close_names(name, names, n=3):
    """Up to `n` entries of `names` that look like `name` (for "did you mean").

    Args:
        name: The unknown name.
        names: The valid names.
        n: Most suggestions to return.

    Returns:
        A list of names, closest first (empty when nothing is close).
    """
    lowered = {candidate.lower(): candidate for candidate in names}
    matches = difflib.get_close_matches(str(name).lower(), list(lowered), n=n, cutoff=0.6)
    return [lowered[match] for match in matches]


def did_you_mean(name, names):
    """" Did you mean 'x'?" (or "" when no name is close)."""
    matches = close_names(name, names)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def unknown_field_error(owner, name):
    """The `ValueError` for a name that is not a field of config class `owner`.

    Names the config the field belongs to when it is another one, and the closest
    valid field names otherwise.

    Args:
        owner: The config class that was given `name`.
        name: The unknown field name.

    Returns:
        A `ValueError` (to raise).
    """
    cls_name = owner.__name__
    for other in _config_classes():
        if other is not owner and name in other._field_names():
            where = {
                "MoEConfig": "MoEConfig(...)",
                "ExpertConfig": "MoEConfig(expert_config=ExpertConfig(...))",
                "GatingConfig": "MoEConfig(gating_config=GatingConfig(...))",
            }[other.__name__]
            return ValueError(
                f"{cls_name} has no field {name!r}: {name!r} belongs to {other.__name__}; "
                f"set it there, as in {where}."
            )
    return ValueError(
        f"{cls_name} has no field {name!r}.{did_you_mean(name, owner._field_names())}"
    )


class _CheckedConfig:
    """Mixin: validates every field on creation and on assignment.

    An unknown keyword (`MoEConfig(num_expert=8)`) or an assignment to a name that is
    not a field (`config.gating_config.topk = 1`) is a `ValueError` that names the
    field, the config it belongs to if another, and the closest valid names. The
    checks read `dataclasses.fields`, so a new field is picked up without more code.
    """

    def __new__(cls, *args, **kwargs):
        names = cls._field_names()
        for key in kwargs:
            if key not in names:
                raise unknown_field_error(cls, key)
        if len(args) > len(names):
            raise ValueError(
                f"{cls.__name__} takes at most {len(names)} positional arguments, "
                f"got {len(args)}; pass fields by keyword."
            )
        return super().__new__(cls)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            self._check_field(f.name, getattr(self, f.name))
        self._initialised = True
        self.validate()

    def __setattr__(self, name, value):
        if getattr(self, "_initialised", False):
            if name in self._field_names():
                value = self._checked(name, value)
            elif not name.startswith("_") and not hasattr(type(self), name):
                raise unknown_field_error(type(self), name)
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
        data = {key: value for key, value in data.items() if key not in cls._retired_fields}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise unknown_field_error(cls, unknown[0])
        return cls(**cls._nested_from_dict(dict(data)))

    @classmethod
    def _nested_from_dict(cls, data):
        return data

    # Fields that earlier versions saved and this one no longer has; `from_dict`
    # skips them so that their `.keras` files still load (see CHANGELOG.md).
    _retired_fields = ()


@dataclasses.dataclass
class ExpertConfig(_CheckedConfig):
    """What each expert computes.

    Example:
        ```python
        from dl_moe import ExpertConfig, MixtureOfExperts, MoEConfig

        experts = ExpertConfig(hidden_dim=16, intermediate_size=32, ffn_type="swiglu")
        layer = MixtureOfExperts(MoEConfig(num_experts=4, expert_config=experts))
        print(experts.resolved_intermediate_size)  # 32
        ```

    Attributes:
        expert_type: Registered expert type; built-in: "ffn" (feed-forward experts,
            `FFNExpertBank`), "attention" (Mixture of Attention heads over `[B, S, d]`,
            `AttentionExpertBank`) and "conv2d" (convolutional experts over whole
            `[B, H, W, C]` examples, `Conv2DExpertBank`); plug-ins via
            `dl_moe.experts.register_expert`.
        hidden_dim: Model width d: the last axis of the layer's input.
        output_dim: Width of the layer's output; None means `hidden_dim`.
        intermediate_size: Hidden width h of each FFN expert (and of each shared
            expert); None means 4 * hidden_dim.
        ffn_type: "mlp" (act(x W_up) W_down), "swiglu" (silu(x W_gate) * x W_up, then
            W_down), "geglu" (exact gelu instead of silu), "geglu_tanh" (tanh-approximated
            gelu, Gemma) or "clamped_swiglu" (GPT-OSS: g = min(x W_gate, limit),
            u = clip(x W_up, -limit, limit), (u + 1) * g * sigmoid(alpha * g), then W_down).
        activation: Activation of the "mlp" variant (any Keras activation name).
        dropout_rate: Dropout on the expert's hidden activations, in training only.
        use_bias: Whether expert matmuls add a bias.
        glu_alpha: "clamped_swiglu": alpha of g * sigmoid(alpha * g) (None: 1.702).
        glu_limit: "clamped_swiglu": clamp limit of the gate and up projections
            (None: 7.0).
        use_expert_scale: Each routed expert's output is multiplied by its own learned
            scalar `expert_scale [E]` (initialised to 1; Gemma 4).
        num_heads: Attention experts: query heads per expert (None: 8, or fewer so that
            it divides hidden_dim).
        head_dim: Attention experts: width of each head (None: hidden_dim // num_heads).
        filters: Conv experts: output channels (None: `output_dim`, else hidden_dim).
        kernel_size: Conv experts: kernel size, an int or (kh, kw) (None: 3).
        strides: Conv experts: strides, an int or (sh, sw) (None: 1).
        padding: Conv experts: "same" or "valid" (None: "same").
        expert_kwargs: Plug-in experts (`dl_moe.experts.register_expert` with a
            `BaseExpert` subclass): keyword arguments of the user's constructor, a
            JSON-serialisable dict; each of the E experts is `cls(**expert_kwargs)`.

    Type-specific fields (`num_heads` ... `expert_kwargs`) must stay None unless the
    registered expert type reads them (its class lists them in `config_fields`).
    `hidden_dim=None` means "the last axis of the first input", resolved when the layer
    is built.
    """

    expert_type: str = _field("ffn", _registered(EXPERT_TYPES))
    hidden_dim: Optional[int] = _field(768, _positive_int(optional=True))
    output_dim: Optional[int] = _field(None, _positive_int(optional=True))
    intermediate_size: Optional[int] = _field(None, _positive_int(optional=True))
    ffn_type: str = _field("mlp", _one_of(FFN_TYPES))
    activation: str = _field("gelu", _activation)
    dropout_rate: float = _field(0.0, _probability)
    use_bias: bool = _field(True, _boolean)
    glu_alpha: Optional[float] = _field(None, _positive_float(optional=True))
    glu_limit: Optional[float] = _field(None, _positive_float(optional=True))
    use_expert_scale: bool = _field(False, _boolean)
    num_heads: Optional[int] = _field(None, _positive_int(optional=True))
    head_dim: Optional[int] = _field(None, _positive_int(optional=True))
    filters: Optional[int] = _field(None, _positive_int(optional=True))
    kernel_size: Optional[object] = _field(None, _int_or_pair(optional=True))
    strides: Optional[object] = _field(None, _int_or_pair(optional=True))
    padding: Optional[str] = _field(None, _optional_one_of(CONV_PADDINGS))
    expert_kwargs: Optional[dict] = _field(None, _json_dict)

    TYPE_SPECIFIC_FIELDS = ("num_heads", "head_dim", "filters", "kernel_size", "strides", "padding", "expert_kwargs")
    # FFN fields with their defaults: an expert type that does not read one (its class's
    # `config_fields`) must leave it at the default, unless shared experts (FFNs) use it.
    FFN_FIELD_DEFAULTS = {"intermediate_size": None, "ffn_type": "mlp", "activation": "gelu"}

    def validate(self):
        cls = EXPERT_TYPES.get(self.expert_type)
        allowed = getattr(cls, "config_fields", ())
        for name in self.TYPE_SPECIFIC_FIELDS:
            value = getattr(self, name)
            if value is not None and name not in allowed:
                readers = [t for t in EXPERT_TYPES.names() if name in getattr(EXPERT_TYPES.get(t), "config_fields", ())]
                raise ValueError(
                    f"ExpertConfig.{name}={value!r} is only used by expert_type in {readers}, "
                    f"got expert_type={self.expert_type!r}."
                )
        for name in ("glu_alpha", "glu_limit"):
            if getattr(self, name) is not None and self.ffn_type != "clamped_swiglu":
                raise ValueError(
                    f"ExpertConfig.{name}={getattr(self, name)!r} is only used by ffn_type='clamped_swiglu', "
                    f"got ffn_type={self.ffn_type!r}."
                )
        if self.use_expert_scale and not getattr(cls, "supports_expert_scale", False):
            raise ValueError(
                f"ExpertConfig.use_expert_scale=True needs expert_type='ffn', got expert_type={self.expert_type!r}."
            )
        if hasattr(cls, "validate_expert_config"):
            cls.validate_expert_config(self)

    @property
    def resolved_intermediate_size(self):
        """`intermediate_size`, with None resolved to 4 * hidden_dim."""
        return self.intermediate_size or 4 * self.hidden_dim

    @property
    def resolved_output_dim(self):
        """`output_dim`, with None resolved to `hidden_dim`."""
        return self.output_dim or self.hidden_dim


BALANCING_MODES = ("aux_loss", "aux_free", "none")


def _unit_interval(open_low=False, optional=False):
    """A number in [0, 1] ((0, 1] when `open_low`), optionally None."""

    def check(owner, name, value):
        if value is None and optional:
            return value
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not ok or value > 1 or value < 0 or (open_low and value == 0):
            interval = "(0, 1]" if open_low else "[0, 1]"
            _fail(owner, name, value, f"a number in {interval}" + (" or None" if optional else ""))
        return float(value)

    return check


def _optional_non_negative_float(owner, name, value):
    return value if value is None else _non_negative_float(owner, name, value)


def _at_least_one(optional=False):
    def check(owner, name, value):
        if value is None and optional:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 1:
            _fail(owner, name, value, "a finite number >= 1" + (" or None" if optional else ""))
        return float(value)

    return check


def _ensemble_members(owner, name, value):
    """None, or a non-empty list of member dicts: GatingConfig fields plus "weight"."""
    if value is None:
        return value
    allowed = "a non-empty list of dicts such as {'gating_type': 'linear', 'weight': 1.0}"
    if not isinstance(value, (list, tuple)) or not value:
        _fail(owner, name, value, allowed)
    members = []
    for member in value:
        if not isinstance(member, dict) or "gating_type" not in member:
            _fail(owner, name, value, allowed + " (each with a 'gating_type')")
        member = dict(member)
        weight = member.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            _fail(owner, f"{name}[...]['weight']", weight, "a finite number >= 0")
        member["weight"] = float(weight)
        members.append(member)
    if sum(m["weight"] for m in members) <= 0:
        _fail(owner, name, value, "members whose weights sum to more than 0")
    return members


@dataclasses.dataclass
class GatingConfig(_CheckedConfig):
    """How tokens are routed to experts.

    Example:
        ```python
        from dl_moe import ExpertConfig, GatingConfig, MixtureOfExperts, MoEConfig

        router = GatingConfig(gating_type="linear", top_k=1, aux_loss_weight=0.01)
        layer = MixtureOfExperts(
            MoEConfig(num_experts=4, expert_config=ExpertConfig(hidden_dim=8), gating_config=router)
        )
        ```

    Attributes:
        gating_type: Registered router type; built-in (see `dl_moe.gating`):
            "linear" (top-k of softmax(x W)), "cosine" (top-k of scaled cosine
            similarity), "softmoe" (Soft MoE slots), "expert_choice" (each expert picks
            its tokens), "top_p" (experts until a probability mass), "conditional" (k
            from a predicted difficulty), "confidence" (k from the router's
            uncertainty), "top_any" (per-expert trainable thresholds), "resonance"
            (token- and expert-side affinity), "ensemble" (a weighted mix of
            routers), "sigmoid" (DeepSeek-V3: top-k of sigmoid scores, optionally
            group-limited) and "rmsnorm_linear" (linear router on RMS-normalised
            tokens, Gemma 4); plug-ins via `dl_moe.gating.register_gating`.
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
            Dynamic-k routers renormalise over their active experts. With a softmax
            router this equals a softmax over the k selected logits (GPT-OSS's
            top-k-then-softmax); False keeps the raw probabilities (Qwen3-MoE's
            `norm_top_k_prob=False`).
        use_router_bias: The router adds a learned bias `router_bias [E]` to its logits
            (GPT-OSS). Routers that compute logits as x W ("linear", "sigmoid",
            "rmsnorm_linear") read it.
        balancing: "aux_loss" (Switch loss weighted by `aux_loss_weight`), "aux_free"
            (DeepSeek-V3: a per-expert bias, non-trainable router state, is added to the
            scores for expert *selection only* and updated in every training call by
            `bias_update_rate * sign(mean load - load_e)`; no Switch loss) or "none"
            (no Switch loss, no bias). `z_loss_weight`, `importance_loss_weight` and
            `entropy_loss_weight` apply in every mode.
        bias_update_rate: gamma of "aux_free" balancing (per training step).
        importance_loss_weight: Weight of the importance CV^2 loss (Shazeer et al. 2017)
            on the per-expert sum of routing weights (0 disables it).
        entropy_loss_weight: Weight of the router entropy loss mean(-sum p log p), which
            keeps a router from going flat (None: 1e-4 for "top_p", else 0).

    Router-specific fields (None unless the router reads them; a router class lists
    the ones it reads in `config_fields`):

        top_p_threshold: "top_p": keep experts, most probable first, while the
            probability mass before them is below this (None: 0.4).
        max_experts: Most experts per token of dynamic-k routers (None: num_experts for
            "top_p" and "top_any", min(4, num_experts) for "conditional"/"confidence").
        min_experts: Fewest experts per token of "conditional"/"confidence" (None: 1).
        threshold_low: "conditional": a predicted difficulty (in [0, 1]) at or below it
            uses `min_experts` (None: 0.3); between the two thresholds k grows
            linearly with the difficulty.
        threshold_high: "conditional": a difficulty at or above it uses `max_experts`
            (None: 0.7). Must exceed `threshold_low`.
        difficulty_loss_weight: "conditional": weight of the regression loss that
            trains the difficulty head toward the router's normalised entropy
            (None: 0.01).
        layer_depth_scale: "confidence": multiplies the complexity score before k is
            derived (clipped to [0, 1]); e.g. 1 + 0.5 * depth / num_layers gives deeper
            layers more experts (None: 1.0).
        bidirectional_strength: "resonance": share beta of the expert->token affinity
            in the blend (None: 0.5).
        ensemble_members: "ensemble": list of member routers, each a dict of
            GatingConfig fields (at least `gating_type`) plus an optional `weight`
            (default 1). Members inherit `top_k` unless they set it.
        expected_experts: Dynamic-k routers: the average experts per token the expert
            capacity is sized for, C = ceil(cf * T * expected_experts / E) (None: the
            router's default, see its `expected_k`). Set it to a measured
            `avg_experts_per_token` to shrink the expert buffers.
        routed_scaling_factor: "sigmoid": multiplies the routing weights after the
            optional renormalisation (DeepSeek-V3's routed_scaling_factor; None: 1.0).
        router_norm_epsilon: "rmsnorm_linear": epsilon of the router's RMS norm
            (None: 1e-6).
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
    balancing: str = _field("aux_loss", _one_of(BALANCING_MODES))
    bias_update_rate: float = _field(1e-3, _positive_float())
    importance_loss_weight: float = _field(0.0, _non_negative_float)
    entropy_loss_weight: Optional[float] = _field(None, _optional_non_negative_float)
    top_p_threshold: Optional[float] = _field(None, _unit_interval(open_low=True, optional=True))
    max_experts: Optional[int] = _field(None, _positive_int(optional=True))
    min_experts: Optional[int] = _field(None, _positive_int(optional=True))
    threshold_low: Optional[float] = _field(None, _unit_interval(optional=True))
    threshold_high: Optional[float] = _field(None, _unit_interval(optional=True))
    difficulty_loss_weight: Optional[float] = _field(None, _optional_non_negative_float)
    layer_depth_scale: Optional[float] = _field(None, _positive_float(optional=True))
    bidirectional_strength: Optional[float] = _field(None, _unit_interval(optional=True))
    ensemble_members: Optional[list] = _field(None, _ensemble_members)
    expected_experts: Optional[float] = _field(None, _at_least_one(optional=True))
    use_router_bias: bool = _field(False, _boolean)
    routed_scaling_factor: Optional[float] = _field(None, _positive_float(optional=True))
    router_norm_epsilon: Optional[float] = _field(None, _positive_float(optional=True))

    ROUTER_SPECIFIC_FIELDS = (
        "top_p_threshold", "max_experts", "min_experts", "threshold_low", "threshold_high",
        "difficulty_loss_weight", "layer_depth_scale", "bidirectional_strength",
        "ensemble_members", "expected_experts", "routed_scaling_factor", "router_norm_epsilon",
    )

    def validate(self):
        cls = GATING_TYPES.get(self.gating_type)
        allowed = getattr(cls, "config_fields", ())
        for name in self.ROUTER_SPECIFIC_FIELDS:
            value = getattr(self, name)
            if value is not None and name not in allowed:
                readers = [t for t in GATING_TYPES.names() if name in getattr(GATING_TYPES.get(t), "config_fields", ())]
                raise ValueError(
                    f"GatingConfig.{name}={value!r} is only used by gating_type in {readers}, "
                    f"got gating_type={self.gating_type!r}."
                )
        if self.use_router_bias and not getattr(cls, "supports_router_bias", False):
            readers = [t for t in GATING_TYPES.names() if getattr(GATING_TYPES.get(t), "supports_router_bias", False)]
            raise ValueError(
                f"GatingConfig.use_router_bias=True is only used by gating_type in {readers}, "
                f"got gating_type={self.gating_type!r}."
            )
        low = 0.3 if self.threshold_low is None else self.threshold_low
        high = 0.7 if self.threshold_high is None else self.threshold_high
        if low >= high:
            raise ValueError(
                f"GatingConfig.threshold_low must be < threshold_high, got threshold_low={low!r}, "
                f"threshold_high={high!r}."
            )
        if self.min_experts is not None and self.max_experts is not None and self.min_experts > self.max_experts:
            raise ValueError(
                f"GatingConfig.min_experts must be <= max_experts, got min_experts={self.min_experts!r}, "
                f"max_experts={self.max_experts!r}."
            )
        if hasattr(cls, "validate_gating_config"):
            cls.validate_gating_config(self)

    def validate_for_layer(self, moe_config):
        """Rules that involve the layer (`num_experts`, routing kind)."""
        num_experts = moe_config.num_experts
        for name in ("max_experts", "min_experts", "expected_experts"):
            value = getattr(self, name)
            if value is not None and value > num_experts:
                raise ValueError(
                    f"GatingConfig.{name} must be at most num_experts={num_experts}, got {value!r}."
                )
        cls = GATING_TYPES.get(self.gating_type)
        if self.balancing == "aux_free" and not getattr(cls, "supports_bias_balancing", False):
            raise ValueError(
                f"GatingConfig.balancing='aux_free' needs a router that selects experts by score "
                f"(not {self.gating_type!r}); use 'none' or 'aux_loss'."
            )
        if getattr(moe_config, "hierarchical_routing", False):
            if self.balancing == "aux_free":
                raise ValueError(
                    "GatingConfig.balancing='aux_free' is not supported with hierarchical_routing=True; "
                    "use 'aux_loss' or 'none'."
                )
            if not getattr(cls, "supports_hierarchical_routing", True):
                raise ValueError(
                    f"MoEConfig.hierarchical_routing=True needs a fixed top-k router such as 'linear' or "
                    f"'cosine', got gating_type={self.gating_type!r}."
                )
        if hasattr(cls, "validate_for_layer"):
            cls.validate_for_layer(moe_config)


@dataclasses.dataclass
class MoEConfig(_CheckedConfig):
    """The whole Mixture-of-Experts layer.

    Example:
        ```python
        from dl_moe import ExpertConfig, GatingConfig, MixtureOfExperts, MoEConfig

        config = MoEConfig(
            num_experts=4,
            drop_tokens=False,  # dropless: every assignment is computed
            expert_config=ExpertConfig(hidden_dim=8, intermediate_size=16),
            gating_config=GatingConfig(top_k=2),
        )
        assert MoEConfig.from_dict(config.to_dict()) == config
        layer = MixtureOfExperts(config)
        ```

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
        hierarchical_routing: Tree routing (`HierarchicalGating`): the experts are the
            leaves of a tree of groups of consecutive experts (`routing_tree_shape`);
            one router per level scores its nodes, p(node) = p(parent) * softmax over
            the node and its siblings, so p(e) is the product of the per-level
            softmaxes along e's path. At every level above the experts the token keeps
            its `top_k_groups` best nodes (by p) among the children of the nodes kept
            one level up, then its `top_k` best experts inside them. Two levels: a
            group router picks `top_k_groups` of `num_expert_groups` groups, then an
            expert router picks `top_k` experts inside them (p(e) = p(group) *
            p(e | group)). Uses the `gating_type` router class at every level;
            token-choice only. (The "sigmoid" router's group-limited selection reads
            `num_expert_groups` and `top_k_groups` without hierarchical routing.)
        num_routing_levels: Hierarchical routing: levels L >= 2 of the tree, the experts
            included (2: groups, then experts; 3 with 64 experts: 4 x 4 x 4). Must equal
            len(routing_tree_shape) when that is set.
        routing_tree_shape: Hierarchical routing: children per node at each level, root
            first, e.g. (4, 4, 4): 4 groups of 16 experts, each of 4 subgroups of 4
            experts; expert e sits at index e of the row-major `[b_1, ..., b_L]` array.
            The product must be num_experts, every level above the experts splits in
            >= 2, top_k_groups <= b_1 and top_k <= top_k_groups * b_L. None: b_1 =
            `num_expert_groups` when set, and the rest (or all) is the most even split
            of the remaining experts (see `default_routing_tree_shape`: the largest
            branching as small as possible, smaller factors nearer the root; for two
            levels the divisor of num_experts closest to sqrt(num_experts) that fits).
        num_expert_groups: Hierarchical routing: groups at the root level b_1 (must divide
            num_experts; None: from the default split). Not together with
            `routing_tree_shape`.
        top_k_groups: Hierarchical routing: nodes kept per token at every level above
            the experts (default 1).
        num_shared_experts: DeepSeekMoE shared experts: every token also goes through a
            dense FFN equal to this many FFN experts (hidden width
            num_shared_experts * intermediate_size), added to the routed output. 0 disables.
        shared_expert_intermediate_size: Hidden width of that shared FFN when it differs
            from num_shared_experts * intermediate_size (Qwen-MoE's
            shared_expert_intermediate_size); needs num_shared_experts >= 1.
        shared_expert_gate: The shared FFN's output is multiplied per token by
            sigmoid(x W_g), with a learned `shared_expert_gate/kernel [d, 1]`
            (Qwen-MoE, Qwen3.5-MoE); needs num_shared_experts >= 1.
        scale_expert_inputs: Llama 4: the routing weight multiplies the token *before*
            its expert (expert(w * x)) and the expert's output is added unweighted,
            instead of w * expert(x). Needs top_k=1 with a token-choice router.
        expert_parallel: Under a `keras.distribution` that shards the expert weights
            by expert (`dl_moe.distribution`), keep the tokens sharded and move the
            routed ones to their experts' devices and back with two all-to-alls
            (JAX, token-choice routers: `dl_moe.expert_parallel`; capacity is then
            per device, C = ceil(cf * T/P * k / E)). Elsewhere the `[E, C, d]`
            buffers are only constrained to the expert axis. No effect without
            such a distribution.
        overflow: What happens to an assignment past its expert's capacity (capacity
            mode): "drop" (it is not computed) or "reroute" (it moves to the token's
            next-best expert that still has room, see `dl_moe.overflow`; token-choice
            routers only).
        reroute_attempts: With overflow="reroute", fallback experts a token tries at
            most (None: all E - 1; fewer rounds cost less).
        initial_active_experts: None (every expert is always live) or the number n of
            experts live when the layer is built: the router then holds an
            active-expert mask `active_experts [E]` (experts 0..n-1 live) and a
            per-expert `expert_logit_offset [E]`, both non-trainable variables, so
            `dl_moe.lifecycle.ExpertLifecycle` can split, merge and retire experts
            during training without changing any weight shape (see
            `dl_moe.lifecycle`). Needs a router with `supports_expert_mask`
            ("linear", "rmsnorm_linear", "cosine", "top_p").
        adaptive_capacity: Capacity mode, training, static token count: the capacity
            factor follows the load instead of `train_capacity_factor`. It is the
            smallest class factor (the bounds, and 1, 1.25, 1.5, 2, 3, 4 between them)
            at or above `capacity_load_factor`, a moving average of the batches'
            largest expert load over the mean load, clipped to
            [min_capacity_factor, max_capacity_factor]. The statistic starts at
            max_capacity_factor (a new router is unbalanced) and is kept by
            `reset_routing_stats`. Needs drop_tokens=True and overflow="drop".
        min_capacity_factor: adaptive_capacity: smallest capacity factor used.
        max_capacity_factor: adaptive_capacity: largest capacity factor used.
        capacity_decay: adaptive_capacity: weight of the old value in the moving
            average (new = decay * old + (1 - decay) * this batch's max load / mean).
        dispatch: Which plan runs dispatch → experts → combine: "auto" (the first row
            of `dl_moe.dispatch_plans.PLAN_TABLE` that applies to the call) or a plan's
            name ("capacity", "grouped", "blocks", "adaptive_capacity", and the
            backend rows "host_slices" and "slices" of eager PyTorch). Plans differ in
            cost only: each computes the same assignments. A named plan that cannot
            run a call raises a `ValueError` saying why.
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
    hierarchical_routing: bool = _field(False, _boolean)
    num_routing_levels: int = _field(2, _routing_levels)
    routing_tree_shape: Optional[tuple] = _field(None, _routing_tree_shape)
    num_expert_groups: Optional[int] = _field(None, _positive_int(optional=True))
    top_k_groups: int = _field(1, _positive_int())
    num_shared_experts: int = _field(0, _non_negative_int)
    shared_expert_intermediate_size: Optional[int] = _field(None, _positive_int(optional=True))
    shared_expert_gate: bool = _field(False, _boolean)
    scale_expert_inputs: bool = _field(False, _boolean)
    expert_parallel: bool = _field(False, _boolean)
    overflow: str = _field("drop", _one_of(OVERFLOW_MODES))
    reroute_attempts: Optional[int] = _field(None, _positive_int(optional=True))
    initial_active_experts: Optional[int] = _field(None, _positive_int(optional=True))
    adaptive_capacity: bool = _field(False, _boolean)
    min_capacity_factor: float = _field(1.0, _positive_float())
    max_capacity_factor: float = _field(2.0, _positive_float())
    capacity_decay: float = _field(0.9, _probability)
    dispatch: str = _field("auto", _dispatch_plan)

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
        self.expert_config.validate()
        self.gating_config.validate()
        self.gating_config.validate_for_layer(self)
        self._validate_catalog()
        self._validate_overflow()
        self._validate_active_experts()
        self._validate_adaptive_capacity()

    def _validate_adaptive_capacity(self):
        """adaptive_capacity: capacity mode with overflow="drop"; its three settings only with it."""
        if not self.adaptive_capacity:
            for name, default in (("min_capacity_factor", 1.0), ("max_capacity_factor", 2.0), ("capacity_decay", 0.9)):
                if getattr(self, name) != default:
                    raise ValueError(
                        f"MoEConfig.{name} is only used with adaptive_capacity=True, got {name}="
                        f"{getattr(self, name)!r} with adaptive_capacity=False."
                    )
            return
        if not self.drop_tokens:
            raise ValueError(
                "MoEConfig.adaptive_capacity=True needs drop_tokens=True (capacity mode); dropless mode has no capacity."
            )
        if self.overflow != "drop":
            raise ValueError(
                f"MoEConfig.adaptive_capacity=True needs overflow='drop', got overflow={self.overflow!r} "
                "(rerouting fills a capacity fixed before the call)."
            )
        if self.min_capacity_factor > self.max_capacity_factor:
            raise ValueError(
                f"MoEConfig.min_capacity_factor must be <= max_capacity_factor, got "
                f"{self.min_capacity_factor} > {self.max_capacity_factor}."
            )

    def _validate_active_experts(self):
        """initial_active_experts: 1 <= n <= E, a router that takes the expert mask, one routing level."""
        n = self.initial_active_experts
        if n is None:
            return
        if n > self.num_experts:
            raise ValueError(
                f"MoEConfig.initial_active_experts must be in [1, num_experts={self.num_experts}], got {n}."
            )
        gating_cls = GATING_TYPES.get(self.gating_config.gating_type)
        if not getattr(gating_cls, "supports_expert_mask", False):
            allowed = [t for t in GATING_TYPES.names() if getattr(GATING_TYPES.get(t), "supports_expert_mask", False)]
            raise ValueError(
                f"MoEConfig.initial_active_experts needs a router that takes an active-expert mask, "
                f"gating_type in {allowed}; got gating_type={self.gating_config.gating_type!r}."
            )
        if self.hierarchical_routing:
            raise ValueError(
                "MoEConfig.initial_active_experts is not supported with hierarchical_routing=True "
                "(the group router has no per-expert mask)."
            )

    def _validate_overflow(self):
        """overflow="reroute" needs capacity mode and a token-choice router."""
        if self.reroute_attempts is not None and self.overflow != "reroute":
            raise ValueError(
                f"MoEConfig.reroute_attempts is only used with overflow='reroute', got overflow={self.overflow!r}."
            )
        if self.overflow != "reroute":
            return
        if not self.drop_tokens:
            raise ValueError(
                "MoEConfig.overflow='reroute' needs drop_tokens=True (capacity mode); dropless mode has no overflow."
            )
        kind = getattr(GATING_TYPES.get(self.gating_config.gating_type), "routing_kind", "token_choice")
        if kind != "token_choice":
            raise ValueError(
                f"MoEConfig.overflow='reroute' needs a token-choice router, got gating_type="
                f"{self.gating_config.gating_type!r} ({kind} routing has no per-expert overflow)."
            )

    def _validate_catalog(self):
        """Rules tying hierarchical routing and shared experts to the expert/router types."""
        gating_cls = GATING_TYPES.get(self.gating_config.gating_type)
        expert_cls = EXPERT_TYPES.get(self.expert_config.expert_type)
        soft = getattr(gating_cls, "routing_kind", "token_choice") == "soft"
        layout = getattr(expert_cls, "token_layout", "token")
        if soft and layout != "token":
            raise ValueError(
                f"GatingConfig.gating_type={self.gating_config.gating_type!r} mixes tokens into "
                f"slots and needs experts whose tokens are positions of [..., d]; got "
                f"expert_type={self.expert_config.expert_type!r}."
            )
        if not self.num_shared_experts:
            self._check_unread_ffn_fields(expert_cls)
        if self.num_shared_experts and layout == "example":
            raise ValueError(
                f"MoEConfig.num_shared_experts must be 0 for expert_type="
                f"{self.expert_config.expert_type!r} (shared experts are FFNs over [..., d] "
                f"tokens), got {self.num_shared_experts}."
            )
        if not self.num_shared_experts:
            for name, unset in (("shared_expert_intermediate_size", None), ("shared_expert_gate", False)):
                if getattr(self, name) != unset:
                    raise ValueError(
                        f"MoEConfig.{name}={getattr(self, name)!r} needs num_shared_experts >= 1, got "
                        f"num_shared_experts={self.num_shared_experts}."
                    )
        if self.scale_expert_inputs and (
            self.gating_config.top_k != 1 or layout == "example"
            or getattr(gating_cls, "routing_kind", "token_choice") != "token_choice"
        ):
            raise ValueError(
                "MoEConfig.scale_expert_inputs=True needs top_k=1 with a token-choice router and token "
                f"experts, got top_k={self.gating_config.top_k}, gating_type={self.gating_config.gating_type!r}, "
                f"expert_type={self.expert_config.expert_type!r}."
            )
        if not self.hierarchical_routing and (self.num_routing_levels != 2 or self.routing_tree_shape is not None):
            raise ValueError(
                "MoEConfig.num_routing_levels / routing_tree_shape are only used with hierarchical_routing=True, "
                f"got num_routing_levels={self.num_routing_levels!r}, routing_tree_shape={self.routing_tree_shape!r}."
            )
        if getattr(gating_cls, "reads_expert_groups", False):
            if self.hierarchical_routing:
                raise ValueError(
                    f"MoEConfig.hierarchical_routing=True is not supported by gating_type="
                    f"{self.gating_config.gating_type!r} (it has its own group-limited selection: set "
                    "num_expert_groups and top_k_groups instead)."
                )
            gating_cls.validate_expert_groups(self)
            return
        if not self.hierarchical_routing:
            if self.num_expert_groups is not None or self.top_k_groups != 1:
                raise ValueError(
                    "MoEConfig.num_expert_groups / top_k_groups are only used with hierarchical_routing=True "
                    f"or gating_type='sigmoid', got num_expert_groups={self.num_expert_groups!r}, "
                    f"top_k_groups={self.top_k_groups!r}."
                )
            return
        if soft:
            raise ValueError(
                "MoEConfig.hierarchical_routing=True needs a token-choice router, got "
                f"gating_type={self.gating_config.gating_type!r}."
            )
        self.resolved_routing_tree_shape  # raises when no tree fits

    def _check_unread_ffn_fields(self, expert_cls):
        expert = self.expert_config
        reads = getattr(expert_cls, "config_fields", ())
        for name, default in ExpertConfig.FFN_FIELD_DEFAULTS.items():
            value = getattr(expert, name)
            if value != default and name not in reads:
                readers = [t for t in EXPERT_TYPES.names() if name in getattr(EXPERT_TYPES.get(t), "config_fields", ())]
                raise ValueError(
                    f"ExpertConfig.{name}={value!r} is only used by expert_type in {readers} and by shared "
                    f"experts (num_shared_experts > 0), got expert_type={expert.expert_type!r}; leave it "
                    f"at its default {default!r}."
                )

    @property
    def resolved_routing_tree_shape(self):
        """Hierarchical routing's children per node at each level, root first (see `routing_tree_shape`)."""
        experts, levels = self.num_experts, self.num_routing_levels
        top_k, per_token, groups = self.gating_config.top_k, self.top_k_groups, self.num_expert_groups
        rule = (
            f"every level above the experts splitting in >= 2, top_k_groups={per_token} <= b_1 and "
            f"top_k={top_k} <= top_k_groups * b_L"
        )
        shape = self.routing_tree_shape
        if shape is not None:
            if groups is not None:
                raise ValueError(
                    f"MoEConfig.num_expert_groups={groups!r} and routing_tree_shape={shape!r} both set the root "
                    "groups; set only routing_tree_shape."
                )
            if len(shape) != levels:
                raise ValueError(
                    f"MoEConfig.routing_tree_shape={shape!r} has {len(shape)} levels but num_routing_levels="
                    f"{levels}; set num_routing_levels={len(shape)}."
                )
            if math.prod(shape) != experts or not routing_tree_fits(shape, top_k, per_token):
                raise ValueError(
                    f"MoEConfig.routing_tree_shape must be {levels} factors (b_1, ..., b_L) of num_experts="
                    f"{experts} with {rule}, got {shape!r}."
                )
            return shape
        shape = default_routing_tree_shape(experts, levels, top_k, per_token, root=groups)
        if shape is None and groups is not None:
            raise ValueError(
                f"MoEConfig.num_expert_groups must be a divisor b_1 of num_experts={experts} in [2, {experts}] "
                f"that leaves a tree of num_routing_levels={levels} levels with {rule}, got {groups}."
            )
        if shape is None:
            raise ValueError(
                f"MoEConfig.hierarchical_routing=True: num_experts={experts} cannot be split into "
                f"num_routing_levels={levels} levels with {rule}; change num_experts, num_routing_levels, "
                "top_k or top_k_groups."
            )
        return shape

    def capacity_factor(self, training):
        """The capacity factor in force for `training` (bool)."""
        if self.gating_config.capacity_factor is not None:
            return self.gating_config.capacity_factor
        return self.train_capacity_factor if training else self.eval_capacity_factor

    # `dropless_classes` (0.1) chose between dropless plans of equal outputs; the
    # plan table (`dispatch`) replaced it.
    _retired_fields = ("dropless_classes",)

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
            hint = did_you_mean(key, moe_names | expert_names | gating_names)
            raise ValueError(
                f"Unknown {owner} key {key!r}: not a field of MoEConfig, ExpertConfig "
                f"or GatingConfig.{hint}"
            )
    return parts
