"""Block-grouped matmul: row blocks times the stacked weights of each block's expert.

Rows arrive as blocks `[G, b, a]`, each block owned by one expert, the blocks of an
expert consecutive (the layout of `dispatch.plan_dropless_dispatch`). The product is

    out[g] = x[g] @ w[owner(g)]        w: `[E, a, c]` stacked expert weights

computed by a loop over the experts that own blocks, and inside it a loop over their
blocks. The loop reads one expert's weights at a time: under XLA a slice of a weight
tensor is a copy, so the temporaries hold one expert's matrix, never one per block
(gathering `w[group_expert]` would hold G copies, and keep them for the backward pass).
The gradient is written by hand with the same two loops, so autodiff never runs
through a loop and keeps nothing per block: the backward pass reads each expert's
weights once more and accumulates each expert's weight gradient in place.

Every loop trip count is data-dependent (experts with no rows are skipped entirely,
so a decoding step reads only the experts it routes to), which is why the loops are
`while_loop`s: they compile under XLA on JAX and TensorFlow and run as Python loops in
eager PyTorch.

`grouped_gated_matmul` is the same product for a GLU's down projection with the gated
unit folded in: `out[g] = unit(gate[g], up[g]) @ w[owner(g)]`, so the hidden
activations and their gradient exist one block at a time.
"""

from typing import NamedTuple

import keras
from keras import ops


class ExpertBlocks(NamedTuple):
    """Which blocks of `[G, b, ...]` rows each expert owns.

    Attributes:
        block_start: `[E]` int32 first block of each expert.
        block_count: `[E]` int32 blocks of each expert (0 for an expert with no rows).
        touched: `[E]` int32 experts with blocks first (ascending), then the others.
        num_touched: Scalar int32, experts with at least one block.
    """

    block_start: object
    block_count: object
    touched: object
    num_touched: object


def expert_blocks(rows_per_expert, block_size):
    """The `ExpertBlocks` of experts holding `rows_per_expert [E]` rows in blocks of `block_size`.

    Expert e's rows are padded to whole blocks and the experts' blocks follow each
    other in expert order (`dispatch.plan_dropless_dispatch`'s layout).
    """
    counts = ops.cast(rows_per_expert, "int32")
    block_count = (counts + block_size - 1) // block_size  # [E]
    block_start = ops.cumsum(block_count) - block_count  # [E]
    num_experts = counts.shape[0]
    # Unique keys: idle experts sort after the touched ones, each group in expert order.
    key = ops.where(block_count > 0, 0, num_experts) + ops.arange(num_experts, dtype="int32")
    touched = ops.cast(ops.argsort(key), "int32")
    num_touched = ops.sum(ops.cast(block_count > 0, "int32"))
    return ExpertBlocks(block_start, block_count, touched, num_touched)


def _block(x, g):
    """Block `g` of `[G, b, a]` as `[b, a]` (a dynamic slice; also expert g of `[E, a, c]`)."""
    return ops.slice(x, (g, 0, 0), (1,) + tuple(x.shape[1:]))[0]


def _put_block(x, g, value):
    """`x [G, b, a]` with block `g` replaced by `value [b, a]` (in place under XLA)."""
    return ops.slice_update(x, (g, 0, 0), ops.expand_dims(value, 0))


def _expert(w, e, dtype):
    """Expert `e`'s matrix `[a, c]` of the stacked `w [E, a, c]`, cast to `dtype`."""
    return ops.cast(ops.slice(w, (e, 0, 0), (1,) + tuple(w.shape[1:]))[0], dtype)


def _loop_experts(blocks, expert_body, state):
    """`state = expert_body(e, state)` for every expert e that owns blocks."""

    def cond(i, state):
        return i < blocks.num_touched

    def body(i, state):
        expert = ops.take(blocks.touched, i)
        return i + 1, expert_body(expert, state)

    return ops.while_loop(cond, body, (ops.convert_to_tensor(0, "int32"), state))[1]


def _loop_blocks(blocks, expert, block_body, state):
    """`state = block_body(g, state)` for each block g of `expert`."""
    first = ops.take(blocks.block_start, expert)
    count = ops.take(blocks.block_count, expert)

    def cond(j, state):
        return j < count

    def body(j, state):
        return j + 1, block_body(first + j, state)

    return ops.while_loop(cond, body, (ops.convert_to_tensor(0, "int32"), state))[1]


