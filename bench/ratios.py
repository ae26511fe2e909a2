"""The figures derived from one run's records: the ratios the issues ask for, and the bars of
the ops plot. Pure functions of the records; bench/report.py renders what they return.

Every ratio is computed from records of the same run (same machine, same load), and names
the records it divides. Speedups are time(baseline) / time(backend) on min times; fractions
are achieved / limit. A ratio is {name, value, numerator, denominator, note, key, of_limit};
of_limit marks a fraction of a measured limit (bandwidth, matmul FLOP/s, the decode ceiling),
which cannot truly exceed 1: above 1, the limit was under-measured or the data were partly
in cache (`above_limit`).
"""

from __future__ import annotations

import re

from bench.suite_ops import ATTN_T, CE_V, GPT2_C, GPT2_ROWS
from fast import OPS

NATIVE = "torch-native"
BASELINES = ("torch-native", "torch-eager", "hf-generate", "ref-nocache", "torch-autograd")


# the metrics of a record that are a fraction of a measured limit (bench/limits.py: rescore)
FRACTIONS = ("fraction_of_limit", "fraction_of_matmul", "fraction_of_ceiling")


def measured(results: list[dict], suite: str, case: str | None = None) -> list[dict]:
    """The records of `suite` (and `case`) that measured something."""
    return [
        r
        for r in results
        if r["suite"] == suite and r["status"] == "ok" and (case is None or r["case"] == case)
    ]


def records_above_limit(results: list[dict]) -> list[dict]:
    """The measured records with a fraction of a limit above 1 (`above_limit`)."""
    return [
        r
        for r in results
        if r["status"] == "ok" and any(above_limit(r["metrics"].get(k)) for k in FRACTIONS)
    ]


def _best(records: list[dict]) -> dict | None:
    """The fastest variant among `records`."""
    return min(records, key=lambda r: r["time_s"]["min"]) if records else None


def _each_backend(records: list[dict], but: tuple[str, ...] = ()):
    """(backend, its fastest record) for every backend of `records` not in `but`, by name."""
    for be in sorted({r["backend"] for r in records} - set(but)):
        yield be, _best([r for r in records if r["backend"] == be])


def _desc(r: dict) -> str:
    p = {k: v for k, v in r["params"].items() if k not in ("pass", "device", "contexts")}
    v = f"/{r['variant']}" if r["variant"] and r["variant"] != r["backend"] else ""
    return f"{r['suite']}.{r['case']} {r['backend']}{v} {p}"


def _ratio(
    name: str,
    value: float,
    num: dict | str,
    den: dict | str,
    note: str = "",
    of_limit: bool = False,
) -> dict:
    return {
        "name": name,
        "value": value,
        "numerator": num if isinstance(num, str) else _desc(num),
        "denominator": den if isinstance(den, str) else _desc(den),
        "note": note,
        "of_limit": of_limit,
    }


def above_limit(x) -> bool:
    """A fraction of a measured limit above 1: the machine did more than its measured
    ceiling, so the ceiling was measured low (a busy machine) or some data came from cache."""
    return x is not None and x > 1.0


def _tokens_ratio(name: str, r: dict, t: dict) -> dict:
    """tokens/s of record `r` over that of record `t`."""
    return _ratio(name, r["metrics"]["tokens_per_s"] / t["metrics"]["tokens_per_s"], r, t)


def _at(r: dict, *names: str) -> tuple:
    """The values of a record's params `names`: what two records must share to be compared."""
    return tuple(r["params"][n] for n in names)


def _size_of(r: dict) -> int:
    """How big a measured op is: its compulsory bytes plus FLOPs (orders shapes)."""
    m = r["metrics"]
    return m["read_bytes"] + m["write_bytes"] + m["flops"]


def _shape_key(r: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in r["params"].items() if k not in ("device",)))


# ---------------------------------------------------------------------------------------------
# ops on the CPU (the Numba issue), and every GPU op against torch's


