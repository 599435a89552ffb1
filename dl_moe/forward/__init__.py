"""One forward module per routing kind, each reading route → dispatch → experts → combine.

A module offers `build_router(layer, input_shape)`, `forward(layer, inputs, training,
mask)` and `routing_decision(layer, inputs, training, mask)` (what
`MixtureOfExperts.route` returns); `common` holds the steps they share.
"""

from dl_moe.forward import expert_choice, soft, token_choice

FORWARD_BY_ROUTING_KIND = {"token_choice": token_choice, "expert_choice": expert_choice, "soft": soft}


def for_routing_kind(kind):
    """The forward module of a router's `routing_kind`."""
    if kind not in FORWARD_BY_ROUTING_KIND:
        raise ValueError(f"Unknown routing_kind {kind!r}. Valid values: {sorted(FORWARD_BY_ROUTING_KIND)}.")
    return FORWARD_BY_ROUTING_KIND[kind]
