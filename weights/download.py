"""Download GPT-2's released weights into a local cache, resumably and verified.

Cache directory (first that is set wins):
    the `cache_dir` argument (`--cache-dir` on the command line),
    the environment variable GPT2_CACHE,
    ~/.cache/gpt2-spec.
Each size gets its own subdirectory: 124M 355M 774M 1558M (aliases gpt2 gpt2-medium gpt2-large
gpt2-xl are accepted, see `ref.config.canonical_size`).

Sources, tried in this order by `source="auto"`:
    "openai": OpenAI's public bucket, {base}/{size}/{file} with base
        https://openaipublic.blob.core.windows.net/gpt-2/models (override: the `openai_url`
        argument or GPT2_DOWNLOAD_URL_OPENAI). Files: checkpoint, hparams.json,
        model.ckpt.index, model.ckpt.data-00000-of-00001, encoder.json, vocab.bpe.
        model.ckpt.meta is NOT fetched: it holds the TensorFlow graph definition, which is
        only needed to rebuild the graph in TensorFlow; the tensors are read from the index
        and data files alone (weights/tf_checkpoint.py).
    "hf": Hugging Face, {base}/openai-community/{gpt2|gpt2-medium|gpt2-large|gpt2-xl}/resolve/
        main/{config.json, model.safetensors} with base https://huggingface.co (override: the
        `hf_url` argument, GPT2_DOWNLOAD_URL_HF, or HF_ENDPOINT).
Only https URLs are accepted, and plain http only to a loopback host (127.0.0.1, localhost,
::1), which is what the tests use; redirects are checked by the same rule.

Verification. No checksums are built in (none could be taken from an official source when this
was written); each file is checked against what the server declares about it:
    the size: Content-Length, Content-Range's total on a resumed (206) answer, and Hugging
        Face's X-Linked-Size (sent on the redirect to its storage); all must agree;
    a sha256: Hugging Face's X-Linked-Etag (or ETag) when it is 64 hex digits, which for LFS
        files is the sha256 of the content;
    an MD5: Azure's Content-MD5 on a whole-file (200) answer, x-ms-blob-content-md5 on any
        answer (on a ranged answer Content-MD5 would describe the range only, so it is not used).
Both hashes are computed while downloading; on resume the partial prefix on disk is hashed first.
Whatever the server declared, the TF checkpoint's own crc32c and the safetensors header are
checked again when the weights are loaded.

Resume and atomicity. A file is written to NAME.part. A later attempt (a retry after a cut
connection, or a later run) asks for the rest with `Range: bytes=N-`; a 200 answer means the
server ignored the range, so the file starts again from zero. A file whose size or hash is wrong
is deleted and a WeightsError names it and its URL; only a verified file is renamed to NAME.
Verified files are recorded in .partial.json as they land (so a later run does not fetch them
again); when all are in, .complete.json (files, sizes, sha256) is written atomically, and
`is_complete` requires it plus every listed file with the recorded size. Connection errors,
timeouts and 5xx/429 answers are retried with exponential backoff, at most `retries` times in a
row without progress, each retry announced through `notify`. A host that cannot be reached at
all (its name does not resolve, the connection is refused, no route) is not retried: the
source is given up at once, so a machine without a network fails in about a second, with a
DownloadError that says what to do instead. A lock file keeps two processes from writing the
same model at once; a model directory left holding nothing but it is removed again.

Progress. This layer draws nothing itself: `progress` is a `BarFactory`, called once per file
with the size the server declares (0 when it declares none) and the file's name; the bar it
returns is told the bytes on disk as they grow (`set(n)`) and closed when the file ends.
`gpt2.progress.download_bar()` is the command line's bar on stderr.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import http.client
import ipaddress
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from typing import Protocol

from ref.config import SIZES, canonical_size, read_json
from weights import DownloadError, WeightsError
from weights.checkpoint import write_json

OPENAI_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
HF_URL = "https://huggingface.co"
OPENAI_FILES = (
    "checkpoint",
    "hparams.json",
    "model.ckpt.index",
    "encoder.json",
    "vocab.bpe",
    "model.ckpt.data-00000-of-00001",
)
HF_FILES = ("config.json", "model.safetensors")
HF_REPOS = {
    "124M": "openai-community/gpt2",
    "355M": "openai-community/gpt2-medium",
    "774M": "openai-community/gpt2-large",
    "1558M": "openai-community/gpt2-xl",
}
SOURCES = ("openai", "hf")
MANIFEST = ".complete.json"
PARTIAL = ".partial.json"
LOCK = ".lock"
CHUNK = 1 << 20
MAX_REDIRECTS = 5
# A cap on all attempts of one file: `retries` bounds failures in a row without progress, and
# this bounds a server that keeps cutting the connection after a few more bytes each time.
MAX_ATTEMPTS = 1000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Bar(Protocol):
    """One file's progress: the bytes written so far (a resumed file starts at its offset)."""

    def set(self, n: float) -> None: ...

    def close(self) -> None: ...


