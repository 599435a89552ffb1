"""Sparse `dl_moe` MoE blocks inside keras-hub's MoE language models.

keras-hub's MoE decoders run every expert on every token (an einsum over `[E, T, ...]`
and a mostly-zero `[E, T]` routing mask). `sparsify(model)` swaps each of those blocks
for an adapter layer with the same call signature and return value that computes the
block with a `dl_moe.MixtureOfExperts` holding the same weights: only the routed
(token, expert) pairs are computed.

```python
import keras_hub
from dl_moe.integrations.keras_hub import sparsify, unsparsify

causal_lm = keras_hub.models.MixtralCausalLM(backbone=backbone)
sparsify(causal_lm)                      # in place, dropless: the same outputs
causal_lm.generate(...)                  # cached decoding routes only the new tokens
causal_lm.save("model.keras")            # loads back after `import dl_moe.integrations.keras_hub`
stock = unsparsify(causal_lm)            # a stock keras-hub model with the trained weights
```

How it fits in:

* Blocks are found by their type (e.g. `MixtralSparseMoeBlock`), wherever they sit in
  the backbone; the decoder attribute holding each is rebound to its adapter. The
  adapter subclasses the stock block's class, so decoders that test
  `isinstance(self.mlp, ...)` keep passing it their masks.
* The backbone's class becomes a registered subclass (`dl_moe>SparseMixtralBackbone`, ...)
  whose config stores the overrides; building it from its config (`.keras` loading,
  `from_config`) builds the stock backbone and swaps its blocks again, so saved models
  load in safe mode and keep their sparse blocks.
* In training, each adapter adds the balancing loss keras-hub's block adds, with the
  model's own coefficient (`aux_loss_weight`), over the same tokens; dl_moe's router
  z-loss is off unless an override turns it on.

Supported families (keras-hub 0.32): Mixtral, Qwen-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS and
Gemma 4 (its MoE variant, `enable_moe_block=True`).
"""

import keras
from keras import ops

from dl_moe.config import GatingConfig, MoEConfig, did_you_mean
from dl_moe.experts.fused import fuse_gate_up, split_gate_up
from dl_moe.layer import MixtureOfExperts

import importlib

try:
    from keras_hub.src.models.backbone import Backbone
    from keras_hub.src.models.causal_lm import CausalLM
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "dl_moe.integrations.keras_hub needs keras-hub (pip install 'dl_moe[keras-hub]')."
    ) from error

# Each family is imported on its own: a keras-hub release that moves or drops one family
# leaves the others working. A missing family's names are placeholders no model has.
MISSING_FAMILIES = {}


def _import_family(family, backbone_path, backbone_name, block_path, block_name):
    """`(backbone class, block class)` of one keras-hub family, or placeholders if absent."""
    try:
        backbone = getattr(importlib.import_module(f"keras_hub.src.models.{backbone_path}"), backbone_name)
        block = getattr(importlib.import_module(f"keras_hub.src.models.{block_path}"), block_name)
        return backbone, block
    except (ImportError, AttributeError) as error:
        MISSING_FAMILIES[family] = f"{type(error).__name__}: {error}"
        placeholder = {"__module__": __name__, "__doc__": f"Stands in for keras-hub's missing {family}."}
        return (
            type(f"Missing{backbone_name}", (Backbone,), dict(placeholder)),
            type(f"Missing{block_name}", (keras.layers.Layer,), dict(placeholder)),
        )


MixtralBackbone, MixtralSparseMoeBlock = _import_family(
    "Mixtral", "mixtral.mixtral_backbone", "MixtralBackbone", "mixtral.mixtral_decoder", "MixtralSparseMoeBlock"
)
QwenMoeBackbone, QwenSparseMoeBlock = _import_family(
    "Qwen-MoE", "qwen_moe.qwen_moe_backbone", "QwenMoeBackbone", "qwen_moe.qwen_moe_decoder", "QwenSparseMoeBlock"
)
Qwen3MoeBackbone, Qwen3SparseMoeBlock = _import_family(
    "Qwen3-MoE", "qwen3_moe.qwen3_moe_backbone", "Qwen3MoeBackbone", "qwen3_moe.qwen3_moe_decoder",
    "Qwen3SparseMoeBlock",
)
Qwen3_5MoeBackbone, Qwen3_5MoeSparseMoeBlock = _import_family(
    "Qwen3.5-MoE", "qwen3_5_moe.qwen3_5_moe_backbone", "Qwen3_5MoeBackbone", "qwen3_5_moe.qwen3_5_moe_decoder",
    "Qwen3_5MoeSparseMoeBlock",
)
GptOssBackbone, GptOssSparseMoeBlock = _import_family(
    "GPT-OSS", "gpt_oss.gpt_oss_backbone", "GptOssBackbone", "gpt_oss.gpt_oss_decoder", "GptOssSparseMoeBlock"
)
Gemma4Backbone, Gemma4MoEBlock = _import_family(
    "Gemma 4", "gemma4.gemma4_backbone", "Gemma4Backbone", "gemma4.gemma4_moe", "Gemma4MoEBlock"
)

