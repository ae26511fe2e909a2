"""Prompt-sized linears on float32, bfloat16 and float16 weights: out = x @ W.T + b, AVX-512.

Shape legend: M = rows of x (B * T), K = reduction (Cin), N = outputs (Cout); W is stored
(N, K), row-major, as ref/quant.py's QWeight holds it. MR x NR = 8 x 48 outputs per tile.

Why a GEMM of our own: a 512-token prompt of GPT-2 124M is 88 GFLOP of linears, and numpy's
OpenBLAS picks its kernels by OPENBLAS_CORETYPE, which this project's machines set to Haswell
(256-bit FMAs): 190-230 GFLOP/s on the prompt's shapes on AMD Zen 5, 2 cores, where its
SkylakeX kernels reach 431 (bench/README.md). The kernel below reaches 340-380 there in the
same process (a session script timing it beside np.matmul on the same arrays, best of 30
calls each), whatever that variable says; a 512-token float32 prompt of GPT-2 124M 284-325 ms
against 497-548 through BLAS (the two alternated in one process).

The scheme is BLIS's, without its cache blocking of K (K is 4 C at most: 3072 for 124M, where
bp is 590 KB, within Zen 5's 1 MB L2; 6400 for 1.5B, 1.2 MB, not measured):
  pack  a thread takes a panel of NR rows of W and writes it transposed, k-major, into a
        buffer bp (K, NR) of float32, widening bfloat16 and float16 as it goes (exactly):
        16 rows x 16 k at a time, loaded as 16 vectors and transposed in registers
        (simd.transpose16); the last K % 16 columns one k at a time. Reads W once per call.
  tile  for each group of MR rows of x, the MR x NR outputs live in 24 zmm accumulators
        (8 rows x 3 vectors of 16), started at 0; at each k: 3 loads of bp[k], 8
        broadcasts of x[m, k], 24 fused multiply-adds. bp (K x 192 bytes) stays in L2 while
        the panel sweeps every row of x; x streams from L2 / L3.
Each out[m, n] is fma(x[m, k], W[n, k], .) applied for k = 0, 1, ..., K - 1 to 0, then + b[n]
(the reference's association: a bias added first would carry its rounding through K), in LLVM
vector IR (no fast-math flags): the same bits whatever M, N and the thread count. Edges
need no code of their own: the last panel starts at N - NR and the last group at M - MR,
overlapping the one before and writing the same bits again (so N >= NR and M >= MR; the
launcher says when it applies). Parallel over panels, thread t computing panels
t P / T .. (t + 1) P / T - 1 of P: each thread writes only its own columns of out.

Tile shapes measured (M = 512, the 124M block shapes, best of 30, 2 cores, Zen 5): 8 x 48 and
6 x 64 (24 accumulators) 340-380 GFLOP/s, 14 x 32 (28) 270-350, 12 x 32 80-160. The packing
takes 2-6% of a call: 0.12 ms of W (2304, 768), 0.29 ms of (768, 3072), against 0.42 and
0.89 ms for a plain loop that LLVM does not vectorise.

Without AVX-512 the 24 accumulators would take 48 of AVX2's 16 ymm registers: there the
launcher is not used (fast/numba/quant.py keeps BLAS) though the kernel stays correct.
Inference only (no backward).
"""

from __future__ import annotations

from types import FunctionType

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fast.numba.simd import AVX512, I32, I64, V16F, L, fma16, splat, store16, transpose16, widen16

MR, NR = 8, 48  # rows of x, rows of W per tile: MR * NR / 16 = 24 accumulators
DTYPES = ("float32", "bfloat16", "float16")  # stored as float32, uint16, uint16 (float16 bits)
USE = AVX512  # the launcher is faster than BLAS only where the tile fits the registers


def _i64(v: int):
    return ir.Constant(I64, v)


def _widen1(dtype: str, builder, ptr):
    """One stored weight at ptr -> float32, exactly."""
    if dtype == "float32":
        return builder.load(ptr)
    bits = builder.load(ptr)
    if dtype == "float16":
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())
    wide = builder.shl(builder.zext(bits, I32), ir.Constant(I32, 16))
    return builder.bitcast(wide, ir.FloatType())


