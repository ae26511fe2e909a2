"""GPT-2 GGUF files (llama.cpp's format), read with numpy alone and written with ggml's `gguf`
package.

File layout (GGUF v2 and v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/
gguf.md): the magic b"GGUF", a uint32 version, a uint64 tensor count and a uint64 metadata
count; that many metadata pairs (a string key, a uint32 value type, the value; strings are a
uint64 length and UTF-8 bytes, arrays a uint32 element type, a uint64 count and the elements);
that many tensor infos (a string name, a uint32 dim count, uint64 dims ne[0..], a uint32 ggml
type, a uint64 offset); then, at the next multiple of `general.alignment` (default 32), the
tensor data, each offset relative to its start. ne[0] is the contiguous axis, so a matrix of
ne = [K, N] is a numpy (N, K) array: (outputs, reduction), the transpose of the (in, out) that
OpenAI's checkpoints and this project's params use.

Names (llama.cpp's GPT-2, src/models/gpt2.cpp) and the canonical names they map onto:
    token_embd.weight -> wte (V, C)      position_embd.weight -> wpe (n_ctx, C)
    output_norm.{weight,bias} -> ln_f/{g,b}    output.weight -> the LM head (optional: tied)
    blk.N.attn_norm -> hN/ln_1   blk.N.attn_qkv -> hN/attn/c_attn   blk.N.attn_output -> attn/c_proj
    blk.N.ffn_norm -> hN/ln_2    blk.N.ffn_up -> hN/mlp/c_fc        blk.N.ffn_down -> mlp/c_proj

Tensor types read: F32, F16 (widened to float32 exactly) and Q8_0 (blocks of 32 along ne[0],
each a float16 scale d then 32 int8 qs: 34 bytes, exactly ref.quant's int8 format); any other
is refused by name. A file with no Q8_0 tensor loads as the plain float32 params tree. A file
with one loads as ref.quant's quantized tree (`quantize_params`' form), every stored block
kept as it is (no round trip through float32): each projection weight a QWeight (N, K) in its
stored type (Q8_0 -> "int8", F16 -> "float16", F32 -> "float32"; llama.cpp's converter falls
back to F16 where K is not a multiple of 32) and params["lm_head"] the head's (output.weight,
else token_embd) as stored. wte and wpe are float32 in both trees (a Q8_0 token_embd is
dequantized exactly for the embedding's gather).

Every count, length, shape and offset is checked against the file's size and the config
before any array is made, so a header that declares 2^60 tensors or a 1 TB tensor costs
nothing; errors (weights.WeightsError) name the file and the tensor or key.

Writing (`write`): the architecture metadata and GPT-2's BPE tokenizer (tokens from
encoder.json, merges from vocab.bpe, <|endoftext|> = 50256 as bos and eos, a control token),
so llama.cpp loads the file and generates. Tensor types per `gguf_type`, as llama.cpp's
converter chooses them: "f32" everything F32; "f16" the matrices F16 (position_embd stays F32);
"q8_0" the matrices Q8_0 quantized with ref.quant (position_embd F32; a matrix whose K is not
a multiple of 32 falls back to F16); 1-D tensors always F32. ref.quant's q8_0 scales are
ggml's bit for bit; its qs round w / d with the float16 d that is stored, where ggml rounds
with the unrounded d, so about 0.7% of them differ by one step, each one nearer w
(tests/test_gguf.py).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from ref import quant
from ref.config import ConfigError, GPT2Config, brief
from weights import WeightsError, read_error
from weights import safetensors as st
from weights.layout import expected_shapes, nest

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 had 32-bit counts and lengths; nothing writes it any more
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays of ... in metadata; GPT-2 files have none
TYPES = ("f32", "f16", "q8_0")  # what `write` writes (gpt2 export --dtype)

# ggml's tensor types (ggml.h, enum ggml_type): the ones read, and names for the refusal
F32, F16, Q8_0 = 0, 1, 8
_GGML_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
Q8_BYTES = 2 + quant.QK  # a float16 d and 32 int8 qs

# metadata value types (gguf.md: gguf_metadata_value_type) -> struct format of a scalar
_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}  # fmt: skip
_STRING, _ARRAY = 8, 9
_INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
_FLOAT_TYPES = (6, 12)

# llama.cpp's per-block names -> the canonical module of weights/layout.py
_BLOCK_NAMES = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn/c_attn",
    "attn_output": "attn/c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp/c_fc",
    "ffn_down": "mlp/c_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "wte",
    "position_embd.weight": "wpe",
    "output_norm.weight": "ln_f/g",
    "output_norm.bias": "ln_f/b",
    "output.weight": "lm_head",
}
_PROJECTIONS = {f"{mod}/{proj}" for mod, proj in quant.PROJECTIONS}


def gguf_name(canonical: str) -> str:
    """`h3/mlp/c_fc/w` -> `blk.3.ffn_up.weight` (the inverse of the reader's mapping)."""
    for g, c in _TOP_NAMES.items():
        if c == canonical:
            return g
    layer, rest = canonical.split("/", 1)
    mod, leaf = rest.rsplit("/", 1)
    block = {v: k for k, v in _BLOCK_NAMES.items()}[mod]
    kind = "bias" if leaf == "b" else "weight"
    return f"blk.{layer[1:]}.{block}.{kind}"


def _canonical(name: str) -> str | None:
    """`blk.3.ffn_up.weight` -> `h3/mlp/c_fc/w`; None for a name GPT-2 does not have."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blk" or parts[3] not in ("weight", "bias"):
        return None
    layer, mod, kind = parts[1], parts[2], parts[3]
    if not layer.isdigit() or (layer != "0" and layer.startswith("0")) or mod not in _BLOCK_NAMES:
        return None
    norm = mod.endswith("_norm")
    leaf = ("g" if norm else "w") if kind == "weight" else "b"
    return f"h{int(layer)}/{_BLOCK_NAMES[mod]}/{leaf}"


# ---------------------------------------------------------------------------------------------
# the header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: ne reversed, (N, K) for a matrix
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class Header:
    version: int
    metadata: dict  # key -> (value type, value); arrays are (element type, count), not read
    tensors: dict[str, TensorInfo]
    data_start: int
    size: int


class _Cursor:
    """Reads little-endian values from a buffer, each bounds-checked against its end."""

    def __init__(self, buf, path: str) -> None:
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise WeightsError(
                f"{self.path}: truncated GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"{self.left()} remain"
            )

    def scalar(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string_length(self, what: str) -> int:
        n = self.scalar("<Q", what)
        self.need(n, what)
        return n

    def string(self, what: str) -> str:
        n = self.string_length(what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        self.pos += n


def _value(cur: _Cursor, vtype: int, what: str, depth: int = 0):
    """One metadata value. Arrays are skipped, after checking that their elements fit the
    file, and returned as (element type, count): no GPT-2 key needs one read (the tokenizer's
    are llama.cpp's business), and a count is bounded by the bytes left before any loop."""
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], what)
    if vtype == _STRING:
        return cur.string(what)
    if vtype != _ARRAY:
        raise WeightsError(f"{cur.path}: {what} has unknown value type {vtype}")
    etype = cur.scalar("<I", what)
    count = cur.scalar("<Q", what)
    if etype in _SCALARS:
        n = struct.calcsize(_SCALARS[etype])
        cur.need(count * n, f"{what} ({count} elements)")
        cur.skip(count * n)
    elif etype == _STRING:
        cur.need(count * 8, f"{what} ({count} strings)")  # each at least its 8-byte length
        for _ in range(count):
            cur.skip(cur.string_length(what))
    elif etype == _ARRAY:
        if depth + 1 >= MAX_NESTING:
            raise WeightsError(f"{cur.path}: {what} nests arrays deeper than {MAX_NESTING}")
        cur.need(count * 12, f"{what} ({count} arrays)")  # each at least its type and count
        for _ in range(count):
            _value(cur, _ARRAY, what, depth + 1)
    else:
        raise WeightsError(f"{cur.path}: {what} has unknown array element type {etype}")
    return (etype, count)


