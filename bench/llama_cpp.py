"""llama.cpp as a baseline: the same weights exported to GGUF (weights/gguf.py) and run by
llama-cpp-python (`pip install llama-cpp-python` with the CMAKE_ARGS of .ci/run: built from
source for the instruction sets /proc/cpuinfo lists; GGML_NATIVE also builds AMX code, which
kills the process on a VM that advertises AMX without enabling it), at the same thread count,
prompt and context as ours.

    available()                       llama_cpp importable
    export(params, cfg, path, type)   the params tree as GGUF f32 | f16 | q8_0 (export_gguf:
                                      the same with (cfg, params) first, bench/suite_generate's
                                      order)
    time_llama(path, threads, prompt_ids, n_decode, n_ctx) -> dict
                                      prefill and decode tokens/s of one sequence
    greedy(path, prompt_ids, n_new, threads) -> list[int]
                                      llama.cpp's greedy tokens (argmax of its logits)

What time_llama times, as llama-bench does (`-p T -n k`): the prefill is one llama_decode of
the T prompt tokens into an empty KV cache (the best of `repeats`, after one warm-up); decode
is n_decode single-token llama_decode calls timed one by one at the contexts ours are timed at
(after `decode_start` tokens), each computing the last position's logits, no sampling (the
token fed back is the prompt's, which speed does not depend on). It runs in a child process
(child_env: llama.cpp's own OpenMP settings, not the spin count fast/numba sets).
llama.cpp's KV cache is its default, float16 (ours is float32); the record says so.

Threads: ggml's CPU threads meet at OpenMP barriers that spin by default. With another
process on one of the 2 cores, 2 threads collapsed (124M q8_0 decode 0.7 tokens/s, against 73
on 1 thread); OMP_WAIT_POLICY=passive in the environment before llama_cpp is first imported
gave 67.5 on 2 threads in the same conditions. The record carries the policy it ran under.
"""

from __future__ import annotations

import os
import time

from ref.config import GPT2Config


