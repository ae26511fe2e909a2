"""Quick timings of GPT-2 124M on the Numba backend per stored weight dtype (issue 15).

    python -m bench.tools.numba_quant_timing [--repeat 5] [--dtypes float32 int8 ...] \
        [--no-prefill] [--no-batch] [--kernels] [--kv-dtype float32|float16]

Random weights at the real shapes (speed does not depend on the values). Prints, best and
median of `repeat` timed calls after a warm-up:
  * the streaming-read bandwidth (bench/tools/numba_decode_timing's parallel sum, 512 MB);
  * with --kernels: qlinear alone at the shapes of a 124M decode step (c_attn, c_fc,
    mlp c_proj, the LM head), M = 1, 16, 64 rows: ms, GB/s of the weights, GFLOP/s;
  * a decode step, batch 1 at context 16 and at 256: tokens/s, the weight bytes it reads (the
    QWeights; "float32" is the plain tree through BLAS, "float32-rows" the QWeight float32
    tree through the row-invariant kernel) and the GB/s that makes against the bandwidth;
  * a decode step, 16 sequences at context 256, timed in turn with batch 1 at context 256
    (`_alternated`): tokens/s, the ratio of the best steps to batch 1 at the same context, the
    median and range of each round's ratio (and the ratio to batch 1 at 16), beside a floor for
    that step (`_floor_ms`: its multiply-adds at this run's sgemm rate, int8's at this run's
    rate of the int8 kernel with its operands in cache, or its bytes at the streaming rate)
    and the ratio the floor allows;
  * a prefill of 512 tokens (LM head on the last position): tokens/s and GFLOP/s.
--kv-dtype float16 runs every step on a 16-bit KV cache (ref.model.KVCache), half the bytes.
Not the benchmark (`gpt2 bench --suite generate` has these rows beside the other backends);
on a shared machine the medians show how much the other processes took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.harness import measure

LABELS = ("float32", "float32-rows", "bfloat16", "float16", "int8")


def _times_ms(fn, repeat: int) -> tuple[float, float]:
    t = measure(fn, warmup=1, min_repeats=repeat, max_repeats=repeat, budget_s=0)
    return t["min"] * 1e3, t["median"] * 1e3


def _tree(params: dict, label: str) -> dict:
    from ref.quant import quantize_params

    if label == "float32":
        return params
    return quantize_params(params, "float32" if label == "float32-rows" else label)


def _weight_bytes(cfg, tree: dict) -> int:
    """Bytes of weights a decode step reads: every matrix once, one row of wpe."""
    from bench.workload import weight_bytes
    from ref.quant import is_quantized, quantized_nbytes

    if not is_quantized(tree):
        return weight_bytes(cfg)
    small = 0  # biases and LayerNorms, float32
    for block in tree["blocks"]:
        for part in block.values():  # ln_1, attn, ln_2, mlp
            for v in part.values():
                leaves = v.items() if isinstance(v, dict) else [("", v)]
                small += sum(a.nbytes for k, a in leaves if k != "w")
    return quantized_nbytes(tree) + small + 4 * cfg.n_embd * 3


def _kernels(repeat: int, dtypes: list[str]) -> None:
    from fast.numba import quant as nq
    from ref import quant

    rng = np.random.default_rng(0)
    for name, (N, K) in {
        "c_attn": (2304, 768),
        "c_fc": (3072, 768),
        "mlp.c_proj": (768, 3072),
        "lm_head": (50257, 768),
    }.items():
        w = (0.02 * rng.standard_normal((N, K))).astype(np.float32)  # (N, K)
        for M in (1, 16, 64):
            x = rng.standard_normal((M, K), dtype=np.float32)  # (M, K)
            for dt in dtypes:
                q = quant.quantize(w, "float32" if dt.startswith("float32") else dt)
                best, med = _times_ms(lambda q=q, x=x: nq.qlinear_forward(x, q), repeat)
                print(
                    f"qlinear {name:<10} N={N:<5} K={K:<4} M={M:<2} {q.dtype:<8} best "
                    f"{best:7.3f} ms  median {med:7.3f} ms  {q.nbytes / best / 1e6:5.1f} GB/s  "
                    f"{2 * M * N * K / best / 1e6:6.1f} GFLOP/s"
                )


def _sgemm_gflops(repeat: int, n: int = 1024) -> float:
    """The machine's float32 multiply-add rate in this run: numpy's BLAS on (n, n) @ (n, n)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, n, n), dtype=np.float32)  # (n, n) each
    best, med = _times_ms(lambda: a @ b, max(repeat, 3))
    gf = 2 * n**3 / best / 1e6
    print(
        f"sgemm {n}^3 (BLAS)          best {best:7.2f} ms  median {med:7.2f} ms  -> "
        f"{gf:.0f} GFLOP/s"
    )
    return gf