def _tensor_nbytes(path: str, name: str, shape: tuple[int, ...], ggml_type: int) -> int:
    n = int(np.prod(shape, dtype=object))
    if ggml_type == F32:
        return 4 * n
    if ggml_type == F16:
        return 2 * n
    if ggml_type == Q8_0:
        K = shape[-1] if shape else 1
        if K % quant.QK:
            raise WeightsError(
                f"{path}: tensor {name!r}: Q8_0 needs ne[0] a multiple of {quant.QK}, got {K}"
            )
        return n // quant.QK * Q8_BYTES
    label = _GGML_NAMES.get(ggml_type, f"unknown type {ggml_type}")
    raise WeightsError(f"{path}: tensor {name!r} has ggml type {label}; supported: F32, F16, Q8_0")


def read_header(path: str, buf) -> Header:
    """Parse and check the header of the GGUF bytes `buf` (the file `path`)."""
    cur = _Cursor(buf, path)
    size = cur.end
    magic = bytes(buf[:4])
    if magic != MAGIC:
        cur.need(4, "the magic")
        raise WeightsError(f"{path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    cur.skip(4)
    version = cur.scalar("<I", "the version")
    if version not in VERSIONS:
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        why = " (a big-endian file?)" if swapped in VERSIONS else ""
        raise WeightsError(
            f"{path}: GGUF version {version} is not supported{why}; supported: "
            f"{', '.join(map(str, VERSIONS))}"
        )
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    # the smallest metadata pair is 13 bytes (an empty key, its type, a one-byte value) and the
    # smallest tensor info 24 (an empty name, no dims, type, offset): counts past what the file
    # could hold are refused before any loop runs
    if n_kv * 13 > cur.left():
        raise WeightsError(
            f"{path}: header declares {n_kv} metadata entries, more than its {size} bytes hold"
        )
    if n_tensors * 24 > cur.left():
        raise WeightsError(
            f"{path}: header declares {n_tensors} tensors, more than its {size} bytes hold"
        )
    metadata: dict = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        vtype = cur.scalar("<I", f"metadata {brief(key)}")
        value = _value(cur, vtype, f"metadata {brief(key)}")
        if key in metadata:
            raise WeightsError(f"{path}: metadata key {brief(key)} appears twice")
        metadata[key] = (vtype, value)
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in metadata:
        vtype, alignment = metadata["general.alignment"]
        if vtype not in _INTEGER_TYPES or alignment < 1 or alignment & (alignment - 1):
            raise WeightsError(
                f"{path}: general.alignment {brief(alignment)} is not a power of two"
            )
    infos: list[TensorInfo] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor {i}'s name")
        where = f"tensor {brief(name)}"
        n_dims = cur.scalar("<I", where)
        if n_dims > MAX_DIMS:
            raise WeightsError(f"{path}: {where} has {n_dims} dims (at most {MAX_DIMS})")
        ne = [cur.scalar("<Q", where) for _ in range(n_dims)]
        ggml_type = cur.scalar("<I", where)
        offset = cur.scalar("<Q", where)
        if name in names:
            raise WeightsError(f"{path}: {where} appears twice")
        names.add(name)
        if int(np.prod(ne, dtype=object)) * 4 >= 2**62:
            raise WeightsError(f"{path}: {where} has shape {ne}, too large for an array")
        shape = tuple(reversed(ne))  # numpy order: ne[0] contiguous, last
        nbytes = _tensor_nbytes(path, name, shape, ggml_type)
        if offset % alignment:
            raise WeightsError(
                f"{path}: {where} starts at offset {offset}, not a multiple of the alignment "
                f"{alignment}"
            )
        infos.append(TensorInfo(name, shape, ggml_type, offset, nbytes))
    data_start = -(-cur.pos // alignment) * alignment
    data_len = size - data_start
    for t in infos:
        if t.offset + t.nbytes > data_len:
            raise WeightsError(
                f"{path}: tensor {brief(t.name)}: its {t.nbytes} bytes at data offset "
                f"{t.offset} lie past the file's end ({max(data_len, 0)} data bytes; truncated "
                "file?)"
            )
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in infos if t.nbytes)
    for (_b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:], strict=False):
        if b1 < e0:
            raise WeightsError(f"{path}: tensors {brief(n0)} and {brief(n1)} overlap")
    return Header(version, metadata, {t.name: t for t in infos}, data_start, size)


