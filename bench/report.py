"""A run's report: report.md (the machine, the limits, the ratios, a table per suite) and the
PNG plots, from the records and the figures bench/ratios.py derives from them.

    python -m bench.report RESULTS_JSON [OUT_DIR]   # again, from a copied results.json
"""

from __future__ import annotations

import json
import os

import numpy as np

from bench.harness import busy_machine
from bench.plan import TINY
from bench.ratios import above_limit, compute_ratios, measured, op_fractions, records_above_limit
from bench.workload import decode_ceiling
from ref.config import SIZES

# What each backend label of the records times: the report's Backends section and the legend
# of the ops plot. "torch" and "torch-native" differ: the first is this project's backend, the
# second torch's own functions, the baseline (bench/suite_ops.py, fast/torch/backend.py).
LABELS = {
    "ref": "the numpy reference (ref/)",
    "numba": "this project's Numba kernels (fast/numba/)",
    "torch": "this project's torch backend (fast/torch/backend.py): the ops written out in "
    "plain torch, or torch's kernels through autograd (variant autograd)",
    "triton": "this project's Triton kernels (fast/triton/)",
    "torch-native": "baseline: torch.nn.functional itself (layer_norm, gelu, "
    "scaled_dot_product_attention, cross_entropy), backward by torch.autograd",
    "ref-nocache": "baseline: the reference recomputing the whole sequence for every token",
    "torch-eager": "baseline: a GPT-2 in eager PyTorch (bench/torch_gpt2.py)",
    "hf-generate": "baseline: Hugging Face transformers' GPT2LMHeadModel.generate",
    "torch-autograd": "baseline: bench/torch_gpt2.py with autograd and torch.optim.AdamW",
    "hf-transformers": "baseline: transformers' GPT2LMHeadModel, autograd and AdamW",
}
SHORT_LABELS = {  # the plot's legend
    "ref": "the numpy reference",
    "numba": "this project's Numba kernels",
    "torch": "this project's torch backend (fast/torch/)",
    "triton": "this project's Triton kernels",
    "torch-native": "torch.nn.functional itself (baseline)",
}

# A fraction of a measured limit above 1 is impossible on a truly measured limit: marked, and
# explained under its table and in the plot.
MARK = "†"
WHY_ABOVE = (
    "the limit was under-measured (busy machine?), or some of the data never left the cache "
    "(an output that fits in the LLC: bench/harness.py)"
)
ABOVE = f"above the measured limit: {WHY_ABOVE}"

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


def _flag(x):
    """A fraction of a limit for a table cell: marked when above 1 (`ABOVE`), with the digits
    that show it is above."""
    if not above_limit(x):
        return x
    text = _fmt(x)
    return f"{x:.4f} {MARK}" if text == "1" else f"{text} {MARK}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [[_fmt(c) for c in row] for row in rows]
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in cells]
    if any(c.endswith(MARK) for row in cells for c in row):
        out += ["", f"{MARK} {ABOVE}"]
    return out + [""]


def _pool(p: dict) -> str:
    """One threadpoolctl pool: 'blas: openblas 0.3.31 (2 threads, Haswell)'."""
    extra = f", {p['architecture']}" if p.get("architecture") else ""
    version = f" {p['version']}" if p.get("version") else ""
    return (
        f"{p.get('user_api')}: {p.get('internal_api')}{version} "
        f"({p.get('num_threads')} threads{extra})"
    )


def _param(key: str):
    return lambda r: r["params"][key]


def _metric(key: str):
    return lambda r: r["metrics"].get(key)


def _shape(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("pass", "device", "size"))


def _not_measured(results: list[dict]) -> list[dict]:
    return [r for r in results if r["status"] != "ok"]


_PEAK = ("peak memory MiB", lambda r: _mem(r["metrics"]))
# the columns of a training step's record (finetune, train) after what tells its cases apart
_STEP = [
    ("BxT", lambda r: f"{r['params']['B']}x{r['params']['T']}"),
    ("step s", lambda r: r["time_s"]["min"]),
    ("tokens/s", _metric("tokens_per_s")),
    ("GFLOP/s", _metric("GFLOPs")),
    _PEAK,
]

