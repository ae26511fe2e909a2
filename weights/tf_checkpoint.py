"""OpenAI's TensorFlow checkpoints (tensor bundle V2), read with numpy and the stdlib alone.

A checkpoint `<prefix>` is three files:
    checkpoint                      text: model_checkpoint_path: "model.ckpt"
    <prefix>.index                  a LevelDB-style sorted table (weights/tf_table.py):
                                    tensor name -> BundleEntryProto
    <prefix>.data-00000-of-00001    the raw tensor bytes, one shard per data file

In the index table, key "" holds the BundleHeaderProto (num_shards, endianness, version) and
every other key is a tensor name whose value is a BundleEntryProto (tensorflow/core/protobuf/
tensor_bundle.proto):
    1 dtype (varint DataType), 2 shape (TensorShapeProto: 2 dim {1 size}, 3 unknown_rank),
    3 shard_id, 4 offset, 5 size (varints), 6 crc32c (fixed32, masked), 7 slices (repeated)
The protobuf wire format is decoded by hand: each field is a varint key (field << 3 | wire
type) then a varint (type 0), 8 bytes (1), a varint length and bytes (2) or 4 bytes (5).
Each tensor's bytes are checked against its entry's crc32c (CRC-32C, masked as in the table).

Every file read lies in the checkpoint's directory: the `checkpoint` file's path is taken by its
base name there, and an index or data shard that resolves elsewhere (a symlink out) is refused,
as for the shards of a safetensors index (weights/loader.py).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator

import numpy as np

from ref.config import brief
from weights import WeightsError, read_error
from weights.tf_table import _Malformed, _varint, crc32c, read_table, unmask_crc

MAX_DIMS = 64  # numpy's limit on an array's dimensions

# DataType enum values (tensorflow/core/framework/types.proto) that hold real numbers; each
# is widened to float32. bfloat16 has no numpy dtype: it is read as uint16 bits.
_FLOAT_DTYPES = {
    1: ("DT_FLOAT", "f4"),
    2: ("DT_DOUBLE", "f8"),
    19: ("DT_HALF", "f2"),
    14: ("DT_BFLOAT16", "u2"),
}
_DTYPE_NAMES = {
    3: "DT_INT32",
    4: "DT_UINT8",
    5: "DT_INT16",
    6: "DT_INT8",
    7: "DT_STRING",
    8: "DT_COMPLEX64",
    9: "DT_INT64",
    10: "DT_BOOL",
    17: "DT_UINT16",
    18: "DT_COMPLEX128",
    22: "DT_UINT32",
    23: "DT_UINT64",
}


# ---------------------------------------------------------------------------------------
# Protobuf wire format
# ---------------------------------------------------------------------------------------


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """Decode one message into (field number, wire type, value) in order of appearance, one
    at a time (a message of many tiny fields never becomes a list).

    Varints come back as ints, fixed32/fixed64 as ints, length-delimited fields as bytes.
    Groups (wire types 3, 4) are obsolete and never used by these messages.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Malformed("fixed64 field runs past the end of its message")
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Malformed("length-delimited field runs past the end of its message")
            value = bytes(buf[pos : pos + n])
            pos += n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _Malformed("fixed32 field runs past the end of its message")
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _int64(v: int) -> int:
    """A varint read as protobuf int32/int64: negatives are 10-byte two's complement."""
    return v - (1 << 64) if v >= 1 << 63 else v


# ---------------------------------------------------------------------------------------
# The tensor bundle
# ---------------------------------------------------------------------------------------


def _parse_header(value: bytes) -> tuple[int, str]:
    """BundleHeaderProto -> (num_shards, numpy byte order '<' or '>')."""
    num_shards, endianness = 1, 0  # proto3 defaults when a field is absent
    for number, wire, v in _proto_fields(value):
        if number == 1 and wire == 0:
            num_shards = _int64(v)
        elif number == 2 and wire == 0:
            endianness = v
    if not 1 <= num_shards <= 100_000:
        raise _Malformed(f"header declares {num_shards} shards")
    if endianness not in (0, 1):
        raise _Malformed(f"header declares unknown endianness {endianness}")
    return num_shards, "<" if endianness == 0 else ">"


