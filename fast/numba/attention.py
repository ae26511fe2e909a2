"""Causal attention in Numba with online softmax: prompt, decode step and training in one kernel.

Shape legend: B = batch, NH = heads, Tq = queries, Tk = keys (Tk >= Tq, the cache included),
hs = head size, K = keys per block (_BLOCK), Tk4 = Tk rounded up to a multiple of 4.

The semantics are `ref.ops.attention_forward`'s: query i sits at absolute position Tk - Tq + i
and sees keys j <= Tk - Tq + i whose key_mask[b, j] is True; a query that sees no key outputs 0.

Layout: the forward reads k and v as rows of hs floats, `kr` (N, hs) C-contiguous, with
key j of head (b, h) at row b * rB + h * rH + j * rT (`_rows`). When the keys of a head are
adjacent rows (rT = 1) and every stride is a whole number of rows, as in the KV cache's
prefix views `cache.k[layer][:, :, :P+T]` of a C-contiguous (B, NH, capacity, hs) buffer and
in contiguous arrays, the kernel reads a in place: it gets the address of a's first element
and builds `kr` there (numba.carray), spanning a's first to its last element: a numpy
array's elements lie in one buffer, so every row of that span is memory that buffer owns,
and the kernel reads only the rows of a. Otherwise (the model's slices of qkv, rows 3C
apart; reversed or transposed arrays) k and v are copied once into compact rows, O(Tk hs)
per head against the O(Tq Tk hs) of a prompt. In a decode step (Tq = 1) a copy would move
more bytes than the attention reads, hence reading in place. An address, not a view made
with numpy's as_strided, because the view cost 15 us a call of the 25 us of Python around a
decode step's kernel.

Keys are taken four at a time: `_dot4` computes four dot products in one pass over hs (LLVM
vectorises it over hs), and the value updates add four keys per pass. The last group of a
query's keys may pass its causal limit `last`: its rows are clamped to `last`, and those
keys, like masked ones, get score -inf, so they never count. Four at a time is faster than
one score per key against a transposed k (figures in bench/README.md). One thread owns a
whole (b, h) (prange over B * NH), so no two threads write the same output or gradient.
Calls with little work (a decode step of one sequence) run the same code on the calling
thread instead (`_SERIAL_BELOW`).

Decode step (Tq = 1): the kernel streams each head's keys and values once, but its loop of
dot products, softmax and weighted sums keeps too few loads in flight to stream from DRAM,
so it prefetches (`prefetch` of fast/numba/common.py) the key rows _AHEAD keys on and the
block's value rows while scoring, which pays once k, v outgrow the caches. When they fit in
the caches from call to call (one sequence), the reference's BLAS matrix-vector products
can beat the four-at-a-time dot products. Figures in bench/README.md, from
`python -m bench.tools.numba_decode_timing`. Past a head's last key the key prefetch runs on
into the next head's first keys (the thread's next head: prange's chunks are contiguous): 16
sequences at context 257, 12 layers' caches from memory, float32 10.5 against 10.9-11.1 ms,
float16 the same within noise (5.4-5.5 ms; old and new kernels alternated in one process).

Forward, per query row i: keys in blocks of K, scores s_j = (q_i * scale) . k_j; the online
softmax (Milakov and Gimelshein 2018) keeps a running maximum m, a running sum
l = sum_j exp(s_j - m) and acc = sum_j exp(s_j - m) v_j, rescaling l and acc by
exp(m_old - m_new) when a block raises the maximum. Then out_i = acc / l and
lse_i = m + log(l). Memory per thread is O(K + hs); the reference's (Tq, Tk) score matrix
is never formed.

Backward (the reference's formulas, recomputing att from lse instead of storing it):
    p_ij = exp(s_ij - lse_i)                       (att, 0 where masked)
    dv_j += p_ij dout_i;   dp_ij = dout_i . v_j
    ds_ij = p_ij (dp_ij - D_i),  D_i = sum_j p_ij dp_ij = dout_i . out_i
    dq_i += ds_ij k_j scale;   dk_j += ds_ij q_i scale
The cache keeps q, k and v (as given: views, no copy), the mask, out and lse (B, NH, Tq):
O(T) per row, not (Tq, Tk). The backward copies k and v into zero-padded (B, NH, Tk4, hs)
buffers, so that its groups of four need no clamping; the copy is O(Tk hs) per head against
its O(Tq Tk hs) work.
A row with lse = -inf saw no key and gets no gradient. dk_j, dv_j of one (b, h) are summed in
a thread-private buffer in a fixed order, so gradients are bit-identical from run to run.

`attention_rows_forward` is the server's decode step (ref/batching.py): R sequences, one query
each, every one over a KV cache of its own (their capacities differ, so each row's arrays reach
the kernel as checked addresses), in one launch over the R * NH (row, head) pairs of
`_forward_head`: 16 rows at context 70, 270 us against 477 us for 16 calls of
attention_forward (one run, caches in L3).

A float16 KV cache (ref.model.KVCache) reaches the kernels as its uint16 bits, widened as read
(`as_f32`: VCVTPH2PS where the loop vectorises), half the bytes: a decode step's attention over
12 layers with their caches in memory, 16 sequences of 257 keys, 15.3 ms on float32 caches and
9.8 on float16 ones; one sequence of 1,024 keys 3.87 and 2.25 ms (2-core AMD Zen 3, a session
script, best of 5 alternated rounds).

`kv_store` writes a forward's new keys and values into a float16 KV cache, rounding as numpy
does (f16_bits: VCVTPS2PH where the loop vectorises); numpy's cast converts one value at a time
and took 0.75 ms of a 16-sequence decode step of GPT-2 124M.

Variants: "numba". Limits: float32 q; k and v float32, or float16 (a 16-bit KV cache) in the
forward.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic

from fast.numba.common import (
    FASTMATH,
    THREADING_LAYER,
    as_f32,
    check_attention,
    check_attention_dout,
    check_f32,
    exp32,
    f16_bits,
    prefetch,
)
from ref import ops as ref_ops

_BLOCK = 64  # K: scores of one block of keys, four 512-bit registers, stays in L1
_AHEAD = 32  # keys between the key row prefetched and the one read (16 to 64 did as well)
# below this much work (B * NH * Tq * Tk * hs multiply-adds, twice) the forward runs on the
# calling thread. On the workqueue layer a parallel launch costs 30-110 us (more when the other
# core is busy), and a decode step of one sequence (NH = 12, hs = 64, Tk <= 1024: 0.8M) takes
# 60-170 us serially. On omp (fast/numba/common.py) a launch costs about 5 us: a decode step
# of one sequence, median of 200 calls, serial / parallel: Tk = 8 6.0 / 5.4 us, 64 22.5 /
# 15.4, 256 78 / 46, 1024 274 / 148 (2 cores).
_SERIAL_BELOW = 2**13 if THREADING_LAYER == "omp" else 2**20
_NEG_INF = np.float32(-np.inf)
_LIKE = {"f": np.empty(0, np.float32), "H": np.empty(0, np.uint16)}  # a kernel's dtype of k, v
_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)


@intrinsic
def _ptr_like(typingctx, addr, like):
    """An int64 address -> a pointer to `like`'s dtype (for numba.carray); see
    attention_rows_forward."""
    if not (isinstance(addr, types.Integer) and isinstance(like, types.Array)):
        return None
    sig = types.CPointer(like.dtype)(addr, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

    return sig, codegen


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _dot4(x, a, r0, r1, r2, r3):
    # x (hs,), a (N, hs) rows, float32 or float16 bits -> (x . a[r0], ..., x . a[r3]) float32
    s0 = _ZERO
    s1 = _ZERO
    s2 = _ZERO
    s3 = _ZERO
    for c in range(x.shape[0]):
        xc = x[c]
        s0 += xc * as_f32(a[r0, c])
        s1 += xc * as_f32(a[r1, c])
        s2 += xc * as_f32(a[r2, c])
        s3 += xc * as_f32(a[r3, c])
    return s0, s1, s2, s3


@numba.njit(inline="always", cache=True)
def _prefetch_row(a, r):
    # a (N, hs): hint the loads of row r, one per 64-byte line (16 floats), and of its last
    # float, which starts one more line when the row does not start on a line
    hs = a.shape[1]
    for c in range(0, hs + 15, 16):
        prefetch(a, r * hs + min(c, hs - 1))


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _forward_head(q, kr, ks, vr, vs, Tk, mask, out, lse, bh):
    # the queries of one head, bh = b * NH + h: writes out[b, h], lse[b, h]
    NH, Tq, hs = q.shape[1:]
    scale = _ONE / np.sqrt(np.float32(hs))
    b = bh // NH
    h = bh - b * NH
    k0 = b * ks[0] + h * ks[1]  # row of key 0 of (b, h) in kr
    v0 = b * vs[0] + h * vs[1]  # row of value 0 of (b, h) in vr
    kt = ks[2]
    vt = vs[2]
    # a decode step's prefetch runs on into the next head's first keys (the same thread takes
    # it next, prange's chunks being contiguous), so no head starts on a cold stream
    has_next = bh + 1 < q.shape[0] * NH
    bn = (bh + 1) // NH
    kn0 = bn * ks[0] + (bh + 1 - bn * NH) * ks[1]  # row of key 0 of the next head
    s = np.empty(_BLOCK, np.float32)  # (K,) scores, then probabilities, of one block
    acc = np.empty(hs, np.float32)  # (hs,)
    qi = np.empty(hs, np.float32)  # (hs,) q_i * scale
    for i in range(Tq):
        last = Tk - Tq + i  # the last key query i may see
        for c in range(hs):
            qi[c] = q[b, h, i, c] * scale
        m = _NEG_INF
        l = _ZERO
        acc[:] = 0.0
        has_nan = False  # max() and the > tests skip NaN scores: flag them instead
        for j0 in range(0, last + 1, _BLOCK):
            nb = min(_BLOCK, (last + 1 - j0 + 3) // 4 * 4)  # keys in block, 4 | nb
            bm = _NEG_INF
            for jj in range(0, nb, 4):
                j = j0 + jj  # <= last; j + 1, j + 2, j + 3 may pass it in the last group
                j1 = min(j + 1, last)
                j2 = min(j + 2, last)
                j3 = min(j + 3, last)
                if Tq == 1:  # the keys _AHEAD on, the values of this block
                    for t in range(4):
                        ja = j + _AHEAD + t
                        if ja <= last:
                            _prefetch_row(kr, k0 + ja * kt)
                        elif has_next:
                            _prefetch_row(kr, kn0 + min(ja - last - 1, last) * kt)
                        _prefetch_row(vr, v0 + min(j + t, last) * vt)
                s0, s1, s2, s3 = _dot4(
                    qi, kr, k0 + j * kt, k0 + j1 * kt, k0 + j2 * kt, k0 + j3 * kt
                )
                s[jj] = s0 if mask[b, j] else _NEG_INF
                s[jj + 1] = s1 if (j + 1 <= last and mask[b, j1]) else _NEG_INF
                s[jj + 2] = s2 if (j + 2 <= last and mask[b, j2]) else _NEG_INF
                s[jj + 3] = s3 if (j + 3 <= last and mask[b, j3]) else _NEG_INF
            for jj in range(nb):
                bm = max(bm, s[jj])
                has_nan |= s[jj] != s[jj]
            if bm == _NEG_INF:
                continue  # every key of this block is hidden
            m_new = max(m, bm)
            if m_new > m:
                corr = exp32(m - m_new) if m > _NEG_INF else _ZERO  # l, acc were 0
                l *= corr
                for c in range(hs):
                    acc[c] *= corr
            for jj in range(nb):
                p = exp32(s[jj] - m_new) if s[jj] > _NEG_INF else _ZERO
                s[jj] = p
                l += p
            for jj in range(0, nb, 4):
                j = j0 + jj
                r0 = v0 + j * vt
                r1 = v0 + min(j + 1, last) * vt  # p = 0 past last: any row in range does
                r2 = v0 + min(j + 2, last) * vt
                r3 = v0 + min(j + 3, last) * vt
                p0 = s[jj]
                p1 = s[jj + 1]
                p2 = s[jj + 2]
                p3 = s[jj + 3]
                for c in range(hs):
                    acc[c] += (p0 * as_f32(vr[r0, c]) + p1 * as_f32(vr[r1, c])
                               + p2 * as_f32(vr[r2, c]) + p3 * as_f32(vr[r3, c]))  # fmt: skip
            m = m_new
        if has_nan:
            out[b, h, i, :] = np.nan  # as the reference: NaN in, NaN out
            lse[b, h, i] = np.nan
        elif l == _ZERO:
            out[b, h, i, :] = 0.0  # no visible key (a padding query)
            lse[b, h, i] = _NEG_INF
        else:
            inv_l = _ONE / l
            for c in range(hs):
                out[b, h, i, c] = acc[c] * inv_l
            lse[b, h, i] = m + np.log(l)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_forward_kernel(q, kv, like, ks, vs, Tk, mask, out, lse):
    # q (B, NH, Tq, hs); kv (4,) int64: the addresses of k's and v's rows of hs values (of
    # like's dtype) and their counts; key j of (b, h) at row b*ks[0] + h*ks[1] + j*ks[2] (v
    # likewise with vs); mask (B, Tk) bool -> writes out (B, NH, Tq, hs), lse (B, NH, Tq)
    hs = q.shape[3]
    kr = numba.carray(_ptr_like(kv[0], like), (kv[1], hs))  # (N, hs)
    vr = numba.carray(_ptr_like(kv[2], like), (kv[3], hs))
    for bh in prange(q.shape[0] * q.shape[1]):
        _forward_head(q, kr, ks, vr, vs, Tk, mask, out, lse, bh)


@numba.njit(fastmath=FASTMATH, error_model="numpy", cache=True)
def _attention_forward_serial_kernel(q, kv, like, ks, vs, Tk, mask, out, lse):
    # the same on the calling thread, for calls too small to pay a parallel launch
    hs = q.shape[3]
    kr = numba.carray(_ptr_like(kv[0], like), (kv[1], hs))  # (N, hs)
    vr = numba.carray(_ptr_like(kv[2], like), (kv[3], hs))
    for bh in range(q.shape[0] * q.shape[1]):
        _forward_head(q, kr, ks, vr, vs, Tk, mask, out, lse, bh)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_backward_kernel(dout, q, k4, v4, Tk, mask, out, lse, dq, dk, dv):
    # dout, q, out (B, NH, Tq, hs), k4, v4 (B, NH, Tk4, hs), mask (B, Tk4), lse (B, NH, Tq)
    # -> writes dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs)
    B, NH, Tq, hs = q.shape
    Tk4 = mask.shape[1]
    scale = _ONE / np.sqrt(np.float32(hs))
    for bh in prange(B * NH):
        b = bh // NH
        h = bh - b * NH
        kp = k4[b, h]  # (Tk4, hs)
        vp = v4[b, h]  # (Tk4, hs)
        dkp = np.zeros((Tk4, hs), np.float32)  # (Tk4, hs) this thread's dk[b, h]
        dvp = np.zeros((Tk4, hs), np.float32)  # (Tk4, hs) this thread's dv[b, h]
        s = np.empty(_BLOCK, np.float32)  # (K,) scores, then p
        dp = np.empty(_BLOCK, np.float32)  # (K,) dout_i . v_j, then ds * scale
        qi = np.empty(hs, np.float32)  # (hs,)
        qs = np.empty(hs, np.float32)  # (hs,) q_i * scale
        doi = np.empty(hs, np.float32)  # (hs,)
        dqi = np.empty(hs, np.float32)  # (hs,)
        for i in range(Tq):
            L = lse[b, h, i]
            if L == _NEG_INF:
                dq[b, h, i, :] = 0.0  # saw no key: out was the constant 0
                continue
            D = _ZERO
            for c in range(hs):
                qi[c] = q[b, h, i, c]
                qs[c] = qi[c] * scale
                doi[c] = dout[b, h, i, c]
                D += doi[c] * out[b, h, i, c]
            dqi[:] = 0.0
            last = Tk - Tq + i
            for j0 in range(0, last + 1, _BLOCK):
                nb = min(_BLOCK, (last + 1 - j0 + 3) // 4 * 4)
                for jj in range(0, nb, 4):
                    j = j0 + jj
                    s0, s1, s2, s3 = _dot4(qs, kp, j, j + 1, j + 2, j + 3)
                    s[jj] = s0
                    s[jj + 1] = s1
                    s[jj + 2] = s2
                    s[jj + 3] = s3
                    d0, d1, d2, d3 = _dot4(doi, vp, j, j + 1, j + 2, j + 3)
                    dp[jj] = d0
                    dp[jj + 1] = d1
                    dp[jj + 2] = d2
                    dp[jj + 3] = d3
                for jj in range(nb):
                    j = j0 + jj
                    p = exp32(s[jj] - L) if (mask[b, j] and j <= last) else _ZERO
                    s[jj] = p
                    dp[jj] = p * (dp[jj] - D) * scale
                for jj in range(0, nb, 4):
                    j = j0 + jj
                    p0 = s[jj]
                    p1 = s[jj + 1]
                    p2 = s[jj + 2]
                    p3 = s[jj + 3]
                    g0 = dp[jj]
                    g1 = dp[jj + 1]
                    g2 = dp[jj + 2]
                    g3 = dp[jj + 3]
                    for c in range(hs):
                        dqi[c] += (
                            g0 * kp[j, c]
                            + g1 * kp[j + 1, c]
                            + g2 * kp[j + 2, c]
                            + g3 * kp[j + 3, c]
                        )
                    for c in range(hs):
                        dvp[j, c] += p0 * doi[c]
                        dvp[j + 1, c] += p1 * doi[c]
                        dvp[j + 2, c] += p2 * doi[c]
                        dvp[j + 3, c] += p3 * doi[c]
                    for c in range(hs):
                        dkp[j, c] += g0 * qi[c]
                        dkp[j + 1, c] += g1 * qi[c]
                        dkp[j + 2, c] += g2 * qi[c]
                        dkp[j + 3, c] += g3 * qi[c]
            for c in range(hs):
                dq[b, h, i, c] = dqi[c]
        dk[b, h] = dkp[:Tk]
        dv[b, h] = dvp[:Tk]


def _rows(a: np.ndarray) -> tuple[np.ndarray, int, int, tuple[int, int, int]]:
    """k or v (B, NH, Tk, hs) -> (the array read: a or a copy, the address of its first row of
    hs values, N rows from there, row steps (rB, rH, rT)) with a[b, h, t] the row
    b * rB + h * rH + t * rT; see the module docstring for when a is read in place and why it
    is safe. The caller keeps the array alive while the kernel reads it."""
    B, NH, Tk, hs = a.shape
    row = hs * a.itemsize  # bytes per row
    sB, sH, sT, sC = a.strides
    steps = (0 if B == 1 else sB, 0 if NH == 1 else sH, 0 if Tk == 1 else sT)
    if (
        (hs == 1 or sC == a.itemsize)
        and steps[0] >= 0 and steps[1] >= 0 and steps[0] % row == 0 and steps[1] % row == 0
        and steps[2] in (0, row)
    ):  # fmt: skip
        rB, rH, rT = steps[0] // row, steps[1] // row, steps[2] // row
        n = (B - 1) * rB + (NH - 1) * rH + (Tk - 1) * rT + 1  # rows from a's first to its last
        return a, _address(a), n, (rB, rH, rT)
    rows = np.array(a, order="C")  # (B, NH, Tk, hs) a copy
    return rows, _address(rows), B * NH * Tk, (NH * Tk, Tk, 1)


@numba.njit(cache=True)
def _address(a):
    # the address of a's first element (a.ctypes.data without making the ctypes object)
    return a.ctypes.data


def _check(q, k, v, key_mask):
    """Validate; q contiguous; mask (B, Tk) bool (k, v are read as rows, see `_rows`)."""
    q, mask = check_attention(q, k, v, key_mask)
    return q, k.shape[2], mask


def _bits(a: np.ndarray) -> np.ndarray:
    """float16 k or v -> its uint16 bits (a view; numba's CPU targets have no float16 arrays),
    which `as_f32` widens; float32 as it is."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _padded(a: np.ndarray, Tk4: int) -> np.ndarray:
    """a (B, NH, Tk, ...) -> (B, NH, Tk4, ...), a copy with zeros past Tk."""
    a4 = np.zeros((*a.shape[:2], Tk4, *a.shape[3:]), a.dtype)  # (B, NH, Tk4, ...)
    a4[:, :, : a.shape[2]] = a
    return a4


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask=None):
    """q (B, NH, Tq, hs), k, v (B, NH, Tk, hs), key_mask (B, Tk) bool or None -> (B, NH, Tq, hs).

    k and v are read in place when the keys of a head are adjacent rows of hs floats (the KV
    cache's prefix views, contiguous arrays), copied once otherwise (the model's slices of qkv).
    float16 k and v (a 16-bit KV cache) go to the kernel as their bits (uint16 views) and are
    widened exactly as they are read (`as_f32`), each key and value once per query.
    """
    q, Tk, mask = _check(q, k, v, key_mask)
    out = np.empty(q.shape, np.float32)  # (B, NH, Tq, hs)
    lse = np.empty(q.shape[:3], np.float32)  # (B, NH, Tq)
    if q.size:
        kb, ka, kn, ks = _rows(_bits(k))
        vb, va, vn, vs = _rows(_bits(v))
        small = q.size * Tk < _SERIAL_BELOW
        kernel = _attention_forward_serial_kernel if small else _attention_forward_kernel
        like = _LIKE[kb.dtype.char]  # the dtype the kernel reads
        # kb, vb (k, v or their copies) stay referenced here while the kernel reads them
        kernel(q, np.array((ka, kn, va, vn), np.int64), like, ks, vs, Tk, mask, out, lse)
    return out, (q, k, v, mask, out, lse)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _attention_rows_kernel(q, kaddr, vaddr, like, caps, n, mask, out, lse):
    # q (R, NH, 1, hs); kaddr, vaddr (R,) addresses of (NH, caps[r], hs) C-contiguous arrays
    # of like's dtype (float32, or uint16: float16 bits); n (R,) keys per row; mask (1, max n)
    # all True -> writes out (R, NH, 1, hs), lse
    R, NH, _, hs = q.shape
    for rh in prange(R * NH):
        r = rh // NH
        h = rh - r * NH
        cap = caps[r]
        kr = numba.carray(_ptr_like(kaddr[r], like), (NH * cap, hs))  # (NH * cap, hs) row r's keys
        vr = numba.carray(_ptr_like(vaddr[r], like), (NH * cap, hs))
        steps = (0, cap, 1)  # key j of head h at row h * cap + j
        _forward_head(q[r : r + 1], kr, steps, vr, steps, n[r], mask, out[r : r + 1],
                      lse[r : r + 1], h)  # fmt: skip


