"""Shared pieces of the Numba kernels: threading layer, fastmath flags, a vectorisable exp,
a prefetch hint.

Threading layer: numba's OpenMP layer (GNU libgomp) where it loads, with GOMP_SPINCOUNT=3000
unless the user set it; "workqueue" where libgomp is missing. A decode step launches about 100
parallel kernels, so the cost of a launch decides its speed. Measured on the project's 2-core
machine (124M shapes; `python -m bench.tools.numba_quant_timing`, GOMP_SPINCOUNT and
NUMBA_THREADING_LAYER set by hand; figures in bench/README.md):
  * a launch of a small kernel: 110 us on workqueue (its workers sleep between kernels), 5 us
    on omp; an int8 decode step 15-26 ms against 7.5-10 ms;
  * libgomp's default spin (300,000 turns before a worker sleeps) keeps the workers spinning
    through the BLAS calls that follow a kernel, and OpenBLAS's threads get no core: an int8
    prompt of 512 tokens took 3.8 s against 1.0 s; with one core busy elsewhere, LayerNorm on
    (4096, 768) took 7.8 ms against 1.3 ms on workqueue;
  * at 3,000 turns the workers sleep within microseconds of the last kernel: prompts as fast
    as on workqueue (within the machine's noise), LayerNorm under load 2.1 ms, decode steps as
    fast as at the default spin. Training, whose steps alternate kernels and BLAS far more
    often, still lost half its speed at 3,000 (878 against 1,621 tokens/s on workqueue, 1,740
    at 300): `gpt2 train` and `gpt2 finetune` set 300 before this module loads (gpt2/cli.py).
Numba reads the layer when it starts its thread pool (the first parallel kernel, or
numba.set_num_threads) and libgomp reads GOMP_SPINCOUNT when it loads (here, on the import of
numba's omppool below), so both are set at this module's import, before any kernel runs: with
malloc's thresholds (below), the only settings fast/numba changes outside itself.
GOMP_SPINCOUNT is process-wide (any library on the same libgomp, llama.cpp's among them, and
child processes see it): SPINCOUNT_SET says whether it was this module that set it
(bench/llama_cpp.py runs llama.cpp without it).

Freed memory (glibc's malloc, Linux): `keep_freed_memory` at import asks malloc to serve blocks
up to 32 MB from its heap and to keep up to 128 MB of freed heap before it gives memory back
to the system. By default glibc maps each large block afresh or trims the heap as soon as
twice the largest block lies free, so every op of a prompt (a (512, 3072) GELU output, 6.3 MB)
wrote to fresh pages: ~9,000 page faults per 512-token prompt of GPT-2 124M, each costing
tens of microseconds in a VM, and bias + GELU right after the gemm that made its input took
3.0-3.3 ms against 1.15 with the memory kept (a session script; llama.cpp allocates its buffers
once). Page faults of a prompt with it: 0. A user's own MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_ or glibc.malloc tunables are left as they are; MALLOC_SET says
whether this module set them. Like GOMP_SPINCOUNT, process-wide.

fastmath: {"reassoc", "contract"} lets LLVM vectorise float32 reductions (sums, dot products)
and fuse multiply-adds. "nnan"/"ninf" are left out on purpose: the attention kernels rely on
-inf comparisons for masked keys.

exp32: `math.exp` inside a Numba loop is a scalar libm call that blocks vectorisation (no SVML
here), and softmax over a 50257-wide vocabulary is dominated by it. exp32 is written with
operations LLVM vectorises: exp(y) = 2^n * exp(r), n = round(y / ln 2), r = y - n ln 2 with
|r| <= ln(2)/2, exp(r) by its degree-7 Taylor polynomial (truncation |r|^8/8! < 1.1e-8, below
float32's half ulp 6e-8), and 2^n built from its IEEE-754 bits through a bitcast.
Inputs are clamped to [-87, 88] so that 2^n stays a normal float (n in [-126, 127]); exp32
never returns 0 or inf: callers that need an exact 0 (masked keys) select it themselves.
NaN stays NaN, so a diverged model shows NaN as it does with the reference.

prefetch: LLVM's `llvm.prefetch` (x86 PREFETCHT0), a hint to start loading a cache line that
will be read soon. A kernel whose loop mixes loads with long dependency chains (attention's
decode step: dot products, softmax, weighted sums) does not keep enough loads in flight to
stream from DRAM on its own; the hint does (fast/numba/attention.py; figures in bench/README.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # optional: without it BLAS's threads stay as they are (blas_threads)
    ThreadpoolController = None

SPINCOUNT = "3000"  # libgomp spin turns before a waiting worker sleeps (see above)
SPINCOUNT_SET = False  # True when this module put GOMP_SPINCOUNT into the environment


def _choose_threading_layer() -> None:
    global SPINCOUNT_SET
    if "NUMBA_THREADING_LAYER" in os.environ:
        return  # the user's choice, as numba reads it
    if "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
        SPINCOUNT_SET = True
    try:
        import numba.np.ufunc.omppool  # noqa: F401  (loads libgomp, which reads the spin count)
    except ImportError:  # no libgomp on this machine
        numba.config.THREADING_LAYER = "workqueue"
    else:
        numba.config.THREADING_LAYER = "omp"


_choose_threading_layer()
THREADING_LAYER = numba.config.THREADING_LAYER  # what kernels may assume a launch costs

MALLOC_MMAP_THRESHOLD = 32 << 20  # bytes: larger blocks are mapped apart (glibc's upper limit)
MALLOC_TRIM_THRESHOLD = 128 << 20  # bytes of free heap kept before malloc returns memory
MALLOC_SET = False  # True when keep_freed_memory changed malloc's settings
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (see the module docstring); False where
    the C library is not glibc or the user set malloc's thresholds."""
    global MALLOC_SET
    user = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or any(k in os.environ for k in user):
        return False
    if "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables:
        return False
    try:  # "glibc 2.36"; musl has no such name (and a mallopt that does nothing)
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, ValueError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    MALLOC_SET = bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
    MALLOC_SET = bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)) and MALLOC_SET
    return MALLOC_SET


