"""LevelDB-style sorted tables, the storage format of TensorFlow checkpoint indexes, read
with numpy and the stdlib alone (weights/tf_checkpoint.py reads the tensor bundle on top).

A table file (TensorFlow's copy of LevelDB's table format, tensorflow/tsl/lib/io/table):
    [data block]* [metaindex block] [index block] [footer: 48 bytes]
    footer   = metaindex handle, index handle (each two varints: offset, size), zero padding
               to 40 bytes, then the magic 0xdb4775248b80fb57 as a little-endian uint64
    block    = entries, then restart offsets (uint32 each) and their count (uint32), then a
               5-byte trailer: compression type (0 none, 1 snappy) and the masked crc32c of the
               block bytes plus that type byte
    entry    = varint shared, varint unshared, varint value_len, key[shared:] bytes, value;
               each key shares `shared` leading bytes with the key before it (prefix
               compression), and a restart point starts a key afresh (shared = 0)
The index block maps the last key of each data block to that block's handle. Varints are
unsigned LEB128 (7 bits a byte, low bits first, high bit set on all but the last byte).

Every checksum is CRC-32C (Castagnoli), stored masked as LevelDB does:
mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32).

Bounded cost: a small file can describe far more than it holds (snappy blocks expand, and keys
that each share the whole previous key plus one byte add up to O(n**2) bytes), so everything
the reader makes (decompressed blocks, keys, values, and ENTRY_COST bytes of Python objects per
entry) is charged to a budget of EXPANSION times the file's size plus 1 MiB, and a table that
would exceed it is refused before the bytes are made. Data blocks must lie one after another,
as TableBuilder writes them, so no block is read twice.

`_Malformed` and `_varint` are shared with weights/tf_checkpoint.py, whose protobuf decoding
reads the same varints and reports its structural errors the same way. The only tables read
here are checkpoint indexes, which is what the error messages call them.
"""

from __future__ import annotations

import functools
import struct

import numpy as np

from weights import WeightsError, read_error

TABLE_MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48  # two block handles of at most 20 bytes each, then the 8-byte magic
BLOCK_TRAILER_SIZE = 5  # compression type (1 byte) + masked crc32c (4 bytes)
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
# The budget. ENTRY_COST is about what one entry's Python objects take: ~190 bytes here (a
# tuple, two bytes objects) and ~600 in weights/tf_checkpoint.py (the parsed entry, the array).
# Charged so, the fixtures TensorFlow wrote (tests/fixtures/tf-*) use 14-17 times their size.
EXPANSION = 64
ENTRY_COST = 512


class _Malformed(Exception):
    """A structural error deep in the parser; re-raised as WeightsError naming the file."""


class _Budget:
    """The bytes a table's reader may still make (see the module docstring)."""

    def __init__(self, file_size: int):
        self.left = EXPANSION * file_size + (1 << 20)

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise _Malformed(
                f"{what} would expand the table past {EXPANSION} times its file's size "
                "(keys sharing ever longer prefixes, or an oversized snappy block)"
            )
        self.left -= n


# ---------------------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------------------

_POLY = 0x82F63B78  # Castagnoli polynomial 0x1EDC6F41, bit-reflected
_SERIAL_MAX = 4096  # below this many bytes a plain Python loop is quicker than numpy
_LANES = 65536  # independent chunks run side by side in the vectorised path


@functools.lru_cache(maxsize=1)
def _table8() -> list[int]:
    """table[b]: the register after shifting the byte b through 8 steps of the LFSR."""
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ _POLY if c & 1 else c >> 1
        table.append(c)
    return table


@functools.lru_cache(maxsize=1)
def _table16() -> np.ndarray:
    """The same for 16 bits at once: 65536 uint32 (256 KB, fits in L2)."""
    t8 = np.array(_table8(), dtype=np.uint32)
    c = np.arange(65536, dtype=np.uint32)
    for _ in range(2):
        c = (c >> 8) ^ t8[c & 0xFF]
    return c


