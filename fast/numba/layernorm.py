"""LayerNorm in Numba: forward in two passes over each row, backward with per-thread partials.

Shape legend: N = rows (the leading axes of x flattened), C = channels, P = partial sums.

Forward (`ref.ops.layernorm_forward`, same symbols): per row, one pass for the statistics and
one for the output. The statistics come from shifted sums, K = x[0] of the row:
    s1 = sum(x - K),  s2 = sum((x - K)^2),  mean = K + s1 / C,  var = (s2 - s1^2 / C) / C
which is exact algebra; the shift keeps the cancellation in s2 - s1^2/C small because K is a
sample of the row, so |mean - K| is of the order of the row's spread (unshifted sums lose
digits on rows whose mean is large against their spread: tests/test_backends.py checks rows
offset by -50).
The cache keeps x, mean and rstd (N,) instead of the (N, C) xhat the reference keeps, so the
forward writes only its output; the backward recomputes xhat = (x - mean) * rstd.

Backward: dx row by row as in the reference,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dout * g,
and dg = sum_rows(dout * xhat), db = sum_rows(dout) through P = n_partials(N) partial sums,
one per contiguous block of rows (each written by exactly one thread), added after the
parallel loop, so the result is the same bit for bit on every run.

Variants: "numba" (parallel over rows). Limits: float32 only; x is made C-contiguous.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from fast.numba.common import FASTMATH, check_f32, n_partials

# Below this many elements (N * C) the forward runs on the calling thread: a parallel launch
# costs ~100 us here, while a serial row of 768 takes ~0.5 us; a decode step calls LayerNorm
# 25 times on (B, 1, C) (measured on the project's 2-core machine).
_SERIAL_BELOW = 2**17


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _layernorm_row(x, g, b, eps, out, mean, rstd, n):
    # row n of x (N, C) -> out[n], mean[n], rstd[n]; statistics shifted by x[n, 0], which keeps
    # the one-pass variance accurate when the mean is large against the spread
    C = x.shape[1]
    inv_c = np.float32(1.0) / np.float32(C)
    K = x[n, 0]
    s1 = np.float32(0.0)
    s2 = np.float32(0.0)
    for c in range(C):
        d = x[n, c] - K
        s1 += d
        s2 += d * d
    m = K + s1 * inv_c
    var = max((s2 - s1 * s1 * inv_c) * inv_c, np.float32(0.0))
    r = np.float32(1.0) / np.sqrt(var + eps)
    for c in range(C):
        out[n, c] = (x[n, c] - m) * r * g[c] + b[c]
    mean[n] = m
    rstd[n] = r


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _layernorm_forward_kernel(x, g, b, eps, out, mean, rstd):
    # x (N, C), g (C,), b (C,), eps float32 -> writes out (N, C), mean (N,), rstd (N,)
    for n in prange(x.shape[0]):
        _layernorm_row(x, g, b, eps, out, mean, rstd, n)


@numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _layernorm_forward_serial_kernel(x, g, b, eps, out, mean, rstd):
    # the same rows on the calling thread (small inputs)
    for n in range(x.shape[0]):
        _layernorm_row(x, g, b, eps, out, mean, rstd, n)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _layernorm_backward_kernel(dout, x, mean, rstd, g, dx, dg_part, db_part):
    # dout, x (N, C), mean, rstd (N,), g (C,) -> writes dx (N, C), dg_part, db_part (P, C)
    N, C = x.shape
    P = dg_part.shape[0]
    inv_c = np.float32(1.0) / np.float32(C)
    for p in prange(P):
        dg_p = dg_part[p]
        db_p = db_part[p]
        dg_p[:] = 0.0
        db_p[:] = 0.0
        for n in range(p * N // P, (p + 1) * N // P):
            m = mean[n]
            r = rstd[n]
            sum_dxhat = np.float32(0.0)
            sum_dxhat_xhat = np.float32(0.0)
            for c in range(C):
                xhat = (x[n, c] - m) * r
                dxhat = dout[n, c] * g[c]
                sum_dxhat += dxhat
                sum_dxhat_xhat += dxhat * xhat
                dg_p[c] += dout[n, c] * xhat
                db_p[c] += dout[n, c]
            mean_dxhat = sum_dxhat * inv_c
            mean_dxhat_xhat = sum_dxhat_xhat * inv_c
            for c in range(C):
                xhat = (x[n, c] - m) * r
                dx[n, c] = r * (dout[n, c] * g[c] - mean_dxhat - xhat * mean_dxhat_xhat)


def layernorm_forward(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5):
    """x (..., C), g (C,), b (C,) -> out (..., C); cache (x, mean, rstd, g)."""
    x = check_f32("layernorm", "x", x)
    g = check_f32("layernorm", "g", g)
    b = check_f32("layernorm", "b", b)
    C = x.shape[-1]
    if g.shape != (C,) or b.shape != (C,):
        raise ValueError(
            f"layernorm: x (..., {C}) needs g, b of shape ({C},), got {g.shape}, {b.shape}"
        )
    x2 = x.reshape(-1, C)  # (N, C)
    N = x2.shape[0]
    out = np.empty((N, C), np.float32)  # (N, C)
    mean = np.empty(N, np.float32)  # (N,)
    rstd = np.empty(N, np.float32)  # (N,)
    if N:
        small = N * C < _SERIAL_BELOW
        kernel = _layernorm_forward_serial_kernel if small else _layernorm_forward_kernel
        kernel(x2, g, b, np.float32(eps), out, mean, rstd)
    return out.reshape(x.shape), (x2, mean, rstd, g, x.shape)


def layernorm_backward(dout: np.ndarray, cache):
    """dout (..., C) -> dx (..., C), dg (C,), db (C,)."""
    x2, mean, rstd, g, shape = cache
    N, C = x2.shape
    dout2 = check_f32("layernorm_backward", "dout", dout).reshape(N, C)  # (N, C)
    dx = np.empty((N, C), np.float32)  # (N, C)
    P = n_partials(N)
    dg_part = np.zeros((P, C), np.float32)  # (P, C)
    db_part = np.zeros((P, C), np.float32)  # (P, C)
    if N:
        _layernorm_backward_kernel(dout2, x2, mean, rstd, g, dx, dg_part, db_part)
    # numpy's sum over P is sequential per column and the same on every run
    return dx.reshape(shape), dg_part.sum(axis=0), db_part.sum(axis=0)


VARIANTS = {"layernorm": {"numba": (layernorm_forward, layernorm_backward)}}