def _map(path: str):
    """The file's bytes, memory-mapped read-only (an empty file as empty bytes)."""
    try:
        if os.path.getsize(path) == 0:
            return b""
        return np.asarray(np.memmap(path, dtype=np.uint8, mode="r"))
    except OSError as e:
        raise read_error(path, e) from None


# ---------------------------------------------------------------------------------------------
# metadata -> config, tensor infos -> the params tree


def _meta(path: str, h: Header, key: str, kinds: tuple[int, ...], required: bool = True):
    if key not in h.metadata:
        if required:
            raise WeightsError(f"{path}: missing metadata {key}")
        return None
    vtype, value = h.metadata[key]
    if vtype not in kinds:
        raise WeightsError(f"{path}: metadata {key} has value type {vtype}, not the one expected")
    return value


def config_of(path: str, h: Header) -> GPT2Config:
    """The GPT2Config a GGUF header describes (n_vocab from token_embd's shape)."""
    arch = _meta(path, h, "general.architecture", (_STRING,))
    if arch != "gpt2":
        raise WeightsError(f"{path}: general.architecture is {brief(arch)}, not 'gpt2'")
    model = _meta(path, h, "tokenizer.ggml.model", (_STRING,), required=False)
    if model is not None and model != "gpt2":
        raise WeightsError(
            f"{path}: tokenizer.ggml.model is {brief(model)}, not GPT-2's BPE ('gpt2')"
        )
    ints = {
        "n_ctx": "gpt2.context_length",
        "n_embd": "gpt2.embedding_length",
        "n_layer": "gpt2.block_count",
        "n_head": "gpt2.attention.head_count",
    }
    kw = {k: _meta(path, h, key, _INTEGER_TYPES) for k, key in ints.items()}
    eps = _meta(path, h, "gpt2.attention.layer_norm_epsilon", _FLOAT_TYPES)
    # llama.cpp stores eps as a float32 (1e-5 -> 9.99999975e-06): its shortest float32
    # spelling gives back the float the config file had
    eps = float(str(np.float32(eps))) if np.isfinite(eps) else eps
    if "token_embd.weight" not in h.tensors:
        raise WeightsError(f"{path}: missing tensor 'token_embd.weight'")
    emb = h.tensors["token_embd.weight"]
    if len(emb.shape) != 2:
        raise WeightsError(
            f"{path}: tensor 'token_embd.weight' has shape {emb.shape}, expected (n_vocab, C)"
        )
    kw["n_vocab"] = emb.shape[0]
    try:
        cfg = GPT2Config(eps=eps, **kw)
    except ConfigError as e:
        raise WeightsError(f"{path}: {e}") from None
    for key, want in (
        ("gpt2.feed_forward_length", 4 * cfg.n_embd),
        ("gpt2.attention.head_count_kv", cfg.n_head),
    ):
        got = _meta(path, h, key, _INTEGER_TYPES, required=False)
        if got is not None and got != want:
            raise WeightsError(f"{path}: {key} is {got}; GPT-2 needs {want}")
    return cfg


