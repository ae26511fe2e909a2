"""The downloader against a local HTTP server with failure injection.

The server serves small random byte strings under the real file names; they are test data, not
weights. Every test starts its own ThreadingHTTPServer on 127.0.0.1 (random port) and shuts it
down at the end. Downloads run with backoff=0 and a handful of retries, so every loop is bounded
and no test sleeps.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2.cli import main
from weights import WeightsError
from weights import download as dl

FAST = {"timeout": 5.0, "retries": 3, "backoff": 0.0, "progress": False}


class FakeServer:
    """What the handler serves, the failures it injects, and a log of (path, Range) requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}  # path -> the true content (sizes, hashes, ranges)
        self.body: dict[str, bytes] = {}  # path -> bytes sent instead (same length: corruption)
        self.headers: dict[str, dict[str, str]] = {}  # path -> extra response headers
        self.length: dict[str, int] = {}  # path -> a wrong Content-Length to declare
        self.redirects: dict[str, str] = {}  # path -> Location of a 302
        self.fail: dict[str, list[int]] = {}  # path -> statuses to answer first, one per request
        self.cut: dict[str, list[int]] = {}  # path -> bytes to send before dropping, per request
        self.chunk: int | None = None  # answer ranged requests with at most this many bytes
        self.stall: dict[str, float] = {}  # path -> seconds to wait after the headers
        self.ignore_range = False
        self.log: list[tuple[str, str | None]] = []
        self.url = ""

    def requests(self, path: str) -> list[str | None]:
        return [r for p, r in self.log if p == path]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        fake: FakeServer = self.server.fake
        path = urllib.parse.urlsplit(self.path).path
        rng = self.headers.get("Range")
        fake.log.append((path, rng))
        if fake.fail.get(path):
            self.send_error(fake.fail[path].pop(0))
            return
        if path in fake.redirects:
            self.send_response(302)
            self.send_header("Location", fake.redirects[path])
            for k, v in fake.headers.get(path, {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path not in fake.files:
            self.send_error(404)
            return
        data = fake.files[path]
        body = fake.body.get(path, data)
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not fake.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            end = len(data) if fake.chunk is None else min(len(data), start + fake.chunk)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("Content-Length", str(end - start))
            body = body[:end]
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(fake.length.get(path, len(data))))
        for k, v in fake.headers.get(path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        if path in fake.stall:
            time.sleep(fake.stall[path])
        payload = body[start:]
        if fake.cut.get(path):
            payload = payload[: fake.cut[path].pop(0)]
        self.wfile.write(payload)
        # HTTP/1.0: the connection closes after this answer, so a short payload is a cut.


@contextlib.contextmanager
def serve():
    fake = FakeServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.fake = fake
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def server():
    with serve() as fake:
        yield fake


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in ("GPT2_CACHE", "GPT2_DOWNLOAD_URL_OPENAI", "GPT2_DOWNLOAD_URL_HF", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def content(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


OPENAI_SIZES = {
    "checkpoint": 90,
    "hparams.json": 80,
    "model.ckpt.index": 3000,
    "encoder.json": 5000,
    "vocab.bpe": 4000,
    "model.ckpt.data-00000-of-00001": 300_000,
}
DATA = "model.ckpt.data-00000-of-00001"


def add_openai(fake: FakeServer, size: str = "124M", md5: bool = True) -> dict[str, bytes]:
    """Serve the OpenAI file set under /models/{size}/, with Azure's Content-MD5 if `md5`."""
    files = {}
    for i, (name, n) in enumerate(OPENAI_SIZES.items()):
        data = content(i, n)
        files[name] = data
        path = f"/models/{size}/{name}"
        fake.files[path] = data
        if md5:
            fake.headers[path] = {"Content-MD5": md5_b64(data)}
    return files


def add_hf(fake: FakeServer, repo: str = "openai-community/gpt2") -> dict[str, bytes]:
    """Serve config.json directly, model.safetensors via a 302 carrying X-Linked-* (as HF does)."""
    cfg, model = b'{"n_layer": 1}', content(99, 200_000)
    fake.files[f"/{repo}/resolve/main/config.json"] = cfg
    # A git blob sha1 (40 hex): not a sha256, so the downloader must not treat it as one.
    fake.headers[f"/{repo}/resolve/main/config.json"] = {"ETag": '"' + "ab" * 20 + '"'}
    fake.redirects[f"/{repo}/resolve/main/model.safetensors"] = "/cdn/blob123"
    fake.headers[f"/{repo}/resolve/main/model.safetensors"] = {
        "X-Linked-Size": str(len(model)),
        "X-Linked-Etag": '"' + hashlib.sha256(model).hexdigest() + '"',
    }
    fake.files["/cdn/blob123"] = model
    return {"config.json": cfg, "model.safetensors": model}


def assert_files(directory: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with open(os.path.join(directory, name), "rb") as f:
            assert f.read() == data, name
    assert not [n for n in os.listdir(directory) if n.endswith(".part")]


def test_full_download_openai(server, tmp_path):
    files = add_openai(server)
    path = dl.download(
        "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
    )
    assert path == os.path.join(str(tmp_path), "124M")
    assert_files(path, files)
    assert dl.is_complete("124M", str(tmp_path))
    manifest = dl.read_manifest("124M", str(tmp_path))
    assert manifest["source"] == "openai" and set(manifest["files"]) == set(files)
    for name, data in files.items():
        rec = manifest["files"][name]
        assert rec["size"] == len(data)
        assert rec["sha256"] == hashlib.sha256(data).hexdigest()
        assert "md5:Content-MD5" in rec["verified"]
    assert not any(p.endswith(".meta") for p, _ in server.log)  # the graph is not needed
    assert all(r is None for _, r in server.log)  # nothing to resume, so no Range
    dl.verify("124M", str(tmp_path))
    # Complete: a second call touches no network.
    n = len(server.log)
    assert dl.download("gpt2", str(tmp_path), openai_url=server.url + "/models", **FAST) == path
    assert len(server.log) == n


def test_connection_cut_then_resume(server, tmp_path):
    files = add_openai(server)
    data_path = f"/models/124M/{DATA}"
    server.cut[data_path] = [1000, 50_000]  # two cuts, then a whole answer
    path = dl.download(
        "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
    )
    assert_files(path, files)
    assert server.requests(data_path) == [None, "bytes=1000-", "bytes=51000-"]
    assert dl.is_complete("124M", str(tmp_path))


def test_resume_of_part_left_by_earlier_run_hashes_the_prefix(server, tmp_path):
    files = add_openai(server)
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / (DATA + ".part")).write_bytes(files[DATA][:12345])
    # On a ranged answer Azure's Content-MD5 covers the range only; x-ms-blob-content-md5 still
    # describes the whole blob, so the resumed file is checked by MD5 over prefix + rest.
    server.headers[f"/models/124M/{DATA}"] = {"x-ms-blob-content-md5": md5_b64(files[DATA])}
    dl.download("124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST)
    assert_files(str(directory), files)
    assert server.requests(f"/models/124M/{DATA}") == ["bytes=12345-"]
    rec = dl.read_manifest("124M", str(tmp_path))["files"][DATA]
    assert rec["sha256"] == hashlib.sha256(files[DATA]).hexdigest()
    assert "md5:x-ms-blob-content-md5" in rec["verified"]


def test_resume_with_a_bad_prefix_is_caught_by_the_whole_file_hash(server, tmp_path):
    files = add_openai(server)
    data_path = f"/models/124M/{DATA}"
    server.headers[data_path] = {"x-ms-blob-content-md5": md5_b64(files[DATA])}
    directory = tmp_path / "124M"
    directory.mkdir()
    bad = bytearray(files[DATA][:5000])
    bad[10] ^= 0xFF
    (directory / (DATA + ".part")).write_bytes(bytes(bad))
    with pytest.raises(WeightsError, match=r"corrupt: MD5") as e:
        dl.download(
            "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )
    assert DATA in str(e.value) and server.url + data_path in str(e.value)
    assert server.requests(data_path) == ["bytes=5000-"]
    assert not (directory / DATA).exists() and not (directory / (DATA + ".part")).exists()
    assert not dl.is_complete("124M", str(tmp_path))


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    files = add_openai(server)
    server.ignore_range = True
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / (DATA + ".part")).write_bytes(b"garbage that must not survive")
    dl.download("124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST)
    assert server.requests(f"/models/124M/{DATA}") == ["bytes=29-"]
    assert_files(str(directory), files)


def test_corrupted_bytes_rejected_nothing_at_final_path(server, tmp_path):
    files = add_openai(server)
    data_path = f"/models/124M/{DATA}"
    bad = bytearray(files[DATA])
    bad[len(bad) // 2] ^= 1
    server.body[data_path] = bytes(bad)  # Content-MD5 still describes the true content
    with pytest.raises(WeightsError) as e:
        dl.download(
            "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )
    msg = str(e.value)
    assert DATA in msg and server.url + data_path in msg and "MD5" in msg
    directory = tmp_path / "124M"
    assert not (directory / DATA).exists() and not (directory / (DATA + ".part")).exists()
    assert not (directory / dl.MANIFEST).exists()
    assert not dl.is_complete("124M", str(tmp_path))


def test_corrupted_lfs_file_rejected_by_linked_sha256(server, tmp_path):
    files = add_hf(server)
    bad = bytearray(files["model.safetensors"])
    bad[0] ^= 1
    server.body["/cdn/blob123"] = bytes(bad)
    with pytest.raises(WeightsError, match=r"model\.safetensors.*sha256"):
        dl.download("124M", str(tmp_path), source="hf", hf_url=server.url, **FAST)
    assert not (tmp_path / "124M" / "model.safetensors").exists()


def test_declared_sizes_that_disagree_are_rejected(server, tmp_path):
    files = add_hf(server)
    path = "/openai-community/gpt2/resolve/main/model.safetensors"
    server.headers[path]["X-Linked-Size"] = str(len(files["model.safetensors"]) + 1)
    with pytest.raises(WeightsError, match=r"different sizes.*X-Linked-Size"):
        dl.download("124M", str(tmp_path), source="hf", hf_url=server.url, **FAST)
    assert not (tmp_path / "124M" / "model.safetensors").exists()


def test_body_shorter_than_declared_size_fails_after_bounded_retries(server, tmp_path):
    files = add_openai(server)
    data_path = f"/models/124M/{DATA}"
    server.length[data_path] = len(files[DATA]) + 100
    server.ignore_range = True  # every attempt starts over, so no attempt makes progress
    with pytest.raises(WeightsError, match=r"failed after retries.*connection closed"):
        dl.download(
            "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )
    # The first attempt makes progress (0 -> N bytes); then retries=3 bound the rest.
    assert len(server.requests(data_path)) == 1 + FAST["retries"] + 1
    assert not (tmp_path / "124M" / DATA).exists()


def test_transient_5xx_is_retried(server, tmp_path):
    files = add_openai(server)
    server.fail[f"/models/124M/{DATA}"] = [503, 500]
    path = dl.download(
        "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
    )
    assert_files(path, files)
    assert len(server.requests(f"/models/124M/{DATA}")) == 3


def test_server_sending_ranges_in_pieces(server, tmp_path):
    files = add_openai(server)
    server.chunk = 40_000
    directory = tmp_path / "124M"
    directory.mkdir()
    (directory / (DATA + ".part")).write_bytes(files[DATA][:1000])
    dl.download("124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST)
    assert_files(str(directory), files)
    starts = [int(r[6:-1]) for r in server.requests(f"/models/124M/{DATA}")]
    assert starts == list(range(1000, len(files[DATA]), 40_000))


def test_stalled_server_times_out_after_bounded_retries(server, tmp_path):
    server.files["/f"] = b"x" * 10
    server.stall["/f"] = 2.0  # well past the client's timeout, so every attempt times out
    kw = {**FAST, "timeout": 0.5, "retries": 1}
    with pytest.raises(
        WeightsError, match=r"f: download from .*/f failed after retries.*timed out"
    ):
        dl.fetch(server.url + "/f", str(tmp_path / "f"), **kw)
    # Two attempts (retries=1); on a loaded machine the second may time out before the server
    # thread has logged it, hence the range.
    assert 1 <= len(server.requests("/f")) <= 2
    assert not (tmp_path / "f").exists()


def test_progress_bar_on_stderr(server, tmp_path, capsys):
    from gpt2.progress import download_bar

    server.files["/vocab.bpe"] = content(5, 3000)
    bar = download_bar(True)
    dl.fetch(server.url + "/vocab.bpe", str(tmp_path / "vocab.bpe"), **{**FAST, "progress": bar})
    err = capsys.readouterr().err
    assert "vocab.bpe" in err and "100.0%" in err


def test_progress_factory_sees_each_file_and_its_bytes(server, tmp_path):
    """The downloader draws nothing itself: it calls progress(total, name) per attempt, then
    set(bytes on disk) as they grow, then close()."""
    server.files["/vocab.bpe"] = content(5, 3000)
    calls = []

    class Bar:
        def set(self, n):
            calls.append(("set", n))

        def close(self):
            calls.append(("close",))

    def progress(total, name):
        calls.append(("bar", total, name))
        return Bar()

    dl.fetch(
        server.url + "/vocab.bpe", str(tmp_path / "vocab.bpe"), **{**FAST, "progress": progress}
    )
    assert calls[0] == ("bar", 3000, "vocab.bpe") and calls[1] == ("set", 0)
    assert calls[-2:] == [("set", 3000), ("close",)]


def test_loader_passes_progress_to_the_downloader(tmp_path, monkeypatch):
    from weights import loader

    seen = {}

    def download(size, cache_dir=None, **kw):
        seen.update(kw, size=size)
        raise WeightsError("not this time")

    monkeypatch.setattr(dl, "download", download)
    bar = object()
    with pytest.raises(WeightsError, match="not this time"):
        loader.load("gpt2", cache_dir=str(tmp_path), progress=bar)
    assert seen == {"size": "124M", "progress": bar, "notify": None}
    with pytest.raises(WeightsError, match="not this time"):
        loader.load("gpt2", cache_dir=str(tmp_path))  # no bar unless the caller brings one
    assert seen["progress"] is None


def test_cli_download_draws_a_bar_on_a_terminal(server, tmp_path, monkeypatch, capsys):
    add_openai(server)
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_OPENAI", server.url + "/models")
    argv = ["download", "124M", "--cache-dir", str(tmp_path), "--source", "openai"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert all(f"\r{name} [" in err for name in dl.OPENAI_FILES) and "100.0%" in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert main([*argv, "--force"]) == 0
    assert "100.0%" not in capsys.readouterr().err  # piped: no bar


def test_404_names_the_url(server, tmp_path):
    with pytest.raises(WeightsError) as e:
        dl.download(
            "355M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )
    assert f"{server.url}/models/355M/checkpoint" in str(e.value) and "404" in str(e.value)
    assert len(server.log) == 1  # a 404 is not retried


def test_fallback_from_openai_to_hf(server, tmp_path):
    files = add_hf(server)
    path = dl.download(
        "gpt2", str(tmp_path), openai_url=server.url + "/models", hf_url=server.url, **FAST
    )
    assert server.log[0][0] == "/models/124M/checkpoint"  # OpenAI first, which 404s
    assert_files(path, files)
    manifest = dl.read_manifest("124M", str(tmp_path))
    assert manifest["source"] == "hf" and set(manifest["files"]) == set(files)
    model = manifest["files"]["model.safetensors"]
    assert "sha256:etag" in model["verified"] and "X-Linked-Size" in model["verified"][0]
    assert model["served_by"] == server.url + "/cdn/blob123"
    assert "sha256:etag" not in manifest["files"]["config.json"]["verified"]


def test_both_sources_failing_names_both_urls(server, tmp_path):
    with pytest.raises(WeightsError) as e:
        dl.download("124M", str(tmp_path), openai_url=server.url + "/m", hf_url=server.url, **FAST)
    msg = str(e.value)
    assert f"{server.url}/m/124M/checkpoint" in msg
    assert f"{server.url}/openai-community/gpt2/resolve/main/config.json" in msg


def test_part_files_are_never_complete(server, tmp_path):
    files = add_openai(server)
    directory = tmp_path / "124M"
    directory.mkdir()
    for name, data in files.items():
        (directory / (name + ".part")).write_bytes(data)
    assert not dl.is_complete("124M", str(tmp_path))
    dl.download("124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST)
    # A full-length part asks for bytes past the end; the 416 restarts the file from zero.
    assert server.requests(f"/models/124M/{DATA}") == [f"bytes={len(files[DATA])}-", None]
    assert_files(str(directory), files)
    assert dl.is_complete("124M", str(tmp_path))


def test_is_complete_false_after_tampering(server, tmp_path):
    files = add_openai(server)
    cache = str(tmp_path)
    dl.download("124M", cache, source="openai", openai_url=server.url + "/models", **FAST)
    directory = tmp_path / "124M"
    manifest_text = (directory / dl.MANIFEST).read_text()
    assert dl.is_complete("124M", cache)

    (directory / "vocab.bpe").write_bytes(files["vocab.bpe"] + b"x")
    assert not dl.is_complete("124M", cache)
    (directory / "vocab.bpe").write_bytes(files["vocab.bpe"])
    assert dl.is_complete("124M", cache)

    (directory / "hparams.json").unlink()
    assert not dl.is_complete("124M", cache)
    (directory / "hparams.json").write_bytes(files["hparams.json"])

    for bad in ("", "{not json", "[]", '{"model": "124M", "files": {"../etc": {}}}'):
        (directory / dl.MANIFEST).write_text(bad)
        assert not dl.is_complete("124M", cache), bad
    other = json.loads(manifest_text)
    other["model"] = "355M"
    (directory / dl.MANIFEST).write_text(json.dumps(other))
    assert not dl.is_complete("124M", cache)
    (directory / dl.MANIFEST).write_text(manifest_text)
    assert dl.is_complete("124M", cache)

    # Same size, one bit flipped: is_complete checks sizes only, verify re-hashes.
    flipped = bytearray(files[DATA])
    flipped[7] ^= 4
    (directory / DATA).write_bytes(bytes(flipped))
    assert dl.is_complete("124M", cache)
    with pytest.raises(WeightsError, match=re.escape(DATA)):
        dl.verify("124M", cache)


def test_verified_files_of_an_unfinished_run_are_not_fetched_again(server, tmp_path):
    files = add_openai(server)
    data = server.files.pop(f"/models/124M/{DATA}")
    with pytest.raises(WeightsError, match="404"):
        dl.download(
            "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )
    assert not dl.is_complete("124M", str(tmp_path))
    server.files[f"/models/124M/{DATA}"] = data
    server.log.clear()
    dl.download("124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST)
    assert [p for p, _ in server.log] == [f"/models/124M/{DATA}"]
    assert_files(str(tmp_path / "124M"), files)
    assert not (tmp_path / "124M" / dl.PARTIAL).exists()


def test_force_downloads_again(server, tmp_path):
    add_openai(server)
    kw = {"source": "openai", "openai_url": server.url + "/models", **FAST}
    dl.download("124M", str(tmp_path), **kw)
    server.log.clear()
    dl.download("124M", str(tmp_path), force=True, **kw)
    assert len(server.log) == len(OPENAI_SIZES)


@pytest.mark.parametrize(
    "url",
    ["https://example.com/x", "http://127.0.0.1:8000/m", "http://localhost/", "http://[::1]:1/"],
)
def test_allowed_urls(url):
    dl.check_url(url)


@pytest.mark.parametrize(
    "url",
    ["http://example.com/x", "ftp://127.0.0.1/x", "file:///etc/passwd", "https://", "127.0.0.1"],
)
def test_refused_urls(url):
    with pytest.raises(WeightsError, match="only https"):
        dl.check_url(url)


def test_refused_base_url_names_its_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_OPENAI", "http://example.com/models")
    with pytest.raises(WeightsError, match="GPT2_DOWNLOAD_URL_OPENAI.*only https"):
        dl.download("124M", str(tmp_path), **FAST)


def test_redirect_to_plain_http_elsewhere_is_refused(server, tmp_path):
    server.redirects["/models/124M/checkpoint"] = "http://example.invalid/checkpoint"
    with pytest.raises(WeightsError, match=r"example\.invalid.*only https"):
        dl.download(
            "124M", str(tmp_path), source="openai", openai_url=server.url + "/models", **FAST
        )


def test_env_var_base_url_is_used(server, tmp_path, monkeypatch):
    files = add_hf(server, "openai-community/gpt2-medium")
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_HF", server.url)
    path = dl.download("gpt2-medium", str(tmp_path), source="hf", **FAST)
    assert path.endswith("355M")
    assert_files(path, files)


def test_cache_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dl.model_dir("gpt2-xl") == str(tmp_path / "home" / ".cache" / "gpt2-spec" / "1558M")
    monkeypatch.setenv("GPT2_CACHE", str(tmp_path / "env"))
    assert dl.model_dir("774M") == str(tmp_path / "env" / "774M")
    assert dl.model_dir("gpt2", str(tmp_path / "arg")) == str(tmp_path / "arg" / "124M")
    with pytest.raises(WeightsError, match="unknown model 'gpt3'"):
        dl.model_dir("gpt3")


@settings(max_examples=10)
@given(n=st.integers(1, 5000), cut=st.integers(0, 5000), seed=st.integers(0, 2**32 - 1))
def test_resume_is_byte_identical_for_any_cut(tmp_path_factory, n, cut, seed):
    cut = min(cut, n - 1)  # a cut at n would not be a cut
    data = content(seed, n)
    dest = str(tmp_path_factory.mktemp("dl") / "model.safetensors")
    with serve() as fake:
        fake.files["/f"] = data
        fake.headers["/f"] = {"Content-MD5": md5_b64(data)}
        fake.cut["/f"] = [cut]
        rec = dl.fetch(fake.url + "/f", dest, **FAST)
        expected = [None, f"bytes={cut}-"] if cut else [None, None]
        assert fake.requests("/f") == expected
    with open(dest, "rb") as f:
        assert f.read() == data
    assert rec["size"] == n and rec["sha256"] == hashlib.sha256(data).hexdigest()


def test_loader_downloads_on_first_use(server, tmp_path, monkeypatch):
    """`--model 124M` through weights.loader: fetched once (OpenAI 404s, so from HF), then cached.

    A tiny config stands in for 124M: the loader takes the shapes from the downloaded config.
    """
    from ref.config import GPT2Config
    from weights import loader
    from weights import safetensors as sft
    from weights.layout import canonical_to_hf, expected_shapes

    cfg = GPT2Config(n_vocab=16, n_ctx=8, n_embd=8, n_head=2, n_layer=1)
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(s).astype(np.float32) for k, s in expected_shapes(cfg).items()}
    sft.write(str(tmp_path / "w.safetensors"), {canonical_to_hf(k): v for k, v in flat.items()})
    repo = "/openai-community/gpt2/resolve/main"
    server.files[f"{repo}/config.json"] = json.dumps(cfg.to_hf_config()).encode()
    server.files[f"{repo}/model.safetensors"] = (tmp_path / "w.safetensors").read_bytes()
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_OPENAI", server.url + "/models")
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_HF", server.url)
    cache = str(tmp_path / "cache")

    with pytest.raises(WeightsError, match="not downloaded"):
        loader.load("124M", cache_dir=cache, download=False)
    got_cfg, params = loader.load("124M", cache_dir=cache)
    assert got_cfg == cfg
    np.testing.assert_array_equal(params["wte"], flat["wte"])  # bytes moved, nothing computed
    n = len(server.log)
    loader.load("124M", cache_dir=cache, download=False)
    assert len(server.log) == n


def test_cli_download_json_and_error(server, tmp_path, monkeypatch, capsys):
    files = add_openai(server)
    monkeypatch.setenv("GPT2_DOWNLOAD_URL_OPENAI", server.url + "/models")
    rc = main(["download", "gpt2", "--cache-dir", str(tmp_path), "--source", "openai", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out["model"] == "124M" and out["path"] == str(tmp_path / "124M")
    assert out["source"] == "openai" and not out["already_present"]
    assert {k: v["size"] for k, v in out["files"].items()} == {k: len(v) for k, v in files.items()}

    rc = main(["download", "355M", "--cache-dir", str(tmp_path), "--source", "openai"])
    err = capsys.readouterr().err
    # a failed download has its own exit status (3), not bad usage's 2
    assert rc == 3 and f"{server.url}/models/355M/checkpoint" in err and "404" in err
