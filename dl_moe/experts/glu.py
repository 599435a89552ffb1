"""The gated units of GLU experts, with the derivatives a fused backward pass needs.

A GLU expert computes `hidden = unit(gate, up)` from its two projections and then
`hidden @ W_down`. Written as one operation (`grouped_matmul.grouped_gated_matmul`),
the `[rows, h]` hidden activations and their gradient exist one block at a time
instead of for every row; that operation recomputes `unit` and needs its derivatives,
which this module gives in closed form (checked against autodiff in the tests).
"""

import math

import keras
from keras import ops

GLU_GATE_ACTIVATIONS = {"swiglu": "silu", "geglu": "gelu"}
DEFAULT_GLU_ALPHA = 1.702
DEFAULT_GLU_LIMIT = 7.0
_GELU_TANH_C = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def gelu_tanh(x):
    """The tanh approximation of gelu (Gemma's `gelu(approximate=True)`)."""
    return keras.activations.gelu(x, approximate=True)


def _silu_derivative(x):
    s = ops.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _gelu_derivative(x):
    cdf = 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))
    return cdf + x * ops.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _gelu_tanh_derivative(x):
    t = ops.tanh(_GELU_TANH_C * (x + _GELU_TANH_CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_TANH_C * (1.0 + 3.0 * _GELU_TANH_CUBIC * x * x)


class GatedUnit:
    """`hidden = unit(gate, up)` of one GLU type, and its vector-Jacobian product.

    Args:
        ffn_type: "swiglu", "geglu", "geglu_tanh" or "clamped_swiglu".
        alpha: "clamped_swiglu"'s sigmoid scale (None: 1.702).
        limit: "clamped_swiglu"'s clamp limit (None: 7.0).
    """

    def __init__(self, ffn_type, alpha=None, limit=None):
        self.ffn_type = ffn_type
        self.alpha = DEFAULT_GLU_ALPHA if alpha is None else alpha
        self.limit = DEFAULT_GLU_LIMIT if limit is None else limit
        if ffn_type == "geglu_tanh":
            self._activation, self._derivative = gelu_tanh, _gelu_tanh_derivative
        elif ffn_type == "geglu":
            self._activation, self._derivative = keras.activations.gelu, _gelu_derivative
        elif ffn_type == "swiglu":
            self._activation, self._derivative = keras.activations.silu, _silu_derivative
        elif ffn_type != "clamped_swiglu":
            raise ValueError(
                f"ffn_type must be one of ['swiglu', 'geglu', 'geglu_tanh', 'clamped_swiglu'] "
                f"for a gated unit, got {ffn_type!r}."
            )

    def __call__(self, gate, up):
        """`[..., h]` hidden activations of `gate` and `up` (`[..., h]` each)."""
        if self.ffn_type == "clamped_swiglu":
            # GPT-OSS: (clip(up) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
            gate = ops.minimum(gate, self.limit)
            up = ops.clip(up, -self.limit, self.limit)
            return (up + 1.0) * gate * ops.sigmoid(self.alpha * gate)
        return self._activation(gate) * up

    def value_and_vjp(self, gate, up, grad_hidden):
        """`(hidden, d gate, d up)`, each `[..., h]`: `__call__`'s value and the vector-Jacobian
        product of `grad_hidden [..., h]` through it (one pass over `gate` and `up`)."""
        if self.ffn_type == "clamped_swiglu":
            # The clamps pass the gradient strictly inside their range (as autodiff of
            # minimum/clip does away from the limits themselves).
            clamped_gate = ops.minimum(gate, self.limit)
            clipped_up = ops.clip(up, -self.limit, self.limit)
            s = ops.sigmoid(self.alpha * clamped_gate)
            glu = clamped_gate * s
            grad_up = ops.where(ops.abs(up) < self.limit, grad_hidden * glu, 0.0)
            glu_derivative = s * (1.0 + self.alpha * clamped_gate * (1.0 - s))
            grad_gate = ops.where(gate < self.limit, grad_hidden * (clipped_up + 1.0) * glu_derivative, 0.0)
            return (clipped_up + 1.0) * glu, grad_gate, grad_up
        activated = self._activation(gate)
        return activated * up, grad_hidden * up * self._derivative(gate), grad_hidden * activated