def available() -> bool:
    """llama-cpp-python is installed. Found without importing it: its library loads GNU
    libgomp, which reads GOMP_SPINCOUNT once, at load; loaded before fast/numba sets it, numba's
    OpenMP workers would spin at libgomp's default and starve BLAS (measured: a 512-token
    float32 prompt at 280-300 tokens/s against 750 in the same process otherwise)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def export(params: dict, cfg: GPT2Config, path: str, gguf_type: str) -> None:
    """Write `params` as a GGUF file of `gguf_type` (f32 | f16 | q8_0) that llama.cpp runs."""
    from weights import gguf

    gguf.write(path, cfg, params, gguf_type)


def export_gguf(cfg: GPT2Config, params: dict, path: str, gguf_type: str) -> None:
    export(params, cfg, path, gguf_type)


def _load(path: str, threads: int, n_ctx: int, n_batch: int, logits_all: bool, f32_kv: bool):
    import llama_cpp

    kw = {}
    if f32_kv:
        kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
        **kw,
    )


def child_env() -> dict:
    """The environment llama.cpp is timed in: ours, less the GOMP_SPINCOUNT that
    fast/numba/common.py sets for numba's OpenMP workers (libgomp is shared with llama.cpp,
    whose own defaults are what its users get); a spin count the user set stays."""
    env = dict(os.environ)
    try:
        from fast.numba import common
    except ImportError:  # numba not installed: nothing of ours in the environment
        return env
    if common.SPINCOUNT_SET and env.get("GOMP_SPINCOUNT") == common.SPINCOUNT:
        env.pop("GOMP_SPINCOUNT")
    return env


def time_llama(
    gguf_path: str,
    threads: int,
    prompt_ids: list[int],
    n_decode: int,
    n_ctx: int,
    repeats: int = 3,
    decode_start: int = 0,
    isolated: bool = True,
) -> dict:
    """Prefill and decode tokens/s of llama.cpp on `gguf_path` (see the module docstring).

    Decode: `decode_start` prompt tokens are evaluated, then n_decode single-token steps are
    timed one by one (contexts decode_start + 1 ... decode_start + n_decode), as
    bench/suite_generate times ours; decode_tokens_per_s is the best step's rate (ours are
    too), decode_median_tokens_per_s the median's. isolated: run in a child process of
    `child_env()` (a fresh libgomp that reads its own settings), else in this one."""
    T = len(prompt_ids)
    if T < 1 or n_decode < 1 or T > n_ctx or not 0 <= decode_start <= T:
        raise ValueError(
            f"time_llama: need 1 <= prompt ({T}) <= n_ctx ({n_ctx}), 1 <= n_decode "
            f"({n_decode}) and 0 <= decode_start ({decode_start}) <= prompt"
        )
    if decode_start + n_decode > n_ctx:
        raise ValueError(
            f"time_llama: decode_start ({decode_start}) + n_decode ({n_decode}) > n_ctx ({n_ctx})"
        )
    args = [gguf_path, threads, list(prompt_ids), n_decode, n_ctx, repeats, decode_start]
    if not isolated:
        return _time_here(*args)
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "bench.llama_cpp"],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        check=False,
    )
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()] or ["(no output)"]
        raise RuntimeError(f"time_llama: the llama.cpp child failed: {lines[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_here(gguf_path, threads, prompt_ids, n_decode, n_ctx, repeats, decode_start) -> dict:
    import llama_cpp

    T = len(prompt_ids)
    t0 = time.perf_counter()
    llm = _load(gguf_path, threads, n_ctx, T, logits_all=False, f32_kv=False)
    load_s = time.perf_counter() - t0
    prefill_s = float("inf")
    for i in range(1 + repeats):  # the first is the warm-up
        llm.reset()  # the cache's positions start again at 0
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        if i:
            prefill_s = min(prefill_s, time.perf_counter() - t0)
    llm.reset()
    if decode_start:
        llm.eval(prompt_ids[:decode_start])
    steps = []
    for i in range(n_decode):
        t0 = time.perf_counter()
        llm.eval([prompt_ids[i % T]])
        steps.append(time.perf_counter() - t0)
    info = llama_cpp.llama_print_system_info()
    return {
        "prefill_tokens_per_s": T / prefill_s,
        "decode_tokens_per_s": 1.0 / min(steps),
        "decode_median_tokens_per_s": 1.0 / sorted(steps)[len(steps) // 2],
        "prefill_s": prefill_s,
        "decode_s": sum(steps),
        "decode_step_s": steps,
        "load_s": load_s,
        "threads": threads,
        "prompt_tokens": T,
        "n_decode": n_decode,
        "decode_contexts": [decode_start + 1, decode_start + n_decode],
        "n_ctx": n_ctx,
        "kv_cache": "f16",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "default"),
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": info.decode() if isinstance(info, bytes) else str(info),
    }


def greedy(gguf_path: str, prompt_ids: list[int], n_new: int, threads: int = 1) -> list[int]:
    """llama.cpp's greedy continuation of `prompt_ids`: the argmax of its logits at each step,
    with a float32 KV cache (as ours), so only the kernels' arithmetic differs."""
    import numpy as np

    n_ctx = len(prompt_ids) + n_new
    llm = _load(gguf_path, threads, n_ctx, len(prompt_ids), logits_all=True, f32_kv=True)
    llm.eval(list(prompt_ids))
    out = []
    for _ in range(n_new):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out


def logits(gguf_path: str, ids: list[int], threads: int = 1):
    """llama.cpp's logits (T, V) for `ids`, one prefill with a float32 KV cache."""
    import numpy as np

    llm = _load(gguf_path, threads, len(ids), len(ids), logits_all=True, f32_kv=True)
    llm.eval(list(ids))
    return np.array(llm.scores[: len(ids)], np.float32)


if __name__ == "__main__":  # time_llama's child: its arguments as JSON on stdin
    import json
    import sys

    print(json.dumps(_time_here(*json.load(sys.stdin))))
