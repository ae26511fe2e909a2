"""Run the fuzz tests at full strength and print how many cases each one tried.

    python tests/fuzz/run_full.py                 # 10,000 cases per test (about 30 min on 2 cores)
    python tests/fuzz/run_full.py --examples 500  # a quicker look

CI runs the same tests with 300 cases each (FUZZ_EXAMPLES's default in tests/test_fuzz.py).
The hypothesis profile is the one tests/conftest.py picks: with CI set, the derandomized "ci"
profile (the same cases every run); without it, "dev" (new random cases every run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=10_000, help="cases per test (10000)")
    p.add_argument("-k", default=None, help="only the tests matching this pytest expression")
    args = p.parse_args(argv)
    if args.examples < 1:
        p.error(f"--examples must be >= 1, got {args.examples}")
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "cases.json")
        env = {**os.environ, "FUZZ_EXAMPLES": str(args.examples), "FUZZ_REPORT": report}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"]
        if args.k:
            cmd += ["-k", args.k]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        elapsed = time.perf_counter() - t0
        counts = {}
        if os.path.exists(report):
            with open(report, encoding="utf-8") as f:
                counts = json.load(f)
    print(f"\nfuzz: {args.examples} examples per test, pytest exit {rc}, {elapsed:.0f} s")
    for name, n in sorted(counts.items()):
        print(f"  {name:<40} {n:>7}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
