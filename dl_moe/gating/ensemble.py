"""Router ensemble: a weighted vote of several routers' weight matrices, then top-k.

A combination of the other routers (no paper of its own): the members route as
usual, their decisions are averaged as dense `[T, E]` weights, and the ensemble
keeps the top-k.
"""

import dataclasses

import keras
from keras import ops

from dl_moe.gating.base import BaseGating, call_router, select_top_k


def member_gating_configs(gating):
    """`(GatingConfig, weight)` of each member of an "ensemble" `GatingConfig`.

    A member dict holds GatingConfig fields (at least `gating_type`) and an optional
    `weight`; it inherits the ensemble's `top_k` unless it sets its own.
    """
    from dl_moe.config import GatingConfig

    members = []
    for member in gating.ensemble_members or ():
        fields = {key: value for key, value in member.items() if key != "weight"}
        fields.setdefault("top_k", gating.top_k)
        members.append((GatingConfig.from_dict(fields), float(member.get("weight", 1.0))))
    return members


@keras.saving.register_keras_serializable(package="dl_moe")
class EnsembleGating(BaseGating):
    """Weighted combination of member routers' weight matrices, then top-k.

    Each member m routes the tokens as usual; its decision is scattered into a dense
    weight matrix W_m `[T, E]` (zero for experts it did not select, including
    inactive dynamic-k slots). With member weights alpha_m:

        W = sum_m alpha_m W_m / sum_m alpha_m                    [T, E]

    The ensemble keeps the top-k of W (plus the aux-free bias when balancing is
    "aux_free"); a kept expert with W = 0 (no member chose it) is an inactive slot.
    Weights are the kept W (renormalised when `normalize_top_k`), so gradients reach
    every member through the weights it gave. The probabilities reported for the
    balancing losses are the alpha-weighted mean of the members' probabilities.

    Members are configured by `GatingConfig.ensemble_members`, e.g.
    `[{"gating_type": "linear", "weight": 2}, {"gating_type": "cosine", "top_k": 1}]`;
    they must be token-choice routers (not "ensemble", "expert_choice", "softmoe")
    and cannot use "aux_free" balancing themselves. Member-specific losses (e.g. the
    conditional router's difficulty loss) are kept.

    Args:
        num_experts: E.
        members: List of member routers (`BaseGating` instances or their serialized
            configs, as `get_config` stores them).
        member_weights: alpha_m, one per member (>= 0, positive sum).
        top_k: k of the final selection.
        normalize_top_k: Renormalise the kept weights.
        **kwargs: `BaseGating` arguments.
    """

    # The hierarchical router ranks experts by gate_logits with a fixed top_k.
    supports_hierarchical_routing = False
    config_fields = ("ensemble_members",)
    supports_bias_balancing = True

    def __init__(self, num_experts, members, member_weights=None, top_k=2, normalize_top_k=False, **kwargs):
        super().__init__(num_experts, top_k, **kwargs)
        if not members:
            raise ValueError("EnsembleGating needs at least one member router, got none.")
        self.members = [
            m if isinstance(m, BaseGating) else keras.saving.deserialize_keras_object(m) for m in members
        ]
        for member in self.members:
            if member.routing_kind != "token_choice" or isinstance(member, EnsembleGating):
                raise ValueError(f"Ensemble members must be token-choice routers, got {type(member).__name__}.")
            if member.num_experts != num_experts:
                raise ValueError(
                    f"Ensemble member {member.name!r} has num_experts={member.num_experts}, "
                    f"expected {num_experts}."
                )
        member_weights = [1.0] * len(self.members) if member_weights is None else [float(w) for w in member_weights]
        if len(member_weights) != len(self.members) or min(member_weights) < 0 or sum(member_weights) <= 0:
            raise ValueError(
                f"member_weights must be {len(self.members)} numbers >= 0 with a positive sum, got {member_weights!r}."
            )
        self.member_weights = member_weights
        self.normalize_top_k = normalize_top_k
        self.supports_masking = True  # the mask is an explicit call argument

    @classmethod
    def validate_gating_config(cls, gating):
        from dl_moe.registry import GATING_TYPES

        if gating.gating_type == "ensemble" and not gating.ensemble_members:
            raise ValueError(
                "GatingConfig.ensemble_members must list the member routers for gating_type='ensemble', "
                "e.g. [{'gating_type': 'linear'}, {'gating_type': 'cosine'}], got None."
            )
        for member, _ in member_gating_configs(gating):
            member_cls = GATING_TYPES.get(member.gating_type)
            if member_cls.routing_kind != "token_choice" or issubclass(member_cls, EnsembleGating):
                raise ValueError(
                    f"GatingConfig.ensemble_members: members must be token-choice routers, got "
                    f"gating_type={member.gating_type!r}."
                )
            if member.balancing == "aux_free":
                raise ValueError(
                    "GatingConfig.ensemble_members: set balancing='aux_free' on the ensemble, not on a member."
                )

    @classmethod
    def validate_for_layer(cls, moe_config):
        for member, _ in member_gating_configs(moe_config.gating_config):
            member_moe = dataclasses.replace(moe_config, gating_config=member)
            member.validate_for_layer(member_moe)

    @classmethod
    def from_moe_config(cls, config, name=None):
        gating = config.gating_config
        members, weights = [], []
        for index, (member, weight) in enumerate(member_gating_configs(gating)):
            member_moe = dataclasses.replace(config, gating_config=member)
            member_cls = _gating_class(member.gating_type)
            members.append(member_cls.from_moe_config(member_moe, name=f"member_{index}_{member.gating_type}"))
            weights.append(weight)
        return cls(
            members=members,
            member_weights=weights,
            top_k=gating.top_k,
            normalize_top_k=gating.normalize_top_k,
            **cls.common_kwargs(config, name),
        )

    def build(self, input_shape):
        for member in self.members:
            member.build(input_shape)
        self.built = True

    def call(self, inputs, training=None, mask=None):
        total = sum(self.member_weights)
        combined, probs = 0.0, 0.0
        for member, alpha in zip(self.members, self.member_weights):
            weights, indices, info = call_router(member, inputs, training=training, mask=mask)
            if "active" in info:
                weights = ops.where(ops.cast(info["active"], "bool"), weights, ops.zeros_like(weights))
            one_hot = ops.one_hot(indices, self.num_experts, dtype=weights.dtype)  # [T, k_m, E]
            dense = ops.sum(one_hot * ops.expand_dims(weights, -1), axis=1)  # [T, E]
            combined = combined + (alpha / total) * dense
            probs = probs + (alpha / total) * info["raw_gate_probs"]
        weights, indices = select_top_k(combined, self.top_k, False, bias=self.selection_bias())
        active = weights > 0
        if self.normalize_top_k:
            weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
        return weights, indices, {"raw_gate_probs": probs, "active": active}

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "members": [keras.saving.serialize_keras_object(m) for m in self.members],
                "member_weights": self.member_weights,
                "normalize_top_k": self.normalize_top_k,
            }
        )
        return config


def _gating_class(name):
    from dl_moe.registry import GATING_TYPES

    return GATING_TYPES.get(name)
