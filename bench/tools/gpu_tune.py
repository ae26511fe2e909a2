"""Sweep the Triton kernels' block sizes and launch options on a CUDA GPU at GPT-2's shapes.

    python -m bench.tools.gpu_tune [--only attention_fwd_bf16,layernorm,...] [--workers 8]

Each family calls one launcher with each candidate in turn, passed as the launcher's config
arguments (`config=`, `dkdv_config=`, `dq_config=`, `elements=`, `rows=`, ...; their defaults
are the kernel files' constants FWD_CONFIG, FWD_ELEMENTS, BIAS_ROWS, FUSED_CONFIG, ...), checks
the result against the torch op it replaces (relative L2 error), and times it with
triton.testing.do_bench (median of CUDA-event timings, the L2 cleared before every call)
beside that torch op. It prints, per family, the candidates fastest first; the winners are
then written by hand into the constants, where a comment names this script. `--workers N`
first compiles every candidate in N processes (Triton's on-disk cache then serves the timing
process): compiling, not timing, is most of a sweep's time. The in-place cross-entropy variant
is not swept (it overwrites its input, so every timed call would need a fresh copy); it
launches with FUSED_CONFIG.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fast.triton import attention as ta
from fast.triton import crossentropy as tc
from fast.triton import gelu as tg
from fast.triton import layernorm as tln

Case = tuple[str, Callable[[], object]]  # name, run (the launcher with that candidate)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _attn_inputs(B, NH, Tq, Tk, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, NH, Tq, 64, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, NH, Tk, 64, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, NH, Tk, 64, device="cuda", dtype=dtype, generator=g)
    return q, k, v


def _sdpa(q, k, v):
    Tq, Tk = q.shape[2], k.shape[2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v)  # Tq = 1: every cached key is visible


def families() -> dict[str, tuple[list[Case], Callable[[], object], Callable[[object], float]]]:
    """{family: (cases, baseline run, check(out) -> relative error against the baseline)}."""
    out = {}
    warps_stages = [(4, 2), (4, 3), (8, 2), (8, 3), (4, 4)]

    def attn_fwd(name, B, T, dtype, blocks, ws, Tq=None):
        q, k, v = _attn_inputs(B, 12, Tq or T, T, dtype)
        want = _sdpa(q, k, v)
        cases = []
        for (bm, bn), (w, s) in itertools.product(blocks, ws):

            def run(c=(bm, bn, w, s)):
                return ta.attention_forward(q, k, v, config=c)[0]

            cases.append((f"BM={bm} BN={bn} w={w} s={s}", run))
        out[name] = (cases, lambda: _sdpa(q, k, v), lambda o: _rel(o, want))

    attn_fwd("attention_fwd_bf16", 8, 1024, torch.bfloat16,
             [(64, 64), (128, 64), (128, 128), (64, 128), (128, 32)], warps_stages)  # fmt: skip
    attn_fwd("attention_fwd_fp32", 1, 1024, torch.float32,
             [(32, 32), (64, 32), (64, 64), (128, 32)], [(4, 1), (4, 2), (8, 2)])  # fmt: skip
    attn_fwd("attention_decode_fp32", 1, 1024, torch.float32,
             [(16, 32), (16, 64), (16, 128)], [(2, 2), (4, 2), (4, 3)], Tq=1)  # fmt: skip
    attn_fwd("attention_decode_bf16", 1, 1024, torch.bfloat16,
             [(16, 64), (16, 128), (16, 256)], [(2, 2), (4, 2), (4, 3)], Tq=1)  # fmt: skip

    def attn_bwd(name, B, T, dtype, which, blocks, ws):
        q, k, v = _attn_inputs(B, 12, T, T, dtype)
        dout = torch.randn_like(q)
        qr, kr, vr = (t.detach().requires_grad_(True) for t in (q, k, v))
        ref_out = _sdpa(qr, kr, vr)
        want = torch.autograd.grad(ref_out, (qr, kr, vr), dout)
        _, cache = ta.attention_forward(q, k, v)
        cases = []
        for (bm, bn), (w, s) in itertools.product(blocks, ws):

            def run(c=(bm, bn, w, s)):  # the other kernel keeps its default
                if which == "dkdv":
                    return ta.attention_backward(dout, cache, dkdv_config=c)
                return ta.attention_backward(dout, cache, dq_config=c)

            cases.append((f"{which} BM={bm} BN={bn} w={w} s={s}", run))

        def base():
            o = _sdpa(qr, kr, vr)
            return torch.autograd.grad(o, (qr, kr, vr), dout)

        def check(got):
            return max(_rel(a, b) for a, b in zip(got, want, strict=True))

        out[name] = (cases, base, check)  # the baseline is SDPA forward + backward

    kv_blocks = [(32, 64), (32, 128), (64, 64), (64, 128), (16, 128)]
    q_blocks = [(64, 32), (128, 32), (64, 64), (128, 64), (128, 16)]
    attn_bwd("attention_dkdv_bf16", 8, 1024, torch.bfloat16, "dkdv", kv_blocks, warps_stages)
    attn_bwd("attention_dq_bf16", 8, 1024, torch.bfloat16, "dq", q_blocks, warps_stages)
    fp32_ws = [(4, 1), (4, 2), (8, 2)]
    attn_bwd("attention_dkdv_fp32", 4, 256, torch.float32, "dkdv", kv_blocks[:3], fp32_ws)
    attn_bwd("attention_dq_fp32", 4, 256, torch.float32, "dq", q_blocks[:3], fp32_ws)

    x = torch.randn(8 * 1024, 768, device="cuda")
    lw, lb = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    want_ln = F.layer_norm(x, (768,), lw, lb)
    cases = []
    for el, w in itertools.product([1024, 2048, 4096, 8192], [None, 2, 4, 8]):

        def run(el=el, w=w):
            return tln.layernorm_forward(x, lw, lb, elements=el, warps=w)[0]

        cases.append((f"elements={el} warps={w}", run))
    out["layernorm"] = (cases, lambda: F.layer_norm(x, (768,), lw, lb), lambda o: _rel(o, want_ln))

    h = torch.randn(8 * 1024, 3072, device="cuda")
    hb = torch.randn(3072, device="cuda")
    want_bg = F.gelu(h + hb, approximate="tanh")
    cases = []
    for (r, bh), w in itertools.product(
        [(1, 1024), (2, 1024), (4, 512), (4, 1024), (8, 512), (2, 2048), (1, 4096)], [4, 8]
    ):

        def run(r=r, bh=bh, w=w):
            return tg.bias_gelu_forward(h, hb, rows=r, block_h=bh, warps=w)[0]

        cases.append((f"rows={r} block_h={bh} warps={w}", run))
    out["bias_gelu"] = (
        cases, lambda: F.gelu(h + hb, approximate="tanh"), lambda o: _rel(o, want_bg),
    )  # fmt: skip

    g = torch.randn(16 * 1024, 3072, device="cuda")
    want_g = F.gelu(g, approximate="tanh")
    cases = []
    for blk, w in itertools.product([1024, 2048, 4096], [4, 8]):

        def run(blk=blk, w=w):
            return tg.gelu_forward(g, block=blk, warps=w)[0]

        cases.append((f"block={blk} warps={w}", run))
    out["gelu"] = (cases, lambda: F.gelu(g, approximate="tanh"), lambda o: _rel(o, want_g))

    logits = torch.randn(8 * 1024, 50257, device="cuda") * 3
    targets = torch.randint(0, 50257, (8 * 1024,), device="cuda")
    lr = logits.detach().requires_grad_(True)
    want_ce = torch.autograd.grad(F.cross_entropy(lr, targets), lr)[0]
    one = torch.ones((), device="cuda")
    cases = []
    for fused, bv, w in itertools.product([False, True], [2048, 4096, 8192], [4, 8, 16]):
        if fused:  # the fused backward launches nothing: it hands over the forward's gradient

            def run(c=(bv, w)):
                cache = tc.crossentropy_forward_fused(logits, targets, config=c)[1]
                return tc.crossentropy_backward(one, cache)

        else:  # online: the candidate serves the forward and the backward kernel

            def run(c=(bv, w)):
                cache = tc.crossentropy_forward(logits, targets, config=c)[1]
                return tc.crossentropy_backward(one, cache, config=c)

        cases.append((f"{'fused' if fused else 'online'} BV={bv} warps={w}", run))

    def ce_base():
        return torch.autograd.grad(F.cross_entropy(lr, targets), lr)[0]

    out["crossentropy"] = (cases, ce_base, lambda o: _rel(o, want_ce))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated families")
    ap.add_argument("--workers", type=int, default=0, help="compile in N processes first")
    ap.add_argument("--shard", default="", help=argparse.SUPPRESS)  # i/n: compile only
    ap.add_argument("--json", default="", help="also write the timings to this file")
    args = ap.parse_args(argv)
    from triton.testing import do_bench

    fams = families()
    names = [n for n in fams if not args.only or n in args.only.split(",")]
    todo = [(f, c) for f in names for c in fams[f][0]]
    if args.shard:
        i, n = (int(p) for p in args.shard.split("/"))
        for f, (_, run) in todo[i::n]:
            try:
                run()
            except Exception as e:  # reported again, with its name, by the timing pass
                print(f"compile {f}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
        torch.cuda.synchronize()
        return 0
    if args.workers > 1:
        t0 = time.time()
        cmd = [sys.executable, "-m", "bench.tools.gpu_tune", "--only", ",".join(names)]
        procs = [
            subprocess.Popen([*cmd, "--shard", f"{i}/{args.workers}"], env=os.environ)
            for i in range(args.workers)
        ]
        for p in procs:
            p.wait()
        print(f"compiled {len(todo)} candidates in {time.time() - t0:.0f} s", flush=True)
    results = {}
    for f in names:
        cases, base, check = fams[f]
        t_base = do_bench(base, warmup=25, rep=100, return_mode="median")
        rows = []
        for name, run in cases:
            try:
                err = check(run())
                t = do_bench(run, warmup=25, rep=100, return_mode="median")
                rows.append((t, name, err, None))
            except Exception as e:
                rows.append((float("inf"), name, float("nan"), f"{type(e).__name__}: {e}"[:120]))
        rows.sort()
        results[f] = {"torch_ms": t_base, "candidates": [
            {"name": n, "ms": t, "rel_err": e, "error": x} for t, n, e, x in rows]}  # fmt: skip
        print(f"\n{f}: torch {t_base * 1e3:.1f} us")
        for t, name, err, x in rows[:6] + [r for r in rows[6:] if r[3]][:3]:
            speed = f"{t_base / t:5.2f}x torch" if t < float("inf") else x
            print(f"  {t * 1e3:9.1f} us  {speed}  err {err:.1e}  {name}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
