"""Plain numpy reference of the MoE computations, written from the documented rules.

Loops over tokens and assignments instead of sorting and gathering, so it shares no
code (and no bug) with the package's vectorised dispatch.
"""

import math

import numpy as np

try:
    from scipy.special import erf as _erf
except ImportError:  # scipy is an optional extra
    _erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def silu(x):
    return x / (1.0 + np.exp(-x))


ACTIVATIONS = {"gelu": gelu, "silu": silu, "relu": lambda x: np.maximum(x, 0.0)}


def softmax(x, axis=-1):
    z = x - x.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def logsumexp(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def l2_normalize(x, axis=-1):
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-6)


def weights_of(layer):
    """{short name: numpy value} for a layer's variables (e.g. 'router_kernel')."""
    from keras import ops

    return {v.path.split("/")[-1]: np.asarray(ops.convert_to_numpy(v)) for v in layer.weights}


def ffn_expert(w, e, x, ffn_type, activation="gelu", use_bias=True):
    """Expert e of an FFN bank on rows x `[n, d]`."""
    b = (lambda name: w[name][e]) if use_bias else (lambda name: 0.0)
    up = x @ w["up_kernel"][e] + b("up_bias")
    if ffn_type == "mlp":
        hidden = ACTIVATIONS[activation](up)
    else:
        gate = x @ w["gate_kernel"][e] + b("gate_bias")
        hidden = (silu(gate) if ffn_type == "swiglu" else gelu(gate)) * up
    return hidden @ w["down_kernel"][e] + b("down_bias")


def capacity(num_tokens, top_k, num_experts, factor):
    raw = math.ceil(factor * num_tokens * top_k / num_experts)
    return max(8, -(-raw // 8) * 8)


def assign_with_capacity(indices, active, num_experts, cap):
    """kept[t, j] following the documented priority: choice rank, then token order."""
    num_tokens, top_k = indices.shape
    load = np.zeros(num_experts, dtype=int)
    kept = np.zeros_like(active, dtype=bool)
    for j in range(top_k):
        for t in range(num_tokens):
            if not active[t, j]:
                continue
            e = indices[t, j]
            if cap is None or load[e] < cap:
                kept[t, j] = True
            load[e] += 1
    return kept, load


def top_k_decision(probs, top_k, normalize):
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, order, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights, order


def token_choice_moe(
    x,
    w,
    *,
    num_experts,
    top_k,
    gating="linear",
    ffn_type="mlp",
    activation="gelu",
    use_bias=True,
    normalize=False,
    temperature=1.0,
    cap=None,
    residual=True,
    mask=None,
):
    """Reference token-choice MoE on x `[T, d]`.

    Returns:
        dict with `out [T, o]`, `probs`, `logits`, `indices`, `weights`, `kept`,
        `load` (routed assignments per expert) and `fully_dropped [T]`.
    """
    num_tokens = x.shape[0]
    if gating == "linear":
        logits = (x @ w["router_kernel"]) / temperature
    elif gating == "cosine":
        scale = min(math.exp(float(w["log_logit_scale"])), 100.0)
        logits = l2_normalize(x @ w["proj_kernel"]) @ l2_normalize(w["expert_embeddings"]).T * scale
    else:
        raise ValueError(gating)
    probs = softmax(logits)
    weights, indices = top_k_decision(probs, top_k, normalize)
    active = np.ones_like(indices, dtype=bool)
    if mask is not None:
        active &= mask[:, None]
    kept, load = assign_with_capacity(indices, active, num_experts, cap)
    out_dim = w["down_kernel"].shape[-1]
    out = np.zeros((num_tokens, out_dim))
    for e in range(num_experts):
        tokens, slots = np.nonzero(kept & (indices == e))  # each kept assignment to e
        if len(tokens):
            rows = ffn_expert(w, e, x[tokens], ffn_type, activation, use_bias)
            np.add.at(out, tokens, weights[tokens, slots][:, None] * rows)
    fully_dropped = active.any(-1) & ~kept.any(-1)
    if residual and out_dim == x.shape[1]:
        out[fully_dropped] = x[fully_dropped]
    if mask is not None:
        out[~mask] = 0.0
    return {
        "out": out,
        "probs": probs,
        "logits": logits,
        "indices": indices,
        "weights": weights,
        "kept": kept,
        "load": load,
        "fully_dropped": fully_dropped,
    }


def switch_aux_loss(probs, load, mask=None):
    num_experts = probs.shape[-1]
    real = probs if mask is None else probs[mask]
    return num_experts * np.sum(load / load.sum() * real.mean(0))


def z_loss(logits, mask=None):
    real = logits if mask is None else logits[mask]
    return np.mean(logsumexp(real) ** 2)


def soft_moe(x, w, *, num_experts, num_slots, ffn_type="mlp", activation="gelu", use_bias=True, mask=None):
    """Reference Soft MoE on x `[B, S, d]` (mask `[B, S]`)."""
    batch, seq, _ = x.shape
    slots_param = l2_normalize(w["slot_embeddings"], axis=0)
    out_dim = w["down_kernel"].shape[-1]
    out = np.zeros((batch, seq, out_dim))
    for b in range(batch):
        logits = l2_normalize(x[b]) @ slots_param * float(w["scale"])  # [S, E*P]
        dispatch_logits = logits.copy()
        if mask is not None:
            dispatch_logits[~mask[b]] = -np.inf
        dispatch = softmax(dispatch_logits, axis=0)
        combine = softmax(logits, axis=1)
        slots = dispatch.T @ x[b]  # [E*P, d]
        slot_out = np.concatenate(
            [
                ffn_expert(w, e, slots[e * num_slots : (e + 1) * num_slots], ffn_type, activation, use_bias)
                for e in range(num_experts)
            ]
        )
        out[b] = combine @ slot_out
        if mask is not None:
            out[b][~mask[b]] = 0.0
    return out
