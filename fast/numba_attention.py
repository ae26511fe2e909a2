"""Causal attention in Numba with online softmax: prompt, decode step and training in one kernel.

Shape legend: B = batch, NH = heads, Tq = queries, Tk = keys (Tk >= Tq, the cache included),
hs = head size, K = keys per block (_BLOCK).

The semantics are `ref.ops.attention_forward`'s: query i sits at absolute position Tk - Tq + i
and sees keys j <= Tk - Tq + i whose key_mask[b, j] is True; a query that sees no key outputs 0.

Forward, per (b, h) and query row i (one thread owns a whole (b, h), so no two threads write
the same output): keys are visited in blocks of K. For each block the scores
s_j = (q_i * scale) . k_j are computed against a transposed copy kT (hs, Tk) of k[b, h], so the
inner loop runs over contiguous keys and vectorises; then the online softmax
(Milakov and Gimelshein 2018) keeps a running maximum m, a running sum l = sum_j exp(s_j - m)
and an accumulator acc = sum_j exp(s_j - m) v_j, rescaling l and acc by exp(m_old - m_new)
when a block raises the maximum. At the end out_i = acc / l and lse_i = m + log(l). Memory per
thread is O(K + hs + Tk hs); the (Tq, Tk) score matrix of the reference is never formed.

Backward (the reference's formulas, recomputing att instead of reading it):
    p_ij = exp(s_ij - lse_i)                       (att, 0 where masked)
    dv_j += p_ij dout_i;   dp_ij = dout_i . v_j
    ds_ij = p_ij (dp_ij - D_i),  D_i = sum_j p_ij dp_ij = dout_i . out_i
    dq_i += ds_ij k_j scale;   dk_j += ds_ij q_i scale
The cache keeps q, k, v, the mask, out and lse (B, NH, Tq): O(T) per row, not (Tq, Tk).
A row with lse = -inf saw no key and gets no gradient. dk, dv of (b, h) are written only by the
thread that owns (b, h), in a fixed order, so gradients are bit-identical from run to run.

Variants: "numba" (parallel over B * NH). Limits: float32; q, k, v are made C-contiguous (a
copy when the model passes a view of its KV cache or of qkv: O(Tk hs) per head, small next to
the O(Tq Tk hs) of the attention itself).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from fast.numba_common import FASTMATH, check_f32, exp32

_BLOCK = 64  # K: 64 float32 scores are four 512-bit registers; small enough to stay in L1
_NEG_INF = np.float32(-np.inf)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _transpose_head(a, b, h, aT):
    # a (B, NH, Tk, hs) -> aT (hs, Tk) = a[b, h].T
    Tk, hs = a.shape[2], a.shape[3]
    for j in range(Tk):
        for c in range(hs):
            aT[c, j] = a[b, h, j, c]


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _block_scores(qi, kT, j0, nb, s):
    # s[jj] = qi . kT[:, j0 + jj] for jj < nb: qi (hs,), kT (hs, Tk), s (K,)
    s[:nb] = 0.0
    for c in range(qi.shape[0]):
        qc = qi[c]
        for jj in range(nb):
            s[jj] += qc * kT[c, j0 + jj]


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_forward_kernel(q, k, v, key_mask, out, lse):
    # q (B, NH, Tq, hs), k, v (B, NH, Tk, hs), key_mask (B, Tk) bool
    # -> writes out (B, NH, Tq, hs), lse (B, NH, Tq)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    scale = _ONE / np.sqrt(np.float32(hs))
    for bh in prange(B * NH):
        b = bh // NH
        h = bh - b * NH
        kT = np.empty((hs, Tk), np.float32)  # (hs, Tk)
        _transpose_head(k, b, h, kT)
        s = np.empty(_BLOCK, np.float32)  # (K,) scores, then probabilities, of one block
        acc = np.empty(hs, np.float32)  # (hs,)
        qi = np.empty(hs, np.float32)  # (hs,)
        for i in range(Tq):
            last = Tk - Tq + i  # the last key query i may see
            for c in range(hs):
                qi[c] = q[b, h, i, c] * scale
            m = _NEG_INF
            l = _ZERO
            acc[:] = 0.0
            for j0 in range(0, last + 1, _BLOCK):
                nb = min(_BLOCK, last + 1 - j0)
                _block_scores(qi, kT, j0, nb, s)
                bm = _NEG_INF
                for jj in range(nb):
                    if not key_mask[b, j0 + jj]:
                        s[jj] = _NEG_INF
                    bm = max(bm, s[jj])
                if bm == _NEG_INF:
                    continue  # every key of this block is padding
                m_new = max(m, bm)
                corr = exp32(m - m_new) if m > _NEG_INF else _ZERO  # l, acc are 0 before
                l *= corr
                for c in range(hs):
                    acc[c] *= corr
                for jj in range(nb):
                    p = exp32(s[jj] - m_new) if s[jj] > _NEG_INF else _ZERO
                    s[jj] = p
                    l += p
                for jj in range(nb):
                    p = s[jj]
                    for c in range(hs):
                        acc[c] += p * v[b, h, j0 + jj, c]
                m = m_new
            if l == _ZERO:
                out[b, h, i, :] = 0.0  # no visible key (a padding query)
                lse[b, h, i] = _NEG_INF
            else:
                inv_l = _ONE / l
                for c in range(hs):
                    out[b, h, i, c] = acc[c] * inv_l
                lse[b, h, i] = m + np.log(l)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_backward_kernel(dout, q, k, v, key_mask, out, lse, dq, dk, dv):
    # dout, q, out (B, NH, Tq, hs), k, v (B, NH, Tk, hs), key_mask (B, Tk), lse (B, NH, Tq)
    # -> writes dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    scale = _ONE / np.sqrt(np.float32(hs))
    for bh in prange(B * NH):
        b = bh // NH
        h = bh - b * NH
        kT = np.empty((hs, Tk), np.float32)  # (hs, Tk)
        vT = np.empty((hs, Tk), np.float32)  # (hs, Tk)
        _transpose_head(k, b, h, kT)
        _transpose_head(v, b, h, vT)
        s = np.empty(_BLOCK, np.float32)  # (K,) scores, then p
        dp = np.empty(_BLOCK, np.float32)  # (K,) dout_i . v_j, then ds * scale
        qi = np.empty(hs, np.float32)  # (hs,) q_i * scale
        doi = np.empty(hs, np.float32)  # (hs,)
        dqi = np.empty(hs, np.float32)  # (hs,)
        for i in range(Tq):
            L = lse[b, h, i]
            if L == _NEG_INF:
                dq[b, h, i, :] = 0.0  # saw no key: out was the constant 0
                continue
            D = _ZERO
            for c in range(hs):
                qi[c] = q[b, h, i, c] * scale
                doi[c] = dout[b, h, i, c]
                D += doi[c] * out[b, h, i, c]
            dqi[:] = 0.0
            last = Tk - Tq + i
            for j0 in range(0, last + 1, _BLOCK):
                nb = min(_BLOCK, last + 1 - j0)
                _block_scores(qi, kT, j0, nb, s)
                _block_scores(doi, vT, j0, nb, dp)
                for jj in range(nb):
                    p = exp32(s[jj] - L) if key_mask[b, j0 + jj] else _ZERO
                    s[jj] = p
                    dp[jj] = p * (dp[jj] - D) * scale
                for jj in range(nb):
                    j = j0 + jj
                    p = s[jj]
                    ds = dp[jj]
                    for c in range(hs):
                        dv[b, h, j, c] += p * doi[c]
                        dk[b, h, j, c] += ds * q[b, h, i, c]
                        dqi[c] += ds * k[b, h, j, c]
            for c in range(hs):
                dq[b, h, i, c] = dqi[c]


def _check(q, k, v, key_mask):
    q = check_f32("attention", "q", q)
    k = check_f32("attention", "k", k)
    v = check_f32("attention", "v", v)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention: q must be (B, NH, Tq, hs) and k, v (B, NH, Tk, hs); "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    if k.shape[:2] != (B, NH) or k.shape[3] != hs:
        raise ValueError(f"attention: k {k.shape} does not match q {q.shape}")
    if Tk < Tq:
        raise ValueError(f"attention: Tk={Tk} must be >= Tq={Tq}")
    if key_mask is None:
        key_mask = np.ones((B, Tk), dtype=bool)  # (B, Tk)
    else:
        key_mask = np.asarray(key_mask)
        if key_mask.dtype != np.bool_ or key_mask.shape != (B, Tk):
            raise ValueError(
                f"attention: key_mask must be bool of shape ({B}, {Tk}), "
                f"got {key_mask.dtype} {key_mask.shape}"
            )
        key_mask = np.ascontiguousarray(key_mask)
    return q, k, v, key_mask


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask=None):
    """q (B, NH, Tq, hs), k, v (B, NH, Tk, hs), key_mask (B, Tk) bool or None -> (B, NH, Tq, hs)."""
    q, k, v, key_mask = _check(q, k, v, key_mask)
    out = np.empty(q.shape, np.float32)  # (B, NH, Tq, hs)
    lse = np.empty(q.shape[:3], np.float32)  # (B, NH, Tq)
    if q.size:
        _attention_forward_kernel(q, k, v, key_mask, out, lse)
    return out, (q, k, v, key_mask, out, lse)


def attention_backward(dout: np.ndarray, cache):
    """dout (B, NH, Tq, hs) -> dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs)."""
    q, k, v, key_mask, out, lse = cache
    dout = check_f32("attention_backward", "dout", dout)
    if dout.shape != q.shape:
        raise ValueError(f"attention_backward: dout {dout.shape} must match q {q.shape}")
    dq = np.empty(q.shape, np.float32)  # (B, NH, Tq, hs)
    dk = np.zeros(k.shape, np.float32)  # (B, NH, Tk, hs), accumulated by the kernel
    dv = np.zeros(v.shape, np.float32)  # (B, NH, Tk, hs)
    if q.size:
        _attention_backward_kernel(dout, q, k, v, key_mask, out, lse, dq, dk, dv)
    return dq, dk, dv


VARIANTS = {"attention": {"numba": (attention_forward, attention_backward)}}
