"""`ExpertBank`: the contract between dispatch and the experts.

An expert bank holds all E experts of a layer and processes dispatched buffers
`[G, R, ...]`: group g holds R rows (tokens) that all belong to one expert. In capacity
mode G = E and group g is expert g (`group_expert=None`); in dropless mode groups are
fixed-size blocks and `group_expert [G]` says which expert owns each. A bank never
sees the routing decision itself.
"""

import keras


class ExpertBank(keras.layers.Layer):
    """Base class of expert banks.

    Args:
        num_experts: E.
        **kwargs: `keras.layers.Layer` arguments.

    Subclasses implement `call(inputs, group_expert=None, training=None)` mapping
    `[G, R, ...in]` to `[G, R, ...out]`, and `compute_output_shape`.
    """

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
