"""Hugging Face safetensors, read and written with numpy alone.

File layout: an 8-byte little-endian header length N, N bytes of JSON
    {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, ...,
     "__metadata__": {..}}
then the raw little-endian tensor bytes, offsets relative to the end of the header.

Reading memory-maps the file: tensors are read-only views into the page cache, so even the
1558M model needs no second copy in RAM. Every declared size and offset is checked against the
file's real size before anything is read.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import IO

import numpy as np

from ref.config import brief, parse_json
from weights import WeightsError, read_error

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own cap on the JSON header
MAX_DIMS = 64  # numpy's limit on an array's dimensions

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # no numpy bfloat16: read as bits, widened in to_float32
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def read_header(path: str) -> tuple[dict, int, int]:
    """-> (entries, data_start, file_size), after checking every entry against the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n > size - 8:
                raise WeightsError(
                    f"{path}: header length {n} is larger than the file ({size} bytes) allows"
                )
            raw = f.read(n)
    except OSError as e:
        raise read_error(path, e) from None
    header = parse_json(raw, WeightsError, f"{path}: header is not valid UTF-8 JSON")
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    for name, e in header.items():
        where = f"{path}: tensor {brief(name)}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise WeightsError(f"{where}: entry needs dtype, shape and data_offsets")
        if not isinstance(e["dtype"], str) or e["dtype"] not in _DTYPES:
            raise WeightsError(f"{where}: unsupported dtype {brief(e['dtype'])}")
        shape, offs = e["shape"], e["data_offsets"]
        # numpy refuses more than 64 dims; counted first, so the product below multiplies at
        # most 64 numbers (a product of n big dims costs O(n**2))
        if isinstance(shape, list) and len(shape) > MAX_DIMS:
            raise WeightsError(f"{where}: shape has {len(shape)} dims (at most {MAX_DIMS})")
        if not (isinstance(shape, list) and all(_is_uint(s) for s in shape)):
            raise WeightsError(f"{where}: shape {brief(shape)} is not a list of non-negative ints")
        # even an empty tensor may not declare nonzero dims that multiply past what an array
        # index can address
        nonzero = int(np.prod([s for s in shape if s], dtype=object))
        if nonzero * _DTYPES[e["dtype"]].itemsize >= 2**62:
            raise WeightsError(f"{where}: shape {brief(shape)} is too large for an array")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise WeightsError(f"{where}: data_offsets {brief(offs)} is not [begin, end]")
        begin, end = offs
        nbytes = _DTYPES[e["dtype"]].itemsize * int(np.prod(shape, dtype=object))
        if not begin <= end <= data_len:
            raise WeightsError(
                f"{where}: data_offsets [{begin}, {end}] lie outside the {data_len} data bytes "
                "(truncated file?)"
            )
        if end - begin != nbytes:
            raise WeightsError(
                f"{where}: {end - begin} bytes stored but dtype {e['dtype']} x shape {shape} "
                f"needs {nbytes}"
            )
        spans.append((begin, end, name))
    spans.sort()
    for (_b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise WeightsError(f"{path}: tensors {brief(n0)} and {brief(n1)} overlap")
    return header, data_start, size


def _is_uint(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**62


def read(path: str) -> dict[str, np.ndarray]:
    """All tensors of one file as read-only memory-mapped arrays in their stored dtype
    (BF16, which numpy lacks, is widened to float32 in a copy)."""
    header, data_start, size = read_header(path)
    if size == data_start:
        return {name: np.zeros(e["shape"], _DTYPES[e["dtype"]]) for name, e in header.items()}
    # A plain ndarray view of the map (its base keeps the file mapped): numpy.memmap is a
    # subclass whose per-operation bookkeeping made a decode-step matmul ~100x slower.
    try:
        mm = np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    except OSError as e:  # ENOMEM under an address-space limit, a file gone since the header
        raise read_error(path, e) from None
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        buf = mm[data_start + begin : data_start + end]
        a = buf.view(_DTYPES[e["dtype"]]).reshape(e["shape"])
        if e["dtype"] == "BF16":  # bfloat16 is the top half of a float32: widen exactly
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = a
    return out


def atomic_write(path: str, write: Callable[[IO], object], binary: bool = False) -> None:
    """Write `path` whole or not at all: `write(f)` fills `path.tmp-<pid>`, which is fsynced and
    renamed over `path`. On any failure the temporary file is removed, and an OSError (a full
    disk, a file-size limit, a read-only directory) becomes a WeightsError naming `path`; any
    earlier file there is left as it was."""

    def produce(tmp: str) -> None:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
            write(f)

    atomic_replace(path, produce)


def atomic_replace(path: str, produce: Callable[[str], object]) -> None:
    """`atomic_write` for writers that open the file themselves (ggml's GGUFWriter):
    `produce(tmp)` writes the temporary path, which is then fsynced and renamed over `path`."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        produce(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise WeightsError(
                f"{path}: cannot write ({e.strerror or e}); any earlier file there is unchanged"
            ) from e
        raise


def write(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None):
    """Write tensors atomically: to `path.tmp-<pid>`, fsync, then rename over `path`.

    A crash (or a full disk) mid-write leaves any earlier file at `path` untouched.
    """
    names = {
        np.dtype("<f4"): "F32",
        np.dtype("<f2"): "F16",
        np.dtype("<f8"): "F64",
        np.dtype("<i8"): "I64",
        np.dtype("<i4"): "I32",
    }
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    arrays = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype.newbyteorder("<") not in names:
            raise WeightsError(f"{path}: cannot write tensor {name!r} of dtype {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": names[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays.append(a)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned

    def write(f) -> None:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(memoryview(a.reshape(-1)).cast("B"))

    atomic_write(path, write, binary=True)
