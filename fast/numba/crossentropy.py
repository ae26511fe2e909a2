"""Softmax cross-entropy in Numba, forward and backward, with ignore_index.

Shape legend: N = rows (B * T), V = vocabulary.

Same definitions as `ref.ops.crossentropy_forward`:
    loss = mean over valid rows of (lse_n - logits[n, t_n]),  lse_n = logsumexp(logits[n])
    dlogits[n] = (softmax(logits[n]) - onehot(t_n)) * dloss / count,  0 on ignored rows
The reference forms exp(logits - max) as an (N, V) matrix in the forward and again in the
backward. Here the forward reads each row twice (max, then sum of exp32) and keeps only
lse (N,); the backward writes dlogits in one pass, so the (N, V) probability matrix is made
once, directly as the gradient. Ignored rows are skipped in the forward's exp pass.
The row maxima come from numpy's `max(axis=1)`: LLVM does not vectorise a float max reduction
in a Numba loop (it would need no-NaN semantics), so the scalar loop made the forward slower
(figures in bench/README.md); numpy's max is SIMD and propagates NaN.

Variants: "numba" (parallel over rows). Limits: float32 logits (made C-contiguous), integer
targets; a target outside [0, V) that is not ignore_index is refused by name.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from fast.numba.common import FASTMATH, check_f32, exp32

_ZERO = np.float32(0.0)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _crossentropy_forward_kernel(logits, targets, valid, row_max, lse, losses):
    # logits (N, V), targets (N,) int64, valid (N,) bool, row_max (N,)
    # -> writes lse (N,), losses (N,)
    N, V = logits.shape
    for n in prange(N):
        if not valid[n]:
            lse[n] = _ZERO
            losses[n] = _ZERO
            continue
        m = row_max[n]
        s = _ZERO
        for j in range(V):
            s += exp32(logits[n, j] - m)
        lse[n] = m + np.log(s)
        losses[n] = lse[n] - logits[n, targets[n]]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _crossentropy_backward_kernel(logits, targets, valid, lse, scale, dlogits):
    # logits (N, V), targets (N,), valid (N,), lse (N,), scale float32 -> writes dlogits (N, V)
    N, V = logits.shape
    for n in prange(N):
        if not valid[n]:
            dlogits[n, :] = 0.0
            continue
        L = lse[n]
        for j in range(V):
            dlogits[n, j] = exp32(logits[n, j] - L) * scale
        dlogits[n, targets[n]] -= scale


def crossentropy_forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100):
    """logits (N, V) float32, targets (N,) int -> loss (float32 scalar)."""
    logits = check_f32("crossentropy", "logits", logits)
    targets = np.asarray(targets)
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"crossentropy: logits must be (N, V) and targets (N,); "
            f"got {logits.shape} and {targets.shape}"
        )
    if targets.dtype.kind not in "iu":
        raise TypeError(f"crossentropy: targets must be integers, got {targets.dtype}")
    N, V = logits.shape
    valid = targets != ignore_index  # (N,)
    bad = valid & ((targets < 0) | (targets >= V))
    if bad.any():
        raise ValueError(
            f"crossentropy: target {targets[bad][0]} is outside [0, {V}) and is not "
            f"ignore_index={ignore_index}"
        )
    safe = np.where(valid, targets, 0).astype(np.int64)  # (N,)
    count = max(int(valid.sum()), 1)
    lse = np.zeros(N, np.float32)  # (N,)
    losses = np.zeros(N, np.float32)  # (N,)
    if N and V:
        row_max = logits.max(axis=1)  # (N,)
        _crossentropy_forward_kernel(logits, safe, valid, row_max, lse, losses)
    loss = np.float32(losses.sum(dtype=np.float32) / count)
    return loss, (logits, safe, valid, lse, count)


def crossentropy_backward(dloss, cache):
    """dloss scalar -> dlogits (N, V)."""
    logits, safe, valid, lse, count = cache
    dlogits = np.empty(logits.shape, np.float32)  # (N, V)
    if logits.shape[0]:
        scale = np.float32(np.float32(dloss) / count)
        _crossentropy_backward_kernel(logits, safe, valid, lse, scale, dlogits)
    return dlogits


VARIANTS = {"crossentropy": {"numba": (crossentropy_forward, crossentropy_backward)}}
