"""LLVM vector IR for the Numba kernels that are written as intrinsics (quant.py, gemm.py).

A kernel written in IR does the operations it names and no others: no fast-math flags, so LLVM
may schedule and allocate registers but not reassociate, and a sum is the same sequence of
float32 operations wherever it is inlined. These helpers build that IR: 16-lane float32
vectors (a zmm register with AVX-512; two ymm where LLVM splits them), fused multiply-adds,
loads that widen the stored 16-bit formats exactly, lane sums in a fixed order, broadcasts,
a 16 x 16 transpose, prefetch hints, and calls of named x86 intrinsics.

HOST: the host CPU's features as LLVM reads them (Numba compiles for the host).
"""

from __future__ import annotations

import llvmlite.binding
from llvmlite import ir
from numba.core import cgutils

L = 16  # lanes per vector
F32 = ir.FloatType()
I32 = ir.IntType(32)
I64 = ir.IntType(64)
V16F = ir.VectorType(F32, L)
HOST = llvmlite.binding.get_host_cpu_features()
AVX512 = bool(HOST.get("avx512f"))


def lanes(builder, v, lo: int, hi: int):
    """Lanes lo .. hi of vector v, as a vector."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, hi - lo), [*range(lo, hi)]))


def sum_lanes(builder, v):
    """The 16 lanes of v summed as a fixed tree: halves added until one lane is left."""
    n = L
    while n > 1:
        v = builder.fadd(lanes(builder, v, 0, n // 2), lanes(builder, v, n // 2, n))
        n //= 2
    return builder.extract_element(v, ir.Constant(I32, 0))


def fma16(builder, a, b, c):
    """a * b + c lane by lane, rounded once (llvm.fma on <16 x float>)."""
    fnty = ir.FunctionType(V16F, [V16F, V16F, V16F])
    fma = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32")
    return builder.call(fma, [a, b, c])


def load16(builder, ptr, bits: int, align: int):
    """16 consecutive stored values of `bits` bits from ptr, as an integer or float vector."""
    elt = F32 if bits == 0 else ir.IntType(bits)
    return builder.load(builder.bitcast(ptr, ir.VectorType(elt, L).as_pointer()), align=align)


def store16(builder, v, ptr):
    """Store the <16 x float> v at the float32 pointer ptr (no alignment assumed)."""
    builder.store(v, builder.bitcast(ptr, V16F.as_pointer()), align=4)


def widen16(dtype: str, builder, ptr):
    """16 stored weights from ptr -> <16 x float>, exactly (each format widens exactly)."""
    if dtype == "float32":
        return load16(builder, ptr, 0, 4)
    v = load16(builder, ptr, 16, 2)
    if dtype == "float16":  # VCVTPH2PS
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), L)), V16F)
    wide = builder.zext(v, ir.VectorType(I32, L))  # bfloat16: its bits in a float32's top half
    sixteen = ir.Constant(ir.VectorType(I32, L), [16] * L)
    return builder.bitcast(builder.shl(wide, sixteen), V16F)


def splat(builder, f, n: int = L):
    """<n x float> of n copies of the float32 f."""
    vty = ir.VectorType(F32, n)
    lane = builder.insert_element(ir.Constant(vty, ir.Undefined), f, ir.Constant(I32, 0))
    mask = ir.Constant(ir.VectorType(I32, n), [0] * n)
    return builder.shuffle_vector(lane, ir.Constant(vty, ir.Undefined), mask)


def transpose16(builder, rows: list) -> list:
    """16 vectors of 16 lanes, rows[r][c] -> cols with cols[c][r] = rows[r][c]: the 2 x 2 block
    transpose applied at block sizes 8, 4, 2, 1, rows r and r + b exchanging their off-diagonal
    blocks at each size (64 two-source shuffles for 256 values)."""
    rows = list(rows)
    b = L // 2
    while b >= 1:
        keep = ir.Constant(ir.VectorType(I32, L), [c if not c & b else L + c - b for c in range(L)])
        swap = ir.Constant(ir.VectorType(I32, L), [c + b if not c & b else L + c for c in range(L)])
        for r in (r for r in range(L) if not r & b):
            lo, hi = rows[r], rows[r + b]
            rows[r] = builder.shuffle_vector(lo, hi, keep)
            rows[r + b] = builder.shuffle_vector(lo, hi, swap)
        b //= 2
    return rows


def prefetch(builder, ptr, offset: int):
    """Hint a load of the cache line `offset` bytes past ptr (llvm.prefetch: read, keep)."""
    i8p = ir.IntType(8).as_pointer()
    at = builder.gep(builder.bitcast(ptr, i8p), [ir.Constant(I64, offset)])
    fnty = ir.FunctionType(ir.VoidType(), [i8p, I32, I32, I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [at, ir.Constant(I32, 0), ir.Constant(I32, 3), ir.Constant(I32, 1)])


def x86(builder, name: str, ret, *args):
    """A call of the x86 intrinsic `name` (its LLVM name) on args, returning type ret."""
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), list(args))
