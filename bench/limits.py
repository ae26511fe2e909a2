"""The machine's limits, measured in the same run as everything they are compared with.

    read_GBps          -- streaming read: best of a BLAS dot product x.x (threaded),
                          numpy's max (one thread, SIMD) and, where Numba is installed, a
                          parallel sum on every core (fast.numba.common.read_sum) over an
                          array far larger than the LLC; bytes counted = the array, read once
    copy_GBps          -- numpy copyto between two such arrays; bytes counted = read + write
                          (the write-allocate read of the destination is not counted)
    matmul_f32_GFLOPs  -- an n x n x n float32 matmul through numpy's BLAS, 2 n^3 FLOPs
    gpu_*              -- on a CUDA device (torch): copy and read bandwidth, and matmul in
                          float32 (TF32 off), bfloat16 and float16

A limit is a ceiling, and other processes can only make it look lower: each is the best
(min-time) repeat of the best of `plan.limit_tries` tries, the tries of all probes taken in
turn (read, copy, matmul, read, ...) so that a burst of load spoils one try of each rather
than every try of one. The run measures them at its start and again at its end, and uses the
best of the two (`best`); `rescore` then recomputes what the records derived from the start's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bench.harness import error_record, llc_bytes, measure, record
from bench.plan import Plan
from bench.workload import device_limits, roofline


@dataclass
class Probe:
    """One measurement feeding a limit: `amount` / time / 1e9 is its rate (GB/s, GFLOP/s)."""

    limit: str  # the key in the limits dict; several probes of one limit: the best counts
    case: str
    variant: str
    fn: Callable[[], object]
    amount: int  # bytes moved or FLOPs done by one call
    metric: str  # "GBps" | "GFLOPs"
    params: dict = field(default_factory=dict)
    cache: str | None = None
    warmup: int = 1


def _best_of_tries(
    probes: list[Probe], tries: int, backend: str, phase: str, kw: dict
) -> tuple[list[dict], dict]:
    """Every probe `tries` times, in turn; a record per probe (its best try's times, the rate
    of every try) and {limit: the best rate of its probes}."""
    rates: list[list[float]] = [[] for _ in probes]
    best_t: list[dict | None] = [None for _ in probes]
    for _ in range(max(tries, 1)):
        for i, p in enumerate(probes):
            t = measure(p.fn, warmup=p.warmup, **kw)
            rates[i].append(p.amount / t["min"] / 1e9)
            if best_t[i] is None or t["min"] < best_t[i]["min"]:
                best_t[i] = t
    recs, limits = [], {}
    for p, r, t in zip(probes, rates, best_t, strict=True):
        recs.append(
            record(
                "limits",
                p.case,
                backend,
                variant=p.variant,
                params={**p.params, "phase": phase},
                time_s=t,
                cache=p.cache,
                metrics={p.metric: max(r), "tries": r},
            )
        )
        limits[p.limit] = max(limits.get(p.limit, 0.0), max(r))
    return recs, limits


def _cpu(plan: Plan, rng: np.random.Generator, phase: str) -> tuple[list[dict], dict]:
    n = max(plan.stream_bytes, 2 * llc_bytes()) // 4
    x = rng.random(n, dtype=np.float32)  # (n,)
    y = np.empty_like(x)  # (n,)
    m = plan.matmul_n
    a = rng.standard_normal((m, m), dtype=np.float32)  # (m, m)
    b = rng.standard_normal((m, m), dtype=np.float32)  # (m, m)
    stream = {"params": {"bytes": x.nbytes}, "cache": "exceeds-llc"}
    probes = [
        Probe("read_GBps", "read", "dot", lambda: np.dot(x, x), x.nbytes, "GBps", **stream),
        Probe("read_GBps", "read", "max", lambda: x.max(), x.nbytes, "GBps", **stream),
        Probe(
            "copy_GBps", "copy", "copyto", lambda: np.copyto(y, x), 2 * x.nbytes, "GBps", **stream
        ),
        Probe(
            "matmul_f32_GFLOPs",
            "matmul",
            "float32",
            lambda: a @ b,
            2 * m**3,
            "GFLOPs",
            params={"n": m},
            warmup=2,
        ),
    ]
    parallel = _parallel_read(x)
    if parallel is not None:
        fn, nbytes = parallel
        probes.insert(2, Probe("read_GBps", "read", "numba_sum", fn, nbytes, "GBps", **stream))
    kw = {"budget_s": plan.budget_s, "max_repeats": plan.max_repeats, "min_repeats": 3}
    return _best_of_tries(probes, plan.limit_tries, "numpy", phase, kw)


def _parallel_read(x: np.ndarray) -> tuple[Callable[[], object], int] | None:
    """A read of x on every core (fast.numba.common.read_sum over rows of 1024 floats) and
    the bytes it reads, or None without Numba. One thread's reduction cannot saturate some
    machines' memory (2-core Zen 5 VMs: numpy's max and BLAS's dot 35 GB/s, this 44-72), and
    a ceiling below what llama.cpp's decode reached (1.17 of it) is no ceiling."""
    try:
        from fast.numba.common import n_partials, read_sum
    except ImportError:
        return None
    a = x[: x.size // 1024 * 1024].reshape(-1, 1024)  # (R, 1024), a view
    partials = np.empty(n_partials(a.shape[0]), np.float32)
    return (lambda: read_sum(a, partials)), a.nbytes


def _gpu(plan: Plan, phase: str) -> tuple[list[dict], dict]:
    """Device limits through torch; nothing where torch or a CUDA device is missing."""
    try:
        import torch
    except ImportError:
        return [], {}

    if not torch.cuda.is_available():
        return [], {}
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    kw = {"budget_s": plan.budget_s, "max_repeats": plan.max_repeats, "sync": sync}
    n = plan.gpu_stream_bytes // 4
    x = torch.rand(n, device=dev)  # (n,)
    y = torch.empty_like(x)  # (n,)
    stream = {"params": {"bytes": n * 4}}
    probes = [  # a copy reads and writes each byte
        Probe("gpu_copy_GBps", "gpu_copy", "", lambda: y.copy_(x), 2 * n * 4, "GBps", **stream),
        Probe("gpu_read_GBps", "gpu_read", "", lambda: x.sum(), n * 4, "GBps", **stream),
    ]
    recs, limits = _best_of_tries(probes, plan.limit_tries, "torch", phase, kw)
    x = y = None  # free the device buffers before the matmuls
    m = plan.gpu_matmul_n
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        probes = []
        for name, dtype in (
            ("f32", torch.float32),
            ("bf16", torch.bfloat16),
            ("fp16", torch.float16),
        ):
            a = torch.randn(m, m, device=dev, dtype=dtype)  # (m, m)
            b = torch.randn(m, m, device=dev, dtype=dtype)  # (m, m)
            probes.append(
                Probe(
                    f"gpu_matmul_{name}_GFLOPs",
                    "gpu_matmul",
                    name,
                    lambda a=a, b=b: a @ b,
                    2 * m**3,
                    "GFLOPs",
                    params={"n": m},
                    warmup=2,
                )
            )
        mm_recs, mm_limits = _best_of_tries(probes, plan.limit_tries, "torch", phase, kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return recs + mm_recs, {**limits, **mm_limits}


def run(
    plan: Plan, rng: np.random.Generator, gpu: bool, phase: str = "start"
) -> tuple[list[dict], dict]:
    """Records and {limit name: value} for the CPU, and the GPU when `gpu` and one exists;
    `phase` ("start" | "end") goes into the records' params."""
    recs, limits = _cpu(plan, rng, phase)
    if gpu:
        try:
            g_recs, g_limits = _gpu(plan, phase)
        except Exception as e:  # a broken driver must not lose the CPU numbers
            g_recs = [error_record("limits", "gpu", "torch", e, params={"phase": phase})]
            g_limits = {}
        recs += g_recs
        limits.update(g_limits)
    return recs, limits


def best(*measured: dict) -> dict:
    """{limit: the highest of its values in `measured`} (the start's and the end's): the
    ceiling closest to the machine's, whichever pass the other processes spoiled less."""
    out: dict = {}
    for limits in measured:
        for k, v in (limits or {}).items():
            if v is not None and (out.get(k) is None or v > out[k]):
                out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# what the records derive from the limits, recomputed for other limits


def _mm_key(device: str, dtype: str) -> str:
    """The matmul limit a model of `dtype` on `device` is compared with (bench/suite_generate)."""
    if device != "cuda":
        return "matmul_f32_GFLOPs"
    return f"gpu_matmul_{'bf16' if dtype == 'bfloat16' else 'f32'}_GFLOPs"


def rescore(results: list[dict], limits: dict) -> None:
    """Recompute, in place, every record's figures that depend on the limits (the ops'
    roofline and fraction_of_limit, prefill's fraction_of_matmul, decode's ceiling and
    fraction_of_ceiling) for `limits`, by the formulas the suites use."""
    for r in results:
        if r["status"] != "ok":
            continue
        m, p = r["metrics"], r["params"]
        device = p.get("device", "cpu")
        if r["suite"] == "ops" and "roofline_s" in m:
            work = {k: m[k] for k in ("flops", "read_bytes", "write_bytes")}
            lim = device_limits(limits, device, p.get("dtype", "float32"))
            t_roof, bound = roofline(work, lim)
            m["roofline_s"], m["bound"] = t_roof, bound
            m["fraction_of_limit"] = None if t_roof is None else t_roof / r["time_s"]["min"]
        elif r["suite"] == "generate" and r["case"] == "prefill" and "fraction_of_matmul" in m:
            peak = limits.get(_mm_key(device, p.get("dtype", "float32")))
            m["fraction_of_matmul"] = m["GFLOPs"] / peak if peak else None
        elif r["suite"] == "generate" and r["case"] == "decode" and "bytes_per_step" in m:
            read = limits.get("gpu_read_GBps" if device == "cuda" else "read_GBps")
            if read:
                ceiling = p["B"] * read * 1e9 / m["bytes_per_step"]
                m["ceiling_tokens_per_s"] = ceiling
                m["fraction_of_ceiling"] = m["tokens_per_s"] / ceiling
