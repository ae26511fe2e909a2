"""A minimal writer for TensorFlow's checkpoint index (a LevelDB-style sorted table), so the
fuzz tests can build tables whose checksums are right and whose contents are wrong.

Independent of `weights/tf_checkpoint.py` on purpose (its own CRC-32C, its own encoding), so a
shared misreading of the format would show up as a disagreement. Layout (LevelDB's
table_format.md, which TensorFlow's tsl/lib/io/table copies):
    [data block]* [metaindex block] [index block] [footer: 48 bytes]
    block   = entries, restart offsets (uint32 each), restart count (uint32), then the trailer:
              compression type (1 byte, 0 = none) and the masked crc32c of block + type byte
    entry   = varint shared, varint unshared, varint value length, key[shared:], value
    footer  = metaindex handle, index handle (varint offset, varint size each), zero padding to
              40 bytes, magic 0xdb4775248b80fb57 as a little-endian uint64
"""

from __future__ import annotations

import struct
from collections.abc import Callable

MAGIC = 0xDB4775248B80FB57


def _crc_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # CRC-32C, bit-reflected
        table.append(c)
    return table


_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    reg = 0xFFFFFFFF
    for b in data:
        reg = _TABLE[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """LevelDB stores every CRC rotated right by 15 bits plus a constant."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    """Unsigned LEB128; a negative int64 is written as its 10-byte two's complement."""
    n &= (1 << 64) - 1 if n < 0 else (1 << 70) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def block(entries: list[tuple[bytes, bytes]], restart_interval: int = 16) -> bytes:
    """Block contents (without trailer): prefix-compressed entries and the restart array."""
    out = bytearray()
    restarts = []
    prev = b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value))
        out += key[shared:] + value
        prev = key
    if not restarts:
        restarts.append(0)
    out += struct.pack(f"<{len(restarts)}I", *restarts)
    out += struct.pack("<I", len(restarts))
    return bytes(out)


def snappy(data: bytes) -> bytes:
    """Snappy's raw format, greedily: a copy (tag 2: 1-64 bytes, 2-byte offset) wherever the
    next 4 bytes occurred in the last 64 KiB, else a literal (a 1-byte tag, or tag 60 and a
    1-byte length). Not snappy's own encoder, but every output is valid snappy."""
    out = bytearray(varint(len(data)))
    seen: dict[bytes, int] = {}
    literal = bytearray()

    def flush() -> None:
        for i in range(0, len(literal), 256):
            piece = literal[i : i + 256]
            if len(piece) <= 60:
                out.append((len(piece) - 1) << 2)
            else:
                out.extend(bytes([60 << 2, len(piece) - 1]))
            out.extend(piece)
        literal.clear()

    pos = 0
    while pos < len(data):
        start = seen.get(data[pos : pos + 4])
        seen[data[pos : pos + 4]] = pos
        if start is not None and len(data) - pos >= 4 and pos - start < 65536:
            n = 4
            while n < 64 and pos + n < len(data) and data[start + n] == data[pos + n]:
                n += 1  # the source may overlap the copy: start + n can reach pos
            flush()
            out.append((n - 1) << 2 | 2)
            out.extend(struct.pack("<H", pos - start))
            pos += n
        else:
            literal.append(data[pos])
            pos += 1
    flush()
    return bytes(out)


def table(
    entries: list[tuple[bytes, bytes]],
    per_block: int = 4,
    restart_interval: int = 16,
    edit_block: Callable[[str, int, bytes], bytes] | None = None,
    compression: int = 0,
) -> bytes:
    """A whole index file. `edit_block(kind, i, contents)` may rewrite a block's contents
    ("data", "metaindex" or "index") before its checksum is computed; compression 1 writes
    the data blocks with `snappy` (after the edit)."""
    edit = edit_block or (lambda kind, i, contents: contents)
    out = bytearray()
    index_entries = []

    def put(kind: str, i: int, contents: bytes) -> bytes:
        contents = edit(kind, i, contents)
        kind_byte = b"\x00"
        if kind == "data" and compression == 1:
            contents, kind_byte = snappy(contents), b"\x01"
        handle = varint(len(out)) + varint(len(contents))
        out.extend(contents + kind_byte + struct.pack("<I", masked_crc32c(contents + kind_byte)))
        return handle

    groups = [entries[i : i + per_block] for i in range(0, len(entries), per_block)] or [[]]
    for i, group in enumerate(groups):
        handle = put("data", i, block(group, restart_interval))
        index_entries.append((group[-1][0] if group else b"", handle))
    meta = put("metaindex", 0, block([]))
    index = put("index", 0, block(index_entries, 1))
    footer = (meta + index).ljust(40, b"\x00")
    out += footer + struct.pack("<Q", MAGIC)
    return bytes(out)


def proto(fields: list[tuple[int, int, object]]) -> bytes:
    """Protobuf wire encoding of (field number, wire type, value): 0 varint, 1 fixed64,
    2 bytes, 5 fixed32."""
    out = bytearray()
    for number, wire, value in fields:
        out += varint(number << 3 | wire)
        if wire == 0:
            out += varint(value)
        elif wire == 1:
            out += struct.pack("<Q", value & (2**64 - 1))
        elif wire == 2:
            out += varint(len(value)) + value
        elif wire == 5:
            out += struct.pack("<I", value & (2**32 - 1))
    return bytes(out)


def bundle_entry(
    dtype: int, shape: list[int], offset: int, size: int, crc: int | None, shard_id: int = 0
) -> bytes:
    """BundleEntryProto (tensorflow/core/protobuf/tensor_bundle.proto)."""
    dims = b"".join(proto([(2, 2, proto([(1, 0, d)]))]) for d in shape)
    fields = [(1, 0, dtype), (2, 2, dims), (3, 0, shard_id), (4, 0, offset), (5, 0, size)]
    if crc is not None:
        fields.append((6, 5, crc))
    return proto(fields)


def bundle_header(num_shards: int = 1, endianness: int = 0) -> bytes:
    """BundleHeaderProto: num_shards, endianness (0 little), version {producer: 1}."""
    return proto([(1, 0, num_shards), (2, 0, endianness), (3, 2, proto([(1, 0, 1)]))])
