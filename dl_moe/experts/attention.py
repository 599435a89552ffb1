"""Attention expert bank: Mixture of Attention heads (Zhang et al. 2022, "MoA").

Letters: B batch, S sequence length, d model width, E experts, H heads per expert,
D head width, o output width, G groups of R dispatched rows (see `dl_moe.dispatch`).

Keys and values are shared by all experts and computed once per call for every token
(`prepare_context`); each expert owns a query projection and an output projection.
A token routed to expert e computes its query with expert e's projection, attends over
its own sequence's shared keys/values and projects the result with expert e's output
matrix; the layer sums the k experts' answers with the routing weights. Only routed
(token, expert) pairs compute queries, attention and output projections.
"""

import math

import keras
from keras import ops

from dl_moe.experts.base import ExpertBank
from dl_moe.experts.ffn import stacked_kernel_initializer

# Large negative score for masked keys (safe in float16).
NEG_INF = -3.0e4
DEFAULT_NUM_HEADS = 8


def default_num_heads(hidden_dim):
    """The largest head count <= 8 that divides `hidden_dim`."""
    return max(h for h in range(1, DEFAULT_NUM_HEADS + 1) if hidden_dim % h == 0)


@keras.saving.register_keras_serializable(package="dl_moe")
class AttentionExpertBank(ExpertBank):
    """E attention experts sharing keys and values.

    Weight layout:

    * shared: `key_kernel [d, H*D]`, `value_kernel [d, H*D]` (+ `key_bias`,
      `value_bias [H*D]`);
    * per expert (stacked): `query_kernel [E, d, H*D]`, `output_kernel [E, H*D, o]`
      (+ `query_bias [E, H*D]`, `output_bias [E, o]`).

    For a row holding token t = b*S + s routed to expert e:

        q = x_t Wq[e]                                   [H, D]
        a_h = softmax(q_h . K[b, :, h]^T / sqrt(D))     over the unmasked keys of b
        y = concat_h(a_h V[b, :, h]) Wo[e]              [o]

    Attention is bidirectional (not causal). Memory: every row gathers its sequence's
    keys and values, `[G, R, S, H, D]`; FLOPs are k times one attention layer's.

    Args:
        num_experts: E.
        num_heads: H.
        head_dim: D.
        output_dim: o (None: the input width d).
        dropout_rate: Dropout on the attention probabilities in training.
        use_bias: Add biases to the projections.
    """

    token_layout = "sequence"
    input_rank = 3
    config_fields = ("num_heads", "head_dim")

    def __init__(self, num_experts, num_heads, head_dim, output_dim=None, dropout_rate=0.0, use_bias=True, **kwargs):
        super().__init__(num_experts, **kwargs)
        for name, value in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.output_dim = output_dim
        self.dropout_rate = dropout_rate
        self.use_bias = use_bias
        self.dropout = keras.layers.Dropout(dropout_rate, dtype=self.dtype_policy, name="attention_dropout")

    @classmethod
    def from_moe_config(cls, config, name=None, dtype=None):
        expert = config.expert_config
        num_heads = expert.num_heads or default_num_heads(expert.hidden_dim)
        return cls(
            num_experts=config.num_experts,
            num_heads=num_heads,
            head_dim=expert.head_dim or max(1, expert.hidden_dim // num_heads),
            output_dim=expert.resolved_output_dim,
            dropout_rate=expert.dropout_rate,
            use_bias=expert.use_bias,
            dtype=dtype,
            name=name,
        )

    def build(self, input_shape):
        d = input_shape[-1]
        e, width = self.num_experts, self.num_heads * self.head_dim
        out = self.output_dim or d
        stacked = stacked_kernel_initializer(e)
        self.key_kernel = self.add_weight(name="key_kernel", shape=(d, width), initializer="glorot_uniform")
        self.value_kernel = self.add_weight(name="value_kernel", shape=(d, width), initializer="glorot_uniform")
        self.query_kernel = self.add_weight(name="query_kernel", shape=(e, d, width), initializer=stacked)
        self.output_kernel = self.add_weight(name="output_kernel", shape=(e, width, out), initializer=stacked)
        if self.use_bias:
            self.key_bias = self.add_weight(name="key_bias", shape=(width,), initializer="zeros")
            self.value_bias = self.add_weight(name="value_bias", shape=(width,), initializer="zeros")
            self.query_bias = self.add_weight(name="query_bias", shape=(e, width), initializer="zeros")
            self.output_bias = self.add_weight(name="output_bias", shape=(e, out), initializer="zeros")
        self.built = True

    def _shared(self, inputs, kernel, bias):
        """`[B, S, d]` -> `[B, S, H, D]`."""
        y = ops.matmul(inputs, kernel)
        if self.use_bias:
            y = y + bias
        return ops.reshape(y, (ops.shape(inputs)[0], ops.shape(inputs)[1], self.num_heads, self.head_dim))

    def prepare_context(self, inputs, mask=None):
        """Shared keys and values of every token, computed once per call.

        Args:
            inputs: `[B, S, d]`.
            mask: Optional bool `[B, S]`: masked positions are ignored as keys.

        Returns:
            dict with `key`, `value` `[B, S, H, D]` and, with a mask, `key_mask [B, S]`.
        """
        context = {
            "key": self._shared(inputs, self.key_kernel, self.key_bias if self.use_bias else None),
            "value": self._shared(inputs, self.value_kernel, self.value_bias if self.use_bias else None),
        }
        if mask is not None:
            context["key_mask"] = ops.cast(mask, "bool")
        return context

    def _per_expert(self, x, kernel, bias, group_expert):
        """x `[G, R, a]` @ kernel of each group's expert `[G, a, b]` (+ bias)."""
        if group_expert is not None:
            kernel = ops.take(kernel, group_expert, axis=0)
        y = ops.matmul(x, kernel)
        if bias is not None:
            if group_expert is not None:
                bias = ops.take(bias, group_expert, axis=0)
            y = y + ops.expand_dims(bias, 1)
        return y

    def call(self, inputs, group_expert=None, training=None, context=None, row_token=None):
        """Attention of each dispatched row with its expert's query/output projections.

        Args:
            inputs: `[G, R, d]` dispatched rows.
            group_expert: `[G]` owner of each group, or None when G == E.
            training: Enables attention dropout.
            context: `prepare_context` output for the layer's `[B, S, d]` input.
            row_token: `[G, R]` int32 flat token index b*S + s of each row (B*S when the
                row is empty).

        Returns:
            `[G, R, o]`.
        """
        if context is None or row_token is None:
            raise ValueError("AttentionExpertBank needs `context` (shared keys/values) and `row_token`.")
        key, value = context["key"], context["value"]  # [B, S, H, D]
        batch, seq_len = ops.shape(key)[0], ops.shape(key)[1]
        row_batch = ops.minimum(ops.cast(row_token, "int32") // seq_len, batch - 1)  # [G, R]
        num_groups, rows = ops.shape(inputs)[0], ops.shape(inputs)[1]

        query = self._per_expert(inputs, self.query_kernel, self.query_bias if self.use_bias else None, group_expert)
        query = ops.reshape(query, (num_groups, rows, self.num_heads, self.head_dim))  # [G, R, H, D]
        row_key = ops.take(key, row_batch, axis=0)  # [G, R, S, H, D]
        row_value = ops.take(value, row_batch, axis=0)  # [G, R, S, H, D]
        scores = ops.einsum("grhd,grshd->grhs", query, row_key) / math.sqrt(self.head_dim)  # [G, R, H, S]
        if "key_mask" in context:
            row_mask = ops.take(context["key_mask"], row_batch, axis=0)  # [G, R, S]
            scores = ops.where(ops.expand_dims(row_mask, 2), scores, ops.cast(NEG_INF, scores.dtype))
        probs = ops.softmax(scores, axis=-1)
        probs = self.dropout(probs, training=training)
        attended = ops.einsum("grhs,grshd->grhd", probs, row_value)  # [G, R, H, D]
        attended = ops.reshape(attended, (num_groups, rows, self.num_heads * self.head_dim))
        output_bias = self.output_bias if self.use_bias else None
        return self._per_expert(attended, self.output_kernel, output_bias, group_expert)  # [G, R, o]

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim or input_shape[-1],)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "output_dim": self.output_dim,
                "dropout_rate": self.dropout_rate,
                "use_bias": self.use_bias,
            }
        )
        return config
