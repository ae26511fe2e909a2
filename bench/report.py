"""From one run's results: the ratios the issues ask for, a markdown report and PNG plots.

Every ratio is computed from records of the same run (same machine, same load), and names
the records it divides. Speedups are time(baseline) / time(backend) on min times; fractions
are achieved / limit.
"""

from __future__ import annotations

import os
import re

from bench.plan import TINY
from bench.workload import decode_ceiling
from fast import OPS
from ref.config import SIZES


def _ok(results: list[dict], suite: str, case: str | None = None) -> list[dict]:
    """The records of `suite` (and `case`) that measured something."""
    return [
        r
        for r in results
        if r["suite"] == suite and r["status"] == "ok" and (case is None or r["case"] == case)
    ]


def _best(records: list[dict]) -> dict | None:
    """The fastest variant among `records`."""
    return min(records, key=lambda r: r["time_s"]["min"]) if records else None


def _desc(r: dict) -> str:
    p = {k: v for k, v in r["params"].items() if k not in ("pass", "device", "contexts")}
    v = f"/{r['variant']}" if r["variant"] and r["variant"] != r["backend"] else ""
    return f"{r['suite']}.{r['case']} {r['backend']}{v} {p}"


def _ratio(name: str, value: float, num: dict | str, den: dict | str, note: str = "") -> dict:
    return {
        "name": name,
        "value": value,
        "numerator": num if isinstance(num, str) else _desc(num),
        "denominator": den if isinstance(den, str) else _desc(den),
        "note": note,
    }


def _size_of(r: dict) -> int:
    """How big a measured op is: its compulsory bytes plus FLOPs (orders shapes)."""
    m = r["metrics"]
    return m["read_bytes"] + m["write_bytes"] + m["flops"]


def _shape_key(r: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in r["params"].items() if k not in ("device",)))