__all__ = ["sparsify", "unsparsify", "moe_layers", "is_sparsified", "expert_parallel_layout_map"]

# Fields that describe the stock block's weights and routing rule; the block decides them.
_FIXED_FIELDS = (
    "num_experts",
    "expert_config",
    "gating_config",
    "gating_type",
    "top_k",
    "normalize_top_k",
    "num_shared_experts",
    "shared_expert_intermediate_size",
    "shared_expert_gate",
    "use_router_bias",
    "router_norm_epsilon",
    "hierarchical_routing",
)
_MOE_FIELDS = tuple(f for f in MoEConfig._field_names() if f not in ("expert_config", "gating_config"))
_GATING_FIELDS = tuple(GatingConfig._field_names())


def _validated_overrides(overrides):
    """Checks `sparsify` overrides: MoEConfig/GatingConfig fields the block does not fix."""
    allowed = sorted(set(_MOE_FIELDS + _GATING_FIELDS) - set(_FIXED_FIELDS))
    for key in overrides:
        if key in _FIXED_FIELDS:
            raise ValueError(
                f"sparsify cannot override {key!r}: the keras-hub block fixes it (its weights and "
                f"routing rule)."
            )
        if key not in allowed:
            raise ValueError(
                f"Unknown sparsify override {key!r}: not a MoEConfig or GatingConfig field."
                f"{did_you_mean(key, allowed)}"
            )
    return dict(overrides)


def _moe_config(num_experts, hidden_dim, intermediate_size, top_k, normalize_top_k, aux_loss_weight, overrides,
                jitter_noise=0.0, expert=None, gating=None, moe=None):
    """The MoEConfig of a keras-hub block: dropless, no residual, no z-loss.

    `expert`, `gating` and `moe` add family fields (e.g. GPT-OSS's clamped unit, a
    router bias, a gated shared expert) to the SwiGLU, linear top-k defaults.
    """
    moe_fields = {"drop_tokens": False, "use_residual_connection": False, "jitter_noise": jitter_noise, **(moe or {})}
    gating_fields = {
        "gating_type": "linear",
        "top_k": top_k,
        "normalize_top_k": normalize_top_k,
        "aux_loss_weight": aux_loss_weight,
        "z_loss_weight": 0.0,
        **(gating or {}),
    }
    for key, value in overrides.items():
        (gating_fields if key in _GATING_FIELDS else moe_fields)[key] = value
    expert_fields = {
        "hidden_dim": hidden_dim,
        "intermediate_size": intermediate_size,
        "ffn_type": "swiglu",
        "use_bias": False,
        **(expert or {}),
    }
    return MoEConfig(num_experts=num_experts, expert_config=expert_fields, gating_config=gating_fields, **moe_fields)


def _numpy(variable):
    return ops.convert_to_numpy(variable)


