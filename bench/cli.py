"""`python -m bench` and `gpt2 bench`: run the suites, write results.json, report.md and the
plots into --out (default ./bench-results/: the committed figures in bench/results/ are
rewritten only by an explicit --out bench/results). A flag with a bad value raises ValueError
naming the flag (gpt2's CLI and main() print it as a usage error, exit status 2)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

SUITES = ("limits", "ops", "generate", "finetune", "train")
SCHEMA = "gpt2-spec-bench/1"
# Relative to the current directory, never bench/results/: a --quick run from the repository
# root must not replace the committed full-run report and the plots the README shows.
DEFAULT_OUT = "bench-results"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from fast import BACKENDS

    p.add_argument(
        "--suite",
        default=",".join(SUITES),
        help="comma-separated suites to run: limits, ops, generate, finetune, train "
        "(default all; the limits are measured in every run)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="fewer shapes and repeats: under two minutes on 2 cores",
    )
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # a toy model: tests
    p.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"directory for results.json, report.md and the plots (default ./{DEFAULT_OUT}; "
        "the committed figures are rewritten only with --out bench/results)",
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="sizes whose widths the ops suite sweeps (default 124M,355M,774M,1558M; "
        "--quick: 124M)",
    )
    p.add_argument(
        "--model-sizes",
        default=None,
        help="model sizes for generate (the first at every context and batch, the "
        "others at short contexts), finetune and train (the first only; train: full runs, "
        "beside the small config); default 124M",
    )
    p.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"backends to time (default all: {','.join(BACKENDS)}; those that do "
        "not import are recorded and skipped)",
    )
    p.add_argument(
        "--no-baselines", action="store_true", help="skip the torch and transformers baselines"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def _suites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in SUITES]
    if bad or not names:
        raise ValueError(
            f"--suite: unknown suite(s) {', '.join(bad) or '(none)'}; choose from "
            f"{', '.join(SUITES)}"
        )
    return names


def run_bench(args: argparse.Namespace, command: str = "python -m bench", log=None) -> dict:
    """Run what `args` asks for; write the outputs into args.out; return the document."""
    from bench import limits as limits_suite
    from bench import suite_finetune, suite_generate, suite_ops, suite_train
    from bench.backends import load_backends
    from bench.harness import busy_machine, environment
    from bench.plan import SuiteSetup, make_plan

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    suites = _suites(args.suite)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    plan = make_plan(mode, args.sizes, args.model_sizes)  # PlanError names the flag
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not names:
        raise ValueError("--backends: no backend given")
    backends, status = load_backends(names)  # ValueError on an unknown name
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {args.out}: cannot create the directory ({e})") from None

    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    doc: dict = {
        "schema": SCHEMA,
        "command": command,
        "mode": mode,
        "options": {
            "suites": suites,
            "sizes": [s for s, _ in plan.widths],
            "model_sizes": [s for s, _ in plan.models],
            "backends": names,
            "baselines": not args.no_baselines,
            "seed": args.seed,
        },
        "environment": environment(),
        "backends": status,
    }
    for name, st in status.items():
        log(
            f"bench: backend {name}: {st['status']}"
            + (f" ({st['reason']})" if st.get("reason") else "")
        )
    log(f"bench: {mode} run, suites {','.join(suites)}, out {os.path.abspath(args.out)}")
    env = doc["environment"]
    busy = busy_machine(env["cpu_count"], env["load_average"])
    if busy:
        log(f"bench: warning: {busy}")
    results: list[dict] = []
    log(f"bench: limits (best of {plan.limit_tries} tries) ...")
    recs, limits = limits_suite.run(plan, rng, gpu=True, phase="start")
    results += recs
    doc["limits"] = doc["limits_start"] = limits
    log("bench: limits " + ", ".join(f"{k} {v:.1f}" for k, v in limits.items()))
    setup = SuiteSetup(plan, backends, limits, rng, not args.no_baselines, log)
    runners = {
        "ops": suite_ops.run,
        "generate": suite_generate.run,
        "finetune": suite_finetune.run,
        "train": suite_train.run,
    }
    for suite in suites:
        if suite == "limits":
            continue
        t0 = time.perf_counter()
        log(f"bench: {suite} ...")
        recs = runners[suite](setup)
        results += recs
        n_bad = sum(r["status"] != "ok" for r in recs)
        log(
            f"bench: {suite}: {len(recs)} records ({n_bad} not measured) in "
            f"{time.perf_counter() - t0:.0f} s"
        )
        _write(doc, results, args.out, t_start, complete=False)  # an interrupted run keeps these
    log("bench: limits again (drift between start and end = noise from other processes) ...")
    recs, doc["limits_end"] = limits_suite.run(plan, rng, gpu=True, phase="end")
    results += recs
    # the fractions use the best of the two: a limit measured low makes everything look fast
    doc["limits"] = limits_suite.best(doc["limits_start"], doc["limits_end"])
    limits_suite.rescore(results, doc["limits"])
    log("bench: limits used " + ", ".join(f"{k} {v:.1f}" for k, v in doc["limits"].items()))
    _write(doc, results, args.out, t_start, complete=True)
    busy = busy_machine(env["cpu_count"], env["load_average"], doc["load_average_end"])
    if busy:
        log(f"bench: warning: {busy}")
    log(
        f"bench: wrote {os.path.join(os.path.abspath(args.out), 'results.json')}, report.md "
        f"and {len(doc['plots'])} plot(s) in {doc['elapsed_s']:.0f} s"
    )
    return doc


def _write(doc: dict, results: list[dict], out: str, t_start: float, complete: bool) -> None:
    """Fill in the run-level fields and write results.json and report.md (and the plots when
    the run is complete)."""
    from bench import report
    from bench.harness import gpu_info, thread_settings

    doc["complete"] = complete
    doc["results"] = results
    doc["threads"] = thread_settings()
    doc["gpu"] = gpu_info()
    doc["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["elapsed_s"] = time.perf_counter() - t_start
    report.write(doc, out, with_plots=complete)


def print_ratios(doc: dict, out=sys.stdout) -> None:
    for r in doc["ratios"]:
        out.write(f"{r['value']:10.3g}  {r['name']}\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        doc = run_bench(args, "python -m bench " + shlex.join(argv))
    except ValueError as e:  # a flag's value, as gpt2's CLI reports it
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"python -m bench: interrupted; the suites finished are in {args.out}", file=sys.stderr
        )
        return 130
    print_ratios(doc)
    return 0
