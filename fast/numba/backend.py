"""The Numba CPU backend: numpy arrays in and out, kernels compiled on first use.

Kernels (one file each, forward and backward side by side):
    fast/numba/layernorm.py    LayerNorm: one pass for the statistics, one for the output
    fast/numba/gelu.py         GELU (tanh form through a vectorisable exp) and bias + GELU
    fast/numba/attention.py    causal attention with KV cache and padding mask, online softmax
    fast/numba/crossentropy.py softmax cross-entropy, probabilities made once
    fast/numba/common.py       threading layer, fastmath flags, exp32
    fast/numba/flash.py        causal attention on BLAS tiles (prompts, training)
    fast/numba/quant.py        qlinear: linear layers on 16- and 8-bit weights (inference)
`attention` dispatches on shape: numba_flash (numpy BLAS on tiles, Numba online softmax) when
Tq >= 16 and Tk >= 256, numba_attention otherwise (decode steps and short prompts, where
numba_flash's fixed cost per call dominates; `python -m bench.tools.numba_flash_timing`).
`linear` and `embedding` are the reference's (one 2-D BLAS matmul; a gather), and so is
`dropout` (one numpy draw and multiply; ref/model.py calls the reference's on every backend).
`qlinear` (a quantized model's linear layers and LM head, ref/quant.py) is fast/numba/quant.py:
the row-invariant kernel for up to 64 rows, dequantized tiles and BLAS beyond.
`kv_store` (a forward's new keys and values into the KV cache) rounds a float16 cache in a
kernel, numpy's cast being one value at a time (fast/numba/attention.py).
`attention_rows_forward` (the server's decode step, ref/batching.py): R sequences, each over a
KV cache of its own, in one launch (fast/numba/attention.py).
Dropout on the attention probabilities: the fused kernels have none (their softmax never
materialises att), so `attention_forward` with dropout > 0 and an rng runs the reference's
attention (ref.ops), masks drawn as it draws them; without dropout it is the kernels'.

Compilation: every kernel is `cache=True`, so the machine code is written next to the source
(`fast/numba/__pycache__`) on first use and loaded from there afterwards; inputs are normalised
to C-contiguous float32 so each kernel has one signature. Importing this module compiles
nothing.
"""

import numpy as np

from fast.numba import attention as numba_attention
from fast.numba import crossentropy as numba_crossentropy
from fast.numba import flash as numba_flash
from fast.numba import gelu as numba_gelu
from fast.numba import layernorm as numba_layernorm
from fast.numba.attention import attention_rows_forward, kv_store
from fast.numba.common import single_threaded
from fast.numba.crossentropy import crossentropy_backward, crossentropy_forward
from fast.numba.gelu import bias_gelu_backward, bias_gelu_forward, gelu_backward, gelu_forward
from fast.numba.layernorm import layernorm_backward, layernorm_forward
from fast.numba.quant import qlinear_forward
from ref import ops as ref_ops
from ref.ops import (  # noqa: F401  (re-exported: the backend contract)
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
)

__all__ = [
    "ROW_INVARIANT",
    "VARIANTS",
    "attention_backward",
    "attention_forward",
    "attention_rows_forward",
    "bias_gelu_backward",
    "bias_gelu_forward",
    "crossentropy_backward",
    "crossentropy_forward",
    "dropout_backward",
    "dropout_forward",
    "embedding_backward",
    "embedding_forward",
    "gelu_backward",
    "gelu_forward",
    "kv_store",
    "layernorm_backward",
    "layernorm_forward",
    "linear_backward",
    "linear_forward",
    "qlinear_forward",
]


# Ops whose output row r, called on R rows, is the same bits as when row r is called alone:
# their kernels loop over rows with one body per row (LayerNorm, bias + GELU), for every R up
# to the serving batch's 64 (tests/test_serve_engine.py). ref/batching.py's decode step calls
# them once on all its rows instead of once per row.
ROW_INVARIANT = frozenset({"layernorm_forward", "bias_gelu_forward"})

# numba_flash for prompts and training; numba_attention for decode steps and tiny prompts
_FLASH_MIN_TQ = 16
_FLASH_MIN_TK = 256


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_mask=None,
    dropout: float = 0.0,
    rng: np.random.Generator | None = None,
):
    """numba_flash when Tq >= 16 and Tk >= 256, else numba_attention; the cache says which.
    With dropout > 0 and an rng (training with attention dropout): the reference's attention,
    the kernels having no dropout."""
    if rng is not None and ref_ops.check_rate(dropout) > 0.0:
        out, cache = ref_ops.attention_forward(q, k, v, key_mask, dropout, rng)
        return out, (ref_ops, cache)
    big = np.ndim(q) == 4 and np.ndim(k) == 4
    big = big and q.shape[2] >= _FLASH_MIN_TQ and k.shape[2] >= _FLASH_MIN_TK
    impl = numba_flash if big else numba_attention
    out, cache = impl.attention_forward(q, k, v, key_mask)
    return out, (impl, cache)


def attention_backward(dout: np.ndarray, cache):
    impl, inner = cache
    return impl.attention_backward(dout, inner)


def _with_serial(variants: dict) -> dict:
    """Each parallel variant, and the same kernels on one thread as the serial baseline."""
    out = {}
    for name, (fwd, bwd) in variants.items():
        out[name] = (fwd, bwd)
        out[f"{name}_1thread"] = (single_threaded(fwd), single_threaded(bwd))
    return out


def _variants(modules: tuple) -> dict:
    """{op: {variant: (forward, backward)}} of the kernel files, with their serial baselines,
    plus "numba_auto": the shape dispatch the model uses."""
    out: dict = {}
    for module in modules:
        for op, variants in module.VARIANTS.items():
            out.setdefault(op, {}).update(_with_serial(variants))
    out["attention"]["numba_auto"] = (attention_forward, attention_backward)
    return out


# swept by tests/test_backends.py and bench/
VARIANTS = _variants(
    (numba_layernorm, numba_gelu, numba_attention, numba_flash, numba_crossentropy)
)