keep_freed_memory()

FASTMATH = {"reassoc", "contract"}
# Kernels that run outside a prange say error_model="numpy": numba's default ("python") tests
# every float division for zero to raise ZeroDivisionError, and that branch keeps LLVM from
# vectorising the loop around it (prange bodies already compile with the numpy model). The bias +
# GELU of a (16, 3072) decode batch on one thread: 213 us with the test, 26 us without.

_LOG2E = np.float32(1.0 / math.log(2.0))
# ln 2 split in two so that n * _LN2_HI is exact for |n| <= 127 (Cody and Waite's reduction):
# _LN2_HI keeps the top 16 bits of ln 2's float32 significand.
_LN2_HI = np.float32(0.693145751953125)
_LN2_LO = np.float32(math.log(2.0) - 0.693145751953125)
_EXP_LO = np.float32(-87.0)
_EXP_HI = np.float32(88.0)
_C2 = np.float32(1.0 / 2)
_C3 = np.float32(1.0 / 6)
_C4 = np.float32(1.0 / 24)
_C5 = np.float32(1.0 / 120)
_C6 = np.float32(1.0 / 720)
_C7 = np.float32(1.0 / 5040)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


@intrinsic
def _int32_bits_as_float32(typingctx, i):
    """Reinterpret an int32's bits as a float32 (LLVM `bitcast`, free and vectorisable)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def as_f32(typingctx, x):
    """A stored float -> float32, exactly: a float32 as it is; a uint16 as the IEEE half its bits
    encode (LLVM fpext: NaN, Inf and subnormals kept; one VCVTPH2PS per 8 or 16 values where
    the loop vectorises on a CPU with F16C). The float16 weights and KV caches are stored as
    uint16 views, numba's CPU targets having no float16 arrays."""
    if x == types.float32:
        sig = types.float32(x)

        def codegen(context, builder, signature, args):
            return args[0]

        return sig, codegen
    if isinstance(x, types.Integer) and x.bitwidth == 16:
        sig = types.float32(x)

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return sig, codegen
    return None


@intrinsic
def f16_bits(typingctx, x):
    """A float32 -> the bits (uint16) of the nearest float16, ties to even, beyond +-65504 inf:
    numpy's astype(float16) (LLVM fptrunc; one VCVTPS2PH per 8 or 16 values where the loop
    vectorises), the inverse of as_f32 on the values a float16 holds."""
    if x != types.float32:
        return None
    sig = types.uint16(x)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def prefetch(typingctx, a, i):
    """Hint a load of the cache line holding element i of C-contiguous `a` (flat index).

    Only a hint: it changes no value and never faults, but callers keep i in range anyway.
    """
    if not (isinstance(a, types.Array) and a.layout == "C" and isinstance(i, types.Integer)):
        return None  # a typing error: the flat index means nothing for a strided array
    sig = types.void(a, i)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read (0), keep in all cache levels (locality 3), data cache (1)
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always", fastmath=FASTMATH, cache=True)
def exp32(y):
    """exp(y) for float32 y, relative error ~2 ulp; see the module docstring."""
    # clamp with selects that keep NaN (min/max may drop it): a NaN input gives a NaN output
    y = _EXP_LO if y < _EXP_LO else y
    y = _EXP_HI if y > _EXP_HI else y
    n = np.floor(y * _LOG2E + _HALF)  # float32 integer in [-126, 127]
    r = (y - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln(2)/2
    p = _C7
    p = p * r + _C6
    p = p * r + _C5
    p = p * r + _C4
    p = p * r + _C3
    p = p * r + _C2
    p = p * r + _ONE
    p = p * r + _ONE  # exp(r)
    two_n = _int32_bits_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))  # 2^n
    return p * two_n


