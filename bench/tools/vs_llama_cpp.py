"""Ours against llama.cpp on the same weights, interleaved round by round (issue 15's targets).

    python -m bench.tools.vs_llama_cpp [--rounds 5] [--steps 16] [--prompt 512] [--out F.json]

GPT-2 124M random weights (speed does not depend on the values), exported to GGUF f32, f16
and q8_0 (weights/gguf.py) for llama.cpp (llama-cpp-python, a child process per timing, its
own OpenMP settings: bench/llama_cpp.time_llama). Each round times every row once, ours and
llama.cpp's one after the other, so a slow minute of a shared machine falls on both: decode,
batch 1, `steps` single-token steps at contexts 2 .. steps + 1 (each step timed); a prefill of
`prompt` tokens for the prefill targets. A row's figure is its best step (its best prefill)
over all rounds, the median beside it; the ratios are of the best figures. Beside each ratio,
the same ratio taken round by round (each round's best against the same round's best) and its
median and range over the rounds: a slow minute moves both sides of a round's ratio, so the
paired median is steadier from run to run than the ratio of bests on a shared machine.
Threads: numba's count, llama.cpp the same.

The machine's limits, measured at the start and the end of the same run (bench/limits.py,
the best of the two): the streaming read (GB/s) and numpy's BLAS sgemm (GFLOP/s, with the BLAS
settings in force: thread_settings records OpenBLAS's kernel architecture). From them, the
ceilings (`ceilings`): a decode step can go no faster than its stored weights and KV cache
streamed at the read rate (each row against the bytes of its own weights; llama.cpp's types
against the row of ours stored alike: f32 float32, f16 float16, q8_0 int8, the same bytes),
and a float32 prompt, whose linears are BLAS gemms, no faster than its FLOPs at the sgemm
rate; beside each ceiling, the ratio to llama.cpp it allows.

`gpt2 bench --suite generate` has the same rows in its report (one pass, not interleaved);
this tool is for the README's table, where the machine's noise needs the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

# (our row, its weights' dtype on numba, the llama.cpp type it is held against)
DECODE_ROWS = [
    ("numba", "float32", "f32"),  # what gpt2.load(backend="numba") runs: float32 QWeights
    ("numba-blas", "float32-plain", "f32"),  # the plain float32 tree, linears through BLAS
    ("numba-bf16", "bfloat16", "f16"),
    ("numba-f16", "float16", "f16"),
    ("numba-int8", "int8", "q8_0"),
]
PREFILL_ROWS = [("numba", "float32", "f32"), ("numba-int8", "int8", "f32")]
TARGETS = {  # issue 15: ours / llama.cpp at least this
    ("decode", "numba"): 1.0,
    ("decode", "numba-bf16"): 1.0,
    ("decode", "numba-f16"): 1.0,
    ("decode", "numba-int8"): 1.0,
    ("prefill", "numba"): 1.2,
    ("prefill", "numba-int8"): 1.2,
}


def _models(cfg, params: dict) -> dict:
    from fast import get_backend
    from ref.model import Model
    from ref.quant import quantize_params

    nb = get_backend("numba")
    out = {}
    for _, dtype, _ in DECODE_ROWS:
        tree = params if dtype == "float32-plain" else quantize_params(params, dtype)
        out[dtype] = Model(cfg, tree, nb)
    return out


def _our_decode(model, steps: int) -> list[float]:
    """Times of `steps` single-token steps after one untimed step (contexts 2 .. steps + 1),
    as bench/suite_generate's runner takes them."""
    from bench.suite_generate import model_runner

    return model_runner(model)["decode"](1, 0, steps + 1)[1:]


def _our_prefill(model, ids: np.ndarray) -> float:
    from bench.suite_generate import model_runner

    t0 = time.perf_counter()
    model_runner(model)["prefill"](ids)
    return time.perf_counter() - t0


