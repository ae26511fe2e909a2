"""Where GPT-2 spends a prefill and a decode step on each torch backend, on a CUDA GPU.

    python -m bench.tools.gpu_profile [--size 124M] [--ctx 1024]

For --backend torch and triton, float32 and bfloat16: the time of a 1,024-token prefill and
of one decode step after --ctx cached tokens (CUDA-synchronised wall clock, median of 5), then
torch.profiler's table of one decode step and one prefill (top ops by CUDA time and by CPU
time). The benchmark (python -m bench) gives the ratios; this says why they are what they are.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from bench.workload import random_params
from fast.torch.model import TorchModel
from ref.config import SIZES, canonical_size


def _wall(fn, n: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="124M")
    ap.add_argument("--ctx", type=int, default=1000, help="cached tokens (< n_ctx)")
    ap.add_argument("--rows", type=int, default=12, help="rows of each profiler table")
    args = ap.parse_args(argv)
    cfg = SIZES[canonical_size(args.size)]
    params = random_params(cfg, np.random.default_rng(0))
    prompt = np.zeros((1, 1024), np.int64)
    tok = np.zeros((1, 1), np.int64)
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            model = TorchModel(cfg, params, backend, "cuda", dtype=dtype)
            cache = model.new_cache(1, args.ctx + 1)
            model.forward(np.zeros((1, args.ctx), np.int64), cache=cache, last_only=True)

            def step(model=model, cache=cache):
                cache.length = args.ctx  # the same step again: overwrite slot ctx
                cache.n_real[:] = args.ctx
                model.forward(tok, cache=cache, last_only=True)

            def prefill(model=model):
                model.forward(prompt, last_only=True)

            t_pre, t_dec = _wall(prefill), _wall(step, 20)
            name = f"{backend} {str(dtype).removeprefix('torch.')}"
            print(f"\n##### {name}: prefill 1024 {t_pre * 1e3:.2f} ms, "
                  f"decode step at ctx {args.ctx} {t_dec * 1e3:.3f} ms", flush=True)  # fmt: skip
            for what, fn in (("decode step", step), ("prefill", prefill)):
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                avg = prof.key_averages()
                for key in ("cuda_time_total", "cpu_time_total"):
                    print(f"--- {name}, {what}, by {key}")
                    print(avg.table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
            del model, cache
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
