"""The machine's limits, measured in the same run as everything they are compared with.

    read_GBps          -- streaming read: best of a BLAS dot product x.x (threaded) and
                          numpy's max (one thread, SIMD) over an array far larger than the LLC;
                          bytes counted = the array, read once
    copy_GBps          -- numpy copyto between two such arrays; bytes counted = read + write
                          (the write-allocate read of the destination is not counted)
    matmul_f32_GFLOPs  -- an n x n x n float32 matmul through numpy's BLAS, 2 n^3 FLOPs
    gpu_*              -- on a CUDA device (torch): copy and read bandwidth, and matmul in
                          float32 (TF32 off), bfloat16 and float16

Each limit is the best (min-time) repeat: the ceiling the other numbers are a fraction of.
"""

from __future__ import annotations

import numpy as np

from bench.harness import error_record, llc_bytes, measure, record
from bench.plan import Plan


def _cpu(plan: Plan, rng: np.random.Generator) -> tuple[list[dict], dict]:
    n = max(plan.stream_bytes, 2 * llc_bytes()) // 4
    x = rng.random(n, dtype=np.float32)  # (n,)
    y = np.empty_like(x)  # (n,)
    kw = {"budget_s": plan.budget_s, "max_repeats": plan.max_repeats, "min_repeats": 3}
    recs, limits = [], {}
    reads = {"dot": lambda: np.dot(x, x), "max": lambda: x.max()}
    best = 0.0
    for name, fn in reads.items():
        t = measure(fn, **kw)
        gbps = x.nbytes / t["min"] / 1e9
        best = max(best, gbps)
        recs.append(
            record(
                "limits",
                "read",
                "numpy",
                variant=name,
                params={"bytes": x.nbytes},
                time_s=t,
                cache="exceeds-llc",
                metrics={"GBps": gbps},
            )
        )
    limits["read_GBps"] = best
    t = measure(lambda: np.copyto(y, x), **kw)
    limits["copy_GBps"] = 2 * x.nbytes / t["min"] / 1e9
    recs.append(
        record(
            "limits",
            "copy",
            "numpy",
            variant="copyto",
            params={"bytes": x.nbytes},
            time_s=t,
            cache="exceeds-llc",
            metrics={"GBps": limits["copy_GBps"]},
        )
    )
    x = y = None  # free the buffers before the matmul
    m = plan.matmul_n
    a = rng.standard_normal((m, m), dtype=np.float32)  # (m, m)
    b = rng.standard_normal((m, m), dtype=np.float32)  # (m, m)
    t = measure(lambda: a @ b, warmup=2, **kw)
    limits["matmul_f32_GFLOPs"] = 2 * m**3 / t["min"] / 1e9
    recs.append(
        record(
            "limits",
            "matmul",
            "numpy",
            variant="float32",
            params={"n": m},
            time_s=t,
            metrics={"GFLOPs": limits["matmul_f32_GFLOPs"]},
        )
    )
    return recs, limits


def _gpu(plan: Plan) -> tuple[list[dict], dict]:
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
    recs, limits = [], {}
    n = plan.gpu_stream_bytes // 4
    x = torch.rand(n, device=dev)
    y = torch.empty_like(x)
    # (case, the call, bytes it moves: a copy reads and writes each byte)
    for case, fn, moved in (
        ("gpu_copy", lambda: y.copy_(x), 2 * n * 4),
        ("gpu_read", lambda: x.sum(), n * 4),
    ):
        t = measure(fn, **kw)
        key = f"{case}_GBps"
        limits[key] = moved / t["min"] / 1e9
        recs.append(
            record(
                "limits",
                case,
                "torch",
                params={"bytes": n * 4},
                time_s=t,
                metrics={"GBps": limits[key]},
            )
        )
    x = y = None  # free the device buffers before the matmuls
    m = plan.gpu_matmul_n
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, dtype in (
            ("f32", torch.float32),
            ("bf16", torch.bfloat16),
            ("fp16", torch.float16),
        ):
            a = torch.randn(m, m, device=dev, dtype=dtype)
            b = torch.randn(m, m, device=dev, dtype=dtype)
            t = measure(lambda a=a, b=b: a @ b, warmup=2, **kw)
            key = f"gpu_matmul_{name}_GFLOPs"
            limits[key] = 2 * m**3 / t["min"] / 1e9
            recs.append(
                record(
                    "limits",
                    "gpu_matmul",
                    "torch",
                    variant=name,
                    params={"n": m},
                    time_s=t,
                    metrics={"GFLOPs": limits[key]},
                )
            )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return recs, limits


def run(plan: Plan, rng: np.random.Generator, gpu: bool) -> tuple[list[dict], dict]:
    """Records and {limit name: value} for the CPU, and the GPU when `gpu` and one exists."""
    recs, limits = _cpu(plan, rng)
    if gpu:
        try:
            g_recs, g_limits = _gpu(plan)
        except Exception as e:  # a broken driver must not lose the CPU numbers
            g_recs = [error_record("limits", "gpu", "torch", e)]
            g_limits = {}
        recs += g_recs
        limits.update(g_limits)
    return recs, limits
