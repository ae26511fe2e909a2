"""Every Python block of the README runs as written (issue 13: a snippet that cannot run
teaches nothing), each in a fresh interpreter from the repository root, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


BLOCKS = python_blocks(os.path.join(ROOT, "README.md"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2  # the API and the backend contract; a broken regex finds none


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_block_runs(i, tmp_path):
    env = {**os.environ, "GPT2_CACHE": str(tmp_path / "cache")}  # nothing downloaded, ever
    r = subprocess.run(
        [sys.executable, "-c", BLOCKS[i]], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, f"README python block {i}:\n{BLOCKS[i]}\n{r.stderr[-3000:]}"
