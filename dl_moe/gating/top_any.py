"""Top-any router: an expert fires for a token when their cosine exceeds its trainable threshold.

Guo et al. 2024, "Dynamic Mixture of Experts: An Auto-Tuning Approach for Efficient
Transformer Models" (DynMoE, arXiv:2405.14297): each token uses any number of
experts, trained through a straight-through gate.
"""

import math
import statistics

import keras
from keras import ops

from dl_moe import export_compat
from dl_moe.gating.base import BaseGating
from dl_moe.gating.cosine import l2_normalize

DEFAULT_TEMPERATURE = 0.07


def initial_threshold(num_experts, top_k, dim):
    """Threshold g0 at which, at initialisation, about `top_k` of E experts fire.

    For random expert vectors in d dimensions, cos(x, w_e) is close to N(0, 1/d) for
    any x, so g0 = Phi^-1(1 - top_k / E) / sqrt(d) makes each expert fire with
    probability top_k / E.
    """
    share = min(max(top_k / num_experts, 1e-3), 1 - 1e-3)
    return statistics.NormalDist().inv_cdf(1.0 - share) / math.sqrt(dim)


@keras.saving.register_keras_serializable(package="dl_moe")
class TopAnyGating(BaseGating):
    """Expert e is active for token x iff cos(x, w_e) > g_e, for any number of experts.

    `expert_embeddings [E, d]` and `thresholds [E]` are trainable. With s_e = cos(x, w_e)
    - g_e (+ the aux-free bias when balancing is "aux_free"):

    * the K = `max_experts` highest s are the candidate slots; slot j is active iff
      s_j > 0 (hard gate h_j in {0, 1});
    * straight-through gradient: the gate used in the weights is h + sigmoid(s / tau) -
      stop_gradient(sigmoid(s / tau)), so the forward value is h while w_e and g_e get
      the sigmoid's gradient;
    * weights: the gates divided by the number of active experts (an average over the
      active experts);
    * when no expert fires for a token: outside training the best-scoring expert
      (argmax of s) is used with weight 1; in training the token gets no expert (its
      output is zero) and is counted in the routing statistics.

    Thresholds start at `initial_threshold(E, top_k, d)`, so about `top_k` experts fire
    per token at initialisation; training then moves the per-expert thresholds.

    Args:
        num_experts: E.
        top_k: Experts per token at initialisation (sets the initial thresholds and the
            default `expected_k`).
        max_experts: Most experts per token K (None: E).
        temperature: tau of the straight-through sigmoid and of the probabilities
            reported for losses and statistics, softmax(s / tau).
        expected_experts: Average experts the layer sizes capacity for (None: top_k).
        **kwargs: `BaseGating` arguments.

    Call returns `(weights [T, K], indices [T, K], info)` with `info["active"] [T, K]`.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = ("max_experts", "expected_experts")
    supports_bias_balancing = True

    def __init__(
        self,
        num_experts,
        top_k=2,
        max_experts=None,
        temperature=DEFAULT_TEMPERATURE,
        expected_experts=None,
        **kwargs,
    ):
        max_experts = max_experts or num_experts
        if not 1 <= max_experts <= num_experts:
            raise ValueError(f"max_experts must be in [1, num_experts={num_experts}], got {max_experts!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}.")
        super().__init__(num_experts, min(top_k, num_experts), **kwargs)
        self.max_experts = int(max_experts)
        self.temperature = float(temperature)
        self.expected_experts = expected_experts

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        return cls(
            top_k=gating.top_k,
            max_experts=gating.max_experts,
            temperature=gating.temperature or DEFAULT_TEMPERATURE,
            expected_experts=gating.expected_experts,
            **cls.common_kwargs(config, name),
        )

    @property
    def expected_k(self):
        k = self.top_k if self.expected_experts is None else float(self.expected_experts)
        return min(k, self.max_experts)

    def build(self, input_shape):
        dim = input_shape[-1]
        self.expert_embeddings = self.add_weight(
            name="expert_embeddings",
            shape=(self.num_experts, dim),
            initializer=keras.initializers.RandomNormal(stddev=1.0),
        )
        self.thresholds = self.add_weight(
            name="thresholds",
            shape=(self.num_experts,),
            initializer=keras.initializers.Constant(initial_threshold(self.num_experts, self.top_k, dim)),
        )
        self.built = True

    def scores(self, inputs):
        """s = cos(x, w_e) - g_e `[T, E]` (without the aux-free bias)."""
        cos = ops.matmul(l2_normalize(inputs), ops.transpose(l2_normalize(self.expert_embeddings)))
        return cos - self.thresholds

    def call(self, inputs, training=None):
        scores = self.scores(self.apply_jitter(inputs, training))  # [T, E]
        selection = scores
        bias = self.selection_bias()
        if bias is not None:
            selection = scores + ops.cast(bias, scores.dtype)
        ranked, indices = export_compat.top_k(selection, self.max_experts)  # [T, K]
        indices = ops.cast(indices, "int32")
        active = ranked > 0
        if not training:
            none_fired = ~ops.any(active, axis=-1, keepdims=True)  # [T, 1]
            first = ops.expand_dims(ops.arange(self.max_experts, dtype="int32") == 0, 0)
            active = active | (none_fired & first)
        hard = ops.cast(active, scores.dtype)
        soft = ops.sigmoid(ops.take_along_axis(scores, indices, axis=-1) / self.temperature)
        gate = hard + soft - ops.stop_gradient(soft)
        count = ops.stop_gradient(ops.maximum(ops.sum(hard, axis=-1, keepdims=True), 1.0))
        weights = ops.where(active, gate / count, ops.zeros_like(gate))
        probs = ops.softmax(scores / self.temperature, axis=-1)
        return weights, indices, {"raw_gate_probs": probs, "active": active}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "max_experts": self.max_experts,
                "temperature": self.temperature,
                "expected_experts": self.expected_experts,
            }
        )
        return config