def check_f32(op: str, name: str, a) -> np.ndarray:
    """A C-contiguous, writeable float32 view or copy of `a`; other dtypes are refused by name.

    The kernels are compiled for one signature (C-contiguous writeable float32) to keep compile
    time and the on-disk cache small, and so that LLVM knows the inner stride is 1. Numba types
    a read-only array differently (one more compilation), so read-only inputs are copied: in
    practice the LayerNorm gains and biases of weights read from safetensors, (C,) each.
    """
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"numba backend: {op} expects {name} as a float32 numpy array, got {got}")
    if not a.flags.writeable:
        return a.copy()  # C-contiguous and writeable
    return np.ascontiguousarray(a)


def n_partials(rows: int) -> int:
    """How many per-thread partial sums a parallel reduction over `rows` rows writes.

    A fixed count (not the thread count), so results are bit-identical whatever the number of
    threads; 16 keeps two to sixteen threads busy and the final sum of partials tiny.
    """
    return max(1, min(16, rows))


@numba.njit(parallel=True, fastmath=FASTMATH, cache=True)
def read_sum(a, partials):
    """a (R, W) float32 C-contiguous -> partials (n,) float32: the sums of n bands of a's rows,
    each read by one thread. The streaming-read probe of the benchmarks (bench/limits.py): every
    core reads its share, as a decode step's kernels read the weights, where numpy's one-thread
    reductions and BLAS's dot product leave bandwidth unused (on 2-core Zen 5 VMs, 35 GB/s
    against 44-72). The inner loop over a row vectorises (reassoc); a flat loop did not."""
    R = a.shape[0]
    parts = partials.shape[0]
    for p in numba.prange(parts):
        s = np.float32(0.0)
        for r in range(R * p // parts, R * (p + 1) // parts):
            for c in range(a.shape[1]):
                s += a[r, c]
        partials[p] = s


def single_threaded(fn):
    """`fn` run with one Numba thread: the serial baseline of a parallel kernel, same code.

    Registered as the "numba_1thread" variant of every op so benchmarks can show what the
    parallel loop buys on a given machine (on a loaded 2-core machine, sometimes nothing).
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        previous = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            numba.set_num_threads(previous)

    return run


def check_attention(q, k, v, key_mask) -> tuple[np.ndarray, np.ndarray]:
    """The attention kernels' shared checks: float32 q (B, NH, Tq, hs), k and v (B, NH, Tk, hs)
    with Tk >= Tq, both float32 or both float16 (a 16-bit KV cache), key_mask (B, Tk) bool or
    None. Returns q as check_f32 makes it and the mask as a writeable C-contiguous (B, Tk) bool
    array (all True for None): one compiled signature."""
    q = check_f32("attention", "q", q)
    for name, a in (("k", k), ("v", v)):
        kv16 = isinstance(a, np.ndarray) and a.dtype == np.float16 and k.dtype == v.dtype
        if not (kv16 or (isinstance(a, np.ndarray) and a.dtype == np.float32)):
            check_f32("attention", name, a)  # raises, naming the tensor
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
        return q, np.ones((B, Tk), dtype=bool)  # (B, Tk)
    mask = np.asarray(key_mask)
    if mask.dtype != np.bool_ or mask.shape != (B, Tk):
        raise ValueError(
            f"attention: key_mask must be bool of shape ({B}, {Tk}), got {mask.dtype} {mask.shape}"
        )
    return q, np.array(mask, order="C")  # (B, Tk), a writeable copy


def check_attention_dout(dout, q: np.ndarray) -> np.ndarray:
    """The attention backwards' shared check: dout as check_f32 makes it, with q's shape
    (B, NH, Tq, hs)."""
    dout = check_f32("attention_backward", "dout", dout)
    if dout.shape != q.shape:
        raise ValueError(f"attention_backward: dout {dout.shape} must match q {q.shape}")
    return dout


# BLAS from Python threads: fast/numba/flash.py's forward and fast/numba/quant.py's float32
# prompts split their gemms among numba's thread count of Python threads, each calling BLAS
# capped at one thread, so OpenBLAS's own threads never run (and never spin after a call while
# the Numba kernels that follow want the cores).
_CONTROLLER: list = []  # the ThreadpoolController, made on first use
_POOL: dict = {}  # workers -> the ThreadPoolExecutor of that many threads, made on first use
# a forked child has none of the pools' threads: it makes pools of its own
os.register_at_fork(after_in_child=_POOL.clear)


def blas_threads(n: int | None):
    """A context capping BLAS at n threads (threadpoolctl), or doing nothing (n None, or no
    threadpoolctl)."""
    if n is None or ThreadpoolController is None:
        return contextlib.nullcontext()
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=n, user_api="blas")


def worker_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool of `workers` Python threads (made once per count)."""
    if workers not in _POOL:
        _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fast_numba")
    return _POOL[workers]
