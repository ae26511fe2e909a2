"""The Numba CPU backend: numpy arrays in and out, kernels compiled on first use.

Kernels (one file each, forward and backward side by side):
    fast/numba_layernorm.py    LayerNorm: one pass for the statistics, one for the output
    fast/numba_gelu.py         GELU (tanh form through a vectorisable exp) and bias + GELU
    fast/numba_attention.py    causal attention with KV cache and padding mask, online softmax
    fast/numba_crossentropy.py softmax cross-entropy, probabilities made once
    fast/numba_common.py       threading layer, fastmath flags, exp32
`linear` is the reference's matmul, made one 2-D BLAS call: numpy multiplies a (B, T, Cin) stack
by a (Cin, Cout) matrix slice by slice, and in a decode step (T = 1) that reads the weight B
times; (B*T, Cin) @ (Cin, Cout) reads it once (B = 16: 1.8 against 3.3 ms for one block's four
matrices, measured on the project's 2-core machine). Its backward and `embedding` (a gather)
are the reference's.

Compilation: every kernel is `cache=True`, so the machine code is written next to the source
(`fast/__pycache__`) on first use and loaded from there afterwards; inputs are normalised to
C-contiguous float32 so each kernel has one signature. Importing this module compiles nothing.
"""

import numpy as np

from fast import numba_attention, numba_crossentropy, numba_gelu, numba_layernorm
from fast.numba_attention import attention_backward, attention_forward
from fast.numba_common import single_threaded
from fast.numba_crossentropy import crossentropy_backward, crossentropy_forward
from fast.numba_gelu import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward
from fast.numba_layernorm import layernorm_backward, layernorm_forward
from ref.ops import (  # noqa: F401  (re-exported: the backend contract)
    embedding_backward,
    embedding_forward,
    linear_backward,
)

__all__ = [
    "VARIANTS",
    "attention_backward",
    "attention_forward",
    "bias_gelu_backward",
    "bias_gelu_forward",
    "crossentropy_backward",
    "crossentropy_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
]


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray):
    """x (..., Cin), w (Cin, Cout), b (Cout,) -> (..., Cout); the reference's cache (x, w)."""
    x2 = x.reshape(-1, x.shape[-1])  # (N, Cin), N = B * T: a view when x is contiguous
    out = (x2 @ w + b).reshape(*x.shape[:-1], w.shape[1])  # (..., Cout)
    return out, (x, w)


def _with_serial(variants: dict) -> dict:
    """Each parallel variant, and the same kernels on one thread as the serial baseline."""
    out = {}
    for name, (fwd, bwd) in variants.items():
        out[name] = (fwd, bwd)
        out[f"{name}_1thread"] = (single_threaded(fwd), single_threaded(bwd))
    return out


# {op: {variant: (forward, backward)}}, swept by tests/test_backends.py and bench/
VARIANTS = {
    op: _with_serial(variants)
    for module in (numba_layernorm, numba_gelu, numba_attention, numba_crossentropy)
    for op, variants in module.VARIANTS.items()
}