def _make_pack(dtype: str):
    """An intrinsic pack(w, n0, bp): bp[k * NR + j] = float32(W[n0 + j, k]) for j < NR, k < K;
    w (N, K) stored data C-contiguous, the caller keeps n0 + NR <= N and bp >= K * NR long."""

    @intrinsic
    def pack(typingctx, w, n0, bp):
        sig = types.void(w, n0, bp)

        def codegen(context, builder, signature, args):
            w_a = context.make_array(signature.args[0])(context, builder, args[0])
            bp_a = context.make_array(signature.args[2])(context, builder, args[2])
            K = cgutils.unpack_tuple(builder, w_a.shape, 2)[1]
            rows = [builder.mul(builder.add(args[1], _i64(j)), K) for j in range(NR)]
            with cgutils.for_range(builder, builder.udiv(K, _i64(L))) as loop:
                k0 = builder.mul(loop.index, _i64(L))
                for h in range(NR // L):  # 16 rows of W x 16 k -> 16 k x 16 lanes of bp
                    vs = [
                        widen16(dtype, builder, builder.gep(w_a.data, [builder.add(r, k0)]))
                        for r in rows[L * h : L * h + L]
                    ]
                    for c, v in enumerate(transpose16(builder, vs)):
                        at = builder.add(
                            builder.mul(builder.add(k0, _i64(c)), _i64(NR)), _i64(L * h)
                        )
                        store16(builder, v, builder.gep(bp_a.data, [at]))
            tail0 = builder.mul(builder.udiv(K, _i64(L)), _i64(L))
            with cgutils.for_range(builder, builder.sub(K, tail0)) as loop:  # K % 16 columns
                k = builder.add(tail0, loop.index)
                for j, r in enumerate(rows):
                    v = _widen1(dtype, builder, builder.gep(w_a.data, [builder.add(r, k)]))
                    at = builder.add(builder.mul(k, _i64(NR)), _i64(j))
                    builder.store(v, builder.gep(bp_a.data, [at]))

        return sig, codegen

    return pack


@intrinsic
def _tile(typingctx, x, m0, bp, out, n0, bias):
    """out[m0 + i, n0 : n0 + NR] = (sum_k x[m0 + i, k] bp[k, :]) + bias[n0 : n0 + NR] for
    i < MR: one fma per k in k order from 0, then the bias's add. x (M, K) and out (M, N)
    float32 C-contiguous, bp (>= K * NR,) from pack, bias (N,); the caller keeps m0 + MR <= M
    and n0 + NR <= N."""
    sig = types.void(x, m0, bp, out, n0, bias)

    def codegen(context, builder, signature, args):
        x_a, bp_a, out_a, b_a = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 2, 3, 5)
        )
        m0_v, n0_v = args[1], args[4]
        K = cgutils.unpack_tuple(builder, x_a.shape, 2)[1]
        N = cgutils.unpack_tuple(builder, out_a.shape, 2)[1]
        H = NR // L
        acc = [[cgutils.alloca_once(builder, V16F) for _ in range(H)] for _ in range(MR)]
        for slot in (s for row in acc for s in row):
            builder.store(ir.Constant(V16F, None), slot)
        x_rows = [builder.mul(builder.add(m0_v, _i64(i)), K) for i in range(MR)]
        with cgutils.for_range(builder, K) as loop:
            k = loop.index
            kb = builder.mul(k, _i64(NR))
            bv = []
            for h in range(H):
                p = builder.gep(bp_a.data, [builder.add(kb, _i64(L * h))])
                bv.append(builder.load(builder.bitcast(p, V16F.as_pointer()), align=4))
            for i in range(MR):
                xv = splat(
                    builder, builder.load(builder.gep(x_a.data, [builder.add(x_rows[i], k)]))
                )
                for h in range(H):
                    builder.store(fma16(builder, xv, bv[h], builder.load(acc[i][h])), acc[i][h])
        bias_v = []  # added last, as the reference adds it to the finished sums
        for h in range(H):
            p = builder.gep(b_a.data, [builder.add(n0_v, _i64(L * h))])
            bias_v.append(builder.load(builder.bitcast(p, V16F.as_pointer()), align=4))
        for i in range(MR):
            row = builder.add(builder.mul(builder.add(m0_v, _i64(i)), N), n0_v)
            for h in range(H):
                p = builder.gep(out_a.data, [builder.add(row, _i64(L * h))])
                store16(builder, builder.fadd(builder.load(acc[i][h]), bias_v[h]), p)

    return sig, codegen


_pack = None  # the name _gemm reads, bound per format by _make_gemm (never called as this)


def _gemm(x, w, bias, out, threads):
    """x (M, K) float32, w (N, K) stored data, bias (N,) -> out (M, N); M >= MR, N >= NR; the
    panels split among `threads`. A template: _make_gemm binds _pack for one storage format."""
    M, K = x.shape
    N = w.shape[0]
    P = (N + NR - 1) // NR  # panels of W
    T = min(threads, P)
    for t in prange(T):
        bp = np.empty(K * NR, np.float32)  # (K, NR), this thread's packed panel
        for j in range(P * t // T, P * (t + 1) // T):
            n0 = min(j * NR, N - NR)  # the last panel overlaps the one before
            _pack(w, n0, bp)
            for g in range((M + MR - 1) // MR):
                _tile(x, min(g * MR, M - MR), bp, out, n0, bias)


def _make_gemm(dtype: str):
    """_gemm compiled with one format's pack as its global: a new function over _gemm's code
    named per format (numba's cache keys a function by its qualified name, and a closure by
    its pickled cells: fast/numba/quant.py's _make_rows says why)."""
    name = f"_gemm_{dtype}"
    fn = FunctionType(_gemm.__code__, dict(globals(), _pack=_make_pack(dtype)), name)
    fn.__qualname__ = name
    return numba.njit(parallel=True, cache=True, nogil=True)(fn)


_GEMM = {dtype: _make_gemm(dtype) for dtype in DTYPES}


def fits(M: int, N: int) -> bool:
    """Whether packed_forward takes x (M, K) against W (N, K): a whole tile of each."""
    return M >= MR and N >= NR


def packed_forward(x2: np.ndarray, data: np.ndarray, dtype: str, bias: np.ndarray) -> np.ndarray:
    """x2 (M, K) float32 C-contiguous, data (N, K) the stored weights (float32, or uint16 bits of
    bfloat16 / float16: fast/numba/quant.py's _stored), bias (N,) float32 -> (M, N) float32."""
    M, K = x2.shape
    N = data.shape[0]
    if dtype not in _GEMM:
        raise ValueError(f"numba backend: packed gemm: dtype {dtype!r} is not one of {DTYPES}")
    if data.shape[1] != K or bias.shape != (N,):
        raise ValueError(
            f"numba backend: packed gemm: x {x2.shape}, W {data.shape}, bias {bias.shape}"
        )
    if not fits(M, N):
        raise ValueError(f"numba backend: packed gemm needs M >= {MR} and N >= {NR}, got {M}, {N}")
    out = np.empty((M, N), np.float32)  # (M, N)
    _GEMM[dtype](x2, data, bias, out, numba.get_num_threads())
    return out
