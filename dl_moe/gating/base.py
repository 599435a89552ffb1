"""`BaseGating`: the router contract every gating type follows.

A router maps tokens `[..., d]` to a routing decision and never runs experts. Its
`call` returns a triple `(expert_weights, expert_indices, info)`:

* token-choice routers: `expert_weights [..., k]`, `expert_indices [..., k]` (int),
  `info` with at least `gate_logits [..., E]` and `raw_gate_probs [..., E]`;
* a router may instead return dense weights `[..., E]` and `expert_indices=None`
  (the layer then keeps the `top_k` largest), or dense weights with argmax indices
  `[...]` (one expert per token);
* soft routers (`routing_kind = "soft"`) return combine weights and put dispatch
  weights in `info["dispatch_weights"]` (see `SoftMoEGating`).

`info` may also carry `active [..., k]` (bool) for routers whose number of experts
varies per token: inactive slots cost nothing and take no capacity. Such routers
return k = their most experts per token and expose `expected_k`, the average the
layer sizes expert capacity for (C = ceil(cf * T * expected_k / E)).

Expert-choice routers (`routing_kind = "expert_choice"`) return
`(weights [E, C], token_indices [E, C], info)`: the tokens each expert picked.

Auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
Strategy for Mixture-of-Experts", arXiv:2408.15664; used by DeepSeek-V3): with `use_expert_bias=True` the router
holds a non-trainable per-expert bias b `[E]` that is added to the scores for
*selection only* (`select_top_k(..., bias=self.selection_bias())`); the layer calls
`update_expert_bias(load)` in every training call, b_e += rate * sign(mean(load) -
load_e). The bias is a variable the trainer carries, so this works in every backend's
`fit` (including JAX's stateless train step).

Active-expert mask (`MoEConfig.initial_active_experts`, routers with
`supports_expert_mask`): the router holds `active_experts [E]` (1 live, 0 dead) and
`expert_logit_offset [E]` (a fixed per-expert prior added to the logits, e.g. -log 2
for both halves of a split expert), both non-trainable float32 variables. The router
calls `mask_logits` on its logits before the softmax, so a dead expert gets logit
`DEAD_LOGIT` (probability 0) and is never selected; the aux-free bias of dead experts
is masked the same way and does not move. Shapes never change, so a compiled step
keeps working when `dl_moe.lifecycle` edits the mask between steps.
"""

from typing import Any, TypedDict

import keras
from keras import ops

from dl_moe import backend_fast_paths, export_compat

# Logit of a dead expert: exp(DEAD_LOGIT - max) is 0 in float32, and it stays finite
# so that logsumexp (z-loss) and its gradient see no inf - inf.
DEAD_LOGIT = -1e9