class KerasHubMoEBlock(keras.layers.Layer):
    """Base of the adapters: one keras-hub sparse-MoE block computed by `MixtureOfExperts`.

    A subclass also derives from the stock block's class (so `isinstance` checks in the
    decoders still hold) but shares none of its state: it defines `call`, the
    config mapping (`from_stock_block`) and the weight mapping (`load_stock_weights`,
    `write_stock_weights`).

    Args:
        moe_config: `MoEConfig` or its dict.
        hidden_dim: d.
        moe_name: Name of the inner `MixtureOfExperts` (RoutingMonitor's log prefix).
        return_router_logits: Whether `call` also computes the router logits
            `[T, E]` (the decoder asked for them); otherwise None takes their place.
    """

    stock_block_class = None  # the keras-hub class this adapter replaces

    def __init__(self, moe_config, hidden_dim, moe_name=None, return_router_logits=False, **kwargs):
        # Not the stock block's __init__: it would demand its constructor arguments.
        keras.layers.Layer.__init__(self, **kwargs)
        self.moe_config = MoEConfig.from_dict(moe_config)
        self.hidden_dim = hidden_dim
        self.moe_name = moe_name
        self.return_router_logits = return_router_logits
        self.moe = MixtureOfExperts(self.moe_config, dtype=self.dtype_policy, name=moe_name)

    def build(self, input_shape=None):
        self.moe.build((None, self.hidden_dim))
        self.built = True

    def compute_output_shape(self, input_shape):
        return input_shape

    def _sparse_moe(self, hidden_states, token_mask, training):
        """`[B, S, d]` → `([B, S, d]` MoE output, router logits `[B*S, E]` or None)."""
        shape = ops.shape(hidden_states)
        tokens = ops.reshape(hidden_states, (-1, self.hidden_dim))  # [T, d]
        if token_mask is not None:
            token_mask = ops.reshape(ops.cast(token_mask, "bool"), (-1,))  # [T]
        outputs = self.moe(tokens, mask=token_mask, training=training)
        logits = self.router_logits(tokens) if self.return_router_logits else None
        return ops.reshape(outputs, shape), logits

    @staticmethod
    def _token_mask(attention_mask):
        """Tokens a keras-hub balancing loss counts: a padding mask `[B, S]` as is; an
        attention mask `[B, S, S_kv]` marks a token whose row attends anywhere."""
        if attention_mask is None:
            return None
        attention_mask = ops.cast(attention_mask, "bool")
        return ops.any(attention_mask, axis=-1) if len(attention_mask.shape) == 3 else attention_mask

    def _assign_routed_swiglu(self, router_kernel, gate_kernel, up_kernel, down_kernel):
        self.moe.gating_network.router_kernel.assign(router_kernel)
        bank = self.moe.experts
        bank.gate_kernel.assign(gate_kernel)
        bank.up_kernel.assign(up_kernel)
        bank.down_kernel.assign(down_kernel)

    def _assign_shared(self, mlp, gate_dense):
        """Copies a stock gated shared expert (gate/intermediate/output Dense `[d, hs]`,
        `[d, hs]`, `[hs, d]` and gate Dense `[d, 1]`) into the layer's shared bank."""
        shared = self.moe.shared_experts
        shared.gate_kernel.assign(ops.expand_dims(mlp._feedforward_gate_dense.kernel, 0))
        shared.up_kernel.assign(ops.expand_dims(mlp._feedforward_intermediate_dense.kernel, 0))
        shared.down_kernel.assign(ops.expand_dims(mlp._feedforward_output_dense.kernel, 0))
        self.moe.shared_expert_gate.kernel.assign(gate_dense.kernel)

    def _write_shared(self, mlp, gate_dense):
        shared = self.moe.shared_experts
        mlp._feedforward_gate_dense.kernel.assign(shared.gate_kernel[0])
        mlp._feedforward_intermediate_dense.kernel.assign(shared.up_kernel[0])
        mlp._feedforward_output_dense.kernel.assign(shared.down_kernel[0])
        gate_dense.kernel.assign(self.moe.shared_expert_gate.kernel)

    def _load_halves(self, router_dense, bank):
        """Router Dense `[d, E]` and a bank with the fused "halves" gate/up `[E, d, 2h]`."""
        gate, up = split_gate_up(_numpy(bank._expert_feedforward_gate_dense), "halves")
        self._assign_routed_swiglu(router_dense.kernel, gate, up, bank._expert_feedforward_output_dense)

    def _write_halves(self, router_dense, bank):
        experts = self.moe.experts
        router_dense.kernel.assign(self.moe.gating_network.router_kernel)
        bank._expert_feedforward_gate_dense.assign(
            fuse_gate_up(_numpy(experts.gate_kernel), _numpy(experts.up_kernel), "halves")
        )
        bank._expert_feedforward_output_dense.assign(experts.down_kernel)

    def router_logits(self, tokens):
        """Router logits `[T, E]` of tokens `[T, d]` (what the stock block returns)."""
        return self.moe.gating_network.compute_gate_logits(ops.cast(tokens, "float32"))

    # Weight mapping: each subclass names the stock tensors of its family.
    def load_stock_weights(self, block, parent):
        """Copies the weights of a stock block (built; `parent` is its decoder) into this adapter."""
        raise NotImplementedError

    def write_stock_weights(self, block, parent):
        """Copies this adapter's weights into a stock block (built)."""
        raise NotImplementedError

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        """An (unbuilt) adapter computing `block` of decoder `parent` with `overrides` (validated)."""
        raise NotImplementedError

    @classmethod
    def owned_stock_layers(cls, parent, block):
        """The stock layers of `parent` whose weights the adapter takes over."""
        return [block]

    def attach(self, parent, attribute, block, copy_weights):
        """Takes `block`'s place as `parent.<attribute>` (and its weights if `copy_weights`)."""
        if copy_weights:
            self.load_stock_weights(block, parent)
        _rebind_sublayer(parent, attribute, self)

    def get_config(self):
        config = keras.layers.Layer.get_config(self)
        config.update(
            {
                "moe_config": self.moe_config.to_dict(),
                "hidden_dim": self.hidden_dim,
                "moe_name": self.moe_name,
                "return_router_logits": self.return_router_logits,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="dl_moe")
class MixtralMoEBlock(KerasHubMoEBlock, MixtralSparseMoeBlock):
    """`MixtralSparseMoeBlock` computed sparsely.

    Weights: router `[d, E]` → `router_kernel`; experts' gate / intermediate `[E, d, h]`
    → `gate_kernel` / `up_kernel`; output `[E, h, d]` → `down_kernel`. Top-k weights are
    renormalised (Mixtral's rule). The balancing loss uses the decoder's padding mask.
    """

    stock_block_class = MixtralSparseMoeBlock

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.intermediate_dim,
            block.top_k,
            normalize_top_k=True,
            aux_loss_weight=block.router_aux_loss_coef,
            overrides=overrides,
            jitter_noise=block.router_jitter_noise,
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=return_router_logits,
                   dtype=block.dtype_policy, name=name)

    def call(self, hidden_states, attention_mask=None, training=False):
        # attention_mask: the decoder's padding mask [B, S] (None in cached decoding).
        return self._sparse_moe(hidden_states, self._token_mask(attention_mask), training)

    def load_stock_weights(self, block, parent):
        bank = block.expert_bank
        self._assign_routed_swiglu(
            block._sparse_feedforward_gate_dense.kernel,
            bank._expert_feedforward_gate_dense,
            bank._expert_feedforward_intermediate_dense,
            bank._expert_feedforward_output_dense,
        )

    def write_stock_weights(self, block, parent):
        bank = self.moe.experts
        block._sparse_feedforward_gate_dense.kernel.assign(self.moe.gating_network.router_kernel)
        block.expert_bank._expert_feedforward_gate_dense.assign(bank.gate_kernel)
        block.expert_bank._expert_feedforward_intermediate_dense.assign(bank.up_kernel)
        block.expert_bank._expert_feedforward_output_dense.assign(bank.down_kernel)


