"""Linear layers on stored 16- and 8-bit weights (ref/quant.py's QWeight): x @ dequant(W).T + b.

Shape legend: M = rows of x (B * T), K = reduction (Cin), N = outputs (Cout, or V for the LM
head); W is stored (N, K), row-major; nb = ceil(K / 32) q8_0 blocks per row.

float32, bfloat16, float16: every format dequantizes exactly to float32 (the 16-bit ones widen
exactly), so the kernels widen W to float32 and compute in float32, like the reference: these
dtypes differ from the float32 model in their weights' values only. Activations stay float32.
int8: q8_0 weights times q8_0 activations, in integers, as the reference defines it (x rounded
to q8_0 blocks per row, ref.quant.q8_0_activations): the kernel below "int8".

Variants for the float formats, chosen on M by `qlinear_forward`:
    rows    M <= ROWS_MAX_M (64): decode steps, batch 1 to 64. Parallel over output rows n: a
            row of W is read once, 32 values at a time, each chunk widened in registers and
            multiplied into two 16-lane accumulators per (n, m), in LLVM vector IR (_make_dot
            says why). M < 4: each row of W against each row of x. From M = 4: groups of 3
            rows of W against 4 rows of x at once (24 accumulators; each widened chunk of W
            serves 4 rows of x, each chunk of x 3 rows of W; on a CPU without AVX-512, 2 x 2
            from M = 2, its 16 registers holding fewer), then the rows left over; a
            group's first pass prefetches the next group's rows of W (the passes after it find
            theirs in L1). Each out[m, n] is the same sequence of float32 operations whatever
            M is and whatever the other rows hold: ROW-INVARIANT, bit for bit
            (tests/test_numba_quant.py). float32 QWeights run the same kernel: the server's
            batch invariance.
    tiles   M > ROWS_MAX_M: prompts. With AVX-512, the packed gemm of fast/numba/gemm.py:
            panels of W widened and transposed into an L2-sized buffer, 8 x 48 register tiles
            (1.4-1.9x numpy's BLAS under OPENBLAS_CORETYPE=Haswell; that module says more).
            Elsewhere, or when a tile does not fit (N < 48): dequantize a tile of W's rows
            into a float32 buffer of about _TILE_BYTES (a parallel Numba kernel) and multiply
            with numpy's BLAS; a float32 QWeight goes to BLAS directly (`gemm_nt`: x @ W.T
            reading W in place).
Threshold: ROWS_MAX_M is where invariance is wanted (decode batches up to 64), not where the
variants cross. At M = 16 (`python -m bench.tools.numba_quant_timing --kernels`; one run, best
of 7, the weights in the L3 except the LM head's): float32 127 GFLOP/s, bfloat16 166-174, the
LM head from memory 85 / 118; BLAS's sgemm reaches 70-76 at this M and 187 on large squares.
Pairs of rows of W against 4 rows of x (12 loads per 16 multiply-adds against 9 now) gave
80-135. One accumulator per (n, m) reached 138-200 in groups of 4 x 4, but a single
accumulator chain per row made float32 and float16 batch-1 decode 10-25% slower (fewer loads
in flight), and interleaving rows of W at batch 1 halved the streaming rate of weights from
memory (measured, interleaved runs): batch 1 reads one row at a time with two accumulators,
and the groups keep that arithmetic.

Batch 1 (decode), measured on the 124M shapes with the weights coming from memory, omp layer,
2 cores (the same tool; machine shared, best of 5): GB/s of stored bytes, the LM head (50257,
768) / c_fc (3072, 768): float32 38.9 / 36.0, bfloat16 37.9 / -, float16 34.4 / 55.8 (c_fc
partly in the 32 MB L3), against a streaming read of 31 GB/s. An earlier design that widened
groups of 4 rows into an L1 buffer first reached 8-13 GB/s.

int8 (every M, one kernel, `q8_forward`; the section "int8" below has the layout): 16 rows of
W in the 16 lanes of AVX-512 VNNI's VPDPBUSD, 64 integer multiply-adds per instruction, each
block's sum exact, then one conversion and one fma per block; on AVX2 without VNNI the same
integers from VPMADDUBSW and VPMADDWD (AMD Zen 3: 93-146 GOP/s at M = 16 and 64 on c_fc,
best of 30 calls, against 13-15 for the widened 32-bit products it replaced; sgemm 123-131).
AVX-512 VNNI, `python -m bench.tools.numba_quant_timing --kernels` on Sapphire Rapids (one
run, best of 7, 2 cores, the quantization of x included): M = 16, the 124M block shapes
480-533 GOP/s (float32 rows kernel in the same run: 148-162) and the LM head from memory 526
(109); M = 64 on c_fc 648 GOP/s, against BLAS's sgemm at 345 GFLOP/s on (1024, 1024)
squares; M = 1 from cache 163-180 GOP/s, the LM head
from memory 53 GB/s. In a decode step the weights come from memory and the workers wake for
each call, so the 16-row step's linears take 13-16 ms where the kernel alone takes 7.
On Zen 5 (2 cores, weights from memory) the tiles of 8 and 16 rows of x prefetch W 8 KB ahead
in its stream (_PF_BYTES), 25-35% faster at M = 16 than leaving it to the hardware's
prefetchers (an earlier try, on Sapphire Rapids, of prefetching whole groups ahead changed
nothing there). Tiles of 16 rows of x (one pass over a group's W for a 16-sequence step) are
9-18% faster than two of 8 there (alternated in one process, best of 7, weights from memory:
c_attn 115-122 against 137-142 us, mlp.c_proj 146-148 against 176-178, the LM head 2.45-2.51
against 2.77-2.87 ms), though on Sapphire Rapids, without the prefetch, they were slower.
The limit: `vpdpbusd_rate` times 16 independent chains of VPDPBUSD on one core, 3.66 G a
second on 2-core Zen 5 (one a cycle; more chains give no more), 936 GOP/s for both cores; the
kernel makes 0.55-0.62 of it from cache (python -m bench.tools.numba_quant_timing prints both)
and 0.5 at M = 16 with its weights from memory: per block it adds a conversion, a scale multiply,
an fma and the offset's broadcast to each 8 VPDPBUSD of a row of x.
A prompt on int8 runs after the tiled attention's BLAS calls, whose OpenBLAS threads spin for
a while after each and took turns with the kernel's (a 512-token int8 prompt 578 ms against
330 with OpenBLAS at one thread): fast/numba/flash.py's forward now caps BLAS at one thread.

Widening: bfloat16 is its bits shifted into a float32's top half (an LLVM bitcast); float16
goes through LLVM's half type (`fpext half -> float`, one VCVTPH2PS per 16 values with F16C);
q8_0 (the tiles variant, kept for tests: the int8 kernel is faster at every M) is int8 ->
float32 times the block's float16 scale, a block at a time in LLVM vector IR
(_q8_block_to_f32 says why).

Limits: W (N, K) with N, K >= 1; x (..., K) float32. Inference only (no backward).
"""

from __future__ import annotations