def attention_rows_forward(q: np.ndarray, ks: list, vs: list, n) -> np.ndarray:
    """One decode step of R sequences, each over a KV cache of its own (ref/batching.py):
    q (R, NH, hs); ks[r], vs[r] (NH, cap_r, hs) C-contiguous, all float32 or all float16 (a
    batch-1 cache's layer, `cache.k[layer, 0]`); n (R,) keys per row, 1 <= n[r] <= cap_r, all
    visible -> (R, NH, hs).

    One parallel launch over the R * NH (row, head) pairs instead of R calls of
    `attention_forward`. Each pair runs `_forward_head`, the kernel's own code for one head
    and one query, on its own row's keys only: out[r] depends on q[r], ks[r] and vs[r] alone,
    the same bits whatever R and the other rows (ROW-INVARIANT; tests/test_serve_engine.py).
    The caches differ in capacity, so the kernel gets each row's arrays as an address
    (numba.carray over it): every array is checked here for dtype, shape, layout and n first,
    and the lists keep them alive for the call.
    """
    q = check_f32("attention_rows", "q", q)
    if q.ndim != 3:
        raise ValueError(f"attention_rows: q must be (R, NH, hs), got {q.shape}")
    R, NH, hs = q.shape
    n = np.asarray(n, dtype=np.int64)  # (R,)
    if len(ks) != R or len(vs) != R or n.shape != (R,):
        raise ValueError(
            f"attention_rows: q has {R} rows but ks, vs, n have {len(ks)}, {len(vs)}, {n.shape}"
        )
    kaddr = np.empty(R, np.int64)  # (R,)
    vaddr = np.empty(R, np.int64)  # (R,)
    caps = np.empty(R, np.int64)  # (R,)
    kv16 = R and getattr(ks[0], "dtype", None) == np.float16  # all float16, else all float32
    dtype = np.dtype(np.float16 if kv16 else np.float32)
    for r in range(R):
        for name, a, addr in (("ks", ks[r], kaddr), ("vs", vs[r], vaddr)):
            ok = isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 3
            if not (ok and a.flags.c_contiguous and a.shape[0] == NH and a.shape[2] == hs):
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ValueError(
                    f"attention_rows: {name}[{r}] must be C-contiguous {dtype} "
                    f"({NH}, cap, {hs}) like ks[0], got {got}"
                )
            addr[r] = a.ctypes.data
        caps[r] = ks[r].shape[1]
        if vs[r].shape != ks[r].shape or not 1 <= n[r] <= caps[r]:
            raise ValueError(
                f"attention_rows: row {r}: n = {n[r]} keys, ks {ks[r].shape}, vs {vs[r].shape}"
            )
    out = np.empty((R, NH, 1, hs), np.float32)  # (R, NH, 1, hs)
    lse = np.empty((R, NH, 1), np.float32)  # (R, NH, 1)
    if R:
        mask = np.ones((1, int(n.max())), dtype=bool)  # (1, max n)
        like = np.empty(0, np.uint16 if kv16 else np.float32)  # the dtype the kernel reads
        _attention_rows_kernel(q[:, :, None], kaddr, vaddr, like, caps, n, mask, out, lse)
    return out[:, :, 0]