def _check_tensors(path: str, h: Header, cfg: GPT2Config) -> dict[str, TensorInfo]:
    """canonical name -> its TensorInfo, every name, count and shape checked against cfg."""
    n_expected = 12 * cfg.n_layer + 4
    # counted before the table of expected names is built: a header may say n_layer=10,000,000
    if cfg.n_layer > len(h.tensors) or len(h.tensors) > n_expected + 1:  # + output.weight
        raise WeightsError(
            f"{path}: {len(h.tensors)} tensors, but the config's n_layer={cfg.n_layer} has "
            f"{n_expected} (and an optional output.weight)"
        )
    shapes = expected_shapes(cfg)
    shapes.pop("lm_head", None)
    by_canonical: dict[str, TensorInfo] = {}
    for name, t in h.tensors.items():
        key = _canonical(name)
        if key is None or (key not in shapes and key != "lm_head"):
            raise WeightsError(f"{path}: unknown tensor {brief(name)}")
        by_canonical[key] = t
    missing = [gguf_name(k) for k in shapes if k not in by_canonical]
    if missing:
        raise WeightsError(
            f"{path}: missing tensor(s) {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    for key, t in by_canonical.items():
        want = (cfg.n_vocab, cfg.n_embd) if key == "lm_head" else shapes[key]
        if _is_matrix(key):
            want = want[::-1]  # GGUF stores (out, in)
        if t.shape != want:
            raise WeightsError(
                f"{path}: tensor {t.name!r} has shape {t.shape} (numpy order), but the config "
                f"(n_embd={cfg.n_embd}, n_ctx={cfg.n_ctx}, n_vocab={cfg.n_vocab}) needs {want}"
            )
        if len(t.shape) == 1 and t.ggml_type == Q8_0:
            raise WeightsError(f"{path}: tensor {t.name!r} is a vector stored as Q8_0")
    return by_canonical


def _is_matrix(key: str) -> bool:
    """A projection weight, stored (out, in) in GGUF and (in, out) in params."""
    return key.endswith("/w") and key.split("/", 1)[1][:-2] in _PROJECTIONS


def _raw(buf, h: Header, t: TensorInfo) -> np.ndarray:
    """The tensor's bytes as a read-only array of its stored form: float32 / float16 (shape),
    or uint8 Q8_0 blocks (N, K / 32, 34)."""
    start = h.data_start + t.offset
    b = buf[start : start + t.nbytes]
    if t.ggml_type == F32:
        return b.view("<f4").reshape(t.shape)
    if t.ggml_type == F16:
        return b.view("<f2").reshape(t.shape)
    N, K = t.shape
    return b.reshape(N, K // quant.QK, Q8_BYTES)


def _q8_0(path: str, t: TensorInfo, blocks: np.ndarray) -> quant.QWeight:
    """Q8_0 blocks (N, nb, 34) -> QWeight("int8", qs (N, K), d (N, nb)), copied as stored."""
    N, nb, _ = blocks.shape
    d = np.ascontiguousarray(blocks[:, :, :2]).view("<f2").reshape(N, nb)  # (N, nb)
    if not np.isfinite(d).all():
        raise WeightsError(f"{path}: tensor {t.name!r} has a NaN or Inf block scale")
    qs = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(N, nb * quant.QK)  # (N, K)
    return quant.QWeight("int8", qs, d.astype(np.float16))


def _float32(path: str, t: TensorInfo, raw) -> np.ndarray:
    """A float32 array of any stored form (F16 widened, Q8_0 dequantized, both exactly)."""
    if t.ggml_type == Q8_0:
        q = _q8_0(path, t, raw)
        a = quant.f32_from_q8_0(q.data, q.scale)
    else:
        a = raw if raw.dtype == np.float32 else raw.astype(np.float32)
    if not np.isfinite(a).all():
        raise WeightsError(f"{path}: tensor {t.name!r} contains NaN or Inf values")
    return a


def _qweight(path: str, t: TensorInfo, raw) -> quant.QWeight:
    """A stored matrix (N, K) as the QWeight of its own type."""
    if t.ggml_type == Q8_0:
        return _q8_0(path, t, raw)
    if not np.isfinite(raw).all():
        raise WeightsError(f"{path}: tensor {t.name!r} contains NaN or Inf values")
    if t.ggml_type == F16:
        return quant.QWeight("float16", np.ascontiguousarray(raw, np.float16))
    return quant.QWeight("float32", np.ascontiguousarray(raw, np.float32))


def read_config(path: str) -> GPT2Config:
    """The config of a GGUF file, from its header alone (no tensor is read)."""
    buf = _map(path)
    return config_of(path, read_header(path, buf))


def load(path: str) -> tuple[GPT2Config, dict]:
    """A GGUF file -> (cfg, params): the float32 tree, or with any Q8_0 tensor the quantized
    tree of ref.quant (see the module docstring)."""
    buf = _map(path)
    h = read_header(path, buf)
    cfg = config_of(path, h)
    infos = _check_tensors(path, h, cfg)
    quantized = any(t.ggml_type == Q8_0 for t in infos.values())
    flat: dict = {}
    for key, t in infos.items():
        if key == "lm_head":
            continue
        raw = _raw(buf, h, t)
        if quantized and _is_matrix(key):
            flat[key] = _qweight(path, t, raw)  # (N, K) = (Cout, Cin), as stored
        elif _is_matrix(key):
            flat[key] = np.ascontiguousarray(_float32(path, t, raw).T)  # (Cin, Cout)
        else:
            flat[key] = _float32(path, t, raw)
    params = nest(flat, cfg)
    head = infos.get("lm_head")
    if quantized:
        t = head or infos["wte"]
        params["lm_head"] = _qweight(path, t, _raw(buf, h, t))  # (V, C)
    elif head is not None:
        a = _float32(path, head, _raw(buf, h, head))
        if not np.array_equal(a, params["wte"]):
            raise WeightsError(
                f"{path}: tensor 'output.weight' differs from token_embd.weight; GPT-2 ties "
                "them and an untied head is not read from GGUF"
            )
    return cfg, params


# ---------------------------------------------------------------------------------------------
# writing


def _tokenizer() -> tuple[list[str], list[str]]:
    """GPT-2's tokens in id order (encoder.json's byte-level strings) and its merges."""
    from ref.config import parse_json
    from weights.tokenizer import DATA_DIR

    enc_path = os.path.join(DATA_DIR, "encoder.json")
    with open(enc_path, "rb") as f:
        encoder = parse_json(f.read(), WeightsError, f"{enc_path}: not valid JSON")
    tokens = [""] * len(encoder)
    for tok, i in encoder.items():
        tokens[i] = tok
    with open(os.path.join(DATA_DIR, "vocab.bpe"), encoding="utf-8") as f:
        merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#")]
    return tokens, merges


def _q8_0_bytes(w: np.ndarray | quant.QWeight) -> np.ndarray:
    """A matrix (N, K) (float32, or a QWeight "int8" kept as it is) -> Q8_0 blocks as bytes,
    (N, K / 32 * 34): each block its float16 d then its 32 qs."""
    if isinstance(w, quant.QWeight) and w.dtype != "int8":
        w = quant.dequantize(w)
    q = w if isinstance(w, quant.QWeight) else quant.quantize(w, "int8")
    N, K = q.shape
    nb = K // quant.QK
    out = np.empty((N, nb, Q8_BYTES), np.uint8)  # (N, nb, 34)
    out[:, :, :2] = q.scale.astype("<f2").view(np.uint8).reshape(N, nb, 2)
    out[:, :, 2:] = q.data.view(np.uint8).reshape(N, nb, quant.QK)
    return out.reshape(N, nb * Q8_BYTES)


def _stored(w) -> np.ndarray:
    """A matrix of either tree as float32 (N, K): a QWeight dequantized, an array as it is."""
    return quant.dequantize(w) if isinstance(w, quant.QWeight) else np.asarray(w, np.float32)


def tensors_for(cfg: GPT2Config, params: dict, gguf_type: str) -> list[tuple[str, np.ndarray, int]]:
    """(GGUF name, array, ggml type) of every tensor `write` writes: floats as float32 or
    float16 arrays in numpy order, Q8_0 as its bytes."""
    if gguf_type not in TYPES:
        raise ValueError(f"--dtype must be one of {', '.join(TYPES)}, got {gguf_type!r}")
    if "lm_head" in params and not isinstance(params["lm_head"], quant.QWeight):
        raise WeightsError("an untied LM head cannot be written to GGUF here (GPT-2 ties it)")
    flat: dict[str, object] = {"wte": params["wte"], "wpe": params["wpe"]}
    flat["ln_f/g"], flat["ln_f/b"] = params["ln_f"]["g"], params["ln_f"]["b"]
    for i, block in enumerate(params["blocks"]):
        for mod in _BLOCK_NAMES.values():
            node = block
            for part in mod.split("/"):
                node = node[part]
            for leaf, value in node.items():
                if leaf in ("g", "b", "w"):
                    flat[f"h{i}/{mod}/{leaf}"] = value
    # the LM head of a quantized tree is wte stored small; an int8 one is written as it is
    head = params.get("lm_head")
    out = []
    for key, value in flat.items():
        name = gguf_name(key)
        if key == "wte" and head is not None:
            value = head  # the head's stored blocks (V, C); wte is their float32 twin
        matrix = _is_matrix(key) or key == "wte"
        if isinstance(value, quant.QWeight):
            w = value  # already (N, K)
        elif _is_matrix(key):
            w = np.asarray(value, np.float32).T  # (Cin, Cout) -> (N, K) = (Cout, Cin)
        else:
            w = np.asarray(value, np.float32)
        kind = gguf_type if matrix else "f32"
        if kind == "q8_0" and w.shape[-1] % quant.QK:
            kind = "f16"  # llama.cpp's converter does the same: Q8_0 needs K % 32 == 0
        try:
            if kind == "q8_0":
                out.append((name, _q8_0_bytes(w), Q8_0))
            elif kind == "f16":
                out.append((name, quant.quantize(_stored(w), "float16").data, F16))
            else:
                out.append((name, np.ascontiguousarray(_stored(w), np.float32), F32))
        except ValueError as e:
            raise WeightsError(f"tensor {key} ({name}): {e}") from None
    return out


def write(path: str, cfg: GPT2Config, params: dict, gguf_type: str = "f32") -> None:
    """Write a GGUF file llama.cpp loads (see the module docstring), atomically: to
    `path.tmp-<pid>`, renamed over `path` when whole; nothing is left on failure."""
    try:
        import gguf
    except ImportError:
        raise WeightsError(
            f"{path}: writing GGUF needs the gguf package (pip install gguf, or the [gguf] extra)"
        ) from None
    tensors = tensors_for(cfg, params, gguf_type)  # every refusal before the file is opened
    tokens, merges = _tokenizer()
    n = cfg.n_vocab
    eot = 50256
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type["q8_0"] = gguf.LlamaFileType.MOSTLY_Q8_0
    if n > len(tokens):
        raise WeightsError(f"{path}: n_vocab {n} is larger than GPT-2's {len(tokens)} tokens")

    def produce(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "gpt2")
        w.add_name("gpt2-spec export")
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_ctx)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.eps)
        w.add_file_type(file_type[gguf_type])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens[:n])
        types = [gguf.TokenType.NORMAL] * n
        if eot < n:
            types[eot] = gguf.TokenType.CONTROL
            w.add_bos_token_id(eot)
            w.add_eos_token_id(eot)
        w.add_token_types(types)
        # a smaller vocabulary (a test model) keeps the merges whose pieces it has
        vocab = set(tokens[:n])
        w.add_token_merges([m for m in merges if n == len(tokens) or (m.replace(" ", "") in vocab)])
        for name, a, ggml_type in tensors:
            w.add_tensor(name, a, raw_dtype=gguf.GGMLQuantizationType(ggml_type))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    st.atomic_replace(path, produce)
