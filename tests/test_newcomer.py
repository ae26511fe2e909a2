"""Issue 13: the project tried as a new user would, each defect found there held by a test.

Most run the command line in a subprocess, as a user meets it. Nothing here needs a network:
"offline" is a download pointed at a port on 127.0.0.1 where nothing listens (refused).
"""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from weights import DownloadError
from weights import download as dl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "hf-tiny")


def closed_port() -> int:
    """A loopback port with nothing listening on it (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gpt2_cli(*args: str, env: dict | None = None, timeout: float = 120) -> tuple:
    """(exit status, stdout, stderr, seconds) of `python -m gpt2 ARGS`."""
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "gpt2", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0


def offline_env(cache: str) -> dict:
    url = f"http://127.0.0.1:{closed_port()}"
    return {"GPT2_CACHE": cache, "GPT2_DOWNLOAD_URL_OPENAI": url, "GPT2_DOWNLOAD_URL_HF": url}


# ---------------------------------------------------------------------------------------------
# 1, 2: offline, the first command fails fast, says what to do, and leaves nothing behind


def test_offline_first_generate_fails_fast_and_says_what_to_do(tmp_path):
    """Before: silent for 62 s (five retries with backoff per source), exit 2, no way forward.
    Now: both sources refused at once, exit 3 (a download failure, not bad usage). The bound
    of 20 s is the interpreter's start and imports (~2-3 s here) with room for a busy CI
    machine; the old behaviour took 31 s of backoff per source."""
    cache = tmp_path / "cache"
    rc, out, err, seconds = gpt2_cli(
        "generate",
        "Alan Turing theorized that computers would one day become",
        "--max-new-tokens",
        "40",
        env=offline_env(str(cache)),
    )
    assert rc == 3, err
    assert seconds < 20, seconds
    assert "could not be reached" in err and "--model" in err and "GPT2_CACHE" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    # 2: nothing is left that looks like a model (before: 124M/ holding only .lock)
    assert not (cache / "124M").exists()
    assert not dl.is_complete("124M", str(cache))


def test_a_failed_download_does_not_count_as_weights_present(tmp_path, monkeypatch):
    """The real-weights tests ask `real_weights.cached_124m`, which trusts only the manifest."""
    from real_weights import cached_124m

    monkeypatch.setenv("GPT2_CACHE", str(tmp_path))
    (tmp_path / "124M").mkdir()
    (tmp_path / "124M" / ".lock").write_text("")
    assert cached_124m() is None


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the http.server API)
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_retries_are_announced_as_they_happen(tmp_path):
    """A 5xx answer is worth retrying; each retry is told to `notify` before its wait."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    notes: list[str] = []
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/f"
        with pytest.raises(DownloadError, match="after retries"):
            dl.fetch(url, str(tmp_path / "f"), retries=2, backoff=0.0, notify=notes.append)
    finally:
        server.shutdown()
    assert len(notes) == 2 and all("503" in n and "retrying" in n for n in notes), notes


def test_refused_connection_is_not_retried(tmp_path):
    notes: list[str] = []
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="could not be reached"):
        dl.fetch(f"http://127.0.0.1:{closed_port()}/f", str(tmp_path / "f"), notify=notes.append)
    assert notes == [] and time.perf_counter() - t0 < 5


# ---------------------------------------------------------------------------------------------
# 7: a mistyped size is an unknown model, on every command


@pytest.mark.parametrize("command", ["generate", "eval", "finetune", "download"])
def test_mistyped_size_is_an_unknown_model(command, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50, encoding="utf-8")
    args = {
        "generate": ["generate", "hi", "--model", "125M"],
        "eval": ["eval", str(text), "--model", "125M"],
        "finetune": [
            "finetune",
            "--model",
            "125M",
            "--data",
            str(text),
            "--out",
            str(tmp_path / "o"),
        ],
        "download": ["download", "125M"],
    }[command]
    rc, _, err, _ = gpt2_cli(*args, env={"GPT2_CACHE": str(tmp_path / "cache")})
    assert rc == 2, err
    assert "unknown model '125M'; expected one of 124M" in err, err
    assert "no such file" not in err