# progress(total, name) -> the bar of one file: `total` bytes declared (0 if unknown), `name`
# the file's base name.
BarFactory = Callable[[int, str], Bar]


class _Transient(Exception):
    """A failure worth retrying: connection cut, timeout, 5xx. Never leaves this module."""


class _Unreachable(Exception):
    """The host cannot be reached at all (no name, refused, no route): not worth a retry."""


class _Restart(Exception):
    """The part file cannot be continued (bad Content-Range, 416): start the file again."""


# --- where things live ---------------------------------------------------------------------------


def cache_root(cache_dir: str | None = None) -> str:
    """`cache_dir`, else $GPT2_CACHE, else ~/.cache/gpt2-spec."""
    root = cache_dir or os.environ.get("GPT2_CACHE") or os.path.join("~", ".cache", "gpt2-spec")
    return os.path.abspath(os.path.expanduser(root))


def unknown_size(name: str) -> str:
    """The message for a name that is not one of the released sizes."""
    return (
        f"unknown model {name!r}; expected one of {', '.join(SIZES)} "
        "(or gpt2, gpt2-medium, gpt2-large, gpt2-xl), a model directory or a .safetensors file"
    )


def _size(name: str) -> str:
    size = canonical_size(name)
    if size is None:
        raise WeightsError(unknown_size(name))
    return size


def model_dir(size: str, cache_dir: str | None = None) -> str:
    """The directory that holds (or will hold) model `size`."""
    return os.path.join(cache_root(cache_dir), _size(size))


def source_urls(size: str, source: str, base: str) -> dict[str, str]:
    """file name -> URL for one model size from one source."""
    size = _size(size)
    base = base.rstrip("/")
    if source == "openai":
        return {f: f"{base}/{size}/{f}" for f in OPENAI_FILES}
    if source == "hf":
        return {f: f"{base}/{HF_REPOS[size]}/resolve/main/{f}" for f in HF_FILES}
    raise WeightsError(f"unknown download source {source!r}; expected one of {', '.join(SOURCES)}")


