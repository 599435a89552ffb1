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
"""

import keras
from keras import ops

from dl_moe import export_compat


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

    def __init__(
        self,
        num_experts,
        top_k=1,
        jitter_noise=0.0,
        seed=None,
        use_expert_bias=False,
        bias_update_rate=1e-3,
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
            self.expert_bias = self.add_weight(
                name="expert_bias",
                shape=(num_experts,),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                autocast=False,
            )

    @property
    def expected_k(self):
        """Average experts per token that expert capacity is sized for (here: top_k)."""
        return self.top_k

    @staticmethod
    def common_kwargs(config, name=None):
        """Constructor arguments every built-in router reads from a `MoEConfig`."""
        gating = config.gating_config
        return {
            "num_experts": config.num_experts,
            "jitter_noise": config.jitter_noise,
            "use_expert_bias": gating.balancing == "aux_free",
            "bias_update_rate": gating.bias_update_rate,
            "dtype": config.routing_dtype,
            "name": name,
        }

    def selection_bias(self):
        """The aux-free balancing bias `[E]` (float32), or None when it is off."""
        return self.expert_bias if self.use_expert_bias else None

    def update_expert_bias(self, load):
        """b_e += rate * sign(mean(load) - load_e), from this call's per-expert load `[E]`.

        Called by `MixtureOfExperts` in training; a no-op without `use_expert_bias`.
        """
        if not self.use_expert_bias:
            return
        load = ops.stop_gradient(ops.cast(load, "float32"))
        step = self.bias_update_rate * ops.sign(ops.mean(load) - load)
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


def call_router(router, inputs, training=None, mask=None):
    """Calls `router`, passing the token mask `[T]` only to routers whose `call` takes one.

    Returns:
        `(weights, indices, info)` with `info` a dict.
    """
    if mask is not None and getattr(router, "_call_has_mask_arg", False):
        weights, indices, info = router(inputs, training=training, mask=mask)
    else:
        weights, indices, info = router(inputs, training=training)
    return weights, indices, dict(info or {})