def _ops_ratios(results: list[dict], limits: dict) -> list[dict]:
    out = []
    ops = _ok(results, "ops")
    if not ops:
        return out
    # headline shapes: the first width of the run, the most rows; attention at T = 1024
    # (NH=12, hs=64 at 124M) or the largest T of the run
    first_size = ops[0]["params"].get("size")
    for op in OPS:
        recs = [r for r in ops if r["case"] == op and r["params"]["device"] == "cpu"]
        if op != "crossentropy":
            recs = [r for r in recs if r["params"].get("size") == first_size]
        if op == "attention":
            recs = [r for r in recs if r["params"]["Tq"] == r["params"]["Tk"]]
            if not recs:
                continue
            top = max(r["params"]["Tk"] for r in recs)
            recs = [r for r in recs if r["params"]["Tk"] == top]
        elif recs:
            top = max(r["params"]["N"] for r in recs)
            recs = [r for r in recs if r["params"]["N"] == top]
        for direction in ("forward", "backward"):
            here = [r for r in recs if r["params"]["pass"] == direction]
            ref = _best([r for r in here if r["backend"] == "ref"])
            for be in sorted({r["backend"] for r in here} - {"ref"}):
                best = _best([r for r in here if r["backend"] == be])
                if ref is not None:
                    out.append(
                        _ratio(
                            f"{op} {direction}: {be} speedup over ref",
                            ref["time_s"]["min"] / best["time_s"]["min"],
                            best,
                            ref,
                            "time(ref) / time(backend), best variant",
                        )
                    )
                if op in ("gelu", "bias_gelu") and direction == "forward" and limits:
                    out.append(
                        _ratio(
                            f"{op} forward: {be} GB/s / copy GB/s",
                            best["metrics"]["GBps"] / limits["copy_GBps"],
                            best,
                            f"limits.copy_GBps = {limits['copy_GBps']:.1f}",
                        )
                    )
            if ref is not None and op in ("gelu", "bias_gelu") and direction == "forward":
                out.append(
                    _ratio(
                        f"{op} forward: ref GB/s / copy GB/s",
                        ref["metrics"]["GBps"] / limits["copy_GBps"],
                        ref,
                        f"limits.copy_GBps = {limits['copy_GBps']:.1f}",
                    )
                )
    # on a GPU: our kernels against torch's own, per op at the largest shape
    gpu = [r for r in ops if r["params"]["device"] == "cuda"]
    for key in sorted({(r["case"], r["params"]["pass"]) for r in gpu}):
        op, direction = key
        here = [r for r in gpu if (r["case"], r["params"]["pass"]) == key]
        native_all = [r for r in here if r["backend"] == "torch-native"]
        if not native_all:
            continue
        big = max(native_all, key=lambda r: r["metrics"]["read_bytes"] + r["metrics"]["flops"])
        same = [r for r in here if _shape_key(r) == _shape_key(big)]
        for be in sorted({r["backend"] for r in same} - {"torch-native"}):
            best = _best([r for r in same if r["backend"] == be])
            out.append(
                _ratio(
                    f"GPU {op} {direction}: {be} speedup over torch-native",
                    big["time_s"]["min"] / best["time_s"]["min"],
                    best,
                    big,
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# issue 6: the GPU targets, each from records of the same run

NATIVE = "torch-native"
BASELINES = ("torch-native", "torch-eager", "hf-generate", "ref-nocache", "torch-autograd")


def _cuda_ops(results: list[dict], op: str, direction: str, **match) -> list[dict]:
    """The CUDA records of `op` in `direction` whose params include `match`."""
    return [
        r
        for r in _ok(results, "ops", op)
        if r["params"]["device"] == "cuda"
        and r["params"]["pass"] == direction
        and all(r["params"].get(k) == v for k, v in match.items())
    ]


def _largest(recs: list[dict]) -> list[dict]:
    """The records at the largest shape torch measured among `recs` (by compulsory bytes
    plus FLOPs): each ratio needs torch's record of the same shape."""
    native = [r for r in recs if r["backend"] == NATIVE]
    if not native:
        return []
    top = max(native, key=_size_of)
    return [r for r in recs if _shape_key(r) == _shape_key(top)]


def _cache_note(*recs: dict) -> str:
    """Which records were timed with the L2 flushed and which on tensors past it."""
    return "cache: " + ", ".join(f"{r['backend']} {r['cache']}" for r in recs)


def _kernels(recs: list[dict]):
    """(backend, its fastest record) for every backend of `recs` but torch's own."""
    for be in sorted({r["backend"] for r in recs} - {NATIVE}):
        yield be, _best([r for r in recs if r["backend"] == be])


def _vs_native(name: str, recs: list[dict]) -> list[dict]:
    """time(torch.nn.functional) / time(backend) for each backend of `recs` (one shape);
    `name` has a {be} field."""
    native = _best([r for r in recs if r["backend"] == NATIVE])
    if native is None:
        return []
    return [
        _ratio(
            name.format(be=be),
            native["time_s"]["min"] / best["time_s"]["min"],
            best,
            native,
            f"time(torch) / time({be}), best variant; {_cache_note(best, native)}",
        )
        for be, best in _kernels(recs)
    ]


def _of_copy(op: str, recs: list[dict], limits: dict) -> list[dict]:
    """GB/s of each backend (torch's too) over the device copy bandwidth of the same run."""
    copy = limits.get("gpu_copy_GBps")
    if not copy or not recs:
        return []
    top = max(recs, key=_size_of)  # the largest rows: the least help from the L2
    recs = [r for r in recs if _shape_key(r) == _shape_key(top)]
    out = []
    for be in sorted({r["backend"] for r in recs}):
        best = _best([r for r in recs if r["backend"] == be])
        out.append(
            _ratio(
                f"GPU {op} forward: {be} GB/s / device copy GB/s",
                best["metrics"]["GBps"] / copy,
                best,
                f"limits.gpu_copy_GBps = {copy:.1f}",
                f"N={best['params']['N']}; {_cache_note(best)}",
            )
        )
    return out


def _gpu_op_targets(results: list[dict], limits: dict) -> list[dict]:
    """Issue 6's op targets: bandwidth fractions and speed (and memory) against torch."""
    from bench.suite_ops import ATTN_T, CE_V, GPT2_C, GPT2_ROWS

    out = _of_copy("layernorm", _cuda_ops(results, "layernorm", "forward"), limits)
    for direction in ("forward", "backward"):
        out += _vs_native(
            f"GPU layernorm {direction} 8x1024 rows of 768: {{be}} / torch layer_norm",
            _cuda_ops(results, "layernorm", direction, N=GPT2_ROWS, C=GPT2_C),
        )
    out += _of_copy("gelu", _cuda_ops(results, "gelu", "forward"), limits)
    out += _vs_native(
        "GPU bias_gelu forward: {be} / unfused torch pair",
        _largest(_cuda_ops(results, "bias_gelu", "forward")),
    )
    for direction in ("forward", "forward+backward"):
        out += _vs_native(
            f"GPU attention {direction} bf16 T={ATTN_T}: {{be}} / torch SDPA",
            _largest(
                _cuda_ops(
                    results, "attention", direction, dtype="bfloat16", Tq=ATTN_T, Tk=ATTN_T, hs=64
                )
            ),
        )
    for direction in ("forward", "forward+backward"):
        ce = _largest(_cuda_ops(results, "crossentropy", direction, V=CE_V))
        out += _vs_native(
            f"GPU crossentropy {direction} V={CE_V}: {{be}} / torch cross_entropy", ce
        )
        if direction == "forward+backward":
            out += _memory_ratios(ce)
            out += _ce_variants(ce)
    return out


def _ce_variants(recs: list[dict]) -> list[dict]:
    """Speed and peak memory of every cross-entropy variant against torch's, one row each:
    the fastest variant need not be the leanest, and the issue's two bars hold for one."""
    from bench.suite_ops import CE_V

    native = _best([r for r in recs if r["backend"] == NATIVE])
    if native is None:
        return []
    out = []
    for r in sorted(recs, key=lambda r: (r["backend"], r["variant"] or "")):
        if r["backend"] == NATIVE:
            continue
        label = f"{r['backend']} {r['variant']}"
        out.append(
            _ratio(
                f"GPU crossentropy forward+backward V={CE_V} ({label}): speedup over torch",
                native["time_s"]["min"] / r["time_s"]["min"],
                r,
                native,
            )
        )
        mine, theirs = _extra_gpu_bytes(r), _extra_gpu_bytes(native)
        if mine and theirs is not None:
            out.append(
                _ratio(
                    f"GPU crossentropy ({label}): torch peak memory / its peak memory",
                    theirs / mine,
                    r,
                    native,
                    f"bytes allocated above the inputs: torch {theirs}, {label} {mine}",
                )
            )
    return out


def _extra_gpu_bytes(r: dict) -> int | None:
    """Device memory one call allocated above what was alive when it began."""
    m = r["metrics"]
    if m.get("peak_gpu_bytes") is None or m.get("gpu_bytes_before") is None:
        return None
    return m["peak_gpu_bytes"] - m["gpu_bytes_before"]


def _memory_ratios(recs: list[dict]) -> list[dict]:
    """Peak device memory of torch's cross-entropy over each backend's (forward+backward)."""
    native = _best([r for r in recs if r["backend"] == NATIVE])
    if native is None or _extra_gpu_bytes(native) is None:
        return []
    out = []
    for be, best in _kernels(recs):
        mine = _extra_gpu_bytes(best)
        if mine is None:
            continue
        out.append(
            _ratio(
                f"GPU crossentropy: torch peak memory / {be} peak memory",
                _extra_gpu_bytes(native) / mine if mine > 0 else None,
                best,
                native,
                f"bytes allocated above the inputs during one forward+backward: torch "
                f"{_extra_gpu_bytes(native)}, {be} {mine}",
            )
        )
    return out


def _torch_twin(label: str) -> str:
    """The torch backend's label at the same dtype: triton -> torch, triton-bf16 -> torch-bf16."""
    return "torch" + label[len(label.split("-")[0]) :]


def _gpu_end_to_end(results: list[dict]) -> list[dict]:
    """Generation and finetuning tokens/s on the GPU: each backend against the torch backend
    at the same dtype and against Hugging Face transformers, same size and shape."""
    out = []
    cuda = [r for r in results if r["status"] == "ok" and r["params"].get("device") == "cuda"]
    pre = [r for r in cuda if r["suite"] == "generate" and r["case"] == "prefill"]
    for r in pre:
        T_top = max(x["params"]["T"] for x in pre if x["params"]["size"] == r["params"]["size"])
        if r["params"]["T"] != T_top or r["backend"] in BASELINES or r["backend"] == "torch":
            continue
        for t in pre:
            same = (t["params"]["size"], t["params"]["T"]) == (r["params"]["size"], T_top)
            if same and t["backend"] == _torch_twin(r["backend"]) and t is not r:
                out.append(
                    _ratio(
                        f"GPU prefill T={T_top} ({r['params']['size']}, {r['params']['dtype']}):"
                        f" {r['backend']} / {t['backend']} tokens/s",
                        r["metrics"]["tokens_per_s"] / t["metrics"]["tokens_per_s"],
                        r,
                        t,
                    )
                )
    dec = [
        r
        for r in cuda
        if r["suite"] == "generate" and r["case"] == "decode" and r["params"]["B"] == 1
    ]
    for r in dec:
        if r["backend"] in BASELINES:
            continue
        p = r["params"]
        for t in dec:
            if (t["params"]["size"], t["params"]["ctx"]) != (p["size"], p["ctx"]):
                continue
            if t["backend"] == "hf-generate":
                name = (
                    f"GPU decode B=1 ctx={p['ctx']} ({p['size']}): {r['backend']} "
                    f"({p['dtype']}) / hf-generate ({t['params']['dtype']}) tokens/s"
                )
            elif t["backend"] == _torch_twin(r["backend"]) and t is not r:
                name = (
                    f"GPU decode B=1 ctx={p['ctx']} ({p['size']}, {p['dtype']}): "
                    f"{r['backend']} / {t['backend']} tokens/s"
                )
            else:
                continue
            out.append(
                _ratio(name, r["metrics"]["tokens_per_s"] / t["metrics"]["tokens_per_s"], r, t)
            )
    ft = [r for r in cuda if r["suite"] == "finetune"]
    for r in ft:
        if r["backend"] in BASELINES or r["backend"] in ("torch", "hf-transformers"):
            continue
        p = r["params"]
        for t in ft:
            if t["backend"] not in ("torch", "hf-transformers"):
                continue
            if (t["params"]["train"], t["params"]["B"], t["params"]["T"]) != (
                p["train"],
                p["B"],
                p["T"],
            ):
                continue
            out.append(
                _ratio(
                    f"GPU finetune {p['train']} B={p['B']} T={p['T']} ({p['size']}): "
                    f"{r['backend']} / {t['backend']} tokens/s",
                    r["metrics"]["tokens_per_s"] / t["metrics"]["tokens_per_s"],
                    r,
                    t,
                )
            )
    return out


def _generate_ratios(results: list[dict], limits: dict) -> list[dict]:
    out = []
    pre = _ok(results, "generate", "prefill")
    for r in pre:
        T_top = max(x["params"]["T"] for x in pre if x["params"]["size"] == r["params"]["size"])
        if r["params"]["T"] == T_top and r["metrics"].get("fraction_of_matmul") is not None:
            out.append(
                _ratio(
                    f"prefill {T_top} tokens B=1 ({r['params']['size']}, {r['backend']}, "
                    f"{r['params']['device']}): effective FLOP/s / matmul FLOP/s",
                    r["metrics"]["fraction_of_matmul"],
                    r,
                    "limits.matmul (same device)",
                )
            )
    dec = _ok(results, "generate", "decode")
    b1 = [r for r in dec if r["params"]["B"] == 1]
    for r in b1:
        if "fraction_of_ceiling" in r["metrics"]:
            out.append(
                _ratio(
                    f"decode B=1 ctx={r['params']['ctx']} ({r['params']['size']}, {r['backend']}, "
                    f"{r['params']['device']}): tokens/s / bandwidth ceiling",
                    r["metrics"]["fraction_of_ceiling"],
                    r,
                    f"ceiling {r['metrics']['ceiling_tokens_per_s']:.1f} tokens/s",
                )
            )
    hf = [r for r in b1 if r["backend"] == "hf-generate"]
    for h in hf:
        for r in b1:
            same = (r["params"]["ctx"], r["params"]["size"]) == (
                h["params"]["ctx"],
                h["params"]["size"],
            )
            if same and r["backend"] not in ("hf-generate", "ref-nocache"):
                out.append(
                    _ratio(
                        f"decode B=1 ctx={h['params']['ctx']} ({r['params']['size']}): "
                        f"{r['backend']} ({r['params']['device']}) / hf-generate "
                        f"({h['params']['device']})",
                        r["metrics"]["tokens_per_s"] / h["metrics"]["tokens_per_s"],
                        r,
                        h,
                    )
                )
    for r in b1:
        if r["backend"] != "ref":
            continue
        for n in b1:
            if n["backend"] == "ref-nocache" and (n["params"]["ctx"], n["params"]["size"]) == (
                r["params"]["ctx"],
                r["params"]["size"],
            ):
                out.append(
                    _ratio(
                        f"decode B=1 ctx={r['params']['ctx']} ({r['params']['size']}): "
                        "ref with KV cache / ref-nocache",
                        r["metrics"]["tokens_per_s"] / n["metrics"]["tokens_per_s"],
                        r,
                        n,
                    )
                )
    for r in dec:
        B = r["params"]["B"]
        if B == 1:
            continue
        for one in b1:
            if (
                one["backend"],
                one["params"]["device"],
                one["params"]["size"],
                one["params"]["ctx"],
            ) == (r["backend"], r["params"]["device"], r["params"]["size"], r["params"]["ctx"]):
                out.append(
                    _ratio(
                        f"decode B={B} / B=1 at ctx={r['params']['ctx']} ({r['params']['size']}, "
                        f"{r['backend']}, {r['params']['device']}): tokens/s",
                        r["metrics"]["tokens_per_s"] / one["metrics"]["tokens_per_s"],
                        r,
                        one,
                    )
                )
    return out


def _finetune_ratios(results: list[dict]) -> list[dict]:
    out = []
    ft = _ok(results, "finetune")
    for r in ft:
        if r["backend"] in ("torch-autograd", "hf-transformers"):
            continue
        for base in ft:
            if (
                base["backend"] == "torch-autograd"
                and base["params"] == {**r["params"], "device": base["params"]["device"]}
                and base["params"]["device"] in ("cpu", r["params"]["device"])
            ):
                out.append(
                    _ratio(
                        f"finetune {r['params']['train']} B={r['params']['B']} T={r['params']['T']}"
                        f": {r['backend']} ({r['params']['device']}) / torch-autograd "
                        f"({base['params']['device']}) tokens/s",
                        r["metrics"]["tokens_per_s"] / base["metrics"]["tokens_per_s"],
                        r,
                        base,
                    )
                )
    return out


def _is_key(name: str, top_ctx: int) -> bool:
    """The ratios the Numba and GPU issues ask for by name (the rest are context)."""
    m = re.search(r"ctx=(\d+)", name)
    ctx_top = m is not None and int(m.group(1)) == top_ctx
    return (
        ("numba" in name and name.startswith(("layernorm", "gelu", "attention")))
        or name.startswith(("gelu forward: ref GB/s", "GPU ", "prefill ", "finetune "))
        or "/ hf-generate" in name
        or ("/ B=1 at ctx=" in name and name.startswith("decode B=16"))
        or (ctx_top and ("bandwidth ceiling" in name or "ref-nocache" in name))
    )


def compute_ratios(doc: dict) -> list[dict]:
    """Every ratio of the run; `key` marks those the issues name."""
    results, limits = doc["results"], doc.get("limits") or {}
    out = (
        _ops_ratios(results, limits)
        + _gpu_op_targets(results, limits)
        + _generate_ratios(results, limits)
        + _finetune_ratios(results)
        + _gpu_end_to_end(results)
    )
    ctxs = [r["params"]["ctx"] for r in _ok(results, "generate", "decode")]
    top = max(ctxs) if ctxs else -1
    for r in out:
        r["key"] = _is_key(r["name"], top)
    return out


# ---------------------------------------------------------------------------------------------
# markdown


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _mem(m: dict) -> str:
    """Peak resident memory of the process, and of the GPU where measured, in MiB."""
    gpu = f" (GPU {_mib(m['peak_gpu_bytes'])})" if m.get("peak_gpu_bytes") is not None else ""
    return _mib(m.get("peak_rss_bytes")) + gpu


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return out + [""]


def _pool(p: dict) -> str:
    """One threadpoolctl pool: 'blas: openblas 0.3.31 (2 threads, Haswell)'."""
    extra = f", {p['architecture']}" if p.get("architecture") else ""
    version = f" {p['version']}" if p.get("version") else ""
    return (
        f"{p.get('user_api')}: {p.get('internal_api')}{version} "
        f"({p.get('num_threads')} threads{extra})"
    )


def markdown(doc: dict) -> str:
    env, limits = doc["environment"], doc.get("limits") or {}
    lines = [f"# gpt2-spec benchmark ({doc['mode']})", ""]
    if not doc.get("complete", True):
        lines += ["**Incomplete: the run stopped early; these are the suites it finished.**", ""]
    lines += [
        f"Command: `{doc['command']}`  ",
        f"Started {env['time_utc']}, took "
        f"{doc['elapsed_s']:.0f} s. Commit {env.get('git_commit') or '?'}.",
        "",
    ]
    threads = doc.get("threads", {})
    pools = threads.get("threadpools")
    blas = ", ".join(_pool(p) for p in pools) if isinstance(pools, list) else str(pools)
    envs = ", ".join(f"{k}={v}" for k, v in env["env"].items() if v is not None) or "none set"
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items() if v)
    lines += [
        f"Machine: {env['cpu_model']}, {env['cpus_usable']} usable CPUs of "
        f"{env['cpu_count']}, caches {env['caches']}, memory "
        f"{_mib(env['memory_bytes'])} MiB; load average at start "
        f"{env['load_average']}, at end {doc.get('load_average_end')}.  ",
        f"Thread pools: {blas}; numba {threads.get('numba_threads', '-')}, torch "
        f"{threads.get('torch_threads', '-')}. Environment: {envs}.  ",
        f"Libraries: {libs}.  ",
        f"GPU: {doc.get('gpu') or 'none'}.",
        "",
        "## Limits (measured in this run)",
        "",
    ]
    end = doc.get("limits_end") or {}
    lines += _table(
        ["limit", "at start", "at end"], [[k, v, end.get(k)] for k, v in limits.items()]
    )
    lines += ["## Backends", ""]
    lines += _table(
        ["backend", "status", "device / reason"],
        [[k, v["status"], v.get("device") or v.get("reason")] for k, v in doc["backends"].items()],
    )
    lines += [
        "## Key ratios",
        "",
        "The ratios the Numba and GPU issues ask for, from this run's "
        "records (speedup = time of the denominator / time of the numerator).",
        "",
    ]
    lines += _table(
        ["ratio", "value"], [[r["name"], r["value"]] for r in doc["ratios"] if r.get("key")]
    )
    gpu_ops = [r for r in doc["ratios"] if r.get("key") and "cache:" in (r.get("note") or "")]
    if gpu_ops:
        lines += [
            "GPU op rows: GPU time between CUDA events around each call (as "
            "triton.testing.do_bench measures), with the device's L2 flushed before every "
            "call where the "
            'working set is under 4 x L2 ("flushed"), else on tensors larger than 4 x L2 '
            '("exceeds-llc"); issue 6\'s targets are LayerNorm forward >= 0.8 of copy '
            "bandwidth and >= 1.2x torch (backward >= 1.0x), GELU >= 0.85 of copy bandwidth, "
            "bias+GELU >= 1.5x the unfused pair, attention >= 0.6x SDPA (forward+backward "
            ">= 0.5x), cross-entropy >= 2x torch and >= 3x less peak memory.",
            "",
        ]
        lines += _table(
            ["ratio", "which records, cache"], [[r["name"], r["note"]] for r in gpu_ops]
        )
    lines += ["## All ratios", ""]
    lines += _table(
        ["ratio", "value", "numerator", "denominator"],
        [[r["name"], r["value"], r["numerator"], r["denominator"]] for r in doc["ratios"]],
    )
    res = doc["results"]
    ops = _ok(res, "ops")
    if ops:
        lines += [
            "## Ops",
            "",
            "Time is the min over repeats (median beside it); fraction = "
            "roofline time / measured time (bench/workload.py).",
            "",
        ]
        rows = []
        for r in ops:
            p = r["params"]
            shape = ", ".join(
                f"{k}={v}" for k, v in p.items() if k not in ("pass", "device", "size")
            )
            m = r["metrics"]
            rows.append(
                [
                    r["case"],
                    p["pass"],
                    p.get("size", "-"),
                    shape,
                    f"{r['backend']}/{r['variant']}",
                    p["device"],
                    r["time_s"]["min"] * 1e3,
                    r["time_s"]["median"] * 1e3,
                    m["GBps"],
                    m["GFLOPs"],
                    m["fraction_of_limit"],
                    m["bound"],
                    r["cache"],
                ]
            )
        lines += _table(
            [
                "op",
                "pass",
                "size",
                "shape",
                "backend/variant",
                "device",
                "min ms",
                "median ms",
                "GB/s",
                "GFLOP/s",
                "fraction",
                "bound",
                "cache",
            ],
            rows,
        )
    pre = _ok(res, "generate", "prefill")
    if pre:
        lines += ["## Prefill (B=1, last position through the LM head)", ""]
        rows = [
            [
                r["params"]["size"],
                r["backend"],
                r["params"]["device"],
                r["params"]["T"],
                r["metrics"]["tokens_per_s"],
                r["metrics"]["GFLOPs"],
                r["metrics"]["fraction_of_matmul"],
                _mem(r["metrics"]),
            ]
            for r in pre
        ]
        lines += _table(
            [
                "size",
                "backend",
                "device",
                "T",
                "tokens/s",
                "GFLOP/s",
                "of matmul",
                "peak memory MiB",
            ],
            rows,
        )
    dec = _ok(res, "generate", "decode")
    if dec:
        lines += [
            "## Decode",
            "",
            "Keys attended by the timed steps in brackets; ceiling = "
            "batch x read bandwidth / bytes read per step.",
            "",
        ]
        rows = [
            [
                r["params"]["size"],
                r["backend"],
                r["params"]["device"],
                r["params"]["B"],
                f"{r['params']['ctx']} {r['params']['contexts']}",
                r["metrics"]["tokens_per_s"],
                r["metrics"].get("ceiling_tokens_per_s"),
                r["metrics"].get("fraction_of_ceiling"),
                _mem(r["metrics"]),
            ]
            for r in dec
        ]
        lines += _table(
            [
                "size",
                "backend",
                "device",
                "B",
                "ctx",
                "tokens/s",
                "ceiling",
                "of ceiling",
                "peak memory MiB",
            ],
            rows,
        )
    ft = _ok(res, "finetune")
    if ft:
        lines += ["## Finetune (one optimizer step: forward, backward, clip, AdamW)", ""]
        rows = [
            [
                r["params"]["size"],
                r["backend"],
                r["params"]["device"],
                r["params"]["train"],
                f"{r['params']['B']}x{r['params']['T']}",
                r["time_s"]["min"],
                r["metrics"]["tokens_per_s"],
                r["metrics"]["GFLOPs"],
                _mem(r["metrics"]),
            ]
            for r in ft
        ]
        lines += _table(
            [
                "size",
                "backend",
                "device",
                "train",
                "BxT",
                "step s",
                "tokens/s",
                "GFLOP/s",
                "peak memory MiB",
            ],
            rows,
        )
    bad = [r for r in res if r["status"] != "ok"]
    if bad:
        lines += ["## Not measured", ""]
        lines += _table(
            ["suite", "case", "backend", "params", "status", "reason"],
            [
                [
                    r["suite"],
                    r["case"],
                    r["backend"],
                    ", ".join(f"{k}={v}" for k, v in r["params"].items()),
                    r["status"],
                    r["reason"],
                ]
                for r in bad
            ],
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots


def plots(doc: dict, out_dir: str) -> list[str]:
    """decode.png and ops_fraction.png in `out_dir`; [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    res, limits = doc["results"], doc.get("limits") or {}
    dec = [r for r in _ok(res, "generate", "decode") if r["params"]["B"] == 1]
    if dec:
        sizes = list(dict.fromkeys(r["params"]["size"] for r in dec))
        fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes, strict=True):
            here = [r for r in dec if r["params"]["size"] == size]
            for key in dict.fromkeys((r["backend"], r["params"]["device"]) for r in here):
                pts = sorted(
                    (sum(r["params"]["contexts"]) / 2, r["metrics"]["tokens_per_s"])
                    for r in here
                    if (r["backend"], r["params"]["device"]) == key
                )
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{key[0]} ({key[1]})")
            cfg = SIZES.get(size, TINY)
            xs = sorted({sum(r["params"]["contexts"]) / 2 for r in here})
            for key, style, label in (("read_GBps", "k--", "CPU"), ("gpu_read_GBps", "k:", "GPU")):
                if limits.get(key):
                    ys = [decode_ceiling(cfg, 1, round(x), limits[key]) for x in xs]
                    ax.plot(xs, ys, style, label=f"bandwidth ceiling ({label}, float32)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("context (keys attended)")
            ax.set_ylabel("tokens/s (batch 1)")
            ax.set_title(f"decode, GPT-2 {size}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "decode.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    ops = _ok(res, "ops")
    if ops:
        first_size = ops[0]["params"].get("size")
        here = [r for r in ops if r["params"].get("size", first_size) == first_size]
        # one shape per (op, pass): the largest, as in the ratios
        biggest: dict[tuple, dict] = {}
        for r in here:
            k = (r["case"], r["params"]["pass"], r["params"]["device"])
            if k not in biggest or _size_of(r) > _size_of(biggest[k]):
                biggest[k] = r
        bars: dict[str, dict[str, float]] = {}
        for r in here:
            p = r["params"]
            if _shape_key(r) != _shape_key(biggest[(r["case"], p["pass"], p["device"])]):
                continue
            label = f"{r['case']} {'fwd' if p['pass'] == 'forward' else 'bwd'} " + ",".join(
                f"{k}={v}" for k, v in p.items() if k in ("N", "C", "H", "Tq", "Tk")
            )
            key = f"{r['backend']} ({p['device']})"
            bars.setdefault(label, {})
            frac = r["metrics"]["fraction_of_limit"]
            if frac is not None:
                bars[label][key] = max(bars[label].get(key, 0.0), frac)
        keys = list(dict.fromkeys(k for v in bars.values() for k in v))
        labels = list(bars)
        fig, ax = plt.subplots(figsize=(9, 0.22 * len(labels) * max(len(keys), 1) + 1.5))
        h = 0.8 / max(len(keys), 1)
        for i, key in enumerate(keys):
            ys = [j + i * h for j in range(len(labels))]
            ax.barh(ys, [bars[lab].get(key, 0.0) for lab in labels], height=h, label=key)
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_xlabel("fraction of the machine's limit (roofline time / measured time)")
        ax.set_title(f"ops at the width of {first_size} (best variant per backend)")
        ax.grid(True, axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "ops_fraction.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report RESULTS_JSON [OUT_DIR]: the ratios, report.md and plots again,
    from a run's results.json (e.g. one copied back from a GPU machine)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("results", help="a results.json written by python -m bench")
    ap.add_argument("out", nargs="?", help="where report.md and the plots go (default: beside)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    doc["ratios"] = compute_ratios(doc)
    doc["plots"] = [os.path.basename(p) for p in plots(doc, out)]
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(markdown(doc))
    print(f"wrote {out}/report.md, results.json, {', '.join(doc['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
