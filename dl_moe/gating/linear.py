"""Linear top-k router: p = softmax(x W), each token keeps its k most probable experts.

The gate of Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer" (arXiv:1701.06538), with its optional noisy
top-k (learned, input-dependent Gaussian noise on the logits in training). Top-2 is
the router of Lepikhin et al. 2020, "GShard: Scaling Giant Models with Conditional
Computation and Automatic Sharding" (arXiv:2006.16668) and of Jiang et al. 2024,
"Mixtral of Experts" (arXiv:2401.04088); top-1 with multiplicative input jitter that
of Fedus, Zoph and Shazeer 2021, "Switch Transformers: Scaling to Trillion Parameter
Models with Simple and Efficient Sparsity" (arXiv:2101.03961).
"""

import keras
from keras import ops

from dl_moe.gating.base import BaseGating, select_top_k


@keras.saving.register_keras_serializable(package="dl_moe")
class LinearGating(BaseGating):
    """logits = x W / temperature; p = softmax(logits); keep the top-k of p.

    In training two optional noises are applied, both drawn from a
    `keras.random.SeedGenerator` so they work under JAX tracing:

    * `jitter_noise` j: the router input is multiplied by U(1 - j, 1 + j) (Switch).
    * `add_noise`: Shazeer et al. 2017 noisy top-k, logits += N(0, 1) *
      softplus(x W_noise) * noise_std, with a learned `noise_kernel [d, E]`.

    Args:
        num_experts: E.
        top_k: k.
        temperature: Divides the logits (>0).
        normalize_top_k: Renormalise the kept weights to sum to 1.
        add_noise: Enables noisy top-k in training.
        noise_std: Scale of the noisy top-k noise.
        jitter_noise: Multiplicative input jitter in training (0 disables it).
        seed: Seed of the noise generator.
        use_router_bias: Add a learned bias `router_bias [E]` (zeros at first) to
            the logits, before the temperature (GPT-OSS's router is a Dense with bias).

    With `normalize_top_k=True` the weights equal a softmax over the k selected
    logits, so GPT-OSS's "top-k of the logits, then softmax" is this router too.

    Call returns `(weights [..., k], indices [..., k], info)` with `info` keys
    `gate_logits [..., E]` (before the noisy top-k noise) and `raw_gate_probs [..., E]`
    (the probabilities the selection used).

    With an active-expert mask (`initial_active_experts`), the logits after the
    temperature get `expert_logit_offset` and dead experts `DEAD_LOGIT` (see
    `BaseGating.mask_logits`), before the noise and the softmax.
    """

    supports_bias_balancing = True
    supports_router_bias = True
    supports_expert_mask = True

    def __init__(
        self,
        num_experts,
        top_k=2,
        temperature=1.0,
        normalize_top_k=False,
        add_noise=False,
        noise_std=1.0,
        jitter_noise=0.0,
        seed=None,
        use_router_bias=False,
        **kwargs,
    ):
        super().__init__(num_experts, top_k, jitter_noise=jitter_noise, seed=seed, **kwargs)
        self.use_router_bias = bool(use_router_bias)
        self.temperature = float(temperature)
        self.normalize_top_k = normalize_top_k
        self.add_noise = add_noise
        self.noise_std = float(noise_std)

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            top_k=gating.top_k,
            temperature=gating.temperature or 1.0,
            normalize_top_k=gating.normalize_top_k,
            add_noise=gating.add_noise,
            noise_std=gating.noise_std,
            use_router_bias=gating.use_router_bias,
            **cls.common_kwargs(config, name),
        )

    def build(self, input_shape):
        super().build(input_shape)
        if self.use_router_bias:
            self.router_bias = self.add_weight(name="router_bias", shape=(self.num_experts,), initializer="zeros")
        if self.add_noise:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_shape[-1], self.num_experts),
                initializer="zeros",
            )

    def expert_axis_variables(self):
        found = super().expert_axis_variables()
        if self.use_router_bias:
            found.append((self.router_bias, 0))
        if self.add_noise:
            found.append((self.noise_kernel, 1))
        return found

    def compute_gate_logits(self, inputs):
        """Router logits `[..., E]` = inputs @ router_kernel (+ router_bias)."""
        logits = super().compute_gate_logits(inputs)
        return logits + self.router_bias if self.use_router_bias else logits

    def call(self, inputs, training=None):
        x = self.apply_jitter(inputs, training)
        logits = self.mask_logits(self.compute_gate_logits(x) / self.temperature)  # [..., E]
        selection_logits = logits
        if training and self.add_noise:
            noise_scale = ops.softplus(ops.matmul(x, self.noise_kernel)) * self.noise_std
            noise = keras.random.normal(ops.shape(logits), dtype=logits.dtype, seed=self.seed_generator)
            selection_logits = logits + noise * noise_scale
        probs = ops.softmax(selection_logits, axis=-1)
        weights, indices = select_top_k(probs, self.top_k, self.normalize_top_k, bias=self.selection_bias())
        return weights, indices, {"gate_logits": logits, "raw_gate_probs": probs}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "temperature": self.temperature,
                "normalize_top_k": self.normalize_top_k,
                "add_noise": self.add_noise,
                "noise_std": self.noise_std,
                "use_router_bias": self.use_router_bias,
            }
        )
        return config
