"""The timing harness: warm-up, repeats with min/median, cache flushing, peak memory, and the
environment written into every result file.

Timing: `measure(fn)` calls `fn` `warmup` times untimed (JIT compilation, page faults, BLAS
thread start-up), then at least `min_repeats` times and up to `max_repeats` times until
`budget_s` seconds of timed calls have passed. It reports min and median; the min is the
number closest to what the hardware can do on a shared machine, the median shows the noise.

Caches: an op whose working set is smaller than `FLUSH_FACTOR` x the last-level cache is timed
with the cache flushed before every call (a buffer of twice the LLC is rewritten), so it reads
its inputs from DRAM as it would inside a model whose weights and activations do not fit in
cache. Larger working sets evict themselves. Every record says which ("flushed" or
"exceeds-llc"). An op whose output fits in the LLC can still beat the copy bandwidth: its
writes stay in cache until after the timed call (the largest shapes do not have that edge).

Peak memory: on Linux, writing 5 to /proc/self/clear_refs resets the process's high-water
mark of resident memory (VmHWM), so the peak of one call can be read without a subprocess.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

FLUSH_FACTOR = 4  # flush the cache for working sets under 4 x LLC
SPIN_CYCLES = 1_000_000  # GPU clock cycles queued before a timed call (~0.5 ms at 2 GHz)


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 30,
    budget_s: float = 0.5,
    before: Callable[[], object] | None = None,
    sync: Callable[[], object] | None = None,
    events: bool = False,
) -> dict:
    """Time `fn()`; `before()` runs untimed before each call (cache flush, state reset) and
    `sync()` inside the timed region after it (a GPU's queue). Returns
    {"min", "median", "n", "warmup"} in seconds.

    events=True (CUDA): the time is the GPU's, between two CUDA events recorded around the
    call, as triton.testing.do_bench measures. Before the first event the stream gets
    `before()`'s work (the L2 flush) and a ~0.5 ms spin (torch.cuda._sleep), so the host has
    queued the call before the GPU reaches it: the time is the kernels' own, without the
    Python launch overhead that a fast host or a CUDA graph would hide anyway."""
    if events:
        return _measure_events(fn, warmup, min_repeats, max_repeats, budget_s, before)
    for _ in range(warmup):
        if before is not None:
            before()
        fn()
        if sync is not None:
            sync()
    times: list[float] = []
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) < budget_s):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return time_stats(times, warmup)


def _measure_events(fn, warmup, min_repeats, max_repeats, budget_s, before) -> dict:
    import torch

    for _ in range(warmup):
        if before is not None:
            before()
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) < budget_s):
        if before is not None:
            before()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)  # ms -> s
    return {**time_stats(times, warmup), "timer": "cuda-events"}


def time_stats(times: list[float], warmup: int) -> dict:
    """A record's time_s: {"min", "median", "n"} of the timed calls, and the untimed ones."""
    return {
        "min": min(times),
        "median": statistics.median(times),
        "n": len(times),
        "warmup": warmup,
    }


def step_stats(times: list[float]) -> dict:
    """The time_s of consecutive steps whose first is the warm-up (the time of each step of a
    trainer, of a decode loop): the first is dropped unless it is the only one."""
    timed = times[1:] if len(times) > 1 else times
    return time_stats(timed, len(times) - len(timed))


# ---------------------------------------------------------------------------------------------
# caches


def cache_sizes() -> dict[str, int]:
    """{"L1d": bytes, "L2": bytes, "L3": bytes} from sysfs (Linux); empty elsewhere."""
    out: dict[str, int] = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return out
    for e in entries:
        if not e.startswith("index"):
            continue
        try:
            with open(f"{base}/{e}/level") as f:
                level = f.read().strip()
            with open(f"{base}/{e}/type") as f:
                kind = f.read().strip()
            with open(f"{base}/{e}/size") as f:
                size = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(size[-1:], 1)
        value = int(size.rstrip("KMG")) * mult
        out[f"L{level}" + ("d" if kind == "Data" else "")] = value
    return out


def llc_bytes() -> int:
    """The last-level cache; 32 MiB when sysfs says nothing (a typical server L3)."""
    sizes = cache_sizes()
    return max(sizes.values()) if sizes else 32 * 1024**2


class CacheFlusher:
    """Calling it rewrites a buffer of twice the LLC, evicting everything else."""

    def __init__(self, llc: int | None = None):
        n = 2 * (llc_bytes() if llc is None else llc) // 4
        self.buf = np.zeros(n, np.float32)

    def __call__(self) -> None:
        self.buf += 1.0


def cache_policy(working_set: int, llc: int) -> str:
    return "flushed" if working_set < FLUSH_FACTOR * llc else "exceeds-llc"


# ---------------------------------------------------------------------------------------------
# memory


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss(fn: Callable[[], object], gpu: bool = False) -> dict:
    """Run `fn` once; {"peak_rss_bytes": process peak during it, "rss_before_bytes"}, and
    with `gpu` "peak_gpu_bytes": torch's peak of allocated device memory during it.

    The peak is the whole process (weights included); the growth above `rss_before_bytes` is
    what the call itself allocated (a lower bound: freed memory that malloc reuses is not
    counted twice). None where /proc is not available.
    """
    return with_peak_memory(fn, gpu)[1]


def with_peak_memory(fn: Callable[[], object], gpu: bool = False) -> tuple[object, dict]:
    """(what `fn()` returned, peak_rss's memory of the call)."""
    if gpu:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ok = reset_peak_rss()
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM") if ok else None
    out = {"peak_rss_bytes": peak, "rss_before_bytes": before}
    if gpu:
        torch.cuda.synchronize()
        out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return result, out


# ---------------------------------------------------------------------------------------------
# environment

ENV_VARS = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_L2_SIZE",
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "GOMP_SPINCOUNT",
    "OMP_WAIT_POLICY",
    "CUDA_VISIBLE_DEVICES",
)
LIBRARIES = ("numpy", "numba", "torch", "triton", "transformers", "threadpoolctl", "matplotlib")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that are installed (None: not installed). Imports nothing
    heavy: reads package metadata."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def thread_settings() -> dict:
    """BLAS and OpenMP pools in force (threadpoolctl), the threads of numba and torch where
    they are already imported (importing them here would change what is measured), and
    malloc's thresholds where fast/numba set them (None: glibc's own, or the user's)."""
    out: dict = {}
    try:
        from threadpoolctl import threadpool_info

        out["threadpools"] = [
            {k: v for k, v in info.items() if k != "filepath"} for info in threadpool_info()
        ]
    except ImportError:
        out["threadpools"] = "threadpoolctl not installed"
    if sys.modules.get("numba") is not None:
        out["numba_threads"] = sys.modules["numba"].get_num_threads()
        out["numba_threading_layer"] = _numba_layer()
    if sys.modules.get("torch") is not None:
        out["torch_threads"] = sys.modules["torch"].get_num_threads()
    common = sys.modules.get("fast.numba.common")
    if common is not None:  # malloc's thresholds, where the numba backend set them
        kept = {"mmap": common.MALLOC_MMAP_THRESHOLD, "trim": common.MALLOC_TRIM_THRESHOLD}
        out["malloc_thresholds"] = kept if common.MALLOC_SET else None
    return out


