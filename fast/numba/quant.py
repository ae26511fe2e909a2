"""Linear layers on stored 16- and 8-bit weights (ref/quant.py's QWeight): x @ dequant(W).T + b.

Shape legend: M = rows of x (B * T), K = reduction (Cin), N = outputs (Cout, or V for the LM
head); W is stored (N, K), row-major; nb = ceil(K / 32) q8_0 blocks per row; G = groups of
_R = 4 output rows.

Every format dequantizes exactly to float32 (bfloat16 and float16 widen exactly; a q8_0
weight qs * d has 8 + 11 significant bits), so each kernel turns a few rows of W into float32
and computes in float32, like the reference: the dtypes differ from the float32 model in
their weights' values only, never in the arithmetic. Activations stay float32 (no q8_0 of x:
a NaN or Inf in x stays where it is, and the accuracy is that of the weights alone).

Variants, chosen on M by `qlinear_forward`:
    rows    M <= ROWS_MAX_M (64): decode steps, batch 1 to 64. Parallel over groups of _R
            output rows: a task widens its group's rows into an L1 buffer (_R, K) float32
            once, then runs every row of x against it, so W is streamed from memory once
            whatever M (bytes streamed once: the batch-1 mat-vec is bound by bandwidth). One
            inner loop (_dot_group: _R sums sharing each load of x) computes every output, so
            out[m, n] is the same sequence of float32 operations whatever M is and whatever the
            other rows hold: ROW-INVARIANT, bit for bit (tests/test_numba_quant.py). A group's
            rows past N are zeros in the buffer and never stored. float32 QWeights run the
            same kernel (their full groups read in place): the server's batch invariance.
    tiles   M > ROWS_MAX_M: prompts. Dequantize a tile of W's rows into a float32 buffer of
            about _TILE_BYTES (a parallel Numba kernel) and multiply with numpy's BLAS; a
            float32 QWeight goes to BLAS directly (x @ W.T reads W in place).
Threshold: ROWS_MAX_M is where invariance is wanted (decode batches up to 64), not where the
variants cross. Measured (best of 10, ms, workqueue layer, 2 cores, idle-ish), rows / tiles:
    (3072, 768) float32  M=16 1.40 / 2.04   M=32 2.70 / 2.07   M=64 7.70 / 2.57
                int8     M=16 1.08 / 3.93   M=32 1.80 / 3.29   M=64 2.83 / 4.91
    (768, 3072) float32  M=32 2.43 / 2.04   M=64 7.55 / 3.00;  int8 M=64 4.86 / 4.35
so float32 QWeights would go to BLAS from M = 32 if invariance did not matter, and int8 near
M = 64; the rows kernel is a hand-written mat-mul without BLAS's register and cache blocking.

Widening: bfloat16 is its bits shifted into a float32's top half (an LLVM bitcast); float16
goes through LLVM's half type (`fpext half -> float`, one VCVTPH2PS per 16 values with F16C);
q8_0 is int8 -> float32 times the block's float16 scale, a block at a time in LLVM vector IR
(_q8_block_to_f32 says why).

Limits: W (N, K) with N, K >= 1; x (..., K) float32. Inference only (no backward).
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from fast.numba.common import FASTMATH, check_f32, prefetch
from ref.quant import QK, QWeight, n_blocks

ROWS_MAX_M = 64  # rows of x up to which the row-invariant kernel runs (decode batches)
_R = 4  # output rows per group: 4 sums share each load of x (and 4 x 16 lanes fit registers)
_TASKS = 16  # parallel tasks of the rows kernel (each allocates its (_R, K) buffer once)
_AHEAD = 4  # groups ahead whose rows are prefetched (16 rows: 12 KB of int8 at K = 768)
_TILE_BYTES = 1 << 20  # float32 bytes of W per dequantized tile on the BLAS path (L2-sized)


# ---------------------------------------------------------------------------------------------
# widening one stored value to float32


@intrinsic
def _f16_bits_to_f32(typingctx, h):
    """uint16 bits of an IEEE half -> float32, exactly (LLVM fpext; NaN, Inf, subnormals)."""
    if not isinstance(h, types.Integer) or h.bitwidth != 16:
        return None
    sig = types.float32(h)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


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
        zero = ir.Constant(ir.IntType(32), 0)
        lane = builder.insert_element(ir.Constant(vf32, ir.Undefined), args[2], zero)
        splat = builder.shuffle_vector(
            lane,
            ir.Constant(vf32, ir.Undefined),
            ir.Constant(ir.VectorType(ir.IntType(32), QK), [0] * QK),
        )
        builder.store(builder.fmul(w, splat), dst, align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# filling a group's buffer: rows n0 .. n0 + _R of W as float32, zeros past N


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _fill_bf16(w, n0, buf):
    """w (N, K) uint16 bfloat16 bits -> buf (_R, K) float32."""
    N, K = w.shape
    for r in range(_R):
        n = n0 + r
        if n < N:
            for k in range(K):
                buf[r, k] = _u32_bits_to_f32(np.uint32(w[n, k]) << np.uint32(16))
        else:
            buf[r, :] = 0.0


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _fill_f16(w, n0, buf):
    """w (N, K) uint16 float16 bits -> buf (_R, K) float32."""
    N, K = w.shape
    for r in range(_R):
        n = n0 + r
        if n < N:
            for k in range(K):
                buf[r, k] = _f16_bits_to_f32(w[n, k])
        else:
            buf[r, :] = 0.0


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _fill_q8(qs, d, n0, buf):
    """qs (N, K) int8 and d (N, nb) uint16 float16 bits -> buf (_R, K) float32 = qs * d."""
    N, K = qs.shape
    full = K // QK
    for r in range(_R):
        n = n0 + r
        if n < N:
            qrow = qs[n]  # (K,)
            brow = buf[r]  # (K,)
            for j in range(full):
                _q8_block_to_f32(qrow, j * QK, _f16_bits_to_f32(d[n, j]), brow, j * QK)
            if full * QK < K:  # the short last block
                scale = _f16_bits_to_f32(d[n, full])
                for k in range(full * QK, K):
                    buf[r, k] = np.float32(qs[n, k]) * scale
        else:
            buf[r, :] = 0.0


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _fill_f32(w, n0, buf):
    """w (N, K) float32 -> buf (_R, K): only for a last group that runs past N."""
    N, K = w.shape
    for r in range(_R):
        n = n0 + r
        if n < N:
            buf[r, :] = w[n, :]
        else:
            buf[r, :] = 0.0


@numba.njit(inline="always", cache=True)
def _prefetch_group(a, grp, last):
    """Hint the loads of group grp + _AHEAD's rows of `a` (N, K) (a hint; changes nothing).

    Used by the int8 kernel only, as measured on 40 matrices of (3072, 768) in turn (400 MB of
    float32, so the weights come from DRAM), M = 1, GB/s of stored bytes, omp layer, 2 cores:
    int8 8.7-9.1 without, 9.7-11.0 with _AHEAD 2-4; bfloat16 12.5-16.6 without, 10-11 with
    (its loads were already streaming; the extra instructions cost more than they hid).
    Noisy figures of a shared machine: rerun them before relying on them."""
    g = grp + _AHEAD
    if g < last:
        N, K = a.shape
        step = 64 // a.itemsize  # elements per cache line
        n1 = min(N, (g + 1) * _R)
        for i in range(g * _R * K, n1 * K, step):
            prefetch(a, i)


# ---------------------------------------------------------------------------------------------
# the one inner loop of the rows kernels


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def _dot_group(g, x, bias, n0, out):
    """out[m, n0 + r] = sum_k g[r, k] x[m, k] + bias[n0 + r] for every m and the r < N - n0.

    g (_R, K) float32, x (M, K), bias (N,), out (M, N). The m loop is outside the k loop and
    each sum depends on its own row of x alone: the same operations for every M."""
    M, K = x.shape
    N = out.shape[1]
    for m in range(M):
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for k in range(K):
            xv = x[m, k]
            s0 += g[0, k] * xv
            s1 += g[1, k] * xv
            s2 += g[2, k] * xv
            s3 += g[3, k] * xv
        out[m, n0] = s0 + bias[n0]
        if n0 + 1 < N:
            out[m, n0 + 1] = s1 + bias[n0 + 1]
        if n0 + 2 < N:
            out[m, n0 + 2] = s2 + bias[n0 + 2]
        if n0 + 3 < N:
            out[m, n0 + 3] = s3 + bias[n0 + 3]


# ---------------------------------------------------------------------------------------------
# rows kernels (M <= ROWS_MAX_M): parallel over _TASKS runs of groups, a buffer per task


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _rows_f32(x, w, bias, out):
    """x (M, K), w (N, K) float32, bias (N,) -> out (M, N)."""
    N, K = w.shape
    G = (N + _R - 1) // _R
    tasks = min(G, _TASKS)
    for t in prange(tasks):
        buf = np.empty((_R, K), np.float32)  # (_R, K), for the last group only
        for grp in range(G * t // tasks, G * (t + 1) // tasks):
            n0 = grp * _R
            if n0 + _R <= N:
                _dot_group(w[n0 : n0 + _R], x, bias, n0, out)  # in place: a (_R, K) view
            else:
                _fill_f32(w, n0, buf)
                _dot_group(buf, x, bias, n0, out)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _rows_bf16(x, w, bias, out):
    """x (M, K), w (N, K) uint16 bfloat16 bits, bias (N,) -> out (M, N)."""
    N, K = w.shape
    G = (N + _R - 1) // _R
    tasks = min(G, _TASKS)
    for t in prange(tasks):
        buf = np.empty((_R, K), np.float32)  # (_R, K)
        for grp in range(G * t // tasks, G * (t + 1) // tasks):
            _fill_bf16(w, grp * _R, buf)
            _dot_group(buf, x, bias, grp * _R, out)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _rows_f16(x, w, bias, out):
    """x (M, K), w (N, K) uint16 float16 bits, bias (N,) -> out (M, N)."""
    N, K = w.shape
    G = (N + _R - 1) // _R
    tasks = min(G, _TASKS)
    for t in prange(tasks):
        buf = np.empty((_R, K), np.float32)  # (_R, K)
        for grp in range(G * t // tasks, G * (t + 1) // tasks):
            _fill_f16(w, grp * _R, buf)
            _dot_group(buf, x, bias, grp * _R, out)


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True, nogil=True)
def _rows_q8(x, qs, d, bias, out):
    """x (M, K), qs (N, K) int8, d (N, nb) uint16 float16 bits, bias (N,) -> out (M, N)."""
    N, K = qs.shape
    G = (N + _R - 1) // _R
    tasks = min(G, _TASKS)
    for t in prange(tasks):
        buf = np.empty((_R, K), np.float32)  # (_R, K)
        for grp in range(G * t // tasks, G * (t + 1) // tasks):
            _prefetch_group(qs, grp, G)
            _fill_q8(qs, d, grp * _R, buf)
            _dot_group(buf, x, bias, grp * _R, out)


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
            tile[r, k] = _f16_bits_to_f32(w[n0 + r, k])


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
            _q8_block_to_f32(qrow, j * QK, _f16_bits_to_f32(d[n, j]), trow, j * QK)
        if full * QK < K:
            scale = _f16_bits_to_f32(d[n, full])
            for k in range(full * QK, K):
                tile[r, k] = np.float32(qs[n, k]) * scale


# ---------------------------------------------------------------------------------------------
# public launchers


def _stored(q: QWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """The arrays a kernel takes, checked against the QWeight's dtype: (data, scale), with
    float16 data and scales as their uint16 bits (one compiled signature, LLVM's half)."""
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
    data, scale = _stored(q)
    out = np.empty((x2.shape[0], data.shape[0]), np.float32)  # (M, N)
    if q.dtype == "float32":
        _rows_f32(x2, data, bias, out)
    elif q.dtype == "bfloat16":
        _rows_bf16(x2, data, bias, out)
    elif q.dtype == "float16":
        _rows_f16(x2, data, bias, out)
    else:
        _rows_q8(x2, data, scale, bias, out)
    return out


def tiles_forward(x2: np.ndarray, q: QWeight, bias: np.ndarray | None) -> np.ndarray:
    """The tiles variant at any M: x2 (M, K) float32 -> (M, N) through BLAS."""
    data, scale = _stored(q)
    N, K = data.shape
    if q.dtype == "float32":
        out = x2 @ data.T  # (M, N)
    else:
        out = np.empty((x2.shape[0], N), np.float32)  # (M, N)
        rows = max(_R, min(N, _TILE_BYTES // (4 * K)))
        tile = np.empty((rows, K), np.float32)  # (rows, K), reused
        for n0 in range(0, N, rows):
            t = tile[: min(rows, N - n0)]  # (rows', K)
            if q.dtype == "bfloat16":
                _tile_bf16(data, n0, t)
            elif q.dtype == "float16":
                _tile_f16(data, n0, t)
            else:
                _tile_q8(data, scale, n0, t)
            out[:, n0 : n0 + t.shape[0]] = x2 @ t.T  # (M, rows')
    if bias is not None:
        out += bias
    return out


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
    if x2.shape[0] <= ROWS_MAX_M:
        bias = np.zeros(N, np.float32) if b is None else b  # (N,)
        out = rows_forward(x2, q, bias)
    else:
        out = tiles_forward(x2, q, b)
    return out.reshape(*x.shape[:-1], N)


# the two variants at any M, for tests and benchmarks (inference only: no backward pair, so
# not in the backend's VARIANTS of (forward, backward))
QLINEAR_VARIANTS = {"numba_rows": rows_forward, "numba_tiles": tiles_forward}