def _crc_serial(reg: int, data) -> int:
    """Advance the raw register `reg` over `data` (bytes-like), one table step per byte."""
    table = _table8()
    for b in bytes(data):
        reg = table[(reg ^ b) & 0xFF] ^ (reg >> 8)
    return reg


def _tabulate(cols: np.ndarray) -> np.ndarray:
    """A linear map of 32-bit registers, given as its 32 columns (the image of each bit),
    -> 4 byte-sliced tables (4, 256), so that applying it costs 4 lookups."""
    tables = np.zeros((4, 256), dtype=np.uint32)
    for k in range(4):
        for i in range(8):
            tables[k, 1 << i : 2 << i] = tables[k, : 1 << i] ^ cols[8 * k + i]
    return tables


def _apply(tables: np.ndarray, reg):
    """The tabulated map applied to a Python int or to every element of a uint32 array."""
    if isinstance(reg, np.ndarray):
        t0, t1, t2, t3 = tables
        return t0[reg & 0xFF] ^ t1[(reg >> 8) & 0xFF] ^ t2[(reg >> 16) & 0xFF] ^ t3[reg >> 24]
    return int(_apply(tables, np.array([reg], dtype=np.uint32))[0])


@functools.lru_cache(maxsize=64)
def _zeros_pow2(k: int) -> np.ndarray:
    """Tables of Z_(2**k), the register map for 2**k zero bytes, by repeated squaring."""
    if k == 0:
        table = _table8()
        cols = np.array([(1 << i >> 8) ^ table[(1 << i) & 0xFF] for i in range(32)], np.uint32)
        return _tabulate(cols)
    half = _zeros_pow2(k - 1)
    cols = _apply(half, _apply(half, np.uint32(1) << np.arange(32, dtype=np.uint32)))
    return _tabulate(cols)


@functools.lru_cache(maxsize=256)
def _zeros_operator(n: int) -> np.ndarray:
    """Tables of Z_n, the register map for n zero bytes.

    With a zero initial register the CRC is linear in the data, and feeding n zero bytes is a
    linear map Z_n of the register: raw(A || B) = Z_len(B)(raw(A)) ^ raw(B) (the idea behind
    zlib's crc32_combine). Z_n is the product of the Z_(2**k) for the set bits k of n.
    """
    cols = np.uint32(1) << np.arange(32, dtype=np.uint32)  # identity
    for k in range(n.bit_length()):
        if n >> k & 1:
            cols = _apply(_zeros_pow2(k), cols)
    return _tabulate(cols)