def _parse_entry(value: bytes, name: str) -> dict:
    """BundleEntryProto -> {dtype, shape, shard_id, offset, size, crc32c, sliced}."""
    e = {
        "dtype": 0,
        "shape": [],
        "shard_id": 0,
        "offset": 0,
        "size": 0,
        "crc32c": None,
        "sliced": False,
    }
    for number, wire, v in _proto_fields(value):
        if number == 1 and wire == 0:
            e["dtype"] = v
        elif number == 2 and wire == 2:
            for n2, w2, dim in _proto_fields(v):
                if n2 == 2 and w2 == 2:
                    size = -1
                    for n3, w3, s in _proto_fields(dim):
                        if n3 == 1 and w3 == 0:
                            size = _int64(s)
                    if size < 0:
                        raise _Malformed(f"tensor {brief(name)}: unknown or negative dimension")
                    # refused while parsing: the size check multiplies the dims, and a product
                    # of n big numbers costs O(n**2)
                    if len(e["shape"]) == MAX_DIMS:
                        raise _Malformed(f"tensor {brief(name)}: more than {MAX_DIMS} dims")
                    e["shape"].append(size)
                elif n2 == 3 and w2 == 0 and dim:  # unknown_rank = true
                    raise _Malformed(f"tensor {brief(name)}: shape of unknown rank")
        elif number in (3, 4, 5) and wire == 0:
            e[{3: "shard_id", 4: "offset", 5: "size"}[number]] = _int64(v)
        elif number == 6 and wire == 5:
            e["crc32c"] = v
        elif number == 7:
            e["sliced"] = True
    return e


_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b'"': b'"', b"'": b"'", b"\\": b"\\"}


def _unescape(text: str) -> str:
    """A protobuf text-format string: C escapes, with non-ASCII written as octal UTF-8 bytes."""

    def one(m: re.Match) -> bytes:
        e = m.group(1)
        if e[:1].isdigit():
            return bytes([int(e, 8) & 0xFF])
        if e[:1] == b"x":
            return bytes([int(e[1:], 16)])
        return _ESCAPES.get(e, e)

    raw = re.sub(rb"\\([0-7]{1,3}|x[0-9a-fA-F]{1,2}|.)", one, text.encode("utf-8"))
    return raw.decode("utf-8", "replace")


