"""Hierarchical (tree) routing: groups of experts, subgroups inside them, ..., experts.

The experts are the leaves of a tree of groups of consecutive experts; each level has
its own router, and a token descends the tree keeping its best few nodes per level, so
an expert outside the chosen groups never receives the token. A generalisation of the
two-level scheme of Shazeer et al. 2017, "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer" (arXiv:1701.06538), Appendix B "Hierarchical
Mixture of Experts", whose primary gate picks groups and secondary gates pick experts
inside them.
"""

import copy
import math

import keras
from keras import ops

from dl_moe import export_compat
from dl_moe.registry import GATING_TYPES


@keras.saving.register_keras_serializable(package="dl_moe")
class HierarchicalGating(keras.layers.Layer):
    """Routes each token down a tree of expert groups to experts.

    The tree's shape `(b_1, ..., b_L)` (product E) nests the experts: level l has
    N_l = b_1 * ... * b_l nodes, node j of level l has children j*b_{l+1} ...
    (j+1)*b_{l+1} - 1, and the leaves (level L) are the experts, so expert e is index e
    of the row-major `[b_1, ..., b_L]` array. One router of the configured
    `gating_type` (any token-choice router whose `info` carries `gate_logits`) per
    level scores its N_l nodes, and

        p(node)  = p(parent) * softmax of the logits over the node and its siblings
        p(e)     = product of those per-level softmaxes along e's path     `[T, E]`, sums to 1

    At level 1 the token keeps its `top_k_groups` best nodes by p; at each level below
    it keeps its `top_k_groups` best among the children of the nodes kept one level up
    (a beam of width `top_k_groups`), and at the leaves its `top_k` best experts among
    the children of the kept nodes. Weights are the selected p(e), renormalised when
    `normalize_top_k` is set. Two levels: groups, then experts inside the chosen
    groups, p(e) = p(g(e)) * p(e | g(e)).

    Args:
        group_router: Router of level 1 (b_1 outputs: the groups).
        expert_router: Router of level L (E outputs: the experts).
        num_experts: E.
        num_groups: b_1 for a two-level tree (then `tree_shape` = (b_1, E / b_1));
            None when `tree_shape` is given.
        top_k: Experts per token k (<= top_k_groups * b_L).
        top_k_groups: Nodes kept per token at every level above the experts
            (<= b_1).
        normalize_top_k: Renormalise the kept weights to sum to 1.
        inner_routers: Routers of levels 2 ... L-1 (N_l outputs each); empty for two
            levels.
        tree_shape: `(b_1, ..., b_L)`; None: `(num_groups, E / num_groups)`.

    Call takes tokens `[T, d]` and returns `(weights [T, k], indices [T, k], info)`;
    `info` holds `raw_gate_probs [T, E]` (p(e)), `gate_logits [T, E]` (the expert
    router's logits, for the z-loss), `group_probs [T, b_1]` and `group_indices
    [T, top_k_groups]` (the level-1 nodes kept).
    """

    routing_kind = "token_choice"

    def __init__(
        self,
        group_router,
        expert_router,
        num_experts,
        num_groups=None,
        top_k=2,
        top_k_groups=1,
        normalize_top_k=False,
        inner_routers=(),
        tree_shape=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if tree_shape is None:
            if num_groups is None or num_experts % num_groups:
                raise ValueError(f"num_groups must divide num_experts={num_experts}, got {num_groups}.")
            tree_shape = (num_groups, num_experts // num_groups)
        tree_shape = tuple(int(b) for b in tree_shape)
        if math.prod(tree_shape) != num_experts or len(tree_shape) < 2:
            raise ValueError(f"tree_shape must be >= 2 factors of num_experts={num_experts}, got {tree_shape}.")
        if num_groups is not None and num_groups != tree_shape[0]:
            raise ValueError(f"num_groups must equal tree_shape[0]={tree_shape[0]}, got {num_groups}.")
        if len(inner_routers) != len(tree_shape) - 2:
            raise ValueError(
                f"inner_routers must hold {len(tree_shape) - 2} routers (levels 2 ... L-1 of a tree "
                f"{tree_shape}), got {len(inner_routers)}."
            )
        if not 1 <= top_k_groups <= tree_shape[0]:
            raise ValueError(f"top_k_groups must be in [1, {tree_shape[0]}] (the root's groups), got {top_k_groups}.")
        if top_k > top_k_groups * tree_shape[-1]:
            raise ValueError(
                f"top_k must be <= top_k_groups * group size = {top_k_groups * tree_shape[-1]}, got {top_k}."
            )
        self.group_router = group_router
        self.inner_routers = list(inner_routers)
        self.expert_router = expert_router
        self.num_experts = num_experts
        self.tree_shape = tree_shape
        self.num_groups = tree_shape[0]
        self.top_k = top_k
        self.top_k_groups = top_k_groups
        self.normalize_top_k = normalize_top_k

    @classmethod
    def from_moe_config(cls, config, name=None):
        """Builds every level from a `MoEConfig` with `hierarchical_routing=True`."""
        router_cls = GATING_TYPES.get(config.gating_config.gating_type)
        tree_shape = config.resolved_routing_tree_shape

        def level(num_nodes, top_k, level_name):
            sub = copy.deepcopy(config)
            object.__setattr__(sub, "num_experts", num_nodes)
            object.__setattr__(sub.gating_config, "top_k", top_k)
            return router_cls.from_moe_config(sub, name=level_name)

        nodes = [math.prod(tree_shape[: depth + 1]) for depth in range(len(tree_shape))]  # N_1 ... N_L
        return cls(
            group_router=level(nodes[0], config.top_k_groups, "group_router"),
            inner_routers=[
                level(count, config.top_k_groups, f"level_{depth}_router")
                for depth, count in enumerate(nodes[1:-1], start=2)
            ],
            expert_router=level(config.num_experts, 1, "expert_router"),
            num_experts=config.num_experts,
            top_k=config.gating_config.top_k,
            top_k_groups=config.top_k_groups,
            normalize_top_k=config.gating_config.normalize_top_k,
            tree_shape=tree_shape,
            dtype=config.routing_dtype,
            name=name,
        )

    @property
    def level_routers(self):
        """The routers from the root level to the experts."""
        return [self.group_router, *self.inner_routers, self.expert_router]

    def build(self, input_shape):
        for router in self.level_routers:
            router.build(input_shape)
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
        kept = None  # [T, N_{l-1}] bool: the nodes kept one level up (None at the root)
        for depth, (router, branching) in enumerate(zip(self.level_routers, self.tree_shape)):
            logits = self._logits(router, inputs, training)  # [T, N_l]
            parents = math.prod(self.tree_shape[:depth])  # N_{l-1}
            nodes = parents * branching  # N_l
            within = ops.softmax(ops.reshape(logits, (-1, parents, branching)), axis=-1)  # [T, N_{l-1}, b_l]
            if depth == 0:
                probs = ops.reshape(within, (-1, nodes))  # [T, b_1]
                scores = probs
            else:
                probs = ops.reshape(ops.expand_dims(probs, -1) * within, (-1, nodes))  # [T, N_l]
                # Children of unkept nodes get a score below every allowed node.
                allowed = ops.reshape(ops.repeat(ops.expand_dims(kept, -1), branching, axis=-1), (-1, nodes))
                scores = ops.where(allowed, probs, probs - 2.0)  # [T, N_l]
            if depth == len(self.tree_shape) - 1:
                break
            _, kept_indices = export_compat.top_k(scores, self.top_k_groups)  # [T, m]
            if depth == 0:
                group_probs, group_indices = probs, kept_indices
            kept = ops.sum(ops.one_hot(kept_indices, nodes, dtype=probs.dtype), axis=1) > 0  # [T, N_l]
        _, indices = export_compat.top_k(scores, self.top_k)  # [T, k]
        indices = ops.cast(indices, "int32")
        weights = ops.take_along_axis(probs, indices, axis=-1)  # [T, k]
        if self.normalize_top_k:
            weights = weights / ops.maximum(ops.sum(weights, axis=-1, keepdims=True), 1e-9)
        info = {
            "gate_logits": logits,
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
                "inner_routers": [keras.saving.serialize_keras_object(r) for r in self.inner_routers],
                "expert_router": keras.saving.serialize_keras_object(self.expert_router),
                "num_experts": self.num_experts,
                "tree_shape": list(self.tree_shape),
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
        config["inner_routers"] = [keras.saving.deserialize_keras_object(r) for r in config.get("inner_routers", ())]
        return cls(**config)