def _crc_lanes(data: np.ndarray, lanes: int) -> int:
    """Raw CRC (zero initial register) of `data` (uint8, length a multiple of 2 * lanes,
    lanes a power of two).

    The data is cut into `lanes` equal chunks; numpy advances all their registers together,
    16 bits per step, then the chunk CRCs are folded pairwise with Z_chunk, in log2(lanes)
    vectorised levels.
    """
    words = data.view("<u2").reshape(lanes, -1)  # (lanes, words per chunk)
    n_words = words.shape[1]
    t16 = _table16()
    reg = np.zeros(lanes, dtype=np.uint32)
    idx = np.empty(lanes, dtype=np.uint32)
    hit = np.empty(lanes, dtype=np.uint32)
    for j0 in range(0, n_words, 32):
        # 32 columns at a time, transposed so that each step reads one contiguous row
        block = np.ascontiguousarray(words[:, j0 : j0 + 32].T)  # (32, lanes)
        for row in block:
            np.bitwise_xor(reg, row, out=idx)
            np.bitwise_and(idx, 0xFFFF, out=idx)
            np.take(t16, idx, out=hit)
            np.right_shift(reg, 16, out=reg)
            np.bitwise_xor(reg, hit, out=reg)
    chunk = 2 * n_words
    while len(reg) > 1:
        reg = _apply(_zeros_operator(chunk), reg[0::2]) ^ reg[1::2]
        chunk *= 2
    return int(reg[0])


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of `data` (bytes-like or an array, read as its raw bytes), continuing from
    `crc` (as zlib.crc32 does).

    A Python loop does a few MB/s; the vectorised path did 500 MB (the 124M checkpoint's
    size) in 1.1 s on the project's 2-core machine when lightly loaded, 4.5 s at load 7.6.
    """
    buf = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    buf = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    reg = crc ^ 0xFFFFFFFF
    pos = 0
    while len(buf) - pos > _SERIAL_MAX:
        # the most lanes that still give each lane at least 16 steps of work
        lanes = min(_LANES, 1 << ((len(buf) - pos) // 32).bit_length() - 1)
        n = (len(buf) - pos) // (2 * lanes) * (2 * lanes)
        reg = _apply(_zeros_operator(n), reg) ^ _crc_lanes(buf[pos : pos + n], lanes)
        pos += n
    reg = _crc_serial(reg, buf[pos:])
    return reg ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB's masking of a stored CRC (so a CRC of data holding CRCs stays informative)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------
# Varints, snappy
# ---------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, end: int | None = None) -> tuple[int, int]:
    """-> (value, position after it); at most 10 bytes (a uint64)."""
    end = len(buf) if end is None else end
    value = shift = 0
    while True:
        if pos >= end:
            raise _Malformed("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _snappy_decompress(buf: bytes, budget: _Budget | None = None) -> bytes:
    """Snappy's raw format: varint length, then literals and back-references.

    Tag byte, low 2 bits: 0 literal (length - 1 in the high 6 bits, or 60..63 meaning 1..4
    bytes of length - 1 follow); 1 copy, length 4 + bits 2-4, offset bits 5-7 << 8 | 1 byte;
    2 copy, length 1 + high 6 bits, 2-byte offset; 3 copy, same with a 4-byte offset.
    The declared length is charged to `budget` before anything is decompressed, and the
    output may never pass it (by default, the budget of a table file as large as `buf`).
    """
    budget = _Budget(len(buf)) if budget is None else budget
    n, pos = _varint(buf, 0)
    budget.take(n, f"a snappy block declaring {n} bytes")
    out = bytearray()
    while pos < len(buf):
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                if pos + extra > len(buf):
                    raise _Malformed("snappy literal length runs past the end")
                length = int.from_bytes(buf[pos : pos + extra], "little")
                pos += extra
            length += 1
            if pos + length > len(buf):
                raise _Malformed("snappy literal runs past the end")
            if len(out) + length > n:
                raise _Malformed("snappy output longer than its declared length")
            out += buf[pos : pos + length]
            pos += length
            continue
        if kind == 1:
            if pos + 1 > len(buf):
                raise _Malformed("snappy copy runs past the end")
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | buf[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if pos + width > len(buf):
                raise _Malformed("snappy copy runs past the end")
            length = (tag >> 2) + 1
            offset = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        if not 0 < offset <= len(out):
            raise _Malformed(f"snappy copy offset {offset} points before the start")
        if len(out) + length > n:
            raise _Malformed("snappy output longer than its declared length")
        # a copy may overlap its own output (offset < length): it then repeats the last
        # `offset` bytes, which is what copying byte by byte would give
        piece = out[len(out) - offset : len(out) - offset + length]
        out += (piece * (length // offset + 1))[:length]
    if len(out) != n:
        raise _Malformed(f"snappy output has {len(out)} bytes, declared {n}")
    return bytes(out)


# ---------------------------------------------------------------------------------------
# The sorted table
# ---------------------------------------------------------------------------------------


def _read_block(raw: bytes, handle: tuple[int, int], what: str, budget: _Budget) -> bytes:
    """Contents of the block at handle (offset, size), after its trailer's checks."""
    offset, size = handle
    if offset + size + BLOCK_TRAILER_SIZE > len(raw) - FOOTER_SIZE:
        raise _Malformed(
            f"{what} block [{offset}, {offset + size}) lies outside the file ({len(raw)} bytes)"
        )
    contents = raw[offset : offset + size]
    kind = raw[offset + size]
    (stored,) = struct.unpack_from("<I", raw, offset + size + 1)
    actual = crc32c(raw[offset : offset + size + 1])
    if unmask_crc(stored) != actual:
        raise _Malformed(
            f"{what} block at offset {offset} fails its crc32c check (stored "
            f"{unmask_crc(stored):#010x}, computed {actual:#010x}): the file is corrupt"
        )
    if kind == SNAPPY_COMPRESSION:
        return _snappy_decompress(contents, budget)
    if kind != NO_COMPRESSION:
        raise _Malformed(f"{what} block at offset {offset} has unknown compression type {kind}")
    return contents