# The tables of records below the ratios, in order: (title, intro or "", the records it lists,
# its columns as (header, the cell of a record)). A table with no records is left out.
RECORD_TABLES = [
    (
        "## Ops",
        "Time is the min over repeats (median beside it); fraction = "
        "roofline time / measured time (bench/workload.py).",
        lambda res: measured(res, "ops"),
        [
            ("op", lambda r: r["case"]),
            ("pass", _param("pass")),
            ("size", lambda r: r["params"].get("size", "-")),
            ("shape", lambda r: _shape(r["params"])),
            ("backend/variant", lambda r: f"{r['backend']}/{r['variant']}"),
            ("device", _param("device")),
            ("min ms", lambda r: r["time_s"]["min"] * 1e3),
            ("median ms", lambda r: r["time_s"]["median"] * 1e3),
            ("GB/s", _metric("GBps")),
            ("GFLOP/s", _metric("GFLOPs")),
            ("fraction", lambda r: _flag(r["metrics"].get("fraction_of_limit"))),
            ("bound", _metric("bound")),
            ("cache", lambda r: r["cache"]),
        ],
    ),
    (
        "## Prefill (B=1, last position through the LM head)",
        "",
        lambda res: measured(res, "generate", "prefill"),
        [
            ("size", _param("size")),
            ("backend", lambda r: r["backend"]),
            ("device", _param("device")),
            ("T", _param("T")),
            ("tokens/s", _metric("tokens_per_s")),
            ("GFLOP/s", _metric("GFLOPs")),
            ("of matmul", lambda r: _flag(r["metrics"].get("fraction_of_matmul"))),
            _PEAK,
        ],
    ),
    (
        "## Decode",
        "Keys attended by the timed steps in brackets; ceiling = "
        "batch x read bandwidth / bytes read per step.",
        lambda res: measured(res, "generate", "decode"),
        [
            ("size", _param("size")),
            ("backend", lambda r: r["backend"]),
            ("device", _param("device")),
            ("B", _param("B")),
            ("ctx", lambda r: f"{r['params']['ctx']} {r['params']['contexts']}"),
            ("tokens/s", _metric("tokens_per_s")),
            ("ceiling", _metric("ceiling_tokens_per_s")),
            ("of ceiling", lambda r: _flag(r["metrics"].get("fraction_of_ceiling"))),
            _PEAK,
        ],
    ),
    (
        "## Finetune (one optimizer step: forward, backward, clip, AdamW)",
        "",
        lambda res: measured(res, "finetune"),
        [
            ("size", _param("size")),
            ("backend", lambda r: r["backend"]),
            ("device", _param("device")),
            ("train", _param("train")),
            *_STEP,
        ],
    ),
    (
        "## Train (pretraining from GPT-2's initialisation: one optimizer step, every tensor)",
        "Random tokens. Each backend's ratio to torch-autograd (the same config, batch and "
        "device) is in the ratios above.",
        lambda res: measured(res, "train"),
        [
            ("size", _param("size")),
            (
                "layers x heads x width",
                lambda r: "{n_layer}x{n_head}x{n_embd}".format(**r["params"]),
            ),
            ("vocab", _param("n_vocab")),
            ("backend", lambda r: r["backend"]),
            ("device", _param("device")),
            *_STEP,
        ],
    ),
    (
        "## Not measured",
        "",
        _not_measured,
        [
            ("suite", lambda r: r["suite"]),
            ("case", lambda r: r["case"]),
            ("backend", lambda r: r["backend"]),
            ("params", lambda r: ", ".join(f"{k}={v}" for k, v in r["params"].items())),
            ("status", lambda r: r["status"]),
            ("reason", lambda r: r["reason"]),
        ],
    ),
]


