"""`ExpertBank`: the contract between dispatch and the experts.

An expert bank holds all E experts of a layer and processes dispatched buffers
`[G, R, ...]`: group g holds R rows (tokens) that all belong to one expert. In capacity
mode G = E and group g is expert g (`group_expert=None`); in dropless mode groups are
fixed-size blocks and `group_expert [G]` says which expert owns each. A bank never
sees the routing decision itself.

How the layer turns its input into tokens is the bank class's `token_layout`:

* "token" (FFN, plug-in experts): every position of `[..., d]` is a token; rows are
  `[G, R, d]`.
* "sequence" (attention experts): inputs are `[B, S, d]`; tokens are the B*S
  positions, and the bank needs per-sequence context (shared keys/values). The layer
  calls `context = bank.prepare_context(inputs, mask)` once on the whole `[B, S, d]`
  input, then `bank(rows, group_expert=..., context=context, row_token=row_token)`,
  where `row_token [G, R]` is the flat token index b*S + s of each row (T for an empty
  row). A bank whose `prepare_context` returns None is called without these two.
* "example" (conv experts): every example `[B, ...]` is one token with its whole
  feature map; rows are `[G, R, ...]` and the router sees
  `bank.router_inputs(tokens) [T, d]` (e.g. pooled features).
"""

import keras


class ExpertBank(keras.layers.Layer):
    """Base class of expert banks.

    Args:
        num_experts: E.
        **kwargs: `keras.layers.Layer` arguments.

    Subclasses implement `call(inputs, group_expert=None, training=None)` mapping
    `[G, R, ...in]` to `[G, R, ...out]`, and `compute_output_shape`.

    Class attributes:
        token_layout: "token", "sequence" or "example" (see the module docstring).
        input_rank: The layer input's required rank, or None for any rank >= 2.
        config_fields: The `ExpertConfig` fields the bank reads beyond the common
            ones (`hidden_dim`, `output_dim`, `dropout_rate`, `use_bias`): setting
            another type-specific field (`num_heads` ... `expert_kwargs`) is a
            `ValueError`, and so is setting an FFN field (`intermediate_size`,
            `ffn_type`, `activation`) away from its default when neither the bank nor
            shared experts read it.
        supports_slice_counts: The bank's `call` also accepts `slice_counts` (a list
            of E Python ints) in place of `group_expert`: one group `[1, N, ...]` whose
            rows are sorted by expert, `slice_counts[e]` rows per expert. Eager
            PyTorch then runs the bank once per call; other banks run once per expert.
        supports_expert_blocks: The bank's `call` also accepts `expert_blocks` (a
            `grouped_matmul.ExpertBlocks`) with `group_expert`: the groups are blocks,
            each expert's consecutive, and the bank indexes one expert's weights at a
            time instead of gathering a copy per block (the "grouped" dispatch plan).
    """

    token_layout = "token"
    input_rank = None
    config_fields = ()
    supports_slice_counts = False
    supports_expert_blocks = False

    def prepare_context(self, inputs, mask=None):
        """Per-call context computed once from the layer's whole input (default: None).

        Args:
            inputs: The layer input, e.g. `[B, S, d]`.
            mask: Optional boolean mask of the input's leading axes.

        Returns:
            Anything the bank's `call` accepts as `context`, or None (then `call` gets
            neither `context` nor `row_token`).
        """
        return None

    def router_inputs(self, tokens):
        """What the router sees for tokens `[T, ...]`: here the tokens themselves `[T, d]`."""
        return tokens

    def __init__(self, num_experts, **kwargs):
        super().__init__(**kwargs)
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be a positive integer, got {num_experts!r}.")
        self.num_experts = num_experts

    @classmethod
    def from_moe_config(cls, config, name=None, dtype=None):
        """Creates the bank described by a `MoEConfig`."""
        raise NotImplementedError

    def get_config(self):
        config = super().get_config()
        config["num_experts"] = self.num_experts
        return config