@numba.njit(cache=True, error_model="numpy")
def _kv_store_f16(cache, P, new):
    # cache (B, NH, capacity, hs) uint16 (float16 bits), new (B, NH, T, hs) float32, any
    # strides -> cache[:, :, P : P + T] = new rounded to float16
    B, NH, T, hs = new.shape
    C = cache.shape[2] * hs  # values per head
    if T == 1:  # a decode step: B * NH rows far apart, each a miss; start them all first
        for bh in range(B * NH):
            prefetch(cache, bh * C + P * hs)
            prefetch(cache, bh * C + P * hs + hs - 1)
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                for c in range(hs):
                    cache[b, h, P + t, c] = f16_bits(new[b, h, t, c])


def kv_store(cache: np.ndarray, P: int, new: np.ndarray) -> None:
    """ref.ops.kv_store: cache[:, :, P : P + T] = new. A float16 cache is rounded to it here,
    the same bits as numpy's cast, which converts one value at a time (a decode step of 16
    sequences of GPT-2 124M: 31 against 8 us for a layer's keys, 0.55 ms a step for keys and
    values); a float32 cache, or arrays the kernel does not take, get numpy's assignment. A
    decode step's B * NH destination rows lie a cache's capacity apart, each a cache miss: the
    kernel prefetches them all before it writes (0.58 against 0.47 ms a step, one run each).
    """
    ok = isinstance(cache, np.ndarray) and isinstance(new, np.ndarray)
    ok = ok and cache.dtype == np.float16 and new.dtype == np.float32 and cache.flags.c_contiguous
    ok = ok and cache.ndim == 4 and new.ndim == 4 and cache.flags.writeable
    if not (ok and new.shape[:2] == cache.shape[:2] and new.shape[3] == cache.shape[3]):
        ref_ops.kv_store(cache, P, new)  # numpy's checks and errors, or float32
        return
    if not 0 <= P <= cache.shape[2] - new.shape[2]:
        raise ValueError(
            f"kv_store: {new.shape[2]} new keys at slot {P} exceed the cache's "
            f"{cache.shape[2]} slots"
        )
    # a C-contiguous copy of the model's strided view (48 KB a decode step of 16 sequences,
    # 2 us): with its layout known the loop vectorises (9-13 against 15-21 us a call without)
    _kv_store_f16(cache.view(np.uint16), P, np.ascontiguousarray(new))