class QwenFamilyBlock(KerasHubMoEBlock):
    """What the three Qwen adapters share: the decoder's mask decides which tokens
    count, the routed experts are a fused "halves" gate/up bank behind a router Dense
    (`router_attribute`), and an optional gated shared expert sits at
    `shared_expert_attributes` (its MLP and its gate Dense)."""

    router_attribute = "_sparse_feedforward_gate_dense"
    shared_expert_attributes = None

    def call(self, hidden_states, attention_mask=None, training=None):
        return self._sparse_moe(hidden_states, self._token_mask(attention_mask), training)

    def load_stock_weights(self, block, parent):
        self._load_halves(getattr(block, self.router_attribute), block.expert_bank)
        if self.shared_expert_attributes:
            self._assign_shared(*(getattr(block, name) for name in self.shared_expert_attributes))

    def write_stock_weights(self, block, parent):
        self._write_halves(getattr(block, self.router_attribute), block.expert_bank)
        if self.shared_expert_attributes:
            self._write_shared(*(getattr(block, name) for name in self.shared_expert_attributes))


@keras.saving.register_keras_serializable(package="dl_moe")
class Qwen3MoEBlock(QwenFamilyBlock, Qwen3SparseMoeBlock):
    """`Qwen3SparseMoeBlock` computed sparsely.

    Weights: router `[d, E]` → `router_kernel`; the fused gate/up tensor `[E, d, 2h]`
    (gate in the first h columns, up in the last h) → `gate_kernel` / `up_kernel`;
    output `[E, h, d]` → `down_kernel`. Renormalisation follows `norm_top_k_prob`.

    The decoder passes its self-attention mask `[B, S, S_kv]`; like keras-hub's loss,
    a token counts when its row attends to at least one position (`any` over the
    last axis).
    """

    stock_block_class = Qwen3SparseMoeBlock

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.intermediate_dim,
            block.top_k,
            normalize_top_k=bool(block.norm_top_k_prob),
            aux_loss_weight=block.router_aux_loss_coefficient,
            overrides=overrides,
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=return_router_logits,
                   dtype=block.dtype_policy, name=name)



@keras.saving.register_keras_serializable(package="dl_moe")
class QwenMoEBlock(QwenFamilyBlock, QwenSparseMoeBlock):
    """`QwenSparseMoeBlock` (Qwen1.5/Qwen2-MoE) computed sparsely.

    As `Qwen3MoEBlock` (fused "halves" gate/up, `norm_top_k_prob`, attention-mask
    token rule), plus the gated shared expert: `shared_expert_dense` (gate /
    intermediate / output Dense) → `shared_experts/{gate,up,down}_kernel [1, ...]`,
    `shared_expert_gate_dense [d, 1]` → `shared_expert_gate/kernel`; the output is
    routed + sigmoid(x · gate) · shared(x).
    """

    stock_block_class = QwenSparseMoeBlock
    shared_expert_attributes = ("shared_expert_dense", "shared_expert_gate_dense")

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.intermediate_dim,
            block.top_k,
            normalize_top_k=bool(block.norm_top_k_prob),
            aux_loss_weight=block.router_aux_loss_coefficient,
            overrides=overrides,
            moe={
                "num_shared_experts": 1,
                "shared_expert_intermediate_size": block.intermediate_dim_shared,
                "shared_expert_gate": True,
            },
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=return_router_logits,
                   dtype=block.dtype_policy, name=name)