def _ops_ratios(results: list[dict], limits: dict) -> list[dict]:
    out = []
    ops = measured(results, "ops")
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

        def of_copy(label: str, rec: dict, op=op) -> dict:
            return _ratio(
                f"{op} forward: {label} GB/s / copy GB/s",
                rec["metrics"]["GBps"] / limits["copy_GBps"],
                rec,
                f"limits.copy_GBps = {limits['copy_GBps']:.1f}",
                of_limit=True,
            )

        for direction in ("forward", "backward"):
            here = [r for r in recs if r["params"]["pass"] == direction]
            ref = _best([r for r in here if r["backend"] == "ref"])
            bandwidth = op in ("gelu", "bias_gelu") and direction == "forward"
            for be, best in _each_backend(here, ("ref",)):
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
                if bandwidth and limits:
                    out.append(of_copy(be, best))
            if ref is not None and bandwidth:
                out.append(of_copy("ref", ref))
    # on a GPU: our kernels against torch's own, per op at the largest shape
    gpu = [r for r in ops if r["params"]["device"] == "cuda"]
    for key in sorted({(r["case"], r["params"]["pass"]) for r in gpu}):
        op, direction = key
        here = [r for r in gpu if (r["case"], r["params"]["pass"]) == key]
        native_all = [r for r in here if r["backend"] == NATIVE]
        if not native_all:
            continue
        big = max(native_all, key=lambda r: r["metrics"]["read_bytes"] + r["metrics"]["flops"])
        same = [r for r in here if _shape_key(r) == _shape_key(big)]
        for be, best in _each_backend(same, (NATIVE,)):
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


def _cuda_ops(results: list[dict], op: str, direction: str, **match) -> list[dict]:
    """The CUDA records of `op` in `direction` whose params include `match`."""
    return [
        r
        for r in measured(results, "ops", op)
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
        for be, best in _each_backend(recs, (NATIVE,))
    ]


def _of_copy(op: str, recs: list[dict], limits: dict) -> list[dict]:
    """GB/s of each backend (torch's too) over the device copy bandwidth of the same run."""
    copy = limits.get("gpu_copy_GBps")
    if not copy or not recs:
        return []
    top = max(recs, key=_size_of)  # the largest rows: the least help from the L2
    recs = [r for r in recs if _shape_key(r) == _shape_key(top)]
    return [
        _ratio(
            f"GPU {op} forward: {be} GB/s / device copy GB/s",
            best["metrics"]["GBps"] / copy,
            best,
            f"limits.gpu_copy_GBps = {copy:.1f}",
            f"N={best['params']['N']}; {_cache_note(best)}",
            of_limit=True,
        )
        for be, best in _each_backend(recs)
    ]


def _gpu_op_targets(results: list[dict], limits: dict) -> list[dict]:
    """Issue 6's op targets: bandwidth fractions and speed (and memory) against torch."""
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
    for be, best in _each_backend(recs, (NATIVE,)):
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


# ---------------------------------------------------------------------------------------------
# generation, finetuning and training


def _torch_twin(label: str) -> str:
    """The torch backend's label at the same dtype: triton -> torch, triton-bf16 -> torch-bf16."""
    return "torch" + label[len(label.split("-")[0]) :]


def _top_T(prefills: list[dict], size: str) -> int:
    """The longest prompt measured at model size `size`."""
    return max(x["params"]["T"] for x in prefills if x["params"]["size"] == size)