def _value(ratio: dict):
    """A ratio's value for a table: a fraction of a limit is marked above 1."""
    return _flag(ratio["value"]) if ratio.get("of_limit") else ratio["value"]


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
    busy = busy_machine(env.get("cpu_count"), env.get("load_average"), doc.get("load_average_end"))
    if busy:
        lines += [f"**Warning: {busy}.**", ""]
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
    start, end = doc.get("limits_start") or limits, doc.get("limits_end") or {}
    limit_recs = measured(doc["results"], "limits")
    tries = max((len(r["metrics"].get("tries", ())) for r in limit_recs), default=0)
    lines += _table(
        ["limit", "at start", "at end", "used"],
        [[k, start.get(k), end.get(k), v] for k, v in limits.items()],
    )
    if tries:
        lines += [
            f"Each the best of {tries} tries; the run uses the higher of start and end "
            "(other processes only ever make a limit look lower).",
            "",
        ]
    over = records_above_limit(doc["results"])
    if over:
        lines += [
            f"{len(over)} measurement(s) below did better than a measured limit allows "
            f"(a fraction above 1, marked {MARK}): {WHY_ABOVE}.",
            "",
        ]
    lines += ["## Backends", ""]
    lines += _table(
        ["backend", "status", "device / reason"],
        [[k, v["status"], v.get("device") or v.get("reason")] for k, v in doc["backends"].items()],
    )
    labels = dict.fromkeys(r["backend"] for r in doc["results"] if r["suite"] != "limits")
    labels = [b for b in labels if b in LABELS]
    if labels:
        lines += ["What each backend label times:", ""]
        lines += [f"- `{b}`: {LABELS[b]}" for b in labels] + [""]
    lines += [
        "## Key ratios",
        "",
        "The ratios the Numba and GPU issues ask for, from this run's "
        "records (speedup = time of the denominator / time of the numerator).",
        "",
    ]
    lines += _table(
        ["ratio", "value"], [[r["name"], _value(r)] for r in doc["ratios"] if r.get("key")]
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
        [[r["name"], _value(r), r["numerator"], r["denominator"]] for r in doc["ratios"]],
    )
    for title, intro, select, columns in RECORD_TABLES:
        recs = select(doc["results"])
        if not recs:
            continue
        lines += [title, ""] + ([intro, ""] if intro else [])
        lines += _table([h for h, _ in columns], [[cell(r) for _, cell in columns] for r in recs])
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
    res, limits = doc["results"], doc.get("limits") or {}
    figures = {}
    dec = [r for r in measured(res, "generate", "decode") if r["params"]["B"] == 1]
    if dec:
        figures["decode.png"] = _decode_plot(plt, dec, limits)
    first_size, bars = op_fractions(res)
    if bars:
        figures["ops_fraction.png"] = _ops_plot(plt, first_size, bars)
    written = []
    for name, fig in figures.items():
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _decode_plot(plt, dec: list[dict], limits: dict):
    """Batch-1 decode tokens/s against context, one panel per model size, with the
    bandwidth ceilings of the run's limits."""
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
        over = [
            (sum(r["params"]["contexts"]) / 2, r["metrics"]["tokens_per_s"])
            for r in here
            if above_limit(r["metrics"].get("fraction_of_ceiling"))
        ]
        if over:
            ax.plot(
                *zip(*over, strict=True),
                "ks",
                markersize=9,
                fillstyle="none",
                label=f"{MARK} above the ceiling: the read bandwidth was under-measured "
                "(busy machine?)",
            )
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
    return fig


def _legend_label(key: str) -> str:
    """ "torch (cpu)" -> "torch (cpu): this project's torch backend (fast/torch/)"."""
    note = SHORT_LABELS.get(key.split(" (")[0])
    return f"{key}: {note}" if note else key


def _ops_plot(plt, first_size: str | None, bars: dict[str, dict[str, float]]):
    """A bar per op label and backend: its fraction of the machine's limit; a bar above 1
    (impossible against a truly measured limit) hatched, with its value written beside it."""
    from matplotlib.patches import Patch
    from matplotlib.transforms import offset_copy

    keys = list(dict.fromkeys(k for v in bars.values() for k in v))
    labels = list(bars)
    fig, ax = plt.subplots(figsize=(9, 0.22 * len(labels) * max(len(keys), 1) + 2.0))
    h = 0.8 / max(len(keys), 1)
    flagged = []  # (bar, value, y): hatched once the legend has copied the plain bar style
    for i, key in enumerate(keys):
        ys = [j + i * h for j in range(len(labels))]
        xs = [bars[lab].get(key, 0.0) for lab in labels]
        drawn = ax.barh(ys, xs, height=h, label=_legend_label(key))
        flagged += [(b, x, y) for b, x, y in zip(drawn, xs, ys, strict=True) if above_limit(x)]
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("fraction of the machine's limit (roofline time / measured time)")
    ax.set_title(f"ops at the width of {first_size} (best variant per backend)")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if flagged:
        handles.append(
            Patch(
                facecolor="white",
                edgecolor="k",
                hatch="///",
                label=f"{MARK} above the measured limit: the limit was under-measured "
                "(busy machine?) or data stayed in cache",
            )
        )
    below = offset_copy(ax.transAxes, fig=fig, y=-0.5, units="inches")  # under the x label
    ax.legend(
        handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(0, 0), bbox_transform=below
    )
    for bar, x, y in flagged:
        bar.set_hatch("///")
        bar.set_edgecolor("k")
        ax.text(x, y, f" {x:.2f} {MARK}", va="center", fontsize=6)
    return fig


# ---------------------------------------------------------------------------------------------
# the files


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write(doc: dict, out_dir: str, with_plots: bool = True) -> None:
    """Compute the ratios into `doc`, draw the plots (with `with_plots`), and write
    results.json and report.md into `out_dir`."""
    doc["ratios"] = compute_ratios(doc)
    doc["plots"] = [os.path.basename(p) for p in plots(doc, out_dir)] if with_plots else []
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, default=_json_default)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(doc))


def main(argv: list[str] | None = None) -> int:
    """python -m bench.report RESULTS_JSON [OUT_DIR]: the ratios, report.md and plots again,
    from a run's results.json (e.g. one copied back from a GPU machine)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    ap.add_argument("results", help="a results.json written by python -m bench")
    ap.add_argument("out", nargs="?", help="where report.md and the plots go (default: beside)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        doc = json.load(f)
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    write(doc, out)
    print(f"wrote {out}/report.md, results.json, {', '.join(doc['plots'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