def _q8_gops(repeat: int) -> float:
    """The int8 kernel's rate in this run with its operands in cache: c_fc's shape (3072, 768)
    at M = 64, GOP/s (two per multiply-add), beside the cores' VPDPBUSD rate (with VNNI)."""
    import numba

    from fast.numba import quant as nq
    from ref import quant

    rng = np.random.default_rng(0)
    q = quant.quantize((0.02 * rng.standard_normal((3072, 768))).astype(np.float32), "int8")
    x = rng.standard_normal((64, 768), dtype=np.float32)  # (64, 768)
    best, med = _times_ms(lambda: nq.qlinear_forward(x, q), max(repeat, 5))
    gops = 2 * 64 * 3072 * 768 / best / 1e6
    # the limit: VPDPBUSD's rate on one core (64 multiply-adds each), times the threads
    peak = nq.vpdpbusd_rate() * 128 * numba.get_num_threads() / 1e9
    limit = f", {gops / peak:.2f} of VPDPBUSD's {peak:.0f} GOP/s on these cores" if peak else ""
    print(
        f"int8 kernel (64, 768) x (3072, 768) best {best:7.3f} ms  median {med:7.3f} ms  -> "
        f"{gops:.0f} GOP/s{limit}"
    )
    return gops


def _floor_ms(
    cfg, wb: int, rate: float, gbs: float, B: int = 16, ctx: int = 256, kv_elt: int = 4
) -> float:
    """A lower bound on a B-row decode step at context ctx: its multiply-adds at `rate`
    (GFLOP/s: the machine's sgemm where the products are float32, the int8 kernel's own for
    int8), or its bytes (the stored weights once, the KV cache at kv_elt bytes a value) at the
    streaming-read rate, whichever takes longer (the two overlapping perfectly)."""
    from bench.workload import forward_flops, kv_bytes

    flops = forward_flops(cfg, B, 1, ctx, head_rows=1)  # linears, head, attention
    return max(flops / rate / 1e6, (wb + kv_bytes(cfg, B, ctx + 1, kv_elt)) / gbs / 1e6)


def _decode_step(model, B: int, context: int, rng) -> callable:
    cache = model.new_cache(B, context + 1)
    cache.mask[:, :context] = True  # keys are zeros: speed does not depend on them
    cache.n_real[:] = context
    cache.length = context
    ids = rng.integers(0, model.cfg.n_vocab, (B, 1))  # (B, 1)

    def step():
        model.forward(ids, cache=cache, last_only=True)
        cache.length -= 1  # back to the same context: every step costs the same
        cache.n_real -= 1

    return step