def _summary(step_times: list[float], tokens: int = 1) -> dict:
    return {
        "tokens_per_s": tokens / min(step_times),
        "median_tokens_per_s": tokens / statistics.median(step_times),
        "n": len(step_times),
    }


def paired(ours: list[list[float]], theirs: list[list[float]]) -> dict:
    """Round-by-round ratios of tokens/s, ours over theirs: ours[r], theirs[r] are round r's
    times for the same work; each round's ratio is of its best times. -> the median, the
    least and the largest ratio, and the rounds' ratios."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired: {len(ours)} rounds of ours against {len(theirs)} of theirs")
    ratios = [min(t) / min(o) for o, t in zip(ours, theirs, strict=True)]  # same work: time ratio
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "rounds": ratios}  # fmt: skip


# the llama.cpp type and the dtype of ours that stores a weight in the same bytes
SAME_BYTES = {"f32": "float32", "f16": "float16", "q8_0": "int8"}


def ceilings(
    rows: dict, read_gbps: float, sgemm_gflops: float, step_bytes: dict, prompt_flops: int,
    prompt_len: int,
) -> dict:  # fmt: skip
    """What the machine's limits allow, beside what each row made. rows: run()'s {"decode":
    {row: {"tokens_per_s", ...}}, "prefill": {...}}; step_bytes: {dtype of ours: bytes a
    decode step reads (weights and KV cache)}; prompt_flops: FLOPs of the float32 prompt.
    -> {"decode": {dtype: {"ceiling_tokens_per_s", "fraction": {row: made / ceiling}}},
    "prefill_float32": {"ceiling_tokens_per_s", "ratio_to_llama_cpp_f32"}}: the decode ceiling
    is read_gbps over the step's bytes; the prefill one the prompt's FLOPs at sgemm_gflops."""
    dtypes = {row: dtype for row, dtype, _ in DECODE_ROWS}
    dtypes.update({f"llama.cpp-{t}": d for t, d in SAME_BYTES.items()})
    decode = {}
    for row, made in rows["decode"].items():
        dtype = dtypes.get(row, row)
        dtype = "float32" if dtype == "float32-plain" else dtype
        if dtype not in step_bytes:
            continue
        entry = decode.setdefault(dtype, {
            "step_bytes": step_bytes[dtype],
            "ceiling_tokens_per_s": read_gbps * 1e9 / step_bytes[dtype], "fraction": {},
        })  # fmt: skip
        entry["fraction"][row] = made["tokens_per_s"] / entry["ceiling_tokens_per_s"]
    ceiling = sgemm_gflops * 1e9 / prompt_flops * prompt_len
    theirs = rows["prefill"].get("llama.cpp-f32", {}).get("tokens_per_s")
    return {
        "decode": decode,
        "prefill_float32": {
            "prompt_flops": prompt_flops, "ceiling_tokens_per_s": ceiling,
            "ratio_to_llama_cpp_f32": ceiling / theirs if theirs else None,
        },
    }  # fmt: skip


def _limits(phase: str) -> dict:
    """bench/limits.py's CPU limits (read_GBps, copy_GBps, matmul_f32_GFLOPs) at the default
    plan's sizes (a 256 MB stream, a 2048^3 sgemm; the best of 3 tries each)."""
    from bench import limits
    from bench.plan import Plan

    _, measured = limits.run(Plan(mode="vs_llama_cpp", widths=[], models=[]),
                             np.random.default_rng(0), gpu=False, phase=phase)  # fmt: skip
    return measured