def _gpu_end_to_end(results: list[dict]) -> list[dict]:
    """Generation and finetuning tokens/s on the GPU: each backend against the torch backend
    at the same dtype and against Hugging Face transformers, same size and shape."""
    out = []
    cuda = [r for r in results if r["status"] == "ok" and r["params"].get("device") == "cuda"]
    pre = [r for r in cuda if r["suite"] == "generate" and r["case"] == "prefill"]
    for r in pre:
        T_top = _top_T(pre, r["params"]["size"])
        if r["params"]["T"] != T_top or r["backend"] in BASELINES or r["backend"] == "torch":
            continue
        for t in pre:
            twin = t["backend"] == _torch_twin(r["backend"]) and t is not r
            if twin and _at(t, "size", "T") == _at(r, "size", "T"):
                name = (
                    f"GPU prefill T={T_top} ({r['params']['size']}, {r['params']['dtype']}):"
                    f" {r['backend']} / {t['backend']} tokens/s"
                )
                out.append(_tokens_ratio(name, r, t))
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
            if _at(t, "size", "ctx") != _at(r, "size", "ctx"):
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
            out.append(_tokens_ratio(name, r, t))
    ft = [r for r in cuda if r["suite"] == "finetune"]
    for r in ft:
        if r["backend"] in BASELINES or r["backend"] in ("torch", "hf-transformers"):
            continue
        p = r["params"]
        for t in ft:
            if t["backend"] not in ("torch", "hf-transformers"):
                continue
            if _at(t, "train", "B", "T") != _at(r, "train", "B", "T"):
                continue
            name = (
                f"GPU finetune {p['train']} B={p['B']} T={p['T']} ({p['size']}): "
                f"{r['backend']} / {t['backend']} tokens/s"
            )
            out.append(_tokens_ratio(name, r, t))
    return out


def _generate_ratios(results: list[dict]) -> list[dict]:
    out = []
    pre = measured(results, "generate", "prefill")
    for r in pre:
        T_top = _top_T(pre, r["params"]["size"])
        if r["params"]["T"] == T_top and r["metrics"].get("fraction_of_matmul") is not None:
            out.append(
                _ratio(
                    f"prefill {T_top} tokens B=1 ({r['params']['size']}, {r['backend']}, "
                    f"{r['params']['device']}): effective FLOP/s / matmul FLOP/s",
                    r["metrics"]["fraction_of_matmul"],
                    r,
                    "limits.matmul (same device)",
                    of_limit=True,
                )
            )
    dec = measured(results, "generate", "decode")
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
                    of_limit=True,
                )
            )
    point = ("ctx", "size")
    for h in [r for r in b1 if r["backend"] == "hf-generate"]:
        for r in b1:
            ours = r["backend"] not in ("hf-generate", "ref-nocache")
            if ours and _at(r, *point) == _at(h, *point):
                name = (
                    f"decode B=1 ctx={h['params']['ctx']} ({r['params']['size']}): "
                    f"{r['backend']} ({r['params']['device']}) / hf-generate "
                    f"({h['params']['device']})"
                )
                out.append(_tokens_ratio(name, r, h))
    for r in [r for r in b1 if r["backend"] == "ref"]:
        for n in b1:
            if n["backend"] == "ref-nocache" and _at(n, *point) == _at(r, *point):
                name = (
                    f"decode B=1 ctx={r['params']['ctx']} ({r['params']['size']}): "
                    "ref with KV cache / ref-nocache"
                )
                out.append(_tokens_ratio(name, r, n))
    for r in dec:
        B = r["params"]["B"]
        if B == 1:
            continue
        for one in b1:
            same = _at(one, "device", *point) == _at(r, "device", *point)
            if same and one["backend"] == r["backend"]:
                name = (
                    f"decode B={B} / B=1 at ctx={r['params']['ctx']} ({r['params']['size']}, "
                    f"{r['backend']}, {r['params']['device']}): tokens/s"
                )
                out.append(_tokens_ratio(name, r, one))
    return out


# issue 15's targets: (ours, llama.cpp's) per weight type, decode B=1 and the longest prefill
VS_LLAMA_CPP = {
    "decode": [("numba", "llama.cpp-f32"), ("numba-f32rows", "llama.cpp-f32"),
               ("numba-bf16", "llama.cpp-f16"), ("numba-f16", "llama.cpp-f16"),
               ("numba-int8", "llama.cpp-q8_0")],
    "prefill": [("numba", "llama.cpp-f32"), ("numba-int8", "llama.cpp-f32")],
}  # fmt: skip


