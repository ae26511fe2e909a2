"""GELU (tanh form) and the fused bias + GELU in Numba, forward and backward.

Shape legend: N = rows (leading axes flattened), D = features (4C in the MLP), n = elements,
P = partial sums.

Same formula as `ref.ops.gelu_forward`, u = sqrt(2/pi) (x + 0.044715 x^3), written through exp
because `np.tanh` in a Numba loop is a scalar call and exp32 (fast/numba/common.py) vectorises:
    tanh(u) = 1 - 2 / (exp(2u) + 1)   so   gelu(x) = 0.5 x (1 + tanh u) = x / (1 + exp(-2u))
and the derivative of the reference,
    gelu'(x) = 0.5 (1 + th) + 0.5 x (1 - th^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),
with th = (1 - e) / (1 + e), e = exp(-2u). exp32 clamps its input, so e stays finite and
th = -1 or 1 exactly far out on either side, as np.tanh gives.

bias_gelu: gelu(x + b) without materialising x + b in the forward; the cache keeps x and b, the
backward recomputes x + b, and db = sum_rows(dxb) goes through per-thread partial sums
(see fast/numba/layernorm.py) so no two threads add into one array.

Variants: "numba" (parallel, exp32). Limits: float32 only; inputs are made C-contiguous.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from fast.numba.common import FASTMATH, check_f32, exp32, n_partials

_S = np.float32(math.sqrt(2.0 / math.pi))  # GELU_SCALE of ref/ops.py
_A = np.float32(0.044715)
_A3 = np.float32(3.0 * 0.044715)
_M2S = np.float32(-2.0 * math.sqrt(2.0 / math.pi))
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)

# Below this many elements the forwards run on the calling thread: a parallel launch costs
# ~100 us here, more than a decode step's (B, 1, 4C) GELU takes serially (measured on the
# project's 2-core machine).
_SERIAL_BELOW = 2**17


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _gelu(x):
    # x / (1 + exp(-2u)), u = S (x + A x^3); x*x*x, never x**3 (a slow pow call)
    return x / (_ONE + exp32(_M2S * (x + _A * (x * x * x))))


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _gelu_grad(x):
    e = exp32(_M2S * (x + _A * (x * x * x)))  # exp(-2u)
    th = (_ONE - e) / (_ONE + e)  # tanh(u)
    du_dx = _S * (_ONE + _A3 * (x * x))
    return _HALF * (_ONE + th) + _HALF * x * (_ONE - th * th) * du_dx


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _gelu_forward_kernel(x, out):
    # x (n,) -> out (n,)
    for i in prange(x.shape[0]):
        out[i] = _gelu(x[i])


@numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _gelu_forward_serial_kernel(x, out):
    # the same on the calling thread (small inputs)
    for i in range(x.shape[0]):
        out[i] = _gelu(x[i])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _gelu_backward_kernel(dout, x, dx):
    # dout, x (n,) -> dx (n,)
    for i in prange(x.shape[0]):
        dx[i] = dout[i] * _gelu_grad(x[i])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bias_gelu_forward_kernel(x, b, out):
    # x (N, D), b (D,) -> out (N, D)
    N, D = x.shape
    for n in prange(N):
        for d in range(D):
            out[n, d] = _gelu(x[n, d] + b[d])


@numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _bias_gelu_forward_serial_kernel(x, b, out):
    # the same on the calling thread (small inputs)
    N, D = x.shape
    for n in range(N):
        for d in range(D):
            out[n, d] = _gelu(x[n, d] + b[d])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _bias_gelu_backward_kernel(dout, x, b, dxb, db_part):
    # dout, x (N, D), b (D,) -> writes dxb (N, D), db_part (P, D)
    N, D = x.shape
    P = db_part.shape[0]
    for p in prange(P):
        db_p = db_part[p]
        db_p[:] = 0.0
        for n in range(p * N // P, (p + 1) * N // P):
            for d in range(D):
                g = dout[n, d] * _gelu_grad(x[n, d] + b[d])
                dxb[n, d] = g
                db_p[d] += g


def gelu_forward(x: np.ndarray):
    """x (...) -> gelu(x) (...); cache (x,)."""
    x = check_f32("gelu", "x", x)
    out = np.empty_like(x)  # (...)
    kernel = _gelu_forward_serial_kernel if x.size < _SERIAL_BELOW else _gelu_forward_kernel
    kernel(x.reshape(-1), out.reshape(-1))
    return out, (x,)


def gelu_backward(dout: np.ndarray, cache):
    (x,) = cache
    dout = check_f32("gelu_backward", "dout", dout)
    if dout.shape != x.shape:
        raise ValueError(f"gelu_backward: dout {dout.shape} must match x {x.shape}")
    dx = np.empty_like(x)  # (...)
    _gelu_backward_kernel(dout.reshape(-1), x.reshape(-1), dx.reshape(-1))
    return dx


def bias_gelu_forward(x: np.ndarray, b: np.ndarray):
    """gelu(x + b): x (..., D), b (D,) -> (..., D); cache (x, b)."""
    x = check_f32("bias_gelu", "x", x)
    b = check_f32("bias_gelu", "b", b)
    D = x.shape[-1]
    if b.shape != (D,):
        raise ValueError(f"bias_gelu: x (..., {D}) needs b of shape ({D},), got {b.shape}")
    out = np.empty_like(x)  # (..., D)
    small = x.size < _SERIAL_BELOW
    kernel = _bias_gelu_forward_serial_kernel if small else _bias_gelu_forward_kernel
    kernel(x.reshape(-1, D), b, out.reshape(-1, D))
    return out, (x, b)


def bias_gelu_backward(dout: np.ndarray, cache):
    """dout (..., D) -> dxb (..., D) (the gradient of x, and of x + b), db (D,)."""
    x, b = cache
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # (N, D)
    dout2 = check_f32("bias_gelu_backward", "dout", dout).reshape(x2.shape)  # (N, D)
    dxb = np.empty_like(x2)  # (N, D)
    db_part = np.zeros((n_partials(x2.shape[0]), D), np.float32)  # (P, D)
    _bias_gelu_backward_kernel(dout2, x2, b, dxb, db_part)
    return dxb.reshape(x.shape), db_part.sum(axis=0)


VARIANTS = {
    "gelu": {"numba": (gelu_forward, gelu_backward)},
    "bias_gelu": {"numba": (bias_gelu_forward, bias_gelu_backward)},
}