@keras.saving.register_keras_serializable(package="dl_moe")
class Qwen3_5MoEBlock(QwenFamilyBlock, Qwen3_5MoeSparseMoeBlock):
    """`Qwen3_5MoeSparseMoeBlock` computed sparsely.

    Router `_router_gate [d, E]`, fused "halves" gate/up experts, top-k weights always
    renormalised, and a gated shared expert (`shared_expert`, `_shared_expert_gate`)
    mapped as in `QwenMoEBlock`. The decoder passes its padding mask `[B, S]`.
    """

    stock_block_class = Qwen3_5MoeSparseMoeBlock
    router_attribute = "_router_gate"
    shared_expert_attributes = ("shared_expert", "_shared_expert_gate")

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.moe_intermediate_dim,
            block.top_k,
            normalize_top_k=True,
            aux_loss_weight=block.router_aux_loss_coefficient,
            overrides=overrides,
            moe={
                "num_shared_experts": 1,
                "shared_expert_intermediate_size": block.shared_expert_intermediate_size,
                "shared_expert_gate": True,
            },
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=return_router_logits,
                   dtype=block.dtype_policy, name=name)



@keras.saving.register_keras_serializable(package="dl_moe")
class GptOssMoEBlock(KerasHubMoEBlock, GptOssSparseMoeBlock):
    """`GptOssSparseMoeBlock` computed sparsely.

    Router Dense with bias (`router/router_dense` `[d, E]`, `[E]`) → `router_kernel`,
    `router_bias`; top-k of the logits then softmax over the k, which equals
    renormalised top-k softmax probabilities (`normalize_top_k`). Experts: the
    interleaved fused `gate_up_proj [E, d, 2h]` and its bias `[E, 2h]` (gate = even
    columns) → `gate_kernel`/`up_kernel`, `gate_bias`/`up_bias`; `down_proj [E, h, d]`
    and `down_proj_bias [E, d]` → `down_kernel`, `down_bias`; the clamped gated unit
    with the block's alpha and limit. keras-hub adds no balancing loss for GPT-OSS, so
    the adapter adds none either (`aux_loss_weight=0`) unless an override asks.

    `call` returns `(output, None)`: the decoder discards the second value (the stock
    block's dense `[T, E]` routing weights).
    """

    stock_block_class = GptOssSparseMoeBlock

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.intermediate_dim,
            block.top_k,
            normalize_top_k=True,
            aux_loss_weight=0.0,
            overrides=overrides,
            expert={
                "ffn_type": "clamped_swiglu",
                "use_bias": True,
                "glu_alpha": float(block.experts.alpha),
                "glu_limit": float(block.experts.limit),
            },
            gating={"use_router_bias": True},
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=False,
                   dtype=block.dtype_policy, name=name)

    def call(self, hidden_states, training=None):
        return self._sparse_moe(hidden_states, None, training)

    def load_stock_weights(self, block, parent):
        experts, router = block.experts, block.router.router_dense
        gate, up = split_gate_up(_numpy(experts.gate_up_proj), "interleaved")
        gate_bias, up_bias = split_gate_up(_numpy(experts.gate_up_proj_bias), "interleaved")
        self._assign_routed_swiglu(router.kernel, gate, up, experts.down_proj)
        self.moe.gating_network.router_bias.assign(router.bias)
        bank = self.moe.experts
        bank.gate_bias.assign(gate_bias)
        bank.up_bias.assign(up_bias)
        bank.down_bias.assign(experts.down_proj_bias)

    def write_stock_weights(self, block, parent):
        experts, router, bank = block.experts, block.router.router_dense, self.moe.experts
        router.kernel.assign(self.moe.gating_network.router_kernel)
        router.bias.assign(self.moe.gating_network.router_bias)
        experts.gate_up_proj.assign(fuse_gate_up(_numpy(bank.gate_kernel), _numpy(bank.up_kernel), "interleaved"))
        experts.gate_up_proj_bias.assign(fuse_gate_up(_numpy(bank.gate_bias), _numpy(bank.up_bias), "interleaved"))
        experts.down_proj.assign(bank.down_kernel)
        experts.down_proj_bias.assign(bank.down_bias)


@keras.saving.register_keras_serializable(package="dl_moe")
class Gemma4RouterInputs(keras.layers.Layer):
    """Takes the place of `Gemma4Router` in a sparsified decoder: returns its input
    `[B, S, d]` as tokens `[T, d]`, which the decoder hands to the expert bank as the
    second argument (the stock router's `[T, E]` dispatch weights). Routing happens
    inside the `Gemma4MoEAdapter`'s `MixtureOfExperts`. No weights."""

    def call(self, x):
        return ops.reshape(x, (-1, ops.shape(x)[-1]))

    def compute_output_shape(self, input_shape):
        return (None, input_shape[-1])