def attention_backward(dout: np.ndarray, cache):
    """dout (B, NH, Tq, hs) -> dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs)."""
    q, k, v, mask, out, lse = cache
    dout = check_attention_dout(dout, q)
    k, v = k.astype(np.float32, copy=False), v.astype(np.float32, copy=False)  # (B, NH, Tk, hs)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    dq = np.empty(q.shape, np.float32)  # (B, NH, Tq, hs)
    dk = np.zeros((B, NH, Tk, hs), np.float32)  # (B, NH, Tk, hs)
    dv = np.zeros((B, NH, Tk, hs), np.float32)  # (B, NH, Tk, hs)
    if q.size:
        # keys four at a time without a ragged tail: zero-padded copies, O(Tk hs) per head
        # against the O(Tq Tk hs) of the kernel
        Tk4 = (Tk + 3) // 4 * 4
        k4, v4 = _padded(k, Tk4), _padded(v, Tk4)  # (B, NH, Tk4, hs)
        mask4 = _padded(mask[:, None], Tk4)[:, 0]  # (B, Tk4), False past Tk
        _attention_backward_kernel(dout, q, k4, v4, Tk, mask4, out, lse, dq, dk, dv)
    return dq, dk, dv


VARIANTS = {"attention": {"numba": (attention_forward, attention_backward)}}