import threading
import time
import weakref
from types import FunctionType

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fast.numba import gemm
from fast.numba.common import (
    FASTMATH,
    ThreadpoolController,
    as_f32,
    blas_threads,
    check_f32,
    worker_pool,
)
from fast.numba.simd import (
    AVX512,
    F32,
    HOST,
    I32,
    I64,
    V16F,
    L,
    fma16,
    lanes,
    load16,
    prefetch,
    splat,
    sum_lanes,
    widen16,
    x86,
)
from ref.quant import QK, QWeight, n_blocks

ROWS_MAX_M = 64  # rows of x up to which the row-invariant kernel runs (decode batches)
# float32 bytes of W per dequantized tile on the BLAS path: every block matrix of 124M-355M in
# one tile, so BLAS multiplies it whole (a 512-token int8 prefill: 1 MB tiles 912 ms, 4 MB 827,
# 16 MB 794, float32 weights 805; interleaved runs). The buffer is kept per thread (_TILE):
# 16 MB of fresh pages on every call would cost their page faults each time.
_TILE_BYTES = 1 << 24
_TILE = threading.local()


# ---------------------------------------------------------------------------------------------
# widening one stored value to float32


@intrinsic
def _u32_bits_to_f32(typingctx, u):
    """The low 32 bits of an integer -> the float32 they encode (LLVM trunc and bitcast; numba
    widens `uint32 << n` to 64 bits)."""
    if not isinstance(u, types.Integer) or u.bitwidth < 32:
        return None
    sig = types.float32(u)

    def codegen(context, builder, signature, args):
        low = builder.trunc(args[0], ir.IntType(32)) if u.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return sig, codegen