@keras.saving.register_keras_serializable(package="dl_moe")
class Gemma4MoEAdapter(KerasHubMoEBlock, Gemma4MoEBlock):
    """Gemma 4's MoE path (`moe_router` + `moe_expert_bank`) computed sparsely.

    The Gemma 4 decoder routes on the raw hidden states and runs the experts on
    `pre_ffw_norm_moe(x)`. The adapter replaces the expert bank and the router is
    replaced by `Gemma4RouterInputs`, so the bank receives `(normed tokens, raw tokens)`
    and calls `MixtureOfExperts(normed, router_inputs=raw)`.

    Weights: router `proj [d, E]` → `router_kernel`, `per_dim_scale [d]` →
    `router_input_scale` (the "rmsnorm_linear" router: unscaled RMS norm, 1/sqrt(d),
    per-dimension weight, linear, softmax, top-k, renormalise); experts
    `gate_proj`/`up_proj [E, d, h]`, `down_proj [E, h, d]`, `per_expert_scale [E]` →
    `gate_kernel`, `up_kernel`, `down_kernel`, `expert_scale` (tanh-GeLU gated).
    keras-hub adds no balancing loss for Gemma 4, so neither does the adapter (unless
    an override sets `aux_loss_weight`).
    """

    stock_block_class = Gemma4MoEBlock

    @classmethod
    def from_stock_block(cls, block, parent, overrides, name, moe_name, return_router_logits):
        router = parent.moe_router
        config = _moe_config(
            block.num_experts,
            block.hidden_dim,
            block.expert_intermediate_dim,
            router.num_experts_per_token,
            normalize_top_k=True,
            aux_loss_weight=0.0,
            overrides=overrides,
            expert={"ffn_type": "geglu_tanh", "use_expert_scale": True},
            gating={"gating_type": "rmsnorm_linear", "router_norm_epsilon": float(router.layer_norm_epsilon)},
        )
        return cls(config, block.hidden_dim, moe_name=moe_name, return_router_logits=False,
                   dtype=block.dtype_policy, name=name)

    @classmethod
    def owned_stock_layers(cls, parent, block):
        return [block, parent.moe_router]

    def attach(self, parent, attribute, block, copy_weights):
        super().attach(parent, attribute, block, copy_weights)
        _rebind_sublayer(parent, "moe_router", Gemma4RouterInputs(dtype=self.dtype_policy, name="moe_router_inputs"))

    def call(self, x, dispatch_weights):
        # x: pre_ffw_norm_moe(h) as tokens [T, d]; dispatch_weights: h itself as tokens
        # [T, d] (from Gemma4RouterInputs), which the router sees.
        return self.moe(x, router_inputs=dispatch_weights)

    def load_stock_weights(self, block, parent):
        router = parent.moe_router
        self._assign_routed_swiglu(router.proj.kernel, block.gate_proj, block.up_proj, block.down_proj)
        self.moe.gating_network.router_input_scale.assign(router.per_dim_scale)
        self.moe.experts.expert_scale.assign(block.per_expert_scale)

    def write_stock_weights(self, block, parent):
        router, bank = parent.moe_router, self.moe.experts
        router.proj.kernel.assign(self.moe.gating_network.router_kernel)
        router.per_dim_scale.assign(self.moe.gating_network.router_input_scale)
        block.gate_proj.assign(bank.gate_kernel)
        block.up_proj.assign(bank.up_kernel)
        block.down_proj.assign(bank.down_kernel)
        block.per_expert_scale.assign(bank.expert_scale)


# Stock backbone class → adapter class of its MoE blocks.
# Families keras-hub does not have (MISSING_FAMILIES) are left out.
_FAMILIES = {
    backbone: adapter
    for backbone, adapter in (
        (MixtralBackbone, MixtralMoEBlock),
        (QwenMoeBackbone, QwenMoEBlock),
        (Qwen3MoeBackbone, Qwen3MoEBlock),
        (Qwen3_5MoeBackbone, Qwen3_5MoEBlock),
        (GptOssBackbone, GptOssMoEBlock),
        (Gemma4Backbone, Gemma4MoEAdapter),
    )
    if not backbone.__name__.startswith("Missing")
}


# ---------------------------------------------------------------- block search/swap


def _find_blocks(backbone, block_classes):
    """`[(parent_layer, attribute, block)]` for every block of the given types, by type."""
    found = []
    for layer in backbone._flatten_layers(include_self=False, recursive=True):
        # On PyTorch sub-layers live in the torch.nn.Module's `_modules`, not in `__dict__`.
        attributes = set(vars(layer)) | set(getattr(layer, "_modules", None) or {})
        for attribute in sorted(attributes):
            value = getattr(layer, attribute, None)
            if type(value) in block_classes:
                found.append((layer, attribute, value))
    return found


def _rebind_sublayer(parent, attribute, new_layer):
    """Rebinds `parent.<attribute>` to `new_layer`, replacing the old one in Keras's tracking."""
    old_layer = getattr(parent, attribute)
    # Swapping in the tracker first keeps the built parent's lock from refusing a new layer.
    parent._tracker.replace_tracked_value("layers", old_layer, new_layer)
    setattr(parent, attribute, new_layer)