def checkpoint_prefix(directory: str) -> str:
    """The checkpoint prefix in `directory`: the `checkpoint` file's model_checkpoint_path,
    taken by its base name inside `directory`, else `model.ckpt`.

    TensorFlow's saver writes the absolute path of the run that saved it; read as written, a
    copied directory would load the original's files (or another machine's), so only the base
    name counts, and `..` or a path out of the directory reaches nothing outside it.
    """
    candidates = []
    state = os.path.join(directory, "checkpoint")
    if os.path.exists(state):
        try:
            with open(state, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise WeightsError(f"{state}: cannot read ({e})") from None
        # [ \t], not \s, and no newline inside the quotes: \s would match newlines, and each
        # start would then scan (and backtrack over) the rest of the file, O(n**2) in all
        m = re.search(
            r'^[ \t]*model_checkpoint_path:[ \t]*"((?:[^"\\\n]|\\.)*)"', text, re.MULTILINE
        )
        if m is None:
            raise WeightsError(f"{state}: no model_checkpoint_path line")
        path = _unescape(m.group(1))
        name = os.path.basename(path)
        if name in ("", ".", "..") or "\x00" in name:
            raise WeightsError(f"{state}: model_checkpoint_path {brief(path)} names no checkpoint")
        candidates.append(os.path.join(directory, name))
    candidates.append(os.path.join(directory, "model.ckpt"))
    for prefix in candidates:
        if os.path.exists(prefix + ".index"):
            return prefix
    raise WeightsError(f"{candidates[0]}.index: file not found (no TensorFlow checkpoint index)")


def _check_inside(path: str, directory: str, index_path: str) -> None:
    """Refuse a checkpoint file that resolves outside the checkpoint's directory."""
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(directory):
        raise WeightsError(
            f"{path}: resolves to {real}, outside the checkpoint's directory (a symlink out?); "
            f"the files of {index_path} must lie beside it"
        )


def _shard_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


def read(prefix: str, verify: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint `prefix` as float32, keyed by its TensorFlow name.

    float32 tensors are read-only memory-mapped views of the data shard; float16, float64 and
    bfloat16 are widened to float32. Each tensor's crc32c is checked unless verify=False.
    """
    index_path = prefix + ".index"
    directory = os.path.dirname(prefix) or "."
    if os.path.exists(index_path):
        _check_inside(index_path, directory, index_path)
    entries = read_table(index_path)
    try:
        if not entries or entries[0][0] != b"":
            raise _Malformed("no bundle header (the entry with the empty key)")
        num_shards, order = _parse_header(entries[0][1])
        parsed = []
        for key, value in entries[1:]:
            name = key.decode("utf-8", "backslashreplace")
            parsed.append((name, _parse_entry(value, name)))
    except _Malformed as e:
        raise WeightsError(f"{index_path}: bad checkpoint index: {e}") from None

    sizes: dict[int, int] = {}
    for name, e in parsed:
        where = f"{index_path}: tensor {brief(name)}"
        if e["sliced"]:
            raise WeightsError(f"{where} is saved in slices (partitioned), which is unsupported")
        if e["dtype"] not in _FLOAT_DTYPES:
            dt = _DTYPE_NAMES.get(e["dtype"], f"DataType {e['dtype']}")
            raise WeightsError(f"{where} has unsupported dtype {dt} (expected a float type)")
        if not 0 <= e["shard_id"] < num_shards:
            raise WeightsError(f"{where}: shard {e['shard_id']} is not one of {num_shards}")
        itemsize = np.dtype(_FLOAT_DTYPES[e["dtype"]][1]).itemsize
        # an empty tensor may still declare a shape numpy cannot make (nonzero dims whose
        # product overflows): refuse it here rather than in the final reshape
        nonzero = int(np.prod([d for d in e["shape"] if d], dtype=object))
        if nonzero * itemsize >= 2**62:
            raise WeightsError(f"{where}: shape {brief(e['shape'])} is too large for an array")
        need = itemsize * int(np.prod(e["shape"], dtype=object))
        if e["size"] != need:
            raise WeightsError(
                f"{where}: {e['size']} bytes stored but {_FLOAT_DTYPES[e['dtype']][0]} x shape "
                f"{e['shape']} needs {need}"
            )
        shard = _shard_path(prefix, e["shard_id"], num_shards)
        if e["shard_id"] not in sizes:
            try:
                sizes[e["shard_id"]] = os.path.getsize(shard)
            except FileNotFoundError:
                raise WeightsError(f"{shard}: file not found (named in {index_path})") from None
            _check_inside(shard, directory, index_path)
        if e["offset"] < 0 or e["offset"] + e["size"] > sizes[e["shard_id"]]:
            raise WeightsError(
                f"{shard}: tensor {brief(name)} needs bytes [{e['offset']}, "
                f"{e['offset'] + e['size']}) but the file has {sizes[e['shard_id']]} bytes "
                "(truncated?)"
            )

    maps: dict[int, np.ndarray] = {}
    out = {}
    for name, e in parsed:
        shard = _shard_path(prefix, e["shard_id"], num_shards)
        if e["size"] == 0:
            buf = np.zeros(0, dtype=np.uint8)
        else:
            if e["shard_id"] not in maps:
                try:
                    maps[e["shard_id"]] = np.asarray(np.memmap(shard, dtype=np.uint8, mode="r"))
                except OSError as err:  # ENOMEM under an address-space limit, say
                    raise read_error(shard, err) from None
            buf = maps[e["shard_id"]][e["offset"] : e["offset"] + e["size"]]
        if verify:
            if e["crc32c"] is None:
                raise WeightsError(f"{index_path}: tensor {brief(name)} has no crc32c")
            actual = crc32c(buf)
            if unmask_crc(e["crc32c"]) != actual:
                raise WeightsError(
                    f"{shard}: tensor {brief(name)} fails its crc32c check (stored "
                    f"{unmask_crc(e['crc32c']):#010x}, computed {actual:#010x}): the file is "
                    "corrupt"
                )
        dt_name, code = _FLOAT_DTYPES[e["dtype"]]
        if dt_name == "DT_BFLOAT16":  # the top half of a float32: widen exactly
            a = (buf.view(order + "u2").astype(np.uint32) << 16).view(np.float32)
        elif dt_name == "DT_FLOAT" and order == "<" and e["offset"] % 4 == 0:
            a = buf.view("<f4")  # the common case: a view, no copy
        else:
            # a float64 past float32's range becomes inf, which the loader refuses by name;
            # numpy's overflow warning would only add a second line to that error
            with np.errstate(over="ignore"):
                a = np.frombuffer(buf.tobytes(), dtype=order + code).astype(np.float32)
        out[name] = a.reshape(e["shape"])
    return out