def _numba_layer() -> str | None:
    try:
        return sys.modules["numba"].threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return None


def gpu_info() -> dict | None:
    """The GPU torch sees, or None (no torch, or no device)."""
    try:
        import torch
    except ImportError:
        return None

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {
        "name": p.name,
        "memory_bytes": p.total_memory,
        "multiprocessors": p.multi_processor_count,
        "capability": f"{p.major}.{p.minor}",
        "cuda": torch.version.cuda,
    }


def environment() -> dict:
    """Everything about the machine and software that a number depends on."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "caches": cache_sizes(),
        "memory_bytes": _mem_total(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "libraries": library_versions(),
        "git_commit": _git_commit(),
    }


def busy_machine(
    cpu_count: int | None, start: list[float] | None, end: list[float] | None = None
) -> str | None:
    """A warning when the 1-minute load average (os.getloadavg()[0]) at the start or at the
    end of a run is above the machine's CPU count; None otherwise. More runnable threads than
    cores means other processes took CPU time from the benchmark: its times are slow, its
    limits low, its fractions of them high."""
    loads = [(label, x[0]) for label, x in (("at the start", start), ("at the end", end)) if x]
    if not cpu_count or not any(v > cpu_count for _, v in loads):
        return None
    where = ", ".join(f"{v:.2f} {label}" for label, v in loads)
    return (
        f"busy machine: load average {where} (1 minute) on {cpu_count} CPUs, above the core "
        "count: other processes competed with the benchmark, so its times, limits and "
        "fractions are unreliable (run it again on an idle machine)"
    )


# ---------------------------------------------------------------------------------------------
# result records (the schema is documented in bench/__init__.py)


def record(
    suite: str,
    case: str,
    backend: str,
    *,
    variant: str = "",
    params: dict | None = None,
    time_s: dict | None = None,
    metrics: dict | None = None,
    cache: str | None = None,
    status: str = "ok",
    reason: str | None = None,
) -> dict:
    return {
        "suite": suite,
        "case": case,
        "backend": backend,
        "variant": variant,
        "params": params or {},
        "status": status,
        "reason": reason,
        "time_s": time_s,
        "cache": cache,
        "metrics": metrics or {},
    }


def error_record(suite: str, case: str, backend: str, e: BaseException, **fields) -> dict:
    """The record of a measurement that raised: status "error", the exception as reason."""
    return record(suite, case, backend, status="error", reason=error_text(e), **fields)


def silent(msg: str) -> None:
    """The default progress log of the suites: nothing."""


def error_text(e: BaseException) -> str:
    """One line naming the exception, for a record's `reason`."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:300]