def _refresh_torch_params(model):
    """PyTorch: re-collects each layer's `torch_params` (they still hold the replaced weights)."""
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if "_torch_params" in vars(layer) or "_torch_params" in (getattr(layer, "_modules", None) or {}):
            layer._track_variables()


def _swap_blocks(backbone, overrides, copy_weights):
    """Replaces every stock MoE block of `backbone` with its adapter (built)."""
    adapter_cls = _FAMILIES[_stock_backbone_class(type(backbone))]
    found = _find_blocks(backbone, (adapter_cls.stock_block_class,))
    for parent, attribute, block in found:
        wants_logits = bool(getattr(parent, "output_router_logits", False))
        adapter = adapter_cls.from_stock_block(
            block, parent, overrides, name=f"{parent.name}_moe_block", moe_name=f"{parent.name}_moe",
            return_router_logits=wants_logits,
        )
        with keras.name_scope(parent.name):  # weights under the decoder's path, like the stock block's
            adapter.build()
        adapter.attach(parent, attribute, block, copy_weights)
    if keras.backend.backend() == "torch":
        _refresh_torch_params(backbone)
    return len(found)


# ------------------------------------------------------------ sparse backbone classes


def _stock_backbone_class(cls):
    for stock_cls in cls.__mro__:
        if stock_cls in _FAMILIES:
            return stock_cls
    raise ValueError(
        f"{cls.__name__} is not a backbone of a supported keras-hub MoE family; supported: "
        f"{sorted(c.__name__ for c in _FAMILIES)}."
    )


def _make_sparse_backbone_class(stock_cls):
    def __init__(self, *args, dl_moe_overrides=None, **kwargs):
        stock_cls.__init__(self, *args, **kwargs)
        self._dl_moe_overrides = _validated_overrides(dl_moe_overrides or {})
        _swap_blocks(self, self._dl_moe_overrides, copy_weights=False)

    def get_config(self):
        config = stock_cls.get_config(self)
        overrides = dict(self._dl_moe_overrides)
        # Some keras-hub configs drop the balancing coefficient (QwenMoeBackbone's does),
        # so a rebuilt stock block would carry the default; the adapters keep theirs.
        weights = {layer.config.gating_config.aux_loss_weight for layer in moe_layers(self)}
        if len(weights) == 1:
            overrides.setdefault("aux_loss_weight", weights.pop())
        config["dl_moe_overrides"] = overrides
        return config

    name = f"Sparse{stock_cls.__name__}"
    cls = type(
        name,
        (stock_cls,),
        {
            "__init__": __init__,
            "get_config": get_config,
            "__module__": __name__,
            "__doc__": f"`{stock_cls.__name__}` whose MoE blocks are `dl_moe` layers (built by `sparsify`).",
        },
    )
    return keras.saving.register_keras_serializable(package="dl_moe", name=name)(cls)


_SPARSE_BACKBONES = {stock_cls: _make_sparse_backbone_class(stock_cls) for stock_cls in _FAMILIES}
_STOCK_BACKBONES = {sparse: stock for stock, sparse in _SPARSE_BACKBONES.items()}


# ---------------------------------------------------------------------- public API


def _backbone_of(model):
    if isinstance(model, CausalLM):
        return model.backbone
    if isinstance(model, Backbone):
        return model
    raise ValueError(f"Expected a keras-hub Backbone or CausalLM, got {type(model).__name__}.")


def is_sparsified(model):
    """Whether `model` (Backbone or CausalLM) was sparsified."""
    return type(_backbone_of(model)) in _STOCK_BACKBONES