def _block_entries(block: bytes, budget: _Budget) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of one block, undoing the prefix compression of the keys; each
    entry is charged to `budget` before its key is rebuilt."""
    if len(block) < 4:
        raise _Malformed("block shorter than its restart count")
    (n_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * n_restarts  # entries end where the restart array begins
    if n_restarts == 0 or limit < 0:
        raise _Malformed(f"block declares {n_restarts} restart points")
    restarts = set(struct.unpack_from(f"<{n_restarts}I", block, limit))
    entries = []
    pos = 0
    key = b""
    while pos < limit:
        start = pos
        shared, pos = _varint(block, pos, limit)
        unshared, pos = _varint(block, pos, limit)
        n_value, pos = _varint(block, pos, limit)
        if shared > len(key) or (start in restarts and shared):
            raise _Malformed(f"entry at byte {start} shares {shared} bytes of the previous key")
        if pos + unshared + n_value > limit:
            raise _Malformed(f"entry at byte {start} runs past the end of its block")
        budget.take(shared + unshared + n_value + ENTRY_COST, f"the entry at byte {start}")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + n_value]))
        pos += n_value
    return entries


def read_table(path: str) -> list[tuple[bytes, bytes]]:
    """All (key, value) pairs of a LevelDB-style table file, in key order."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise read_error(path, e) from None
    try:
        if len(raw) < FOOTER_SIZE:
            raise _Malformed(f"{len(raw)} bytes is too short for a table footer (truncated?)")
        footer = raw[-FOOTER_SIZE:]
        (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
        if magic != TABLE_MAGIC:
            raise _Malformed(
                f"bad table magic {magic:#018x} (expected {TABLE_MAGIC:#018x}): not a "
                "TensorFlow checkpoint index, or truncated"
            )
        metaindex, pos = _handle_at(footer, 0)
        index, _ = _handle_at(footer, pos)
        budget = _Budget(len(raw))
        _read_block(raw, metaindex, "metaindex", budget)  # unused (no filters), but checked
        entries = []
        next_block = 0  # where the next data block may start
        for last_key, value in _block_entries(_read_block(raw, index, "index", budget), budget):
            handle, _ = _handle_at(value, 0)
            if handle[0] < next_block:
                raise _Malformed(
                    f"data block at offset {handle[0]} overlaps the block before it (blocks "
                    "lie one after another)"
                )
            next_block = handle[0] + handle[1] + BLOCK_TRAILER_SIZE
            block_entries = _block_entries(_read_block(raw, handle, "data", budget), budget)
            if block_entries and block_entries[-1][0] > last_key:
                raise _Malformed("a data block holds keys past its index entry")
            entries += block_entries
        for (k0, _), (k1, _) in zip(entries, entries[1:], strict=False):
            if k1 <= k0:
                raise _Malformed(f"keys out of order or repeated: {k0!r} then {k1!r}")
        return entries
    except _Malformed as e:
        raise WeightsError(f"{path}: bad checkpoint index: {e}") from None


def _handle_at(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    """A block handle (two varints: offset, size) at `pos` -> (handle, position after it)."""
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos
