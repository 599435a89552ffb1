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
varies per token: inactive slots cost nothing and take no capacity.
"""

import keras
from keras import ops


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

    def __init__(self, num_experts, top_k=1, jitter_noise=0.0, seed=None, **kwargs):
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

    @classmethod
    def from_moe_config(cls, config, name=None):
        """Creates the router described by a `MoEConfig`.

        Built-in routers override this to read their own `GatingConfig` fields; a user
        router gets `num_experts`, `top_k`, `jitter_noise` and the routing dtype.
        """
        return cls(
            num_experts=config.num_experts,
            top_k=config.gating_config.top_k,
            jitter_noise=config.jitter_noise,
            dtype=config.routing_dtype,
            name=name,
        )

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
            }
        )
        return config


def select_top_k(probs, top_k, normalize):
    """Top-k selection shared by the probability-based routers.

    Args:
        probs: Router probabilities `[..., E]`.
        top_k: Number of experts to keep.
        normalize: Renormalise the kept weights to sum to 1.

    Returns:
        `(weights [..., k], indices [..., k] int32)`, best expert first.
    """
    weights, indices = ops.top_k(probs, top_k)
    if normalize:
        weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
    return weights, ops.cast(indices, "int32")
