"""Compile every Triton kernel of fast/triton/*.py for a CUDA target, without a GPU.

Triton's interpreter (how the tests run the kernels here) executes the kernels' Python with
numpy: it checks the arithmetic but not what only the compiler sees (types of loop-carried
values, dot shapes and dtypes, shared memory). This compiles each kernel ahead of time with
the configurations the launchers use, for each dtype, down to a cubin (ptxas ships with
triton), and reports the shared memory each needs against the target's limit:

    python -m bench.tools.triton_aot [--arch 90] [--dtypes fp32,fp16,bf16] [--quick]

Run it with TRITON_INTERPRET unset (the interpreter replaces the kernels it would compile).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

# shared memory per block, bytes (CUDA C programming guide, "Compute capabilities" table)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
FP32_POINTERS = {
    "mean_ptr", "rstd_ptr", "lse_ptr", "delta_ptr", "dg_part_ptr", "db_part_ptr",
    "losses_ptr", "inv_count_ptr", "coef_ptr",
}  # fmt: skip
FLOAT_SCALARS = {"eps", "scale", "inv_C", "qk_scale"}


@dataclass
class Result:
    kernel: str
    dtype: str
    config: dict
    shared: int
    error: str | None = None


def signature(fn, dtype: str, constexprs: dict) -> dict[str, str]:
    """Triton's type string for every argument of kernel `fn` with data of `dtype`."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "mask_ptr":
            sig[name] = "*i8"
        elif name == "targets_ptr":
            sig[name] = "*i64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def cases(dtypes: list[str], arch: int = 90, quick: bool = False):
    """(kernel, dtype, constexprs, num_warps, num_stages) as the launchers use them with their
    default configs (the kernel files' tuned constants), at GPT-2's sizes (head sizes 64 and
    128). quick: one configuration per kernel."""
    from fast.triton import attention as ta
    from fast.triton import crossentropy as tc
    from fast.triton import gelu as tg
    from fast.triton import layernorm as tln

    both = (True,) if quick else (False, True)
    for dt in dtypes:
        for block_c in (1024,) if quick else (1024, 2048):  # C = 768 (124M), 1600 (1558M)
            rows, warps = tln._fwd_launch(block_c, 1 << 20, tln.FWD_ELEMENTS, tln.FWD_WARPS)
            yield tln._layernorm_fwd_kernel, dt, {"ROWS": rows, "BLOCK_C": block_c}, warps, 3
            bwd_warps = tln._warps(block_c)
            yield tln._layernorm_bwd_kernel, dt, {"BLOCK_C": block_c}, bwd_warps, 3
        tile = {"ROWS": tg.BIAS_ROWS, "BLOCK_H": tg.BIAS_BLOCK_H}
        yield tg._gelu_fwd_kernel, dt, {"BLOCK": tg.BLOCK}, tg.NUM_WARPS, 3
        yield tg._gelu_bwd_kernel, dt, {"BLOCK": tg.BLOCK}, tg.NUM_WARPS, 3
        yield tg._bias_gelu_fwd_kernel, dt, tile, tg.NUM_WARPS, 3
        yield tg._bias_gelu_bwd_kernel, dt, tile, tg.NUM_WARPS, 3
        precision = "ieee" if dt == "fp32" else "tf32"
        width = 4 if dt == "fp32" else 2
        launches = [
            (ta._attn_fwd_kernel, ta.FWD_CONFIG),
            (ta._attn_fwd_kernel, ta.DECODE_CONFIG),
            (ta._attn_bwd_dkdv_kernel, ta.DKDV_CONFIG),
            (ta._attn_bwd_dq_kernel, ta.DQ_CONFIG),
        ]
        for bd in (64,) if quick else (64, 128):
            for fn, table in launches:
                bm, bn, warps, stages = table[width]
                while ta._shared_bytes(bm, bn, bd, width) > SHARED_LIMIT[arch] and max(bm, bn) > 16:
                    bm, bn = max(bm // 2, 16), max(bn // 2, 16)  # as the launcher does
                for mask in both:
                    cfg = {"HAS_MASK": mask, "PRECISION": precision, "BM": bm, "BN": bn, "BD": bd}
                    yield fn, dt, cfg, warps, stages
        for fused, (bv, warps) in ((False, tc.ONLINE_CONFIG), (True, tc.FUSED_CONFIG)):
            if fused in both:
                yield tc._ce_fwd_kernel, dt, {"COMPUTE_GRAD": fused, "BV": bv}, warps, 3
        bv, warps = tc.ONLINE_CONFIG
        yield tc._ce_bwd_kernel, dt, {"BV": bv}, warps, 3


def compile_all(
    arch: int = 90,
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16"),
    quick: bool = False,
    only: tuple[str, ...] = (),
) -> list[Result]:
    """Compile every case (of the kernels named in `only`, if given); one Result per case,
    with `error` set where compilation failed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter has nothing to compile")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for fn, dt, constexprs, warps, stages in cases(list(dtypes), arch, quick):
        if only and fn.__name__ not in only:
            continue
        src = ASTSource(fn, signature(fn, dt, constexprs), constexprs=constexprs)
        name = fn.__name__
        try:
            opts = {"num_warps": warps, "num_stages": stages}
            k = triton.compile(src, target=target, options=opts)
            results.append(Result(name, dt, constexprs, int(k.metadata.shared)))
        except Exception as e:  # report every failing case, not only the first
            results.append(Result(name, dt, constexprs, -1, f"{type(e).__name__}: {e}"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools.triton_aot", description=__doc__)
    p.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_LIMIT))
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--quick", action="store_true", help="one configuration per kernel")
    args = p.parse_args(argv)
    dtypes = tuple(args.dtypes.split(","))
    bad = [d for d in dtypes if d not in ("fp32", "fp16", "bf16")]
    if bad:
        p.error(f"--dtypes: unknown {bad}; choose from fp32, fp16, bf16")
    limit = SHARED_LIMIT[args.arch]
    failed = 0
    for r in compile_all(args.arch, dtypes, args.quick):
        cfg = " ".join(f"{k}={v}" for k, v in r.config.items())
        if r.error is None and r.shared <= limit:
            print(f"ok    {r.kernel:24s} {r.dtype:5s} shared {r.shared:7d} B  {cfg}")
            continue
        failed += 1
        why = r.error or f"needs {r.shared} B of shared memory, sm_{args.arch} has {limit}"
        print(f"FAIL  {r.kernel:24s} {r.dtype:5s} {cfg}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
