"""Causal attention in tiles: BLAS for the products, Numba for the softmax (FlashAttention-2).

Shape legend: B = batch, NH = heads, Tq = queries, Tk = keys (Tk >= Tq, the cache included),
hs = head size, bq = queries per tile, bk = keys per tile (_BQ, _BK forward; _BWD_BQ, _BWD_BK
backward; the last tile of a row or column is smaller).

The semantics are `ref.ops.attention_forward`'s: query i sits at absolute position
off + i with off = Tk - Tq and sees keys j <= off + i whose key_mask[b, j] is True; a query
that sees no key outputs 0 (and gets no gradient). NaN in the inputs gives NaN out.

Where the time goes: the products q k^T and p v are 4 Tq Tk hs flops per head against ~Tq Tk
exponentials, so at hs = 64 the products must run at BLAS speed. Numba's own `np.dot` needs
SciPy's BLAS, which the project does not depend on, so the products are numpy `matmul` on
tiles of many heads at once (numpy's OpenBLAS, one gemm per head per tile, e.g.
(128, 64) x (64, 256)), and the elementwise work between them is a Numba kernel over those
heads. The Python loop runs over tile pairs only (20 in the forward at T = 1024), so its
overhead is tens of microseconds against milliseconds of arithmetic.
Threads: the forward's gemms run with OpenBLAS capped at one thread (FORWARD_BLAS_THREADS,
through threadpoolctl where it is installed), and the heads are split among numba's thread
count of Python threads (`_forward_tiles` on each share: its gemms and a serial tile kernel
that runs without the GIL, as matmul does), so every core multiplies; each head is computed
by one worker in the one-thread order, so the bits do not depend on the thread count. Before
(one Python thread: single-threaded gemms, the tile kernel parallel over the heads), the
forward alone took 9.7 / 33.4 / 12.9 ms at T = 512, T = 1024 and B = 4 x T = 256; split,
5.8 / 18.8 / 7.8 (2-core AMD Zen 3, processes alternated 4 times, best of 15 calls each).
The backward runs with OpenBLAS's two threads and its tile kernel parallel over the heads.
Why the cap: OpenBLAS's threads spin for a while after each gemm, and the kernels that follow
a forward took turns with them:
on the project's machine (`python -m bench.tools.numba_flash_timing`, and a 512-token prompt
of GPT-2 124M timed by op, one run each) the cap makes the forward alone 10-20% slower (T =
1024: 22.6 against 25.0 ms; B = 4, T = 256: 8.6 against 10.4) but leaves a float32 prompt
where it was (478 against 475 ms: its linears are BLAS calls that find the threads asleep
either way) and makes an int8 prompt, whose linears are Numba kernels, 1.7x faster (328
against 563 ms). The backward keeps both threads: capped, it took 1.4x longer.
k and v are read in place when their rows of hs floats have unit stride (the model's slices
of qkv, row stride 3C): copying them first made the forward slower, not faster.
Figures for both in bench/README.md (`python -m bench.tools.numba_flash_timing --blas-threads 1`
times the forward with OpenBLAS capped).

Forward, per query tile Q (rows q0 .. q0 + bq - 1, pre-scaled by scale = 1 / sqrt(hs)) and key
tile K, V (keys k0 .. k0 + bk - 1), with the online softmax (Milakov and Gimelshein 2018):
    s = Q K^T                               (B, NH, bq, bk), BLAS
    s_ij = -inf where j > off + i or key_mask[b, j] is False
    m_new = max(m, max_j s_ij);  p_ij = exp(s_ij - m_new);  alpha = exp(m - m_new)
    l = alpha l + sum_j p_ij;   acc = alpha acc + p V   (p V by BLAS)
and at the end out = acc / l, lse = m + log(l) (-inf for a row that saw no key).
Key tiles that start past the diagonal of the query tile's last row are never visited, so
about half of the (Tq, Tk) products are skipped; the largest temporary is one
(B, NH, bq, bk) tile, never a (Tq, Tk) score matrix. Padding enters as a (B, Tk) bias of 0 or
-inf added to the scores, which keeps the softmax loops free of branches (vectorised).

Backward (the reference's formulas, recomputing att from lse instead of storing it), key tiles
outer, with D_i = sum_j att_ij datt_ij = dout_i . out_i computed once:
    p = exp(Q K^T - lse)  (0 where hidden);   dv[K] += p^T dout[Q]
    dp = dout[Q] V^T;   ds = p * (dp - D)
    dq[Q] += ds K scale;   dk[K] += ds^T Q scale   (Q already holds q * scale)
p and ds come out of one pass over the tile (dp is computed first, as it does not need p),
not two. The first query tile of a key tile writes dk[K], dv[K] from gemm; tall query tiles
(512 rows) keep the number of `+=` small. All accumulation happens in numpy
calls made in a fixed order from one Python thread (the Numba kernels only write their own
tile), so no two threads add into the same gradient, and results are bit-identical from run
to run.

Cache: q * scale, k, v (views when the inputs were), the padding bias (B, Tk), out and lse
(B, NH, Tq): O(T) per row beyond the inputs.

Variants: "numba_flash". Limits: float32. Meant for prompts and training: each call has a
fixed cost (allocations, a few parallel launches) that dominates a decode step (Tq = 1) or a
tiny prompt, where fast/numba/attention.py is faster (`python -m bench.tools.numba_flash_timing`;
figures in bench/README.md).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from fast.numba.common import (
    FASTMATH,
    blas_threads,
    check_attention,
    check_attention_dout,
    exp32,
    worker_pool,
)

FORWARD_BLAS_THREADS = 1  # OpenBLAS threads for the forward's gemms (None: as configured)

_BQ = 128  # queries per tile
_BK = 256  # keys per tile: a (B*NH, 128, 256) score tile is 1.5 MB at B*NH = 12
_BWD_BQ = 512  # backward: queries per tile
_BWD_BK = 128  # backward: keys per tile
_NEG_INF = np.float32(-np.inf)
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _row_max(row, brow, n):
    # max_c (row[c] + brow[c]) over c < n, in eight independent chains: one chain is bound by
    # the latency of max
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = _NEG_INF
    n8 = n - n % 8
    for c in range(0, n8, 8):
        m0 = max(m0, row[c] + brow[c])
        m1 = max(m1, row[c + 1] + brow[c + 1])
        m2 = max(m2, row[c + 2] + brow[c + 2])
        m3 = max(m3, row[c + 3] + brow[c + 3])
        m4 = max(m4, row[c + 4] + brow[c + 4])
        m5 = max(m5, row[c + 5] + brow[c + 5])
        m6 = max(m6, row[c + 6] + brow[c + 6])
        m7 = max(m7, row[c + 7] + brow[c + 7])
    for c in range(n8, n):
        m0 = max(m0, row[c] + brow[c])
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _forward_tile(s, bias, q0, k0, off, m, l, acc):
    # s (B, NH, bq, bk) scores of query rows q0.. against keys k0.., overwritten by p;
    # bias (B, Tk) 0 or -inf (padding); updates m, l (B, NH, Tq), acc (B, NH, Tq, hs).
    # Serial, without the GIL: each worker of _forward_tiles runs it on its own heads.
    B, NH, bq, bk = s.shape
    hs = acc.shape[3]
    for bh in range(B * NH):
        b = bh // NH
        h = bh - b * NH
        for r in range(bq):
            i = q0 + r
            lim = max(0, min(bk, off + i + 1 - k0))  # keys k0 .. k0 + lim - 1 are causal
            row = s[b, h, r]  # (bk,)
            brow = bias[b, k0 : k0 + lim]  # (lim,) -inf for padding
            mx = _row_max(row, brow, lim)
            m_old = m[b, h, i]
            m_new = max(m_old, mx)
            if m_new == _NEG_INF and not np.isnan(row[:lim]).any():
                row[:] = 0.0  # nothing visible yet: p = 0, l and acc stay 0
                continue
            # a NaN score makes its p NaN, so l, out and lse turn NaN, as the reference's do
            alpha = exp32(m_old - m_new) if m_old != _NEG_INF else _ZERO  # l, acc were 0
            total = _ZERO
            for c in range(lim):
                x = row[c] + brow[c]
                p = _ZERO if x == _NEG_INF else exp32(x - m_new)  # exp32 never gives 0
                row[c] = p
                total += p
            row[lim:] = 0.0  # past the diagonal
            m[b, h, i] = m_new
            l[b, h, i] = l[b, h, i] * alpha + total
            if alpha != _ONE:
                a = acc[b, h, i]  # (hs,)
                for c in range(hs):
                    a[c] *= alpha


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _forward_finish(acc, m, l, out, lse):
    # acc (B, NH, Tq, hs), m, l (B, NH, Tq) -> writes out (B, NH, Tq, hs), lse (B, NH, Tq)
    B, NH, Tq, hs = acc.shape
    for bh in prange(B * NH):
        b = bh // NH
        h = bh - b * NH
        for i in range(Tq):
            if l[b, h, i] == _ZERO:
                out[b, h, i, :] = 0.0  # no visible key (a padding query)
                lse[b, h, i] = _NEG_INF
            else:
                inv_l = _ONE / l[b, h, i]
                for c in range(hs):
                    out[b, h, i, c] = acc[b, h, i, c] * inv_l
                lse[b, h, i] = m[b, h, i] + np.log(l[b, h, i])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _probs_ds_tile(s, dp, bias, q0, k0, off, lse, D):
    # s (B, NH, bq, bk) scores q*scale . k, overwritten by p = exp(s - lse), 0 where hidden;
    # dp (B, NH, bq, bk) = dout V^T, overwritten by ds = p * (dp - D); lse, D (B, NH, Tq)
    B, NH, bq, bk = s.shape
    for bh in prange(B * NH):
        b = bh // NH
        h = bh - b * NH
        for r in range(bq):
            i = q0 + r
            lim = max(0, min(bk, off + i + 1 - k0))
            li = lse[b, h, i]
            prow = s[b, h, r]  # (bk,)
            dsrow = dp[b, h, r]  # (bk,)
            if li == _NEG_INF:
                prow[:] = 0.0  # the query saw no key: no gradient
                dsrow[:] = 0.0
                continue
            brow = bias[b, k0 : k0 + lim]  # (lim,) -inf for padding
            d = D[b, h, i]
            for c in range(lim):
                x = prow[c] + brow[c]
                p = _ZERO if x == _NEG_INF else exp32(x - li)
                prow[c] = p
                dsrow[c] = p * (dsrow[c] - d)
            prow[lim:] = 0.0  # past the diagonal
            dsrow[lim:] = 0.0


def _tile(buf: np.ndarray, shape: tuple[int, int, int, int]) -> np.ndarray:
    """A C-contiguous (B, NH, bq, bk) view at the start of the flat scratch `buf`, so that every
    tile, the ragged last ones included, is one compiled layout and no allocation."""
    return buf[: math.prod(shape)].reshape(shape)


def _check(q, k, v, key_mask):
    """Validate; q C-contiguous; k, v float32 with unit stride along hs (else copied; float16
    ones, of a 16-bit KV cache, widened to float32 copies, O(Tk hs) per head against the
    O(Tq Tk hs) of the tiles); mask (B, Tk) bool."""
    q, mask = check_attention(q, k, v, key_mask)
    k, v = k.astype(np.float32, copy=False), v.astype(np.float32, copy=False)  # (B, NH, Tk, hs)
    if hs_strided(k):
        k = np.ascontiguousarray(k)  # gemm reads rows of hs floats with any row stride
    if hs_strided(v):
        v = np.ascontiguousarray(v)
    return q, k, v, mask


def hs_strided(a: np.ndarray) -> bool:
    """True when the hs axis of a (B, NH, T, hs) array is not contiguous."""
    return a.shape[3] > 1 and a.strides[3] != a.itemsize


def _tiles(Tq: int, Tk: int, bq: int, bk: int):
    """(q0, q1, k0, k1) of every tile pair with a causally visible key, query tiles outer."""
    off = Tk - Tq
    for q0 in range(0, Tq, bq):
        q1 = min(q0 + bq, Tq)
        for k0 in range(0, off + q1, bk):  # the last key row q1 - 1 sees is off + q1 - 1
            yield q0, q1, k0, min(k0 + bk, off + q1)


def _tiles_by_key(Tq: int, Tk: int, bq: int, bk: int):
    """(q0, q1, k0, k1) of every tile pair with a causally visible key, key tiles outer."""
    off = Tk - Tq
    for k0 in range(0, Tk, bk):
        for q0 in range(max(0, k0 - off), Tq, bq):  # query i sees key k0 once off + i >= k0
            yield q0, min(q0 + bq, Tq), k0, min(k0 + bk, Tk)


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask=None):
    """q (B, NH, Tq, hs), k, v (B, NH, Tk, hs), key_mask (B, Tk) bool or None -> (B, NH, Tq, hs)."""
    q, k, v, mask = _check(q, k, v, key_mask)
    bias = np.where(mask, np.float32(0.0), _NEG_INF)  # (B, Tk) added to the scores
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    off = Tk - Tq
    qs = q * np.float32(1.0 / math.sqrt(hs))  # (B, NH, Tq, hs) q * scale
    m = np.full((B, NH, Tq), _NEG_INF, np.float32)  # (B, NH, Tq) running max
    l = np.zeros((B, NH, Tq), np.float32)  # (B, NH, Tq) running sum of exp(s - m)
    acc = np.zeros((B, NH, Tq, hs), np.float32)  # (B, NH, Tq, hs) running sum of p v
    out = np.empty((B, NH, Tq, hs), np.float32)  # (B, NH, Tq, hs)
    lse = np.empty((B, NH, Tq), np.float32)  # (B, NH, Tq)
    if q.size:
        workers = min(numba.get_num_threads(), NH)
        heads = [slice(NH * i // workers, NH * (i + 1) // workers) for i in range(workers)]
        with blas_threads(FORWARD_BLAS_THREADS):
            if workers == 1:
                _forward_tiles(qs, k, v, bias, off, m, l, acc)
            else:  # each worker its own heads: views of every array, written in place
                pool = worker_pool(workers)
                parts = [(qs[:, h], k[:, h], v[:, h], bias, off, m[:, h], l[:, h], acc[:, h])
                         for h in heads]  # fmt: skip
                for job in [pool.submit(_forward_tiles, *part) for part in parts]:
                    job.result()  # raises what a worker raised
        _forward_finish(acc, m, l, out, lse)
    return out, (qs, k, v, bias, out, lse)


def _forward_tiles(qs, k, v, bias, off, m, l, acc) -> None:
    """The forward's tile pairs for the heads of the arrays given (all of them, or one
    worker's share): m, l and acc updated in place (see the module docstring)."""
    B, NH, Tq, hs = qs.shape
    Tk = k.shape[2]
    kt = k.swapaxes(-1, -2)  # (B, NH, hs, Tk) a view: gemm reads k transposed
    sbuf = np.empty(B * NH * min(_BQ, Tq) * min(_BK, Tk), np.float32)  # scores, then p
    pvbuf = np.empty(B * NH * min(_BQ, Tq) * hs, np.float32)  # p v of one tile
    for q0, q1, k0, k1 in _tiles(Tq, Tk, _BQ, _BK):
        s = _tile(sbuf, (B, NH, q1 - q0, k1 - k0))  # (B, NH, bq, bk)
        np.matmul(qs[:, :, q0:q1], kt[:, :, :, k0:k1], out=s)
        _forward_tile(s, bias, q0, k0, off, m, l, acc)
        pv = _tile(pvbuf, (B, NH, q1 - q0, hs))  # (B, NH, bq, hs)
        np.matmul(s, v[:, :, k0:k1], out=pv)
        acc[:, :, q0:q1] += pv