def _llama_cpp_ratios(results: list[dict]) -> list[dict]:
    """Our tokens/s over llama.cpp's, at the same size, batch 1, the same prompt length
    (prefill) or decode contexts (bench/suite_generate.llama_cpp_records matches them)."""
    out = []
    for case, pairs in VS_LLAMA_CPP.items():
        recs = [r for r in measured(results, "generate", case) if r["params"].get("B", 1) == 1]
        for ours, theirs in pairs:
            for t in [r for r in recs if r["backend"] == theirs]:
                size = t["params"]["size"]
                at = ("T",) if case == "prefill" else ("contexts",)
                for r in recs:
                    if r["backend"] == ours and r["params"]["size"] == size:
                        if _at(r, *at) == _at(t, *at):
                            where = (
                                f"T={t['params']['T']}"
                                if case == "prefill"
                                else (f"contexts {t['params']['contexts']}")
                            )
                            name = f"{case} B=1 {where} ({size}): {ours} / {theirs}"
                            out.append(_tokens_ratio(name, r, t))
    return out


def _vs_autograd(recs: list[dict], prefix, cpu_baseline: bool) -> list[dict]:
    """tokens/s of each trainer's step record over torch-autograd's with the same params but
    the device: autograd on the trainer's device, and with `cpu_baseline` on the CPU too.
    prefix(record) starts the ratio's name."""
    out = []
    for r in recs:
        if r["backend"] in ("torch-autograd", "hf-transformers"):
            continue
        device = r["params"]["device"]
        for base in recs:
            bdev = base["params"]["device"]
            if (
                base["backend"] == "torch-autograd"
                and base["params"] == {**r["params"], "device": bdev}
                and (bdev == device or (cpu_baseline and bdev == "cpu"))
            ):
                name = f"{prefix(r)}: {r['backend']} ({device}) / torch-autograd ({bdev}) tokens/s"
                out.append(_tokens_ratio(name, r, base))
    return out


def _finetune_ratios(results: list[dict]) -> list[dict]:
    def prefix(r: dict) -> str:
        return f"finetune {r['params']['train']} B={r['params']['B']} T={r['params']['T']}"

    return _vs_autograd(measured(results, "finetune"), prefix, cpu_baseline=True)


def _train_ratios(results: list[dict]) -> list[dict]:
    """Pretraining: each backend against torch autograd on the same config and device."""

    def prefix(r: dict) -> str:
        return f"train {r['params']['size']} B={r['params']['B']} T={r['params']['T']}"

    return _vs_autograd(measured(results, "train"), prefix, cpu_baseline=False)


def _is_key(name: str, top_ctx: int) -> bool:
    """The ratios the Numba and GPU issues ask for by name (the rest are context)."""
    m = re.search(r"ctx=(\d+)", name)
    ctx_top = m is not None and int(m.group(1)) == top_ctx
    return (
        ("numba" in name and name.startswith(("layernorm", "gelu", "attention")))
        or name.startswith(("gelu forward: ref GB/s", "GPU ", "prefill ", "finetune ", "train "))
        or "/ hf-generate" in name
        or "/ llama.cpp-" in name
        or ("/ B=1 at ctx=" in name and name.startswith("decode B=16"))
        or (ctx_top and ("bandwidth ceiling" in name or "ref-nocache" in name))
    )


def compute_ratios(doc: dict) -> list[dict]:
    """Every ratio of the run; `key` marks those the issues name."""
    results, limits = doc["results"], doc.get("limits") or {}
    out = (
        _ops_ratios(results, limits)
        + _gpu_op_targets(results, limits)
        + _generate_ratios(results)
        + _llama_cpp_ratios(results)
        + _finetune_ratios(results)
        + _train_ratios(results)
        + _gpu_end_to_end(results)
    )
    ctxs = [r["params"]["ctx"] for r in measured(results, "generate", "decode")]
    top = max(ctxs) if ctxs else -1
    for r in out:
        r["key"] = _is_key(r["name"], top)
    return out


# ---------------------------------------------------------------------------------------------
# the ops plot


def op_fractions(results: list[dict]) -> tuple[str | None, dict[str, dict[str, float]]]:
    """(the first width of the run, {op label: {"backend (device)": fraction of the limit}})
    at that width: one shape per (op, pass, device), the largest, as in the ratios, and the
    best variant of each backend."""
    ops = measured(results, "ops")
    if not ops:
        return None, {}
    first_size = ops[0]["params"].get("size")
    here = [r for r in ops if r["params"].get("size", first_size) == first_size]
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
    return first_size, bars