def _forward(x, ws, blocks):
    """`[x[g] @ w[owner(g)] for w in ws]`, each `[G, b, c_i]`.

    One loop per weight, so a single expert matrix is in flight at a time.
    """
    groups = ops.shape(x)[:2]  # G may be known only at run time (TF graphs)
    outs = []
    for w in ws:

        def expert_body(expert, out, w=w):
            w_e = _expert(w, expert, x.dtype)  # [a, c]: the one weight copy in flight

            def block_body(g, out):
                return _put_block(out, g, ops.matmul(_block(x, g), w_e))

            return _loop_blocks(blocks, expert, block_body, out)

        out = ops.zeros(tuple(groups) + (w.shape[-1],), dtype=x.dtype)
        outs.append(_loop_experts(blocks, expert_body, out))
    return tuple(outs)


def _backward(x, ws, blocks, upstreams):
    """`(d x [G, b, a], [d w [E, a, c_i]])` of `_forward` for the cotangents `upstreams [G, b, c_i]`.

    One loop per weight (one expert matrix in flight at a time); the weights sharing
    `x` add their input gradients into one `[G, b, a]` buffer, and each block adds its
    weight gradient into its expert's slice of `d w` in place, so no per-expert
    accumulator is held beside it.
    """
    dtype = upstreams[0].dtype
    grad_x = ops.zeros_like(x, dtype=dtype)
    grad_ws = []
    for index, (w, upstream) in enumerate(zip(ws, upstreams)):

        def expert_body(expert, grads, w=w, upstream=upstream, first=index == 0):
            w_e = _expert(w, expert, dtype)  # [a, c]

            def block_body(g, grads):
                grad_x, grad_w = grads
                dy = _block(upstream, g)  # [b, c]
                grad_x_g = ops.matmul(dy, ops.transpose(w_e))
                grad_x = _put_block(grad_x, g, grad_x_g if first else _block(grad_x, g) + grad_x_g)
                grad_w_g = ops.cast(ops.matmul(ops.transpose(_block(x, g)), dy), grad_w.dtype)
                grad_w = _put_block(grad_w, expert, _block(grad_w, expert) + grad_w_g)
                return grad_x, grad_w

            return _loop_blocks(blocks, expert, block_body, grads)

        grad_w = ops.zeros(tuple(w.shape), dtype=w.dtype)
        grad_x, grad_w = _loop_experts(blocks, expert_body, (grad_x, grad_w))
        grad_ws.append(grad_w)
    return grad_x, tuple(grad_ws)