def run(rounds: int, steps: int, prompt_len: int, log=print) -> dict:
    import numba

    from bench import llama_cpp
    from bench.harness import environment, thread_settings
    from bench.limits import best as limits_best
    from bench.suite_generate import stored_weight_bytes
    from bench.workload import forward_flops, kv_bytes, random_params
    from ref.config import SIZES

    if not llama_cpp.available():
        raise SystemExit("vs_llama_cpp: llama-cpp-python is not installed (pip install "
                         '"llama-cpp-python>=0.3" with the CMAKE_ARGS of .ci/run)')  # fmt: skip
    cfg = SIZES["124M"]
    rng = np.random.default_rng(0)
    params = random_params(cfg, rng)
    prompt = [int(i) for i in rng.integers(0, cfg.n_vocab, prompt_len)]
    ids = np.array([prompt])
    models = _models(cfg, params)
    # only now: numba's pool starts on this call, and fast/numba/common.py (imported by
    # _models) must have chosen its layer and libgomp's spin count first
    threads = numba.get_num_threads()
    log("vs_llama_cpp: the machine's limits (start)")
    measured = {"start": _limits("start")}
    # times per round: [round][step] (prefill: one time per round)
    ours_dec = {row: [] for row, _, _ in DECODE_ROWS}
    ours_pre = {row: [] for row, _, _ in PREFILL_ROWS}
    theirs_dec = {t: [] for t in ("f32", "f16", "q8_0")}
    theirs_pre = {t: [] for t in ("f32", "f16", "q8_0")}
    info = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for t in theirs_dec:
            paths[t] = os.path.join(tmp, f"124M-{t}.gguf")
            llama_cpp.export(params, cfg, paths[t], t)
        for _row, dtype, _ in DECODE_ROWS:  # warm-up: compile or load every kernel once
            _our_decode(models[dtype], 2)
        for _row, dtype, _ in PREFILL_ROWS:
            _our_prefill(models[dtype], ids)
        for r in range(rounds):
            log(f"vs_llama_cpp: round {r + 1}/{rounds}")
            for row, dtype, _ in PREFILL_ROWS:
                ours_pre[row].append([_our_prefill(models[dtype], ids)])
            for row, dtype, _ in DECODE_ROWS:
                ours_dec[row].append(_our_decode(models[dtype], steps))
            for t, path in paths.items():
                res = llama_cpp.time_llama(
                    path, threads, prompt, steps, cfg.n_ctx, repeats=1, decode_start=1
                )
                theirs_dec[t].append(list(res["decode_step_s"]))
                theirs_pre[t].append([res["prefill_s"]])
                info = {k: res[k] for k in ("llama_cpp_python", "system_info", "gomp_spincount")}
                info["omp_wait_policy"] = res["omp_wait_policy"]

    log("vs_llama_cpp: the machine's limits (end)")
    measured["end"] = _limits("end")
    measured["best"] = limits_best(measured["start"], measured["end"])

    def flat(per_round: list[list[float]]) -> list[float]:
        return [x for r in per_round for x in r]

    rows = {"decode": {}, "prefill": {}}
    for row in ours_dec:
        rows["decode"][row] = _summary(flat(ours_dec[row]))
    for t in theirs_dec:
        rows["decode"][f"llama.cpp-{t}"] = _summary(flat(theirs_dec[t]))
        rows["prefill"][f"llama.cpp-{t}"] = _summary(flat(theirs_pre[t]), prompt_len)
    for row in ours_pre:
        rows["prefill"][row] = _summary(flat(ours_pre[row]), prompt_len)
    ratios = []
    for case, table, ours, theirs in (
        ("decode", DECODE_ROWS, ours_dec, theirs_dec),
        ("prefill", PREFILL_ROWS, ours_pre, theirs_pre),
    ):
        for row, _, t in table:
            value = rows[case][row]["tokens_per_s"] / rows[case][f"llama.cpp-{t}"]["tokens_per_s"]
            target = TARGETS.get((case, row))
            ratios.append({
                "case": case, "ours": row, "theirs": f"llama.cpp-{t}", "value": value,
                "paired": paired(ours[row], theirs[t]),
                "target": target, "met": None if target is None else value >= target,
            })  # fmt: skip
    ctx = steps + 1  # the last step's context: its KV cache read, the most of any step
    step_bytes = {
        dtype: stored_weight_bytes(cfg, models[dtype].params) + kv_bytes(cfg, 1, ctx)
        for dtype in ("float32", "bfloat16", "float16", "int8")
    }
    best = measured["best"]
    env = environment()
    return {
        "command": "python -m bench.tools.vs_llama_cpp " + " ".join(sys.argv[1:]),
        "commit": env["git_commit"],
        "machine": f"{env['cpu_model']}, {env['cpu_count']} CPUs",
        "environment": env,
        "threads": threads,
        "thread_settings": thread_settings(),
        "gomp_spincount_ours": os.environ.get("GOMP_SPINCOUNT"),
        "rounds": rounds,
        "steps": steps,
        "prompt": prompt_len,
        "decode_contexts": [2, steps + 1],
        "llama_cpp": info,
        "rows": rows,
        "ratios": ratios,
        "limits": measured,
        "ceilings": ceilings(
            rows,
            best["read_GBps"],
            best["matmul_f32_GFLOPs"],
            step_bytes,
            forward_flops(cfg, 1, prompt_len, head_rows=1),
            prompt_len,
        ),  # fmt: skip
    }