def _alternated(one, many, rounds: int) -> tuple[list[float], list[float]]:
    """Time the batch-1 step `one` and the 16-sequence step `many` in turn, `rounds` times
    each: seconds per call, in round order. Timed alternately, so the two see the same minutes
    of a shared machine (whose memory and cores swing by up to 2x from minute to minute) and
    each round's ratio compares like with like. Each timed step follows an untimed step of its
    own kind, so it finds the caches as a run of such steps leaves them (batch 1's 4.7-9.4 MB
    KV cache stays in the L3 from step to step; right after a 16-sequence step it would not,
    and batch 1 would look 10-20% slower than it is)."""
    t1: list[float] = []
    t16: list[float] = []
    for _ in range(rounds):
        for fn, times in ((one, t1), (many, t16)):
            fn()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return t1, t16


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.tools.numba_quant_timing", description=__doc__
    )
    p.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (5)")
    p.add_argument("--dtypes", nargs="+", default=list(LABELS), choices=LABELS)
    p.add_argument("--no-prefill", action="store_true", help="skip the 512-token prefill")
    p.add_argument("--no-batch", action="store_true", help="skip the 16-sequence decode")
    p.add_argument("--kernels", action="store_true", help="time qlinear alone too")
    p.add_argument("--kv-dtype", default="float32", choices=["float32", "float16"])
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    from bench.tools.numba_decode_timing import _stream_gbs
    from bench.workload import forward_flops, random_params
    from fast import get_backend
    from ref.config import SIZES
    from ref.model import Model

    gbs = _stream_gbs(args.repeat)
    # the int8 kernel first: after BLAS's sgemm, OpenBLAS's threads spin for a while and take
    # turns with the kernel's (measured: 287 against 648 GOP/s)
    q8 = _q8_gops(args.repeat) if "int8" in args.dtypes else 0.0
    sgemm = _sgemm_gflops(args.repeat)
    if args.kernels:
        _kernels(args.repeat, args.dtypes)
    cfg = SIZES["124M"]
    rng = np.random.default_rng(0)
    params = random_params(cfg, rng)
    nb = get_backend("numba")
    for label in args.dtypes:
        tree = _tree(params, label)
        model = Model(cfg, tree, nb, args.kv_dtype)
        wb = _weight_bytes(cfg, tree)
        best, med = _times_ms(_decode_step(model, 1, 16, rng), args.repeat)
        tps1 = 1e3 / best
        print(
            f"{label:<12} decode B=1 ctx=16    best {best:7.2f} ms  median {med:7.2f} ms  "
            f"{tps1:6.1f} tokens/s  weights {wb / 1e6:5.1f} MB -> {wb / best / 1e6:5.1f} GB/s "
            f"({wb / best / 1e6 / gbs:.2f} of {gbs:.1f} GB/s; ceiling {gbs * 1e9 / wb:.0f} "
            "tokens/s)"
        )
        if not args.no_batch:
            one, many = _alternated(
                _decode_step(model, 1, 256, rng), _decode_step(model, 16, 256, rng), args.repeat
            )
            best, med = min(one) * 1e3, float(np.median(one)) * 1e3
            tps256 = 1e3 / best
            print(
                f"{label:<12} decode B=1 ctx=256   best {best:7.2f} ms  median {med:7.2f} ms  "
                f"{tps256:6.1f} tokens/s"
            )
            best, med = min(many) * 1e3, float(np.median(many)) * 1e3
            tps = 16e3 / best
            paired = [16 * a / b for a, b in zip(one, many, strict=True)]  # per round
            kv_elt = np.dtype(args.kv_dtype).itemsize
            floor = _floor_ms(cfg, wb, q8 if label == "int8" else sgemm, gbs, kv_elt=kv_elt)
            print(
                f"{label:<12} decode B=16 ctx=256  best {best:7.2f} ms  median {med:7.2f} ms  "
                f"{tps:6.1f} tokens/s  ({tps / tps256:.1f}x batch 1 at ctx 256, paired "
                f"{np.median(paired):.1f}x [{min(paired):.1f}, {max(paired):.1f}] over "
                f"{len(paired)} rounds; {tps / tps1:.1f}x at ctx 16; floor {floor:.1f} ms: at "
                f"most {16e3 / floor / tps256:.1f}x at ctx 256)"
            )
        if not args.no_prefill:
            ids = rng.integers(0, cfg.n_vocab, (1, 512))  # (1, 512)
            best, med = _times_ms(lambda m=model, i=ids: m.forward(i, last_only=True), args.repeat)
            flops = forward_flops(cfg, 1, 512, head_rows=1)
            print(
                f"{label:<12} prefill T=512        best {best:7.1f} ms  median {med:7.1f} ms  "
                f"{512e3 / best:6.1f} tokens/s  {flops / best / 1e6:6.1f} GFLOP/s"
            )


if __name__ == "__main__":
    main()