class BaseGating(keras.layers.Layer):
    """Base class of routers.

    Args:
        num_experts: Number of experts E.
        top_k: Experts per token k.
        jitter_noise: Multiplicative router-input noise j in training (see
            `apply_jitter`); 0 disables it.
        seed: Seed of the router's `keras.random.SeedGenerator`.
        **kwargs: `keras.layers.Layer` arguments. Pass `dtype="float32"` (what
            `MixtureOfExperts` does with `routing_dtype`) to keep router math in float32
            under a mixed-precision policy.

    Subclasses implement `call(inputs, training=None)` (optionally with `mask`).
    The base `build` creates the router kernel `[d, E]` used by `compute_gate_logits`.
    """

    routing_kind = "token_choice"
    # GatingConfig router-specific fields this router reads (others must stay None).
    config_fields = ()
    # The router selects experts by per-expert scores, so "aux_free" balancing applies.
    supports_bias_balancing = False
    # The router applies `mask_logits` (MoEConfig.initial_active_experts).
    supports_expert_mask = False

    def __init__(
        self,
        num_experts,
        top_k=1,
        jitter_noise=0.0,
        seed=None,
        use_expert_bias=False,
        bias_update_rate=1e-3,
        initial_active_experts=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={num_experts}, got {top_k!r}.")
        if not 0 <= jitter_noise < 1:
            raise ValueError(f"jitter_noise must be in [0, 1), got {jitter_noise!r}.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.jitter_noise = float(jitter_noise)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.use_expert_bias = bool(use_expert_bias)
        self.bias_update_rate = float(bias_update_rate)
        if self.use_expert_bias:
            # Created here (its shape is known) so that every subclass gets it.
            self.expert_bias = self._add_expert_state("expert_bias", num_experts)
        self.initial_active_experts = initial_active_experts
        if initial_active_experts is not None:
            if not self.supports_expert_mask:
                raise ValueError(f"{type(self).__name__} does not take an active-expert mask (initial_active_experts).")
            if not 1 <= initial_active_experts <= num_experts:
                raise ValueError(
                    f"initial_active_experts must be in [1, num_experts={num_experts}], got {initial_active_experts!r}."
                )
            live = [1.0] * initial_active_experts + [0.0] * (num_experts - initial_active_experts)
            self.active_experts = self._add_expert_state(
                "active_experts", num_experts,
                initializer=lambda shape, dtype=None: ops.convert_to_tensor(live, dtype or "float32"),
            )
            self.expert_logit_offset = self._add_expert_state("expert_logit_offset", num_experts)

    def _add_expert_state(self, name, num_experts, initializer="zeros"):
        """A non-trainable float32 `[E]` variable the router updates or reads outside training."""
        return self.add_weight(
            name=name, shape=(num_experts,), initializer=initializer, trainable=False, dtype="float32", autocast=False
        )

    @property
    def has_expert_mask(self):
        """Whether the router holds an active-expert mask."""
        return self.initial_active_experts is not None

    def live_experts(self):
        """`[E]` bool, True for live experts (all True without a mask)."""
        if not self.has_expert_mask:
            return ops.ones((self.num_experts,), dtype="bool")
        return self.active_experts > 0.5

    def mask_logits(self, logits):
        """logits `[..., E]` + the per-expert offset; `DEAD_LOGIT` for dead experts.

        The identity without a mask.
        """
        if not self.has_expert_mask:
            return logits
        offset = ops.cast(self.expert_logit_offset, logits.dtype)
        dtype = keras.backend.standardize_dtype(logits.dtype)
        dead = ops.cast(DEAD_LOGIT if dtype in ("float32", "float64") else -6e4, dtype)
        return ops.where(self.live_experts(), logits + offset, dead)

    def expert_axis_variables(self):
        """`[(variable, expert axis)]` of the router's per-expert variables (for
        `dl_moe.lifecycle`, which copies, averages and frees their expert rows)."""
        found = [(self.router_kernel, 1)] if hasattr(self, "router_kernel") else []
        if self.use_expert_bias:
            found.append((self.expert_bias, 0))
        return found

    @property
    def expected_k(self):
        """Average experts per token that expert capacity is sized for (here: top_k)."""
        return self.top_k

    @staticmethod
    def common_kwargs(config, name=None):
        """Constructor arguments every built-in router reads from a `MoEConfig`."""
        gating = config.gating_config
        kwargs = {
            "num_experts": config.num_experts,
            "jitter_noise": config.jitter_noise,
            "use_expert_bias": gating.balancing == "aux_free",
            "bias_update_rate": gating.bias_update_rate,
            "dtype": config.routing_dtype,
            "name": name,
        }
        if getattr(config, "initial_active_experts", None) is not None:
            kwargs["initial_active_experts"] = config.initial_active_experts
        return kwargs

    def selection_bias(self):
        """The aux-free balancing bias `[E]` (float32), or None when it is off.

        With an active-expert mask, dead experts get `DEAD_LOGIT` so the bias can never
        select them.
        """
        if not self.use_expert_bias:
            return None
        if not self.has_expert_mask:
            return self.expert_bias
        return ops.where(self.live_experts(), ops.convert_to_tensor(self.expert_bias), DEAD_LOGIT)

    def update_expert_bias(self, load):
        """b_e += rate * sign(mean(load) - load_e), from this call's per-expert load `[E]`.

        Called by `MixtureOfExperts` in training; a no-op without `use_expert_bias`.
        With an active-expert mask the mean is over live experts and dead experts'
        bias stays put.
        """
        if not self.use_expert_bias:
            return
        load = ops.stop_gradient(ops.cast(load, "float32"))
        if not self.has_expert_mask:
            step = self.bias_update_rate * ops.sign(ops.mean(load) - load)
        else:
            live = ops.cast(self.live_experts(), "float32")
            mean = ops.sum(load * live) / ops.maximum(ops.sum(live), 1.0)
            step = self.bias_update_rate * ops.sign(mean - load) * live
        self.expert_bias.assign(self.expert_bias + step)

    @classmethod
    def from_moe_config(cls, config, name=None):
        """Creates the router described by a `MoEConfig`.

        Built-in routers override this to read their own `GatingConfig` fields; a user
        router gets `num_experts`, `top_k`, `jitter_noise` and the routing dtype.
        """
        kwargs = cls.common_kwargs(config, name)
        if not cls.supports_bias_balancing:
            kwargs.pop("use_expert_bias")
            kwargs.pop("bias_update_rate")
        return cls(top_k=config.gating_config.top_k, **kwargs)

    def build(self, input_shape):
        self.router_kernel = self.add_weight(
            name="router_kernel",
            shape=(input_shape[-1], self.num_experts),
            initializer="glorot_uniform",
        )
        self.built = True

    def apply_jitter(self, inputs, training):
        """Multiplies the router input by U(1 - j, 1 + j) noise in training (Switch)."""
        if not training or self.jitter_noise == 0:
            return inputs
        return inputs * keras.random.uniform(
            ops.shape(inputs),
            minval=1.0 - self.jitter_noise,
            maxval=1.0 + self.jitter_noise,
            dtype=inputs.dtype,
            seed=self.seed_generator,
        )

    def add_loss(self, loss):
        """Registers `loss` as float32 whatever the routing dtype (see `MixtureOfExperts.add_loss`)."""
        super().add_loss(ops.cast(loss, "float32"))

    def quantize(self, mode=None, type_check=True, config=None):
        """Leaves the router in float: `model.quantize(...)` quantizes the experts only.

        Routing is a discrete top-k over logits, so small weight errors change which
        expert a token goes to; the router is also a tiny share of the weights (d*E
        against E*d*h per expert matrix).
        """

    def compute_gate_logits(self, inputs):
        """Router logits `[..., E]` = inputs `[..., d]` @ router_kernel `[d, E]`."""
        return ops.matmul(inputs, self.router_kernel)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "jitter_noise": self.jitter_noise,
                "seed": self.seed,
                "use_expert_bias": self.use_expert_bias,
                "bias_update_rate": self.bias_update_rate,
            }
        )
        if self.initial_active_experts is not None:
            config["initial_active_experts"] = self.initial_active_experts
        return config