def attention_backward(dout: np.ndarray, cache):
    """dout (B, NH, Tq, hs) -> dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs)."""
    qs, k, v, bias, out, lse = cache
    dout = check_attention_dout(dout, qs)
    B, NH, Tq, hs = qs.shape
    Tk = k.shape[2]
    off = Tk - Tq
    dq = np.zeros((B, NH, Tq, hs), np.float32)  # (B, NH, Tq, hs)
    if not qs.size:
        zeros = np.zeros((B, NH, Tk, hs), np.float32)  # (B, NH, Tk, hs)
        return dq, zeros, zeros.copy()
    # every key tile has a first query tile (the last query sees every key), which writes it
    dk = np.empty((B, NH, Tk, hs), np.float32)  # (B, NH, Tk, hs)
    dv = np.empty((B, NH, Tk, hs), np.float32)  # (B, NH, Tk, hs)
    D = np.einsum("bhtc,bhtc->bht", dout, out)  # (B, NH, Tq) rowsum(dout * out)
    kt = k.swapaxes(-1, -2)  # (B, NH, hs, Tk)
    vt = v.swapaxes(-1, -2)  # (B, NH, hs, Tk)
    bq_max, bk_max = min(_BWD_BQ, Tq), min(_BWD_BK, Tk)
    pbuf = np.empty(B * NH * bq_max * bk_max, np.float32)  # p of one tile
    dsbuf = np.empty(B * NH * bq_max * bk_max, np.float32)  # dp, then ds, of one tile
    gbuf = np.empty(B * NH * max(bq_max, bk_max) * hs, np.float32)  # a product
    for q0, q1, k0, k1 in _tiles_by_key(Tq, Tk, _BWD_BQ, _BWD_BK):
        bq, bk = q1 - q0, k1 - k0
        Q = qs[:, :, q0:q1]  # (B, NH, bq, hs) q * scale
        dO = dout[:, :, q0:q1]  # (B, NH, bq, hs)
        p = _tile(pbuf, (B, NH, bq, bk))  # (B, NH, bq, bk)
        np.matmul(Q, kt[:, :, :, k0:k1], out=p)
        ds = _tile(dsbuf, (B, NH, bq, bk))  # (B, NH, bq, bk)
        np.matmul(dO, vt[:, :, :, k0:k1], out=ds)
        _probs_ds_tile(p, ds, bias, q0, k0, off, lse, D)  # p, and ds in place of dp
        g = _tile(gbuf, (B, NH, bq, hs))  # (B, NH, bq, hs)
        np.matmul(ds, k[:, :, k0:k1], out=g)
        dq[:, :, q0:q1] += g
        if q0 == max(0, k0 - off):  # the first query tile of this key tile: write
            np.matmul(p.swapaxes(-1, -2), dO, out=dv[:, :, k0:k1])
            np.matmul(ds.swapaxes(-1, -2), Q, out=dk[:, :, k0:k1])
        else:
            g = _tile(gbuf, (B, NH, bk, hs))  # (B, NH, bk, hs)
            np.matmul(p.swapaxes(-1, -2), dO, out=g)
            dv[:, :, k0:k1] += g
            np.matmul(ds.swapaxes(-1, -2), Q, out=g)
            dk[:, :, k0:k1] += g  # ds^T (q * scale): the scale is already in Q
    dq *= np.float32(1.0 / math.sqrt(hs))
    return dq, dk, dv


VARIANTS = {"attention": {"numba_flash": (attention_forward, attention_backward)}}
