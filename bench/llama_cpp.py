"""llama.cpp as a baseline: the same weights exported to GGUF (weights/gguf.py) and run by
llama-cpp-python (`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`, built from
source for this CPU's instructions), at the same thread count, prompt and context as ours.

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
is n_decode single-token llama_decode calls after it (contexts T + 1 ... T + n_decode), each
computing the last position's logits, no sampling (the token fed back is the prompt's, which
speed does not depend on). llama.cpp's KV cache is its default, float16 (ours is float32);
the record says so.

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
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


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


def time_llama(
    gguf_path: str,
    threads: int,
    prompt_ids: list[int],
    n_decode: int,
    n_ctx: int,
    repeats: int = 3,
) -> dict:
    """Prefill and decode tokens/s of llama.cpp on `gguf_path` (see the module docstring)."""
    import llama_cpp

    T = len(prompt_ids)
    if T < 1 or n_decode < 1 or T + n_decode > n_ctx:
        raise ValueError(
            f"time_llama: need 1 <= prompt ({T}) and 1 <= n_decode ({n_decode}) with prompt + "
            f"n_decode <= n_ctx ({n_ctx})"
        )
    t0 = time.perf_counter()
    llm = _load(gguf_path, threads, n_ctx, T, logits_all=False, f32_kv=False)
    load_s = time.perf_counter() - t0
    prefill_s = float("inf")
    for _ in range(1 + repeats):  # the first is the warm-up
        llm.reset()  # the cache's positions start again at 0
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        prefill_s = min(prefill_s, time.perf_counter() - t0) if _ else prefill_s
    t0 = time.perf_counter()
    for i in range(n_decode):
        llm.eval([prompt_ids[i % T]])
    decode_s = time.perf_counter() - t0
    info = llama_cpp.llama_print_system_info()
    return {
        "prefill_tokens_per_s": T / prefill_s,
        "decode_tokens_per_s": n_decode / decode_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "load_s": load_s,
        "threads": threads,
        "prompt_tokens": T,
        "n_decode": n_decode,
        "n_ctx": n_ctx,
        "kv_cache": "f16",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
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