def render(doc: dict) -> str:
    lines = [
        f"{'row':<16} {'decode best':>12} {'median':>8} {'prefill best':>13} {'median':>8}",
    ]
    names = list(doc["rows"]["decode"])
    for name in names:
        d = doc["rows"]["decode"][name]
        p = doc["rows"]["prefill"].get(name)
        pre = f"{p['tokens_per_s']:13.1f} {p['median_tokens_per_s']:8.1f}" if p else ""
        lines.append(f"{name:<16} {d['tokens_per_s']:12.1f} {d['median_tokens_per_s']:8.1f} {pre}")
    lines.append("")
    for r in doc["ratios"]:
        mark = "" if r["target"] is None else f"  (target {r['target']}: "
        mark += "" if r["target"] is None else ("met)" if r["met"] else "not met)")
        pr = r.get("paired")
        pr = f"  paired {pr['median']:.2f} [{pr['min']:.2f}, {pr['max']:.2f}]" if pr else ""
        lines.append(
            f"{r['case']:<8} {r['ours']:<14} / {r['theirs']:<15} {r['value']:6.2f}{pr}{mark}"
        )
    lim, ceil = doc.get("limits", {}).get("best"), doc.get("ceilings")
    if lim and ceil:
        blas = [t for t in doc.get("thread_settings", {}).get("threadpools", [])
                if t.get("user_api") == "blas"]  # fmt: skip
        arch = f" ({blas[0].get('internal_api')} {blas[0].get('architecture')})" if blas else ""
        lines += ["", f"limits: read {lim['read_GBps']:.1f} GB/s, sgemm "
                  f"{lim['matmul_f32_GFLOPs']:.0f} GFLOP/s{arch}"]  # fmt: skip
        for dtype, c in ceil["decode"].items():
            made = ", ".join(f"{row} {f:.2f}" for row, f in c["fraction"].items())
            lines.append(f"decode ceiling {dtype:<8} {c['ceiling_tokens_per_s']:7.1f} tokens/s "
                         f"({c['step_bytes'] / 1e6:.1f} MB a step); made: {made}")  # fmt: skip
        pf = ceil["prefill_float32"]
        allows = pf["ratio_to_llama_cpp_f32"]
        allows = f" = {allows:.2f}x llama.cpp-f32" if allows else ""
        lines.append(f"prefill ceiling float32 at sgemm {pf['ceiling_tokens_per_s']:7.1f} "
                     f"tokens/s{allows}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m bench.tools.vs_llama_cpp", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per round (16)")
    p.add_argument("--prompt", type=int, default=512, help="prefill length (512)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or not 1 <= args.prompt <= 1024 - args.steps - 2:
        p.error("need --rounds >= 1, --steps >= 1 and 1 <= --prompt <= 1022 - --steps")
    doc = run(args.rounds, args.steps, args.prompt, log=lambda m: print(m, file=sys.stderr))
    print(render(doc))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
