"""Quick timings of the decode step on the Numba backend against the reference (seconds).

    python -m bench.tools.numba_decode_timing [--repeat 10] [--batch 1 16] [--context 256] \
        [--no-model]

Prints, best and median of `repeat` timed calls after a warm-up call:
  * the streaming-read bandwidth (a parallel sum over 512 MB), the yardstick of a decode step;
  * attention of one layer (NH = 12, hs = 64) for one new token against a KV cache of
    capacity 1024 read through prefix views, Tk = 256 and 1024, for each batch size;
  * a whole decode step of a GPT-2 124M-shaped model with random weights and a KV cache
    holding `context` random keys and values per row, for each batch size: tokens/s, and the
    memory-bandwidth ceiling: bytes read per step (weights once, one row of wpe, plus the KV
    cache) over the streaming bandwidth, and the fraction of it reached.
Not the benchmark (bench/ sweeps backends with the machine's limits); on a shared machine the
medians show how much the other processes took.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.harness import measure


def _times_ms(fn, repeat: int) -> tuple[float, float]:
    """(best, median) of `repeat` calls after a warm-up (compilation, page faults)."""
    t = measure(fn, warmup=1, min_repeats=repeat, max_repeats=repeat, budget_s=0)
    return t["min"] * 1e3, t["median"] * 1e3


def _attention(batches: list[int], repeat: int) -> None:
    from fast.numba import backend as numba_backend
    from ref import ops as ref_ops

    rng = np.random.default_rng(0)
    for B in batches:
        k_cache, v_cache = (
            rng.standard_normal((B, 12, 1024, 64), dtype=np.float32) for _ in range(2)
        )  # (B, NH, capacity, hs) each
        q = rng.standard_normal((B, 12, 1, 64), dtype=np.float32)  # (B, NH, 1, hs)
        for Tk in (256, 1024):
            k, v = k_cache[:, :, :Tk], v_cache[:, :, :Tk]  # (B, NH, Tk, hs) views
            for name, fwd in (
                ("ref", ref_ops.attention_forward),
                ("numba", numba_backend.attention_forward),
            ):
                best, med = _times_ms(lambda fwd=fwd, q=q, k=k, v=v: fwd(q, k, v, None), repeat)
                print(
                    f"attention decode B={B:<3} Tk={Tk:<5} {name:<6} best {best:7.3f} ms  "
                    f"median {med:7.3f} ms  (k, v {2 * k.nbytes / 1e6:5.1f} MB)"
                )


def _stream_gbs(repeat: int) -> float:
    from fast.numba.common import n_partials, read_sum

    a = np.ones((128 * 1024, 1024), np.float32)  # 512 MB, beyond any cache
    partials = np.empty(n_partials(a.shape[0]), np.float32)
    best, med = _times_ms(lambda: read_sum(a, partials), repeat)
    print(
        f"stream read 512 MB          best {best:7.1f} ms  median {med:7.1f} ms  "
        f"-> {a.nbytes / best / 1e6:5.1f} GB/s"
    )
    return a.nbytes / best / 1e6


def _model(batches: list[int], context: int, repeat: int, gbs: float) -> None:
    from bench.workload import random_params, weight_bytes
    from fast import get_backend
    from ref.config import SIZES
    from ref.model import KVCache, forward

    cfg = SIZES["124M"]
    rng = np.random.default_rng(0)
    params = random_params(cfg, rng)
    single = {}  # backend -> tokens/s at B = 1, for the batched speed-up
    for B in batches:
        cache = KVCache(cfg, B, context + 1)
        for kv in (cache.k, cache.v):  # (L, B, NH, capacity, hs)
            kv[:, :, :, :context] = rng.standard_normal(kv[:, :, :, :context].shape, np.float32)
        cache.mask[:, :context] = True
        cache.n_real[:] = context
        cache.length = context
        ids = rng.integers(0, cfg.n_vocab, (B, 1))  # (B, 1)
        step_bytes = weight_bytes(cfg) + 2 * cache.k[:, :, :, : context + 1].nbytes
        ceiling = B * gbs * 1e9 / step_bytes  # tokens/s
        for name in ("ref", "numba"):
            ops = get_backend(name)

            def step(ops=ops, cache=cache, ids=ids):
                forward(params, ids, cfg, cache=cache, ops=ops, last_only=True)
                cache.length -= 1  # back to the same context: every step costs the same
                cache.n_real -= 1

            best, med = _times_ms(step, repeat)
            tps = B * 1e3 / best
            if B == 1:
                single[name] = tps
            gain = f", {tps / single[name]:.1f}x B=1" if name in single and B > 1 else ""
            print(
                f"decode step 124M B={B:<3} P={context} {name:<6} best {best:7.1f} ms  "
                f"median {med:7.1f} ms  {tps:7.1f} tokens/s  "
                f"({step_bytes / 1e6:.0f} MB per step; {tps / ceiling:.2f} of the ceiling "
                f"{ceiling:.1f} tokens/s{gain})"
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.tools.numba_decode_timing", description=__doc__
    )
    p.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (10)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16], help="batch sizes (1 16)")
    p.add_argument("--context", type=int, default=256, help="cached tokens in the model (256)")
    p.add_argument("--no-model", action="store_true", help="skip the whole-model decode step")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if min(args.batch) < 1:
        p.error("--batch sizes must be >= 1")
    if not 1 <= args.context < 1024:
        p.error("--context must be in [1, 1023] (GPT-2's 1024 positions, one for the new token)")
    gbs = _stream_gbs(args.repeat)  # first: before BLAS has started its (spinning) threads
    _attention(args.batch, args.repeat)
    if not args.no_model:
        _model(args.batch, args.context, args.repeat, gbs)


if __name__ == "__main__":
    main()
