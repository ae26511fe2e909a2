"""Timings of the tiled attention (fast.numba.flash) against the reference and fast.numba.attention.

    python -m bench.tools.numba_flash_timing [--rounds 7] [--blas-threads N] [--tiles 128x128 ...]

Forward and backward, milliseconds, the best of `rounds`, at GPT-2 124M's head shape
(NH = 12, hs = 64) for a 1,024-token prompt (B = 1) and a training batch (B = 4, T = 256),
plus a decode step (Tq = 1 against 1,024 keys; forward only). The variants are timed in turn
within each round, so that load from other processes on a shared machine falls on all of them
alike; the minimum is the figure least disturbed by that load. --tiles times numba_flash with
other tile sizes (queries x keys); --blas-threads caps OpenBLAS's threads (threadpoolctl).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHAPES = {  # name: (B, NH, Tq, Tk, hs)
    "prompt B=1 T=1024": (1, 12, 1024, 1024, 64),
    "train B=4 T=256": (4, 12, 256, 256, 64),
    "decode Tq=1 Tk=1024": (1, 12, 1, 1024, 64),
}


def _once(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def _time_shape(variants: dict, shape: tuple, rounds: int, rng: np.random.Generator) -> dict:
    B, NH, Tq, Tk, hs = shape
    q = rng.standard_normal((B, NH, Tq, hs)).astype(np.float32)  # (B, NH, Tq, hs)
    k = rng.standard_normal((B, NH, Tk, hs)).astype(np.float32)  # (B, NH, Tk, hs)
    v = rng.standard_normal((B, NH, Tk, hs)).astype(np.float32)  # (B, NH, Tk, hs)
    dout = rng.standard_normal((B, NH, Tq, hs)).astype(np.float32)  # (B, NH, Tq, hs)
    best = {name: [float("inf"), float("inf")] for name in variants}
    for r in range(rounds + 1):  # round 0 warms up: compilation, first touch of buffers
        for name, (setup, fwd, bwd) in variants.items():
            setup()
            t_f, (_, cache) = _once(fwd, q, k, v)
            t_b = _once(bwd, dout, cache)[0] if Tq > 1 else 0.0
            if r:
                best[name][0] = min(best[name][0], t_f)
                best[name][1] = min(best[name][1], t_b)
    return best


def main(argv: list[str] | None = None) -> None:
    from threadpoolctl import threadpool_limits

    from fast.numba import attention as numba_attention
    from fast.numba import flash as numba_flash
    from ref import ops

    p = argparse.ArgumentParser(
        prog="python -m bench.tools.numba_flash_timing", description=__doc__
    )
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per shape (7)")
    p.add_argument("--blas-threads", type=int, default=None, help="cap on OpenBLAS threads")
    p.add_argument("--tiles", nargs="*", default=[], help="extra numba_flash tile sizes, QxK")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")

    default_tiles = (numba_flash._BQ, numba_flash._BK)

    def tiles(bq: int, bk: int):
        def setup():
            numba_flash._BQ, numba_flash._BK = bq, bk

        return setup

    variants = {
        "ref": (lambda: None, ops.attention_forward, ops.attention_backward),
        "numba": (
            lambda: None,
            numba_attention.attention_forward,
            numba_attention.attention_backward,
        ),
        "numba_flash": (
            tiles(*default_tiles),
            numba_flash.attention_forward,
            numba_flash.attention_backward,
        ),
    }
    for spec in args.tiles:
        try:
            bq, bk = (int(n) for n in spec.lower().split("x"))
        except ValueError:
            p.error(f"--tiles takes QxK such as 128x256, got {spec!r}")
        if bq < 1 or bk < 1:
            p.error(f"--tiles sizes must be >= 1, got {spec!r}")
        variants[f"numba_flash {bq}x{bk}"] = (
            tiles(bq, bk),
            numba_flash.attention_forward,
            numba_flash.attention_backward,
        )
    rng = np.random.default_rng(0)
    with threadpool_limits(args.blas_threads):
        for label, shape in SHAPES.items():
            best = _time_shape(variants, shape, args.rounds, rng)
            ref_f, ref_b = best["ref"]
            for name, (t_f, t_b) in best.items():
                line = (
                    f"{label:20s} {name:20s} forward {t_f * 1e3:8.2f} ms ({ref_f / t_f:4.2f}x ref)"
                )
                if shape[2] > 1:  # a decode step is not trained through
                    line += f"  backward {t_b * 1e3:8.2f} ms ({ref_b / t_b:4.2f}x ref)"
                print(line, flush=True)
    numba_flash._BQ, numba_flash._BK = default_tiles


if __name__ == "__main__":
    main()