@intrinsic
def _q8_block_to_f32(typingctx, qs, k0, scale, out, o0):
    """out[o0 : o0 + 32] = qs[k0 : k0 + 32] * scale, for a full q8_0 block (C-contiguous 1-D
    int8 qs and float32 out; the caller keeps both ranges inside the arrays).

    Written as one <32 x i8> load, sitofp and fmul in LLVM IR: numba leaves LLVM's SLP
    vectoriser off (NUMBA_SLP_VECTORIZE=0), and a loop of a constant 32 iterations is fully
    unrolled into 32 scalar conversions before the loop vectoriser sees it (measured: 6x
    slower than this on a 768-wide row)."""
    ok = isinstance(qs, types.Array) and qs.dtype == types.int8 and qs.layout == "C"
    ok = ok and isinstance(out, types.Array) and out.dtype == types.float32 and out.layout == "C"
    if not (ok and qs.ndim == 1 and out.ndim == 1 and scale == types.float32):
        return None
    sig = types.void(qs, k0, scale, out, o0)

    def codegen(context, builder, signature, args):
        src_a = context.make_array(signature.args[0])(context, builder, args[0])
        dst_a = context.make_array(signature.args[3])(context, builder, args[3])
        vi8 = ir.VectorType(ir.IntType(8), QK)
        vf32 = ir.VectorType(ir.FloatType(), QK)
        src = builder.bitcast(builder.gep(src_a.data, [args[1]]), vi8.as_pointer())
        dst = builder.bitcast(builder.gep(dst_a.data, [args[4]]), vf32.as_pointer())
        w = builder.sitofp(builder.load(src, align=1), vf32)
        builder.store(builder.fmul(w, splat(builder, args[2], QK)), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# the rows kernels' dot products, in LLVM vector IR
#
# R rows of W against P rows of x: the full 32-wide chunks of K, each widened from its stored
# form to two <16 x float> and multiplied into 16-lane accumulators of (r, p) with llvm.fma,
# then a fixed tree of adds across the lanes. Written in IR rather than as a Numba
# loop so the operations are these and no others: no fast-math flags, so LLVM may schedule
# but not reassociate, and each (n, m) sum is the same sequence of float32 operations whatever
# R, P and the batch are (ROW-INVARIANT). The P rows of x share each chunk's widened weights,
# the R rows of W each chunk of x.
#   float32 / bfloat16 / float16: acc_h = fma(w_h, x_h, acc_h) for the two halves h of a chunk
#     (two accumulators: a batch-1 row keeps two chains of multiply-adds in flight)


def _make_dot(dtype: str, R: int, P: int):
    """An intrinsic dot(w, d, n0, x, m0) -> R * P float32, index r * P + p: the sum over the
    full 32-chunks of K of W[n0 + r, k] x[m0 + p, k]. w (N, K) C-contiguous stored data, d
    any array (unread: the template's signature), x (M, K) float32 C-contiguous; the caller
    keeps n0 + R <= N and m0 + P <= M. pf >= 0: prefetch rows pf .. pf + R - 1 of W, chunk by
    chunk (the caller keeps pf + R <= N); pf < 0: none.
    Each (r, p) has accumulators of its own, updated in the same order whatever R and P: the
    same bits for every shape."""

    @intrinsic
    def dot(typingctx, w, d, n0, x, m0, pf):
        sig = types.UniTuple(types.float32, R * P)(w, d, n0, x, m0, pf)

        def codegen(context, builder, signature, args):
            w_a = context.make_array(signature.args[0])(context, builder, args[0])
            x_a = context.make_array(signature.args[3])(context, builder, args[3])
            K = cgutils.unpack_tuple(builder, w_a.shape, 2)[1]
            n0_v, m0_v, pf_v = args[2], args[4], args[5]
            pf_on = builder.icmp_signed(">=", pf_v, ir.Constant(I64, 0))
            pf_rows = [builder.mul(builder.add(pf_v, ir.Constant(I64, r)), K) for r in range(R)]
            itemsize = 4 if dtype == "float32" else 2
            acc = [
                [[cgutils.alloca_once(builder, V16F) for _ in range(2)] for _ in range(P)]
                for _ in range(R)
            ]
            for slot in (s for rows in acc for row in rows for s in row):
                builder.store(ir.Constant(V16F, None), slot)
            n_v = [builder.add(n0_v, ir.Constant(I64, r)) for r in range(R)]
            w_rows = [builder.mul(n, K) for n in n_v]
            x_rows = [builder.mul(builder.add(m0_v, ir.Constant(I64, p)), K) for p in range(P)]
            chunks = builder.udiv(K, ir.Constant(I64, QK))
            with cgutils.for_range(builder, chunks) as loop:
                k0 = builder.mul(loop.index, ir.Constant(I64, QK))

                def at(data, row, h):
                    i = builder.add(builder.add(row, k0), ir.Constant(I64, L * h))
                    return builder.gep(data, [i])

                def fma_into(r, p, h, a, b):  # acc[r][p][h] = fma(a, b, acc[r][p][h])
                    slot = acc[r][p][h]
                    builder.store(fma16(builder, a, b, builder.load(slot)), slot)

                with builder.if_then(pf_on):  # the next rows of W, while these compute
                    for pr in pf_rows:
                        for line in range(0, QK * itemsize, 64):
                            prefetch(builder, at(w_a.data, pr, 0), line)
                for h in range(2):  # acc_h = fma(w_h, x_h, acc_h) for the two halves of a chunk
                    xs = [load16(builder, at(x_a.data, xr, h), 0, 4) for xr in x_rows]
                    for r in range(R):
                        wv = widen16(dtype, builder, at(w_a.data, w_rows[r], h))
                        for p in range(P):
                            fma_into(r, p, h, wv, xs[p])
            sums = []
            for r in range(R):
                for p in range(P):
                    v = builder.fadd(builder.load(acc[r][p][0]), builder.load(acc[r][p][1]))
                    sums.append(sum_lanes(builder, v))
            return context.make_tuple(builder, signature.return_type, sums)

        return sig, codegen

    return dot


# rows of W (_RF) and of x (_P) per dot call in batched decode, by the host's vector registers:
# AVX-512, 3 x 4 x 2 = 24 accumulators of the 32 zmm; AVX2 (16 ymm, each accumulator two of
# them), 2 x 2: rows_forward at M = 16 on c_fc (3072, 768), AMD Zen 3, best of 40 calls in
# three runs alternated, float32 55-67 GFLOP/s against 35-51 with 3 x 4, bfloat16 64-84
# against 39-58
_RF, _P = (3, 4) if AVX512 else (2, 2)


# the K % 32 tail, in plain float32 order (no fastmath: the same operations at every call site)


@numba.njit(inline="always", cache=True)
def _tail_f32(w, d, n, x, m, k0):
    s = np.float32(0.0)
    for k in range(k0, w.shape[1]):
        s += w[n, k] * x[m, k]
    return s


@numba.njit(inline="always", cache=True)
def _tail_bf16(w, d, n, x, m, k0):
    s = np.float32(0.0)
    for k in range(k0, w.shape[1]):
        s += _u32_bits_to_f32(np.uint32(w[n, k]) << np.uint32(16)) * x[m, k]
    return s


@numba.njit(inline="always", cache=True)
def _tail_f16(w, d, n, x, m, k0):
    s = np.float32(0.0)
    for k in range(k0, w.shape[1]):
        s += as_f32(w[n, k]) * x[m, k]
    return s


# ---------------------------------------------------------------------------------------------
# rows kernels (M <= ROWS_MAX_M): each row of W is read from memory once, whatever M.
# M == 1: parallel over rows n of W, one after the other.
# M < _P: each row n of W against every row of x. M >= _P: parallel over groups of _G = _RF rows
# of W against _P rows of x at a time, the rows of x left over one at a time, the
# last rows of W (N modulo the group) alone. Every out[m, n] is the same operations on every
# path (_make_dot).


# the names _rows reads that _make_rows binds for each format (never called as these)
_dot_1 = _dot_p = _dot_r1 = _dot_1p = _tail = None
_G = 0


def _rows(x, w, d, bias, out):
    """x (M, K) float32, w (N, K) stored data (d: unread, w again), bias (N,) -> out (M, N).
    A template: _make_rows binds _dot_1, _dot_p, _dot_r1, _dot_1p, _tail and _G for one
    storage format."""
    N, K = w.shape
    M = x.shape[0]
    k0 = K // QK * QK
    Mp = M // _P * _P
    if M == 1:  # batch 1: a row of W, then the next
        for n in prange(N):
            out[0, n] = (_dot_1(w, d, n, x, 0, -1)[0] + _tail(w, d, n, x, 0, k0)) + bias[n]
        return
    if Mp == 0:
        for n in prange(N):
            for m in range(M):
                s1 = _dot_1(w, d, n, x, m, -1)[0] + _tail(w, d, n, x, m, k0)
                out[m, n] = s1 + bias[n]
        return
    for g in prange((N + _G - 1) // _G):
        n0 = g * _G
        if n0 + _G <= N:
            for m0 in range(0, Mp, _P):
                pf = n0 + _G if m0 == 0 and n0 + 2 * _G <= N else -1  # next group, first pass
                s = _dot_p(w, d, n0, x, m0, pf)
                for r in range(_G):
                    for p in range(_P):
                        t = _tail(w, d, n0 + r, x, m0 + p, k0)
                        out[m0 + p, n0 + r] = (s[r * _P + p] + t) + bias[n0 + r]
            for m in range(Mp, M):
                s = _dot_r1(w, d, n0, x, m, -1)
                for r in range(_G):
                    out[m, n0 + r] = (s[r] + _tail(w, d, n0 + r, x, m, k0)) + bias[n0 + r]
        else:
            for n in range(n0, N):
                for m0 in range(0, Mp, _P):
                    s = _dot_1p(w, d, n, x, m0, -1)
                    for p in range(_P):
                        out[m0 + p, n] = (s[p] + _tail(w, d, n, x, m0 + p, k0)) + bias[n]
                for m in range(Mp, M):
                    s1 = _dot_1(w, d, n, x, m, -1)[0] + _tail(w, d, n, x, m, k0)
                    out[m, n] = s1 + bias[n]


def _make_rows(dtype: str, tail, G: int):
    """The rows kernel of one storage format: `_rows` compiled with that format's dot products,
    tail and group size as its globals. A new function over _rows's code with globals of its
    own, named per format, rather than a closure: numba's cache keys a closure by its pickled
    cells, which differ from process to process (every process recompiled, 6 s), and files an
    entry under the function's qualified name (one name per format keeps them apart)."""
    name = f"_rows_{dtype}"
    bound = dict(
        globals(),
        _dot_1=_make_dot(dtype, 1, 1),
        _dot_p=_make_dot(dtype, G, _P),
        _dot_r1=_make_dot(dtype, G, 1),
        _dot_1p=_make_dot(dtype, 1, _P),
        _tail=tail,
        _G=G,
    )
    fn = FunctionType(_rows.__code__, bound, name)
    fn.__qualname__ = name
    return numba.njit(parallel=True, cache=True, nogil=True)(fn)


_ROWS = {
    "float32": _make_rows("float32", _tail_f32, _RF),
    "bfloat16": _make_rows("bfloat16", _tail_bf16, _RF),
    "float16": _make_rows("float16", _tail_f16, _RF),
}


# ---------------------------------------------------------------------------------------------
# int8: q8_0 weights times q8_0 activations in integers (every M)
#
# ref.quant.qlinear_forward's int8 product is deq(q8_0(x)) @ deq(W).T: x rounded to q8_0 blocks
# of its own (quantize_x_q8), then per block b of 32 along K the integer dot product
# I_b = sum_k qx[m, k] qs[n, k] (exact in int32), scaled by d_w[n, b] d_x[m, b] (two float16
# scales: their product is exact in float32) and summed over the blocks in float32:
#     out[m, n] = fma(float(I_b), d_w[n, b] d_x[m, b], out[m, n]) for b = 0, 1, ... ; + bias[n]
# Each out[m, n] is that sequence whatever M and whatever the other rows hold: ROW-INVARIANT.
#
# VPDPBUSD (AVX-512 VNNI) adds to each 32-bit lane the four products of an unsigned byte of
# one operand and a signed byte of the other: 64 multiply-adds per instruction against 16 for
# a float32 FMA. The lanes are 16 rows of W (_LANES), so no sum across lanes is ever needed:
#   * the weights are kept as qs + 128, unsigned (an XOR of the sign bit), interleaved once per
#     QWeight (_prepare_q8) as (groups of 16 rows, nb, 8, 16, 4): each 64-byte load is four
#     consecutive k of 16 rows, and a group's bytes are contiguous (one stream per thread);
#   * each 4 bytes of a row of qx are broadcast to the 16 lanes;
#   * sum_k (qs + 128) qx = I + 128 sum_k qx: the lanes start the block at cx[m, b] =
#     -128 sum_k qx[m, k] (quantize_x_q8 computes it, negated already so that the kernel
#     broadcasts it straight from memory), so they hold I_b exactly;
#   * then one int -> float conversion and one fma per block and (16 rows x a row of x).
# Rows of x go 16 at a time, then 8, 4 and 1 (each load of W serves them all, its lanes 4 rows
# at a time). K is padded to a
# multiple of 32 with zero weights and zero quants (the short last block needs no code of its
# own), N to a multiple of 16 (the kernel writes a padded (M, Np) output).
# AVX2 without VNNI (AMD Zen 2 and 3, most laptops before 2021) has VPMADDUBSW: the two
# products of adjacent unsigned x signed bytes summed into 16 bits, saturating, so qs + 128
# (up to 255 x 127, twice) would overflow. There the sign trick of llama.cpp's AVX2 dot
# products keeps every pair within 16 bits: |qs| (unsigned, <= 128) times qx with qs's sign
# (VPSIGNB; |qx| <= 127 so negating it is exact), 2 x 128 x 127 < 2^15, then VPMADDWD by ones
# into the 32-bit lanes: they hold I_b itself and start the block at 0. Rows of x go 2 at a
# time there (AVX2 has 16 ymm registers; 4 rows' lanes and their operands would spill).
# Elsewhere (no AVX2) the same lanes are computed by widening to 32-bit multiplies
# (_vnni_lanes "wide"). All three compute the same integers, so the same bits.

# the tiles of 8 and 16 rows of x (M >= 8: batched decode) prefetch W this many bytes on in wu's
# stream, 16 lines ahead of each 64-byte load. Weights from memory, 16 rows of x, 2-core AMD Zen 5
# (tiles of 8 then), three runs alternated, best of 15 each (us, none / 8 KB / 12 KB / 24 KB ahead):
# c_attn 155-190 / 120-122 / 118-124 / 124-134, c_fc 212-278 / 163-171 / 159-166 / 160-165, the LM
# head 3196-3341 / 2435-2475 / 2260-2699 / 2356-2941. The hardware's prefetchers alone leave the
# vector units waiting on memory at every group. Batch 1 (the tile of 1 row) gains nothing from it
# (the LM head 531-585 us without, 562-652 with 8 KB): its loads alone stream the weights.
_PF_BYTES = 8192
_Q8_SERIAL_X = 1 << 14  # elements of x up to which the kernel quantizes x on one thread
_LANES = 16  # rows of W per group: the 16 int32 / float32 lanes of a zmm register
_V16I = ir.VectorType(I32, _LANES)
_V64B = ir.VectorType(ir.IntType(8), 64)
_V16H = ir.VectorType(ir.IntType(16), _LANES)  # 16 float16 scales, as bits
VNNI = bool(HOST.get("avx512vnni")) and bool(HOST.get("avx512bw"))
ISA = "vnni" if VNNI else "avx2" if HOST.get("avx2") else "wide"  # the int8 kernel's here
ISAS = ("vnni", "avx2", "wide")
_ISA_ROWS = {"vnni": 4, "avx2": 2, "wide": 4}  # rows of x whose lanes are in flight at once


def _splat_int(builder, v, vty):
    """<n x iN> of n copies of the integer v."""
    lane = builder.insert_element(ir.Constant(vty, ir.Undefined), v, ir.Constant(I32, 0))
    mask = ir.Constant(ir.VectorType(I32, vty.count), [0] * vty.count)
    return builder.shuffle_vector(lane, ir.Constant(vty, ir.Undefined), mask)


def _half(builder, v, h: int):
    """Bytes 32 h .. 32 h + 31 of a <64 x i8> (a ymm's worth)."""
    return builder.shuffle_vector(
        v, v, ir.Constant(ir.VectorType(I32, 32), list(range(32 * h, 32 * h + 32)))
    )


def _vnni_lanes(builder, acc, a, b, isa: str):
    """acc + for each of 16 int32 lanes l the sum over j < 4 of a[4l + j] times b[4l + j]
    (b signed bytes): isa "vnni" one VPDPBUSD, a unsigned (qs + 128); "wide" the same integers
    by widening; "avx2" a the signed weights' bytes (qs), VPSIGNB, VPMADDUBSW, VPMADDWD."""
    if isa == "vnni":
        return x86(builder, "llvm.x86.avx512.vpdpbusd.512", _V16I, acc, a, b)
    if isa == "avx2":
        v32b = ir.VectorType(ir.IntType(8), 32)
        v16s = ir.VectorType(ir.IntType(16), 16)
        ones = ir.Constant(v16s, [1] * 16)
        zero = ir.Constant(v32b, [0] * 32)
        halves = []
        for h in range(2):  # rows 8 h .. 8 h + 7 of the group: 8 lanes of a ymm
            w, x = _half(builder, a, h), _half(builder, b, h)
            aw = builder.select(builder.icmp_signed("<", w, zero), builder.neg(w), w)  # |qs|
            sx = x86(builder, "llvm.x86.avx2.psign.b", v32b, x, w)  # qx with the sign of qs
            pairs = x86(builder, "llvm.x86.avx2.pmadd.ub.sw", v16s, aw, sx)  # |pair| < 2^15
            halves.append(
                x86(builder, "llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8), pairs, ones)
            )
        both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(_V16I, list(range(16))))
        return builder.add(acc, both)
    wide = ir.VectorType(I32, 64)
    prod = builder.mul(builder.zext(a, wide), builder.sext(b, wide))
    for j in range(4):
        pick = ir.Constant(_V16I, [4 * lane + j for lane in range(_LANES)])
        acc = builder.add(acc, builder.shuffle_vector(prod, prod, pick))
    return acc


def _make_q8_tile(P: int, isa: str, ahead: int = 0):
    """An intrinsic tile(wu, dws, g, qx, dx, cx, m0, out): out[m0 + p, 16 g : 16 g + 16] for
    p < P, as the sums above (no bias). wu (G, nb, 8, 16, 4) uint8 and dws (G, nb, 16) uint16
    (float16 bits) from _prepare_q8; qx (M, nb * 32) int8, dx (M, nb) float32, cx (M, nb)
    int32 from quantize_x_q8; out (M, 16 G) float32; all C-contiguous, the caller keeps
    g < G and m0 + P <= M. isa: the instructions of _vnni_lanes. ahead > 0: prefetch wu that
    many bytes past each 64-byte load (a hint: past wu's end it reads nothing)."""
    chunk = _ISA_ROWS[isa]

    @intrinsic
    def tile(typingctx, wu, dws, g, qx, dx, cx, m0, out):
        sig = types.void(wu, dws, g, qx, dx, cx, m0, out)

        def codegen(context, builder, signature, args):
            def array(i):
                return context.make_array(signature.args[i])(context, builder, args[i])

            wu_a, dws_a, qx_a, dx_a, cx_a, out_a = (array(i) for i in (0, 1, 3, 4, 5, 7))
            g_v, m0_v = args[2], args[6]

            def const(v):
                return ir.Constant(I64, v)

            nb = cgutils.unpack_tuple(builder, dx_a.shape, 2)[1]
            kp4 = builder.udiv(cgutils.unpack_tuple(builder, qx_a.shape, 2)[1], const(4))
            Np = cgutils.unpack_tuple(builder, out_a.shape, 2)[1]
            acc = [cgutils.alloca_once(builder, V16F) for _ in range(P)]
            for slot in acc:
                builder.store(ir.Constant(V16F, None), slot)
            m_v = [builder.add(m0_v, const(p)) for p in range(P)]
            gb = builder.mul(g_v, nb)  # blocks of the groups before g
            sign = ir.Constant(_V64B, [0x80] * 64)
            qx32 = builder.bitcast(qx_a.data, I32.as_pointer())  # 4 quants per int32
            with cgutils.for_range(builder, nb) as loop:
                b = loop.index
                w0 = builder.mul(builder.add(gb, b), const(8 * 64))  # byte of (g, b) in wu
                wv = []  # the block's 8 x 64 bytes of W: four k at a time, for every row of x
                for k4 in range(8):
                    wp = builder.gep(wu_a.data, [builder.add(w0, const(64 * k4))])
                    if ahead:
                        prefetch(builder, wp, ahead)
                    v = builder.load(builder.bitcast(wp, _V64B.as_pointer()), align=1)
                    wv.append(builder.xor(v, sign) if isa == "avx2" else v)  # avx2: qs itself
                sp = builder.gep(dws_a.data, [builder.mul(builder.add(gb, b), const(_LANES))])
                bits = builder.load(builder.bitcast(sp, _V16H.as_pointer()), align=2)
                dw = builder.fpext(
                    builder.bitcast(bits, ir.VectorType(ir.HalfType(), _LANES)), V16F
                )
                for c0 in range(0, P, chunk):  # rows of x `chunk` at a time (16 lanes each)
                    rows = range(c0, min(P, c0 + chunk))
                    mb = {p: builder.add(builder.mul(m_v[p], nb), b) for p in rows}  # in dx, cx
                    lanes = {}  # each row of x: its 16 lanes, from cx[m, b] (avx2: from 0)
                    for p in rows:
                        if isa == "avx2":
                            lanes[p] = ir.Constant(_V16I, [0] * _LANES)
                            continue
                        cx_mb = builder.load(builder.gep(cx_a.data, [mb[p]]))
                        lanes[p] = _splat_int(builder, cx_mb, _V16I)
                    x0 = {
                        p: builder.add(builder.mul(m_v[p], kp4), builder.mul(b, const(8)))
                        for p in rows
                    }
                    for k4 in range(8):  # 64 bytes of W against 4 bytes of each row of x
                        for p in rows:
                            xq = builder.load(builder.gep(qx32, [builder.add(x0[p], const(k4))]))
                            xv = builder.bitcast(_splat_int(builder, xq, _V16I), _V64B)
                            lanes[p] = _vnni_lanes(builder, lanes[p], wv[k4], xv, isa)
                    for p in rows:
                        d_x = builder.load(builder.gep(dx_a.data, [mb[p]]))
                        scale = builder.fmul(dw, splat(builder, d_x))  # exact: two float16s
                        total = builder.sitofp(lanes[p], V16F)
                        builder.store(fma16(builder, total, scale, builder.load(acc[p])), acc[p])
            n0 = builder.mul(g_v, const(_LANES))
            for p in range(P):
                at = builder.gep(out_a.data, [builder.add(builder.mul(m_v[p], Np), n0)])
                builder.store(builder.load(acc[p]), builder.bitcast(at, V16F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return tile


@intrinsic
def _round_f16(typingctx, f):
    """float32 -> the nearest float16 (ties to even; overflow to inf), widened back exactly:
    numpy's astype(float16).astype(float32) (LLVM fptrunc, fpext)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), F32)

    return types.float32(f), codegen


@intrinsic
def _q8_block(typingctx, x, m, k0, qx, dx, cx, b):
    """One full q8_0 block of a row of x whose values are all finite and within _Q8_X_MAX:
    x[m, k0 : k0 + 32] -> qx[m, k0 : k0 + 32], dx[m, b], cx[m, b], the operations of
    _quantize_row's loops on 16 lanes at a time (|x|'s maximum, d = float16(amax / 127),
    q = rint(x / d) clipped to +-127, their sum; the same bits: the maximum and an integer sum
    do not depend on their order). x (M, K) float32, qx (M, Kp) int8, dx (M, nb) float32,
    cx (M, nb) int32, all C-contiguous; the caller keeps k0 + 32 <= K. x of (16, 768):
    4.5 us against 15.6 through the loops alone, (16, 3072) 12.8 against 56.6 (the launcher
    quantize_x_q8, best of 200; 1.1 ms of a 16-sequence decode step of GPT-2 124M); batch 1
    unchanged within the noise of whole decode steps alternated with the loops' tree."""
    sig = types.void(x, m, k0, qx, dx, cx, b)

    def codegen(context, builder, signature, args):
        x_a, qx_a, dx_a, cx_a = (
            context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 3, 4, 5)
        )
        m_v, k0_v, b_v = args[1], args[2], args[6]
        K = cgutils.unpack_tuple(builder, x_a.shape, 2)[1]
        Kp = cgutils.unpack_tuple(builder, qx_a.shape, 2)[1]
        nb = cgutils.unpack_tuple(builder, dx_a.shape, 2)[1]
        at = builder.add(builder.mul(m_v, K), k0_v)
        ptrs = [builder.gep(x_a.data, [builder.add(at, ir.Constant(I64, 16 * h))]) for h in (0, 1)]
        halves = [load16(builder, p, 0, 4) for p in ptrs]  # x[m, k0 : k0 + 32], two vectors

        def vmax(a, c):
            return builder.select(builder.fcmp_ordered(">", a, c), a, c)

        def vmin(a, c):
            return builder.select(builder.fcmp_ordered("<", a, c), a, c)

        fabs = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V16F, [V16F]), "llvm.fabs.v16f32"
        )
        a = vmax(builder.call(fabs, [halves[0]]), builder.call(fabs, [halves[1]]))
        n = QK // 2
        while n > 1:  # the 16 lanes' maximum
            a = vmax(lanes(builder, a, 0, n // 2), lanes(builder, a, n // 2, n))
            n //= 2
        amax = builder.extract_element(a, ir.Constant(I32, 0))
        d = builder.fpext(
            builder.fptrunc(builder.fdiv(amax, ir.Constant(F32, 127.0)), ir.HalfType()), F32
        )
        zero = ir.Constant(F32, 0.0)
        inv = builder.select(
            builder.fcmp_ordered("!=", d, zero), builder.fdiv(ir.Constant(F32, 1.0), d), zero
        )
        rint = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V16F, [V16F]), "llvm.rint.v16f32"
        )
        lo, hi = splat(builder, ir.Constant(F32, -127.0)), splat(builder, ir.Constant(F32, 127.0))
        v16b = ir.VectorType(ir.IntType(8), L)
        q_at = builder.add(builder.mul(m_v, Kp), k0_v)
        total = ir.Constant(_V16I, [0] * L)
        for h in range(2):
            q = builder.call(rint, [builder.fmul(halves[h], splat(builder, inv))])
            q = vmin(vmax(q, lo), hi)
            qi = builder.fptosi(q, _V16I)
            total = builder.add(total, qi)
            dst = builder.gep(qx_a.data, [builder.add(q_at, ir.Constant(I64, 16 * h))])
            builder.store(builder.trunc(qi, v16b), builder.bitcast(dst, v16b.as_pointer()), align=1)
        n = L
        while n > 1:
            total = builder.add(lanes(builder, total, 0, n // 2), lanes(builder, total, n // 2, n))
            n //= 2
        tot = builder.extract_element(total, ir.Constant(I32, 0))
        mb = builder.add(builder.mul(m_v, nb), b_v)
        builder.store(d, builder.gep(dx_a.data, [mb]))
        builder.store(builder.mul(tot, ir.Constant(I32, -128)), builder.gep(cx_a.data, [mb]))
        return context.get_dummy_value()

    return sig, codegen


_Q8_X_MAX = np.float32(127.0 * 65504.0)  # |x| beyond this: a block scale float16 cannot hold


@numba.njit(inline="always", cache=True, nogil=True)
def _quantize_row(x, qx, dx, cx, m):
    """Row m of x (M, K) float32 -> qx[m] (nb * 32,) int8 (zeros past K), dx[m] (nb,) float32,
    cx[m] (nb,) int32: ref.quant.q8_0_activations bit for bit (d = float16(absmax / 127),
    q = round(x / d) clipped to +-127; a row holding NaN, Inf or |x| > 127 * 65504 gets quants 0
    and dx NaN), and cx = -128 * the sum of each block's quants (the kernel's offset)."""
    K = x.shape[1]
    nb = dx.shape[1]
    bad = False
    for k in range(K):
        bad |= not abs(x[m, k]) <= _Q8_X_MAX  # NaN fails every comparison
    for b in range(nb):
        lo = b * QK
        hi = min(K, lo + QK)
        if hi - lo == QK and not bad:
            _q8_block(x, m, lo, qx, dx, cx, b)  # the same, 16 lanes at a time
            continue
        amax = np.float32(0.0)
        for k in range(lo, hi):
            amax = max(amax, abs(x[m, k]))
        d = _round_f16(amax / np.float32(127.0))
        inv = np.float32(1.0) / d if d != 0 and not bad else np.float32(0.0)
        total = 0
        for k in range(lo, hi):
            q = 0 if bad else int(min(max(np.rint(x[m, k] * inv), -127.0), 127.0))
            qx[m, k] = q
            total += q
        for k in range(hi, lo + QK):
            qx[m, k] = 0
        dx[m, b] = np.float32(np.nan) if bad else d
        cx[m, b] = -128 * total


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_x_q8(x, qx, dx, cx):
    """x (M, K) float32 -> qx (M, nb * 32) int8, dx (M, nb) float32, cx (M, nb) int32, row by
    row as _quantize_row."""
    for m in prange(x.shape[0]):
        _quantize_row(x, qx, dx, cx, m)


# the names _rows_q8 reads; _make_rows_q8 binds them
_q8_tile_16 = _q8_tile_8 = _q8_tile_4 = _q8_tile_1 = None
_TILE16 = False


def _rows_q8(x, wu, dws, qx, dx, cx, bias, out):
    """The int8 kernel: x (M, K) float32 quantized into qx, dx, cx (_quantize_row), then out
    (M, 16 G) = the tiles above, + bias (N,) on the first N columns. A template: _make_rows_q8 binds
    _q8_tile_P (P = 16, 8, 4 rows of x; 16 where _TILE16) and _q8_tile_1. Small x is quantized on
    the calling thread (a parallel region more would cost a wake-up of the workers, 30-50 us,
    against ~10 us)."""
    G = wu.shape[0]
    M, K = x.shape
    N = bias.shape[0]
    M8 = M // 8 * 8
    M4 = M // 4 * 4
    if M * K <= _Q8_SERIAL_X:
        for m in range(M):
            _quantize_row(x, qx, dx, cx, m)
    else:
        for m in prange(M):
            _quantize_row(x, qx, dx, cx, m)
    M16 = M // 16 * 16 if _TILE16 else 0  # tiles of 16 rows: AVX-512 VNNI's 32 registers
    for g in prange(G):
        for m0 in range(0, M16, 16):
            _q8_tile_16(wu, dws, g, qx, dx, cx, m0, out)
        for m0 in range(M16, M8, 8):
            _q8_tile_8(wu, dws, g, qx, dx, cx, m0, out)
        for m0 in range(M8, M4, 4):
            _q8_tile_4(wu, dws, g, qx, dx, cx, m0, out)
        for m in range(M4, M):
            _q8_tile_1(wu, dws, g, qx, dx, cx, m, out)
        for m in range(M):
            for n in range(g * _LANES, min(N, (g + 1) * _LANES)):
                out[m, n] += bias[n]


def _make_rows_q8(isa: str):
    """_rows_q8 compiled for one of ISAS (as _make_rows does, one name each); its tiles of 8
    and 16 rows of x (16: VNNI only) prefetch wu _PF_BYTES on."""
    name = f"_rows_q8_{isa}"
    tiles = {
        f"_q8_tile_{P}": _make_q8_tile(P, isa, _PF_BYTES if P >= 8 else 0) for P in (16, 8, 4, 1)
    }
    bound = dict(globals(), **tiles, _TILE16=isa == "vnni")
    fn = FunctionType(_rows_q8.__code__, bound, name)
    fn.__qualname__ = name
    return numba.njit(parallel=True, cache=True, nogil=True)(fn)


# ---------------------------------------------------------------------------------------------
# the machine's limit for the int8 kernel: VPDPBUSD's rate on one core

_PROBE_CHAINS = 16  # independent accumulators: more than the instruction's latency needs


@intrinsic
def _vpdpbusd_chains(typingctx, n, buf):
    """n rounds of _PROBE_CHAINS independent VPDPBUSD on 64 bytes of buf (uint8, >= 64 long),
    the x operand a 4-byte broadcast from buf as in the kernel -> an int64 of the sums (kept
    so that LLVM cannot drop the work)."""
    sig = types.int64(n, buf)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[1])(context, builder, args[1]).data
        w = builder.load(builder.bitcast(data, _V64B.as_pointer()), align=1)
        x32 = builder.load(builder.bitcast(data, I32.as_pointer()), align=1)
        xb = builder.bitcast(_splat_int(builder, x32, _V16I), _V64B)
        acc = [
            cgutils.alloca_once_value(builder, ir.Constant(_V16I, [i] * _LANES))
            for i in range(_PROBE_CHAINS)
        ]
        with cgutils.for_range(builder, args[0]):
            for a in acc:
                builder.store(_vnni_lanes(builder, builder.load(a), w, xb, "vnni"), a)
        total = builder.load(acc[0])
        for a in acc[1:]:
            total = builder.add(total, builder.load(a))
        return builder.sext(builder.extract_element(total, ir.Constant(I32, 0)), I64)

    return sig, codegen


@numba.njit(cache=True)
def _probe(n, buf):
    return _vpdpbusd_chains(n, buf)


def vpdpbusd_rate(rounds: int = 2_000_000, repeat: int = 3) -> float:
    """VPDPBUSD instructions a second on the calling thread (best of `repeat`), 64 integer
    multiply-adds each: the int8 kernel's compute limit per core. 0.0 without AVX-512 VNNI."""
    if not VNNI:
        return 0.0
    buf = np.ones(64, np.uint8)
    _probe(10, buf)  # compile or load
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        _probe(rounds, buf)
        best = min(best, time.perf_counter() - t)
    return rounds * _PROBE_CHAINS / best


# by ISAS, compiled on first call; tests run each the host has (ISA and below)
ROWS_Q8 = {isa: _make_rows_q8(isa) for isa in ISAS}


# ---------------------------------------------------------------------------------------------
# dequantizing a tile of rows n0 .. n0 + rows for BLAS (M > ROWS_MAX_M)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _tile_bf16(w, n0, tile):
    """w (N, K) uint16 bfloat16 bits -> tile (rows, K) float32 = rows n0 .. n0 + rows."""
    rows, K = tile.shape
    for r in prange(rows):
        for k in range(K):
            tile[r, k] = _u32_bits_to_f32(np.uint32(w[n0 + r, k]) << np.uint32(16))


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _tile_f16(w, n0, tile):
    """w (N, K) uint16 float16 bits -> tile (rows, K) float32."""
    rows, K = tile.shape
    for r in prange(rows):
        for k in range(K):
            tile[r, k] = as_f32(w[n0 + r, k])


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _tile_q8(qs, d, n0, tile):
    """qs (N, K) int8, d (N, nb) uint16 float16 bits -> tile (rows, K) float32 = qs * d."""
    rows, K = tile.shape
    full = K // QK
    for r in prange(rows):
        n = n0 + r
        qrow = qs[n]  # (K,)
        trow = tile[r]  # (K,)
        for j in range(full):
            _q8_block_to_f32(qrow, j * QK, as_f32(d[n, j]), trow, j * QK)
        if full * QK < K:
            scale = as_f32(d[n, full])
            for k in range(full * QK, K):
                tile[r, k] = np.float32(qs[n, k]) * scale


# ---------------------------------------------------------------------------------------------
# public launchers


# id(QWeight) -> (a weak reference to it, data, scale): the checked kernel arrays of each
# QWeight, made once. Weights read from a file are read-only (memory-mapped) and a GGUF file's
# q8_0 blocks are strided views: their writeable C-contiguous copies were remade on every call
# (the float32 LM head: 154 MB per token, 55 ms of a 70 ms decode step). An entry goes when its
# QWeight is collected.
_PREPARED: dict[int, tuple] = {}
_INTERLEAVED: dict[int, tuple] = {}  # the same for the int8 kernel's layout (_prepare_q8)


def _once(table: dict, q: QWeight, make) -> tuple:
    """make(q), kept in `table` while q lives."""
    hit = table.get(id(q))
    if hit is not None and hit[0]() is q:
        return hit[1]
    arrays = make(q)
    key = id(q)
    table[key] = (weakref.ref(q, lambda _, key=key: table.pop(key, None)), arrays)
    return arrays


def _stored(q: QWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays a kernel takes, checked against the QWeight's dtype: (data, scale), with
    float16 data and scales as their uint16 bits (one compiled signature, LLVM's half);
    C-contiguous and writeable (numba types read-only arrays apart: one signature), copied once
    per QWeight where they are not (_PREPARED)."""
    return _once(_PREPARED, q, _prepare)


def _stored_q8(q: QWeight) -> tuple[np.ndarray, np.ndarray]:
    """An int8 QWeight in the int8 kernel's layout, made once per QWeight: (wu, dws)."""
    return _once(_INTERLEAVED, q, lambda q: _prepare_q8(*_stored(q)))


def _prepare_q8(qs: np.ndarray, dbits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """qs (N, K) int8, dbits (N, nb) uint16 -> wu (G, nb, 8, 16, 4) uint8 = qs + 128 (rows
    padded to 16 G and K to 32 nb with zero weights), dws (G, nb, 16) uint16 (padded rows:
    scale 0): a group's 16 rows side by side, four k at a time (the kernel's 64-byte loads).
    A second copy of the weights, as bytes: 1.06 bytes per weight more while the QWeight lives."""
    N, K = qs.shape
    nb = dbits.shape[1]
    G = -(-N // _LANES)
    w = np.zeros((G * _LANES, nb * QK), np.int8)  # (Np, Kp)
    w[:N, :K] = qs
    wu = w.view(np.uint8) ^ np.uint8(0x80)  # qs + 128, as unsigned bytes
    wu = np.ascontiguousarray(wu.reshape(G, _LANES, nb, 8, 4).transpose(0, 2, 3, 1, 4))
    d = np.zeros((G * _LANES, nb), np.uint16)  # (Np, nb)
    d[:N] = dbits
    dws = np.ascontiguousarray(d.reshape(G, _LANES, nb).transpose(0, 2, 1))
    return wu, dws


def _prepare(q: QWeight) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(q, QWeight):
        raise TypeError(f"numba backend: qlinear expects a QWeight, got {type(q).__name__}")
    want = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16, "int8": np.int8}
    if q.dtype not in want:
        raise ValueError(f"numba backend: qlinear: unknown QWeight dtype {q.dtype!r}")
    data = q.data
    if not isinstance(data, np.ndarray) or data.dtype != want[q.dtype] or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data)
        raise ValueError(
            f"numba backend: qlinear: a {q.dtype} QWeight holds (N, K) {np.dtype(want[q.dtype])}"
            f" data, got {got}"
        )
    N, K = data.shape
    if N < 1 or K < 1:
        raise ValueError(f"numba backend: qlinear: empty weight {data.shape}")
    data = np.ascontiguousarray(data)
    if q.dtype == "float16":
        data = data.view(np.uint16)
    scale = None
    if q.dtype == "int8":
        s = q.scale
        if not isinstance(s, np.ndarray) or s.dtype != np.float16 or s.shape != (N, n_blocks(K)):
            got = f"{s.dtype} {s.shape}" if isinstance(s, np.ndarray) else type(s).__name__
            raise ValueError(
                f"numba backend: qlinear: an int8 QWeight (N, K) = {(N, K)} needs float16 "
                f"scales of shape {(N, n_blocks(K))}, got {got}"
            )
        scale = np.ascontiguousarray(s).view(np.uint16)
    if not data.flags.writeable:  # numba types read-only arrays apart: one signature
        data = data.copy()
    if scale is not None and not scale.flags.writeable:
        scale = scale.copy()
    return data, scale


def rows_forward(x2: np.ndarray, q: QWeight, bias: np.ndarray) -> np.ndarray:
    """The rows variant at any M: x2 (M, K) float32, bias (N,) -> (M, N)."""
    if q.dtype == "int8":
        return q8_forward(x2, q, bias)
    data, scale = _stored(q)
    out = np.empty((x2.shape[0], data.shape[0]), np.float32)  # (M, N)
    _ROWS[q.dtype](x2, data, data if scale is None else scale, bias, out)
    return out


def q8_forward(x2: np.ndarray, q: QWeight, bias: np.ndarray, isa: str = ISA) -> np.ndarray:
    """The int8 kernel: x2 (M, K) float32, an int8 QWeight (N, K), bias (N,) -> (M, N); isa one
    of ISAS that this CPU has (the default: the fastest it has)."""
    wu, dws = _stored_q8(q)
    M, K = x2.shape
    N = q.data.shape[0]
    nb = dws.shape[1]
    qx = np.empty((M, nb * QK), np.int8)  # (M, Kp)
    dx = np.empty((M, nb), np.float32)  # (M, nb)
    cx = np.empty((M, nb), np.int32)  # (M, nb)
    out = np.empty((M, wu.shape[0] * _LANES), np.float32)  # (M, Np)
    ROWS_Q8[isa](x2, wu, dws, qx, dx, cx, bias, out)
    return out if out.shape[1] == N else np.ascontiguousarray(out[:, :N])


def tiles_forward(x2: np.ndarray, q: QWeight, bias: np.ndarray | None) -> np.ndarray:
    """The tiles variant at any M: x2 (M, K) float32 -> (M, N), on AVX-512 through the packed
    gemm (fast/numba/gemm.py) where a whole tile fits, else through BLAS (int8: x rounded to
    its q8_0 blocks first, as the reference; the int8 kernel is faster at every M)."""
    data, scale = _stored(q)
    N, K = data.shape
    if q.dtype in gemm.DTYPES and gemm.USE and gemm.fits(x2.shape[0], N):
        bias = np.zeros(N, np.float32) if bias is None else bias  # (N,)
        return gemm.packed_forward(np.ascontiguousarray(x2), data, q.dtype, bias)
    if q.dtype == "int8":
        x2 = dequantize_x_q8(x2)
    out = np.empty((x2.shape[0], N), np.float32)  # (M, N)
    if q.dtype == "float32":
        gemm_nt(x2, data, out)
    else:
        rows = max(1, min(N, _TILE_BYTES // (4 * K)))
        buf = getattr(_TILE, "buf", None)
        if buf is None or buf.size < rows * K:
            buf = _TILE.buf = np.empty(max(rows * K, _TILE_BYTES // 4), np.float32)
        tile = buf[: rows * K].reshape(rows, K)  # (rows, K), reused
        for n0 in range(0, N, rows):
            t = tile[: min(rows, N - n0)]  # (rows', K)
            if q.dtype == "bfloat16":
                _tile_bf16(data, n0, t)
            elif q.dtype == "float16":
                _tile_f16(data, n0, t)
            else:
                _tile_q8(data, scale, n0, t)
            gemm_nt(x2, t, out[:, n0 : n0 + t.shape[0]])  # (M, rows')
    if bias is not None:
        out += bias
    return out


def gemm_nt(x2: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
    """out = x2 @ w.T (x2 (M, K), w (N, K), out (M, N) a view with unit column stride), the
    columns split among numba's thread count of Python threads, each a one-thread BLAS call
    (fast/numba/common.py's pool): OpenBLAS's own threads, which spin for a while after each
    gemm, then never compete with the Numba kernels that follow (attention, GELU). A 512-token
    float32 prompt of GPT-2 124M, whole processes alternated (7 pairs; in one process the
    previous call's spinning threads fall on the next): the median of their best prompts 709
    against 742 ms, CPU time 0.91x; bfloat16 prompts (dequantized tiles) the same within noise.
    Without threadpoolctl (which caps BLAS) or with one thread: one BLAS call."""
    N = w.shape[0]
    workers = min(numba.get_num_threads(), max(1, N // 64))
    if workers == 1 or ThreadpoolController is None:
        np.matmul(x2, w.T, out=out)
        return
    cuts = [N * i // workers for i in range(workers + 1)]
    with blas_threads(1):
        pool = worker_pool(workers)
        jobs = [pool.submit(np.matmul, x2, w[a:b].T, out=out[:, a:b])
                for a, b in zip(cuts, cuts[1:], strict=False)]  # fmt: skip
        for job in jobs:
            job.result()  # raises what a worker raised


def dequantize_x_q8(x2: np.ndarray) -> np.ndarray:
    """x2 (M, K) float32 -> its q8_0 rounding (M, K) float32, exactly (quants of 8 bits times
    float16 scales): ref.quant.q8_0_activations dequantized."""
    M, K = x2.shape
    nb = n_blocks(K)
    qx = np.empty((M, nb * QK), np.int8)  # (M, Kp)
    dx = np.empty((M, nb), np.float32)  # (M, nb)
    quantize_x_q8(x2, qx, dx, np.empty((M, nb), np.int32))
    xq = qx.reshape(M, nb, QK).astype(np.float32) * dx[:, :, None]  # (M, nb, 32)
    return np.ascontiguousarray(xq.reshape(M, nb * QK)[:, :K])


def qlinear_forward(x: np.ndarray, q: QWeight, b: np.ndarray | None = None) -> np.ndarray:
    """x (..., K) float32, q a QWeight (N, K), b (N,) or None -> (..., N) float32; the backend's
    version of ref.quant.qlinear_forward. Rows kernel for M <= ROWS_MAX_M, tiles beyond."""
    x = check_f32("qlinear", "x", x)
    data_shape = q.data.shape if isinstance(q, QWeight) else None
    if data_shape is None or x.shape[-1] != data_shape[-1]:
        _stored(q)  # raises for anything that is not a QWeight
        raise ValueError(
            f"numba backend: qlinear: x (..., {x.shape[-1]}) does not match the weight "
            f"(N, K) = {data_shape}"
        )
    N = data_shape[0]
    if b is not None:
        b = check_f32("qlinear", "b", b)
        if b.shape != (N,):
            raise ValueError(f"numba backend: qlinear: bias {b.shape} must be ({N},)")
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if x2.shape[0] <= ROWS_MAX_M or q.dtype == "int8":
        bias = np.zeros(N, np.float32) if b is None else b  # (N,)
        out = rows_forward(x2, q, bias)
    else:
        out = tiles_forward(x2, q, b)
    return out.reshape(*x.shape[:-1], N)


# the two variants at any M, for tests and benchmarks (inference only: no backward pair, so
# not in the backend's VARIANTS of (forward, backward))
QLINEAR_VARIANTS = {"numba_rows": rows_forward, "numba_tiles": tiles_forward}
