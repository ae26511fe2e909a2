"""Run the atheris targets (tests/fuzz/atheris_targets.py) one after another and report, per
target, the executions, the coverage libFuzzer saw and any crash.

    python tests/fuzz/run_atheris.py --minutes 10                  # every target, 10 min each
    python tests/fuzz/run_atheris.py --minutes 1 --targets config tf_table
    python tests/fuzz/run_atheris.py --minutes 10 --corpus .fuzz --report figures.json

Coverage is libFuzzer's: `cov` counts the instrumented branches (edges) of ref/ and weights/
that some input reached, `ft` its finer features (edge hit counts and the like). Each target
runs with -timeout (seconds per input) and -rss_limit_mb, so an input whose parse takes time or
memory out of proportion to its size is reported as a crash (timeout / out-of-memory) like an
unexpected exception; the slowest input's time and the peak RSS are reported too. Logs and
crash inputs are kept in ARTIFACTS (default CORPUS/artifacts). With --corpus the corpora are
kept, so a later run continues where this one stopped; without it they go to a new
temporary directory, which is kept (and printed) for the crash inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for fuzz.atheris_targets

from fuzz.atheris_targets import TARGETS  # noqa: E402  (imports neither atheris nor the project)

_STATS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/\S+")


def run_target(
    name: str, seconds: float, corpus: str, artifacts: str, timeout: int, rss_mb: int
) -> dict:
    """One libFuzzer run of target `name`; its figures, from libFuzzer's status lines."""
    os.makedirs(corpus, exist_ok=True)
    os.makedirs(artifacts, exist_ok=True)
    log_path = os.path.join(artifacts, f"{name}.log")
    cmd = [
        sys.executable,
        os.path.join(HERE, "atheris_targets.py"),
        name,
        corpus,
        f"-max_total_time={max(int(seconds), 1)}",
        f"-timeout={timeout}",
        f"-rss_limit_mb={rss_mb}",
        f"-artifact_prefix={artifacts}{os.sep}{name}-",
        "-print_final_stats=1",
    ]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - t0
    execs = cov = ft = corp = 0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    for line in text.splitlines():
        m = _STATS.match(line)
        if m:
            execs, cov, ft, corp = (int(g) for g in m.groups())
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", text, re.MULTILINE))
    execs = int(stats.get("number_of_executed_units", execs))
    crashes = sorted(
        f for f in os.listdir(artifacts) if f.startswith(f"{name}-") and not f.endswith(".log")
    )
    return {
        "target": name,
        "seconds": round(elapsed),
        "executions": execs,
        "cov": cov,
        "ft": ft,
        "corpus": corp,
        "slowest_input_s": int(stats.get("slowest_unit_time_sec", -1)),
        "peak_rss_mb": int(stats.get("peak_rss_mb", -1)),
        "exit": rc,
        "crashes": crashes,
        "log": log_path,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per target (10)")
    p.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    p.add_argument("--corpus", help="keep the corpora in CORPUS/<target> (default: a temp dir)")
    p.add_argument("--artifacts", help="crash inputs and logs (default: CORPUS/artifacts)")
    # generous: on a shared machine a stall of a minute was seen (one "timeout" whose input
    # then parsed in 0.3 s); the slowest input's time is reported either way
    p.add_argument("--timeout", type=int, default=60, help="seconds one input may take (60)")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="memory limit (2048)")
    p.add_argument("--report", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if not args.minutes > 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    base = args.corpus or tempfile.mkdtemp(prefix="atheris-")  # kept: it holds the crashes
    artifacts = args.artifacts or os.path.join(base, "artifacts")
    print(f"corpora in {base}, logs and crash inputs in {artifacts}", flush=True)
    rows = []
    for name in args.targets:
        row = run_target(
            name, args.minutes * 60, os.path.join(base, name), artifacts, args.timeout,
            args.rss_limit_mb,
        )  # fmt: skip
        rows.append(row)
        print(
            f"{name:<13} {row['seconds'] / 60:5.1f} min  {row['executions']:>10,} execs  "
            f"cov {row['cov']:>4}  ft {row['ft']:>5}  corpus {row['corpus']:>4}  slowest "
            f"{row['slowest_input_s']} s  rss {row['peak_rss_mb']} MB  exit {row['exit']}  "
            f"crashes: {', '.join(row['crashes']) or 'none'}",
            flush=True,
        )
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["exit"] == 0 and not r["crashes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