def _read(w):
    """The value of `w` (a variable or a tensor) as a plain tensor.

    On TensorFlow `keras.ops.convert_to_tensor` passes a variable through, and a
    `tf.custom_gradient` function that reads a variable must return that variable's
    gradient separately; reading it first makes it an ordinary input.
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(getattr(w, "value", w))
    return ops.convert_to_tensor(w)


def grouped_matmul(x, weights, blocks):
    """`out[g] = x[g] @ w[owner(g)]` for each stacked `w` of `weights`, on the blocks each
    expert owns (blocks no expert owns: zeros).

    Args:
        x: `[G, b, a]` row blocks.
        weights: A tuple of stacked expert matrices `[E, a, c_i]` that all multiply `x`
            (e.g. a GLU's gate and up kernels: the backward pass then sums their input
            gradients in one buffer). Any dtype: a block's product casts its expert's
            matrix to `x`'s dtype (e.g. int8 kernels); integer weights get no gradient.
        blocks: `ExpertBlocks` of the G blocks.

    Returns:
        A tuple of `[G, b, c_i]` in `x`'s dtype, one per weight.
    """
    weights = tuple(_read(w) for w in weights)
    if len(weights) > 1 and keras.backend.backend() == "torch":
        # Keras's torch custom_gradient passes a single upstream gradient, so each
        # weight gets its own product there (the input gradients add up in autograd).
        return tuple(grouped_matmul(x, (w,), blocks)[0] for w in weights)
    num_weights = len(weights)

    @ops.custom_gradient
    def product(x, *args):
        ws, owned = args[:num_weights], ExpertBlocks(*args[num_weights:])

        def grad(*grad_args, upstream=None):
            grad_x, grad_ws = _backward(x, ws, owned, _upstreams(grad_args, upstream))
            return (grad_x,) + tuple(_weight_grad(g, w) for g, w in zip(grad_ws, ws)) + (None,) * 4

        return _forward(x, ws, owned), grad

    return product(x, *weights, *blocks)


def _upstreams(grad_args, upstream):
    """The cotangents of a `keras.ops.custom_gradient` function's outputs, as a tuple.

    Keras passes them as one tuple (JAX), one positional argument each (TF) or
    `upstream=` (torch).
    """
    if upstream is None:
        upstream = grad_args[0] if len(grad_args) == 1 else grad_args
    return tuple(upstream) if isinstance(upstream, (tuple, list)) else (upstream,)


def _weight_grad(grad, w):
    """`grad`, or None for integer (quantized) weights, which take no gradient."""
    return grad if "float" in str(w.dtype) else None


def _gated_forward(gate, up, w, blocks, unit):
    """`[G, b, c]`: `unit(gate[g], up[g]) @ w[owner(g)]`, the hidden rows one block at a time."""
    out = ops.zeros(tuple(ops.shape(gate)[:2]) + (w.shape[-1],), dtype=gate.dtype)

    def expert_body(expert, out):
        w_e = _expert(w, expert, gate.dtype)  # [h, c]

        def block_body(g, out):
            hidden = unit(_block(gate, g), _block(up, g))  # [b, h]
            return _put_block(out, g, ops.matmul(hidden, w_e))

        return _loop_blocks(blocks, expert, block_body, out)

    return _loop_experts(blocks, expert_body, out)


def _gated_backward(gate, up, w, blocks, unit, upstream):
    """`(d gate, d up, d w)` of `_gated_forward` for the cotangent `upstream [G, b, c]`.

    Each block recomputes its hidden rows from `gate` and `up` (elementwise, no matmul)
    and turns `upstream`'s block into its `[b, h]` hidden gradient and from it the
    gate and up gradients.
    """
    dtype = upstream.dtype

    def expert_body(expert, grads):
        w_e = _expert(w, expert, dtype)  # [h, c]

        def block_body(g, grads):
            grad_gate, grad_up, grad_w = grads
            gate_g, up_g, dy = _block(gate, g), _block(up, g), _block(upstream, g)
            grad_hidden = ops.matmul(dy, ops.transpose(w_e))  # [b, h]
            hidden, grad_gate_g, grad_up_g = unit.value_and_vjp(gate_g, up_g, grad_hidden)
            grad_w_g = ops.cast(ops.matmul(ops.transpose(hidden), dy), grad_w.dtype)
            return (
                _put_block(grad_gate, g, ops.cast(grad_gate_g, grad_gate.dtype)),
                _put_block(grad_up, g, ops.cast(grad_up_g, grad_up.dtype)),
                _put_block(grad_w, expert, _block(grad_w, expert) + grad_w_g),
            )

        return _loop_blocks(blocks, expert, block_body, grads)

    grads = (ops.zeros_like(gate, dtype=dtype), ops.zeros_like(up, dtype=dtype), ops.zeros(tuple(w.shape), w.dtype))
    return _loop_experts(blocks, expert_body, grads)


def grouped_gated_matmul(gate, up, weight, blocks, unit):
    """`out[g] = unit(gate[g], up[g]) @ w[owner(g)]`: a GLU's down projection on the
    blocks each expert owns (blocks no expert owns: zeros).

    The `[G, b, h]` hidden activations are never stored whole: the forward pass makes
    them one block at a time, and the backward pass recomputes a block's from `gate`
    and `up` (elementwise work) and passes its gradient on through `unit.value_and_vjp`, so a
    training step holds `gate`, `up` and their gradients, not also the hidden
    activations and theirs.

    Args:
        gate: `[G, b, h]` gate projections of the row blocks.
        up: `[G, b, h]` up projections.
        weight: `[E, h, c]` stacked down-projection matrices (any dtype, as in
            `grouped_matmul`; integer weights get no gradient).
        blocks: `ExpertBlocks` of the G blocks.
        unit: The gated unit: `unit(gate, up)` and `unit.value_and_vjp(gate, up, d_hidden)`
            (`dl_moe.experts.glu.GatedUnit`).

    Returns:
        `[G, b, c]` in `gate`'s dtype.
    """

    @ops.custom_gradient
    def product(gate, up, w, *owned):
        owned = ExpertBlocks(*owned)

        def grad(*grad_args, upstream=None):
            (upstream,) = _upstreams(grad_args, upstream)
            grad_gate, grad_up, grad_w = _gated_backward(gate, up, w, owned, unit, upstream)
            return (grad_gate, grad_up, _weight_grad(grad_w, w)) + (None,) * 4

        return _gated_forward(gate, up, w, owned, unit), grad

    return product(gate, up, _read(weight), *blocks)
