"""Two-level (hierarchical) routing: first expert groups, then experts inside them."""

import copy

import keras
from keras import ops

from dl_moe import export_compat
from dl_moe.registry import GATING_TYPES


@keras.saving.register_keras_serializable(package="dl_moe")
class HierarchicalGating(keras.layers.Layer):
    """Routes each token to groups of experts, then to experts within those groups.

    The E experts form n groups of E/n consecutive experts (group g holds experts
    g*E/n ... (g+1)*E/n - 1). Two routers of the configured `gating_type` (any
    token-choice router whose `info` carries `gate_logits`) score the token:

        p(g)     = softmax(group_logits)                        `[T, n]`
        p(e | g) = softmax of expert_logits within group g      `[T, n, E/n]`
        p(e)     = p(g(e)) * p(e | g(e))                        `[T, E]`, sums to 1

    The token keeps its `top_k_groups` best groups and then the `top_k` best experts by
    p(e) among the experts of those groups, so an expert outside the chosen groups never
    receives the token (dispatch stays sparse). Weights are the selected p(e),
    renormalised when `normalize_top_k` is set.

    Args:
        group_router: A token-choice router over n "experts" (the groups).
        expert_router: A token-choice router over the E experts.
        num_experts: E.
        num_groups: n (divides E).
        top_k: Experts per token k (<= top_k_groups * E / n).
        top_k_groups: Groups per token.
        normalize_top_k: Renormalise the kept weights to sum to 1.

    Call takes tokens `[T, d]` and returns `(weights [T, k], indices [T, k], info)`;
    `info` holds `raw_gate_probs [T, E]` (p(e)), `gate_logits [T, E]` (the expert
    router's logits, for the z-loss), `group_probs [T, n]` and `group_indices
    [T, top_k_groups]`.
    """

    routing_kind = "token_choice"

    def __init__(
        self,
        group_router,
        expert_router,
        num_experts,
        num_groups,
        top_k=2,
        top_k_groups=1,
        normalize_top_k=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_experts % num_groups:
            raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}.")
        if top_k > top_k_groups * (num_experts // num_groups):
            raise ValueError(
                f"top_k must be <= top_k_groups * group size = {top_k_groups * (num_experts // num_groups)}, "
                f"got {top_k}."
            )
        self.group_router = group_router
        self.expert_router = expert_router
        self.num_experts = num_experts
        self.num_groups = num_groups
        self.top_k = top_k
        self.top_k_groups = top_k_groups
        self.normalize_top_k = normalize_top_k

    @classmethod
    def from_moe_config(cls, config, name=None):
        """Builds both levels from a `MoEConfig` with `hierarchical_routing=True`."""
        router_cls = GATING_TYPES.get(config.gating_config.gating_type)
        num_groups = config.resolved_num_expert_groups

        def level(num_experts, top_k, level_name):
            sub = copy.deepcopy(config)
            object.__setattr__(sub, "num_experts", num_experts)
            object.__setattr__(sub.gating_config, "top_k", top_k)
            return router_cls.from_moe_config(sub, name=level_name)

        return cls(
            group_router=level(num_groups, config.top_k_groups, "group_router"),
            expert_router=level(config.num_experts, 1, "expert_router"),
            num_experts=config.num_experts,
            num_groups=num_groups,
            top_k=config.gating_config.top_k,
            top_k_groups=config.top_k_groups,
            normalize_top_k=config.gating_config.normalize_top_k,
            dtype=config.routing_dtype,
            name=name,
        )

    def build(self, input_shape):
        self.group_router.build(input_shape)
        self.expert_router.build(input_shape)
        self.built = True

    @staticmethod
    def _logits(router, inputs, training):
        _, _, info = router(inputs, training=training)
        if info is None or "gate_logits" not in info:
            raise ValueError(
                f"Hierarchical routing needs routers that return info['gate_logits']; "
                f"{type(router).__name__} does not."
            )
        return info["gate_logits"]

    def call(self, inputs, training=None):
        num_groups, group_size = self.num_groups, self.num_experts // self.num_groups
        group_logits = self._logits(self.group_router, inputs, training)  # [T, n]
        expert_logits = self._logits(self.expert_router, inputs, training)  # [T, E]
        group_probs = ops.softmax(group_logits, axis=-1)  # [T, n]
        within = ops.softmax(ops.reshape(expert_logits, (-1, num_groups, group_size)), axis=-1)  # [T, n, E/n]
        probs = ops.reshape(ops.expand_dims(group_probs, -1) * within, (-1, self.num_experts))  # [T, E]

        _, group_indices = export_compat.top_k(group_probs, self.top_k_groups)  # [T, m]
        chosen = ops.sum(ops.one_hot(group_indices, num_groups, dtype=probs.dtype), axis=1) > 0  # [T, n]
        chosen = ops.reshape(ops.repeat(ops.expand_dims(chosen, -1), group_size, axis=-1), (-1, self.num_experts))
        # Experts of unchosen groups get a score below every allowed expert.
        scores = ops.where(chosen, probs, probs - 2.0)  # [T, E]
        _, indices = export_compat.top_k(scores, self.top_k)  # [T, k]
        indices = ops.cast(indices, "int32")
        weights = ops.take_along_axis(probs, indices, axis=-1)  # [T, k]
        if self.normalize_top_k:
            weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
        info = {
            "gate_logits": expert_logits,
            "raw_gate_probs": probs,
            "group_probs": group_probs,
            "group_indices": ops.cast(group_indices, "int32"),
        }
        return weights, indices, info

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "group_router": keras.saving.serialize_keras_object(self.group_router),
                "expert_router": keras.saving.serialize_keras_object(self.expert_router),
                "num_experts": self.num_experts,
                "num_groups": self.num_groups,
                "top_k": self.top_k,
                "top_k_groups": self.top_k_groups,
                "normalize_top_k": self.normalize_top_k,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("group_router", "expert_router"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)
