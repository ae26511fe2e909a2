"""gpt2 bench [--suite ops,generate,finetune,train] [--quick] [--out DIR] [--sizes ...]
[--model-sizes ...] [--backends ...]: the benchmark suite of bench/ (same as python -m bench)."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_parser(sub) -> None:
    from bench.cli import add_arguments

    p = sub.add_parser(
        "bench", help="benchmarks: ops, generation, finetuning, pretraining, machine limits"
    )
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bench.cli import print_ratios, run_bench

    doc = run_bench(args, "gpt2 " + shlex.join(sys.argv[1:]))
    print_ratios(doc)
    return 0