def sparsify(model, **overrides):
    """Makes every MoE block of a keras-hub MoE model a sparse `dl_moe` layer, in place.

    Args:
        model: A keras-hub `Backbone` or `CausalLM` of a supported family, built
            (every keras-hub backbone is). Compile it after this call: a compiled
            optimizer would still refer to the replaced weights.
        **overrides: `MoEConfig` / `GatingConfig` fields for every block, e.g.
            `drop_tokens=True, train_capacity_factor=1.25` (capacity mode),
            `expert_parallel=True`, `aux_loss_weight=0.01`, `z_loss_weight=1e-3`,
            `balancing="aux_free"`. The default is dropless with the model's own
            balancing coefficient: the outputs equal the stock model's. Fields the
            block's weights fix (`num_experts`, `top_k`, `normalize_top_k`, ...) raise
            a `ValueError`.

    Returns:
        `model` itself, its backbone now of class `Sparse<Backbone>` (registered, so a
        `.keras` file of it loads once this module is imported).

    Raises:
        ValueError: For a model of another family, an already sparsified model, a
            model without MoE blocks or an invalid override.

    Example:
        ```python
        import numpy as np
        import keras_hub
        from dl_moe import sparsify

        backbone = keras_hub.models.MixtralBackbone(
            vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1,
            hidden_dim=16, intermediate_dim=32, num_experts=4, top_k=2)
        model = keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=None)
        inputs = {"token_ids": np.arange(1, 9)[None], "padding_mask": np.ones((1, 8), bool)}
        before = model.predict(inputs, verbose=0)
        sparsify(model)  # in place, dropless: the same outputs, only routed pairs computed
        after = model.predict(inputs, verbose=0)
        print(np.abs(after - before).max() / np.abs(before).max())  # float32 rounding
        ```
    """
    backbone = _backbone_of(model)
    if type(backbone) in _STOCK_BACKBONES:
        raise ValueError(f"{backbone.name} is already sparsified; call unsparsify(model) first.")
    stock_cls = _stock_backbone_class(type(backbone))
    if type(backbone) is not stock_cls:
        raise ValueError(
            f"sparsify supports the keras-hub classes themselves; got a subclass {type(backbone).__name__} "
            f"of {stock_cls.__name__}."
        )
    overrides = _validated_overrides(overrides)
    if not _find_blocks(backbone, (_FAMILIES[stock_cls].stock_block_class,)):
        raise ValueError(f"{backbone.name} has no {_FAMILIES[stock_cls].stock_block_class.__name__} layers.")
    _swap_blocks(backbone, overrides, copy_weights=True)
    backbone._dl_moe_overrides = overrides
    backbone.__class__ = _SPARSE_BACKBONES[stock_cls]
    _forget_compiled_functions(model)
    return model


def _forget_compiled_functions(model):
    """Drops traced train/predict/generate functions that still call the stock blocks."""
    for attribute in ("train_function", "test_function", "predict_function", "generate_function"):
        if getattr(model, attribute, None) is not None:
            setattr(model, attribute, None)


def unsparsify(model):
    """A stock keras-hub model (new object) holding the weights of a sparsified one.

    The result is what `sparsify` was given, with the current (e.g. trained) weights:
    `save_to_preset` writes a preset that stock keras-hub loads.

    Args:
        model: A sparsified `Backbone` or `CausalLM`.

    Returns:
        A stock `Backbone`, or a `CausalLM` of the same class around a stock backbone
        (with the same preprocessor).
    """
    backbone = _backbone_of(model)
    if type(backbone) not in _STOCK_BACKBONES:
        raise ValueError(f"{backbone.name} is not sparsified (its class is {type(backbone).__name__}).")
    stock_cls = _STOCK_BACKBONES[type(backbone)]
    config = backbone.get_config()
    config.pop("dl_moe_overrides")
    stock = stock_cls.from_config(config)

    adapter_cls = _FAMILIES[stock_cls]
    adapters = _find_blocks(backbone, (adapter_cls,))
    blocks = _find_blocks(stock, (adapter_cls.stock_block_class,))
    moe_layers_ = [adapter for _, _, adapter in adapters]
    moe_layers_ += [layer for parent, _, block in blocks for layer in adapter_cls.owned_stock_layers(parent, block)]
    moe_ids = {id(v) for layer in moe_layers_ for v in layer.weights}
    others = [v for v in backbone.weights if id(v) not in moe_ids]
    stock_others = [v for v in stock.weights if id(v) not in moe_ids]
    if len(others) != len(stock_others):
        raise ValueError(f"Weights do not line up: {len(others)} sparse vs {len(stock_others)} stock.")
    for source, target in zip(others, stock_others):
        if tuple(source.shape) != tuple(target.shape):
            raise ValueError(f"Weights do not line up: {source.path} {source.shape} vs {target.path} {target.shape}.")
        target.assign(source)
    for (_, _, adapter), (parent, _, block) in zip(adapters, blocks):
        adapter.write_stock_weights(block, parent)
    if isinstance(model, CausalLM):
        return type(model)(backbone=stock, preprocessor=model.preprocessor)
    return stock


def moe_layers(model):
    """The `MixtureOfExperts` layer of every sparsified block, in model order."""
    backbone = _backbone_of(model)
    return [adapter.moe for _, _, adapter in _find_blocks(backbone, tuple(_FAMILIES.values()))]


def expert_parallel_layout_map(device_mesh, expert_axis="expert", model_axis=None):
    """Layout map sharding a sparsified model's expert weights along `expert_axis`.

    Set it (`keras.distribution.ModelParallel(layout_map=...)`) before building the
    stock model and calling `sparsify(model, expert_parallel=True)`: the expert
    weights the adapters create are then laid out on the mesh. Everything else
    (attention, embeddings, routers) is replicated. See `dl_moe.distribution`.
    """
    from dl_moe.distribution import expert_parallel_layout_map as layout_map

    return layout_map(device_mesh, expert_axis=expert_axis, model_axis=model_axis)
