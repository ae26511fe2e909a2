"""Quick sanity timings of the Numba kernels against the numpy reference (a few seconds).

    python -m bench.tools.numba_timing [--repeat 5] [--variants numba numba_1thread] [--model]

Not the benchmark (bench/ sweeps every backend and variant with the machine's limits); this
prints one line per op and variant: best-of-`repeat` milliseconds, forward and backward, with
the speedup over the reference, at GPT-2 124M's sizes:
    layernorm (4096, 768)  gelu (4096, 3072)  attention (1, 12, 1024, 64)
    crossentropy (256, 50257)
and np.copyto on GELU's array, the memory-bandwidth yardstick for GELU. Compilation and
first-touch of the inputs are excluded by a warm-up call. With --model: the whole forward of a
GPT-2 124M-shaped model with random weights on each numpy backend, a 256-token prompt and
single-token decode steps against a KV cache.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.harness import measure


def _best_ms(fn, args: tuple, repeat: int) -> float:
    """The best of `repeat` calls after a warm-up (compilation, page faults of fresh buffers)."""
    t = measure(lambda: fn(*args), warmup=1, min_repeats=repeat, max_repeats=repeat, budget_s=0)
    return t["min"] * 1e3


def _cases(rng: np.random.Generator) -> dict:
    """{op: (forward args, make dout from the forward's output)}."""

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def like(out):
        return f32(*np.shape(out))

    return {
        "layernorm": ((f32(4096, 768), f32(768), f32(768)), like),
        "gelu": ((f32(4096, 3072),), like),
        "attention": ((f32(1, 12, 1024, 64), f32(1, 12, 1024, 64), f32(1, 12, 1024, 64)), like),
        "crossentropy": (
            (f32(256, 50257), rng.integers(0, 50257, 256)),
            lambda out: np.float32(1.0),
        ),
    }


def _model_times(repeat: int) -> None:
    from bench.workload import random_params
    from fast import get_backend
    from ref.config import SIZES
    from ref.model import KVCache, forward

    cfg = SIZES["124M"]
    rng = np.random.default_rng(0)
    params = random_params(cfg, rng)
    ids = rng.integers(0, cfg.n_vocab, (1, 256))  # (1, 256)
    for name in ("ref", "numba"):
        ops = get_backend(name)
        cache = KVCache(cfg, 1, 512)
        forward(params, ids, cfg, cache=cache, ops=ops, last_only=True)
        prompt_ms = _best_ms(_prompt, (params, ids, cfg, ops), repeat)
        step_ms = _best_ms(_decode_step, (params, ids[:, :1], cfg, cache, ops), repeat)
        print(
            f"model 124M    {name:<14} prompt(256) {prompt_ms:8.1f} ms  "
            f"decode step (P=256) {step_ms:6.1f} ms"
        )


def _prompt(params, ids, cfg, ops) -> None:
    from ref.model import forward

    forward(params, ids, cfg, ops=ops, last_only=True)


def _decode_step(params, ids, cfg, cache, ops) -> None:
    from ref.model import forward

    forward(params, ids, cfg, cache=cache, ops=ops, last_only=True)
    cache.length -= 1  # back to the same P, so every timed step costs the same
    cache.n_real -= 1


def main(argv: list[str] | None = None) -> None:
    from fast import ref_backend
    from fast.numba import backend as numba_backend

    p = argparse.ArgumentParser(prog="python -m bench.tools.numba_timing", description=__doc__)
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (5)")
    p.add_argument(
        "--variants", nargs="+", default=list(next(iter(numba_backend.VARIANTS.values())))
    )
    p.add_argument("--model", action="store_true", help="also time a whole 124M-shaped model")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    rng = np.random.default_rng(0)
    for op, (inputs, make_dout) in _cases(rng).items():
        ref_fwd, ref_bwd = ref_backend.VARIANTS[op]["ref"]
        out, cache = ref_fwd(*inputs)
        dout = make_dout(out)
        base = (
            _best_ms(ref_fwd, inputs, args.repeat),
            _best_ms(ref_bwd, (dout, cache), args.repeat),
        )
        print(f"{op:<13} {'ref':<14} fwd {base[0]:8.2f} ms        bwd {base[1]:8.2f} ms")
        for name in args.variants:
            fwd, bwd = numba_backend.VARIANTS[op][name]
            _, cache = fwd(*inputs)
            t = (_best_ms(fwd, inputs, args.repeat), _best_ms(bwd, (dout, cache), args.repeat))
            print(
                f"{op:<13} {name:<14} fwd {t[0]:8.2f} ms {base[0] / t[0]:5.1f}x "
                f"bwd {t[1]:8.2f} ms {base[1] / t[1]:5.1f}x"
            )
    x = _cases(rng)["gelu"][0][0]
    copy_ms = _best_ms(np.copyto, (np.empty_like(x), x), args.repeat)
    print(f"{'copy':<13} {'np.copyto':<14} fwd {copy_ms:8.2f} ms (GELU's array)")
    if args.model:
        _model_times(args.repeat)


if __name__ == "__main__":
    main()