def check_url(url: str, what: str = "URL") -> None:
    """Refuse anything but https, and http to a loopback host (for tests)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _is_loopback(host):
        return
    raise WeightsError(
        f"{what} {url!r} refused: only https:// URLs are allowed "
        "(plain http:// only to 127.0.0.1, localhost or ::1)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _base_url(source: str, given: str | None) -> str:
    """The base URL of `source`: the argument, else its environment variable(s), else default."""
    if given:
        check_url(given, what=f"{source}_url")
        return given
    names = (
        ("GPT2_DOWNLOAD_URL_OPENAI",)
        if source == "openai"
        else ("GPT2_DOWNLOAD_URL_HF", "HF_ENDPOINT")
    )
    for name in names:
        value = os.environ.get(name)
        if value:
            check_url(value, what=name)
            return value
    return OPENAI_URL if source == "openai" else HF_URL


# --- manifest ------------------------------------------------------------------------------------


def _read_json(path: str) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    try:
        data = read_json(path, WeightsError)
    except WeightsError:
        return None
    return data if isinstance(data, dict) else None


def _valid_name(name: object) -> bool:
    return isinstance(name, str) and name in OPENAI_FILES + HF_FILES


def read_manifest(size: str, cache_dir: str | None = None) -> dict | None:
    """The parsed .complete.json of model `size`, or None when absent or malformed."""
    data = _read_json(os.path.join(model_dir(size, cache_dir), MANIFEST))
    if data is None or not isinstance(data.get("files"), dict) or not data["files"]:
        return None
    for name, rec in data["files"].items():
        if not _valid_name(name) or not isinstance(rec, dict):
            return None
        if not isinstance(rec.get("size"), int) or not isinstance(rec.get("sha256"), str):
            return None
    return data


def is_complete(size: str, cache_dir: str | None = None) -> bool:
    """True when the manifest exists and every file it lists is present with its size.

    Sizes only: hashing several GB on every load would be slow; `verify` re-hashes.
    """
    directory = model_dir(size, cache_dir)
    manifest = read_manifest(size, cache_dir)
    if manifest is None or manifest.get("model") != _size(size):
        return False
    for name, rec in manifest["files"].items():
        path = os.path.join(directory, name)
        try:
            if not os.path.isfile(path) or os.path.getsize(path) != rec["size"]:
                return False
        except OSError:
            return False
    return True


def verify(size: str, cache_dir: str | None = None) -> None:
    """Re-hash every file against the manifest; raises WeightsError naming the first bad one."""
    directory = model_dir(size, cache_dir)
    if not is_complete(size, cache_dir):
        raise WeightsError(f"{directory}: model {_size(size)} is not (completely) downloaded")
    for name, rec in read_manifest(size, cache_dir)["files"].items():
        path = os.path.join(directory, name)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        if h.hexdigest() != rec["sha256"]:
            raise WeightsError(
                f"{path}: sha256 {h.hexdigest()} differs from {rec['sha256']} recorded in "
                f"{os.path.join(directory, MANIFEST)}; run `gpt2 download {_size(size)} --force`"
            )


# --- HTTP ----------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are followed by `_open` itself, to check each hop and keep its headers."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _opener(url: str) -> urllib.request.OpenerDirector:
    # A proxy from the environment must not capture requests to a local test server.
    host = urllib.parse.urlsplit(url).hostname or ""
    proxies = urllib.request.ProxyHandler({} if _is_loopback(host) else None)
    return urllib.request.build_opener(proxies, _NoRedirect())


def _open(url: str, offset: int, timeout: float) -> tuple[http.client.HTTPResponse, dict, str]:
    """GET `url` (from byte `offset`), following redirects by hand.

    Returns the response, the headers that declare size and hashes (lower-case names; the
    X-Linked-* ones come from Hugging Face's redirect, not from the final answer) and the URL
    that answered.
    """
    declared: dict[str, str] = {}
    first = url
    for _ in range(MAX_REDIRECTS + 1):
        check_url(url, what="URL" if url == first else "redirect to")
        hop = "" if url == first else f" (at {_strip_query(url)})"
        req = urllib.request.Request(url, headers={"User-Agent": "gpt2-spec", "Accept": "*/*"})
        if offset:
            req.add_header("Range", f"bytes={offset}-")
        try:
            resp = _opener(url).open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            headers, code = e.headers, e.code
            e.close()
            for key in ("x-linked-size", "x-linked-etag"):
                if headers.get(key):
                    declared[key] = headers[key]
            if code in (301, 302, 303, 307, 308) and headers.get("Location"):
                url = urllib.parse.urljoin(url, headers["Location"])
                continue
            if code == 416:
                raise _Restart(f"HTTP 416 range not satisfiable{hop}") from None
            if code >= 500 or code in (408, 429):
                raise _Transient(f"HTTP {code} {e.reason}{hop}") from None
            raise WeightsError(f"HTTP {code} {e.reason}{hop}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if _unreachable(reason):
                host = urllib.parse.urlsplit(url).hostname
                raise _Unreachable(f"{host} could not be reached ({reason})") from None
            raise _Transient(f"{reason}{hop}") from None
        for key in (
            "content-length",
            "content-range",
            "content-md5",
            "x-ms-blob-content-md5",
            "etag",
            "x-linked-size",
            "x-linked-etag",
        ):
            value = resp.headers.get(key)
            if value and key not in declared:
                declared[key] = value
        return resp, declared, url
    raise WeightsError(f"more than {MAX_REDIRECTS} redirects")


# errnos of a host that is not there for us: no route, nothing listening, no local address
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
    errno.EADDRNOTAVAIL,
    errno.ENETDOWN,
}


def _unreachable(reason: object) -> bool:
    """Whether a connection failure means the host cannot be reached at all (retrying will
    not help within a command's lifetime), as opposed to a timeout or a cut connection."""
    if isinstance(reason, socket.gaierror):  # the name does not resolve: no DNS, no network
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def _strip_query(url: str) -> str:
    """A URL without its query: storage redirects carry signatures that need not be kept."""
    return urllib.parse.urlsplit(url)._replace(query="", fragment="").geturl()


def _md5_header(value: str, name: str) -> str:
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise WeightsError(f"header {name} is not base64: {value!r}") from None
    if len(digest) != 16:
        raise WeightsError(f"header {name} is not an MD5 digest: {value!r}")
    return digest.hex()


def _sha256_etag(value: str | None) -> str | None:
    if not value:
        return None
    tag = value.strip().removeprefix("W/").strip('"').lower()
    return tag if _HEX64.match(tag) else None


def _expectations(status: int, declared: dict, offset: int, source: str) -> dict:
    """What the answer declares: the 'total' size, 'sha256', 'md5', and the 'checks' made."""
    exp: dict = {"total": None, "sha256": None, "md5": None, "checks": []}
    totals: list[tuple[str, int]] = []
    length = declared.get("content-length")
    if status == 206:
        m = _CONTENT_RANGE.match(declared.get("content-range", "").strip())
        if m is None or int(m.group(1)) != offset:
            raise _Restart(f"unusable Content-Range {declared.get('content-range')!r}")
        start, end = int(m.group(1)), int(m.group(2))
        if m.group(3) != "*":
            totals.append(("Content-Range", int(m.group(3))))
        if length is not None and length.isdigit() and int(length) != end - start + 1:
            raise WeightsError(
                f"Content-Length {length} disagrees with Content-Range {declared['content-range']}"
            )
    elif length is not None:
        if not length.isdigit():
            raise WeightsError(f"invalid Content-Length {length!r}")
        totals.append(("Content-Length", int(length)))
    linked = declared.get("x-linked-size")
    if linked is not None:
        if not linked.strip().isdigit():
            raise WeightsError(f"invalid X-Linked-Size {linked!r}")
        totals.append(("X-Linked-Size", int(linked)))
    if len({t for _, t in totals}) > 1:
        said = ", ".join(f"{k} {v}" for k, v in totals)
        raise WeightsError(f"the server declares different sizes ({said})")
    if totals:
        exp["total"] = totals[0][1]
        exp["checks"].append("size:" + "+".join(k for k, _ in totals))
    # Hugging Face's etags are sha256 of LFS content; other servers' etags mean other things.
    sha = _sha256_etag(declared.get("x-linked-etag"))
    if sha is None and source == "hf":
        sha = _sha256_etag(declared.get("etag"))
    if sha is not None:
        exp["sha256"] = sha
        exp["checks"].append("sha256:etag")
    if declared.get("x-ms-blob-content-md5"):
        exp["md5"] = _md5_header(declared["x-ms-blob-content-md5"], "x-ms-blob-content-md5")
        exp["checks"].append("md5:x-ms-blob-content-md5")
    elif status == 200 and declared.get("content-md5"):
        exp["md5"] = _md5_header(declared["content-md5"], "Content-MD5")
        exp["checks"].append("md5:Content-MD5")
    return exp


# --- one file ------------------------------------------------------------------------------------


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _hash_prefix(path: str, n: int, hashers: list) -> None:
    with open(path, "rb") as f:
        left = n
        while left:
            block = f.read(min(CHUNK, left))
            if not block:
                raise _Restart(f"{path}: shorter than expected while hashing")
            for h in hashers:
                h.update(block)
            left -= len(block)


def _attempt(url: str, dest: str, source: str, timeout: float, make_bar: BarFactory) -> dict:
    """One GET of `url` into `dest`.part, continuing what is there. Returns the file's record."""
    part = dest + ".part"
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    resp, declared, final_url = _open(url, offset, timeout)
    with resp:
        status = resp.status
        if status not in (200, 206):
            raise WeightsError(f"unexpected HTTP {status}")
        if status == 206 and not offset:
            raise _Restart("partial answer to a whole-file request")
        exp = _expectations(status, declared, offset, source)
        if status == 200:
            offset = 0  # the server ignored Range (or none was sent): start again from zero
        sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
        if offset:
            _hash_prefix(part, offset, [sha, md5])
        got = offset
        bar = make_bar(exp["total"] or 0, os.path.basename(dest))
        bar.set(got)
        try:
            with open(part, "r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                while True:
                    try:
                        block = resp.read(CHUNK)
                    except (OSError, http.client.HTTPException) as e:
                        raise _Transient(f"connection lost after {got} bytes ({e})") from None
                    if not block:
                        break
                    f.write(block)
                    sha.update(block)
                    md5.update(block)
                    got += len(block)
                    bar.set(got)
                    if exp["total"] is not None and got > exp["total"]:
                        break
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    total = exp["total"]
    if total is not None and got < total:
        # A cut connection, or a server that sends ranges in pieces: continue from here.
        raise _Transient(f"connection closed after {got} of {total} bytes")
    problem = None
    if total is not None and got != total:
        problem = f"received {got} bytes but the server declared {total}"
    elif exp["sha256"] is not None and sha.hexdigest() != exp["sha256"]:
        problem = f"sha256 {sha.hexdigest()} does not match the declared {exp['sha256']}"
    elif exp["md5"] is not None and md5.hexdigest() != exp["md5"]:
        problem = f"MD5 {md5.hexdigest()} does not match the declared {exp['md5']}"
    if problem is not None:
        _remove(part)
        raise WeightsError(f"corrupt: {problem}; the partial file was deleted")
    os.replace(part, dest)
    return {
        "size": got,
        "sha256": sha.hexdigest(),
        "url": url,
        "verified": exp["checks"],
        **({"served_by": _strip_query(final_url)} if final_url != url else {}),
    }


def fetch(
    url: str,
    dest: str,
    *,
    source: str = "",
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    progress: BarFactory | None = None,
    notify: Callable[[str], None] | None = None,
) -> dict:
    """Download `url` to `dest` through `dest`.part, verified; returns {size, sha256, ...}.

    `retries` bounds consecutive failed attempts that brought no new bytes; waits grow as
    backoff * 2**k seconds, and `notify(message)` hears of each retry before its wait.
    `progress` makes each attempt's bar; None (or False) draws none. An unreachable host
    raises DownloadError at once.
    """
    check_url(url)
    make_bar = progress or _no_bar
    part = dest + ".part"
    failures, last = 0, "no attempt made"
    for _ in range(MAX_ATTEMPTS):
        before = os.path.getsize(part) if os.path.exists(part) else 0
        try:
            return _attempt(url, dest, source, timeout, make_bar)
        except _Unreachable as e:
            raise DownloadError(str(e)) from None
        except WeightsError as e:
            raise DownloadError(f"{dest}: download from {url} failed: {e}") from None
        except _Restart as e:
            _remove(part)
            last = str(e)
            failures += 1
        except _Transient as e:
            last = str(e)
            after = os.path.getsize(part) if os.path.exists(part) else 0
            failures = 0 if after > before else failures + 1
        if failures > retries:
            break
        wait = backoff * 2 ** max(failures - 1, 0)
        if notify is not None:
            notify(
                f"{os.path.basename(dest)}: {last}; retrying in {wait:g} s "
                f"({failures} of {retries} retries without progress)"
            )
        time.sleep(wait)
    raise DownloadError(f"{dest}: download from {url} failed after retries: {last}")


class _NoBar:
    def set(self, n: float) -> None:
        pass

    def close(self) -> None:
        pass


def _no_bar(total: int, name: str) -> Bar:
    return _NoBar()


# --- one model -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive lock on the model directory where the OS has flock (POSIX)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = os.path.join(directory, LOCK)
    try:
        f = open(path, "a+")
    except OSError as e:
        raise WeightsError(f"{path}: cannot create the lock file ({e})") from None
    with f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _download_source(
    size: str, source: str, base: str, directory: str, kw: dict
) -> dict[str, dict]:
    partial_path = os.path.join(directory, PARTIAL)
    partial = _read_json(partial_path) or {}
    records: dict[str, dict] = {}
    for name, url in source_urls(size, source, base).items():
        dest = os.path.join(directory, name)
        rec = partial.get(name)
        if (
            isinstance(rec, dict)
            and rec.get("url") == url
            and isinstance(rec.get("size"), int)
            and os.path.isfile(dest)
            and os.path.getsize(dest) == rec["size"]
        ):
            records[name] = rec  # verified by an earlier run that did not finish the set
            continue
        records[name] = fetch(url, dest, source=source, **kw)
        partial[name] = records[name]
        write_json(partial_path, partial)
    return records


def download(
    size: str,
    cache_dir: str | None = None,
    *,
    source: str = "auto",
    openai_url: str | None = None,
    hf_url: str | None = None,
    force: bool = False,
    timeout: float = 30.0,
    retries: int = 5,
    backoff: float = 1.0,
    progress: BarFactory | None = None,
    notify: Callable[[str], None] | None = None,
) -> str:
    """Download model `size` (unless already complete) and return its directory.

    `source`: "openai", "hf" or "auto" (OpenAI's bucket, then Hugging Face if that fails).
    `force`: fetch again even when the cache holds a complete copy.
    `progress`: a bar per file (see `fetch`); None draws none. `notify`: hears of retries.
    Raises DownloadError when no source gives the model.
    """
    size = _size(size)
    if source not in (*SOURCES, "auto"):
        raise WeightsError(f"unknown download source {source!r}; expected openai, hf or auto")
    order = list(SOURCES) if source == "auto" else [source]
    bases = {s: _base_url(s, openai_url if s == "openai" else hf_url) for s in order}
    directory = model_dir(size, cache_dir)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise WeightsError(f"{directory}: cannot create the cache directory ({e})") from None
    kw = {"timeout": timeout, "retries": retries, "backoff": backoff, "progress": progress}
    kw["notify"] = notify
    return _download_locked(size, directory, order, bases, force, cache_dir, kw)


def _remove_if_only_lock(directory: str) -> None:
    """A first download that failed before any file arrived leaves nothing behind: the
    directory would otherwise look like a (broken) model to whoever lists the cache."""
    with contextlib.suppress(OSError):
        if os.listdir(directory) == [LOCK]:
            os.remove(os.path.join(directory, LOCK))
            os.rmdir(directory)


OFFLINE_HINT = (
    "without a network, run on weights you have: --model DIR (a model directory, either "
    "format) or --model FILE.safetensors, or set GPT2_CACHE to a cache that holds the model "
    "(`gpt2 download NAME` fills one where there is a network)"
)


def _download_locked(
    size: str, directory: str, order: list, bases: dict, force: bool, cache_dir, kw: dict
) -> str:
    with _locked(directory):
        if force:
            _remove(os.path.join(directory, MANIFEST))
            _remove(os.path.join(directory, PARTIAL))
        elif is_complete(size, cache_dir):
            return directory  # another process finished it while we waited for the lock
        errors = []
        for src in order:
            try:
                records = _download_source(size, src, bases[src], directory, kw)
            except WeightsError as e:
                errors.append((src, e))
                continue
            except OSError as e:
                errors.append((src, WeightsError(f"{directory}: cannot write ({e})")))
                continue
            manifest = {"format": 1, "model": size, "source": src, "files": records}
            write_json(os.path.join(directory, MANIFEST), manifest)
            _remove(os.path.join(directory, PARTIAL))
            return directory
        _remove_if_only_lock(directory)  # still holding the lock
    said = "; ".join(f"[{src}] {e}" for src, e in errors)
    if all("could not be reached" in str(e) for _, e in errors):
        raise DownloadError(f"could not download {size}: {said}; {OFFLINE_HINT}")
    if len(errors) == 1:
        raise DownloadError(str(errors[0][1]))
    raise DownloadError(f"{directory}: could not download {size} from any source: {said}")