def select_top_k(probs, top_k, normalize, bias=None):
    """Top-k selection shared by the probability-based routers.

    Args:
        probs: Router probabilities `[..., E]`.
        top_k: Number of experts to keep.
        normalize: Renormalise the kept weights to sum to 1.
        bias: Optional `[E]` aux-free balancing bias added to `probs` for the
            selection only; the weights stay the unbiased probabilities.

    Returns:
        `(weights [..., k], indices [..., k] int32)`, best expert first.
    """
    if bias is None:
        weights, indices = export_compat.top_k(probs, top_k)
    else:
        _, indices = export_compat.top_k(probs + ops.cast(bias, probs.dtype), top_k)
        weights = ops.take_along_axis(probs, indices, axis=-1)
    if normalize:
        weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
    return weights, ops.cast(indices, "int32")


class RoutingInfo(TypedDict, total=False):
    """The `info` dict a router returns beside its weights and indices.

    Every key is optional; a router fills the ones it computes.

    Attributes:
        gate_logits: `[..., E]` router logits before any noise (the z-loss reads them).
        raw_gate_probs: `[..., E]` the probabilities the experts were selected from.
            In training this includes the router's noise (noisy top-k, jitter), so it is
            what the balancing losses and `overflow="reroute"` see. The name is kept
            because code written against the API this package honours reads it
            (`../shared/seeds/002_*`: `gating_info['raw_gate_probs']`).
        active: `[..., k]` bool, False for the unused slots of dynamic-k routers.
        dispatch_weights: `[B, S, E*P]` Soft MoE only: each slot's weights over the tokens.
        group_probs, group_indices: hierarchical routing: the root level's
            probabilities `[T, G]` and kept groups `[T, top_k_groups]`.
        difficulty, complexity: `[T]` the per-token scores of the "conditional" and
            "confidence" routers that set their number of experts.
    """

    gate_logits: Any
    raw_gate_probs: Any
    active: Any
    dispatch_weights: Any
    group_probs: Any
    group_indices: Any
    difficulty: Any
    complexity: Any


def call_router(router, inputs, training=None, mask=None):
    """Calls `router`, passing the token mask `[T]` only to routers whose `call` takes one.

    Returns:
        `(weights, indices, info)` with `info` a `RoutingInfo` (a plain dict).
    """
    kwargs = {"mask": mask} if mask is not None and getattr(router, "_call_has_mask_arg", False) else {}
    weights, indices, info = backend_fast_paths.call_layer(router, inputs, training=training, **kwargs)
    return weights, indices, dict(info or {})
