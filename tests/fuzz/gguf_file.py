"""A minimal GGUF writer of its own (bytes in, bytes out), for hostile inputs: the tests and the
fuzz target build files with any count, version, type, shape or offset, which ggml's writer
(the `gguf` package) would refuse to write. Independent of weights/gguf.py, from the format's
description (ggml docs/gguf.md)."""

from __future__ import annotations

import struct

import numpy as np

U32, F32_T, STRING, ARRAY = 4, 6, 8, 9  # metadata value types
F32, F16, Q8_0 = 0, 1, 8  # ggml tensor types


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def value(vtype: int, v) -> bytes:
    if vtype == U32:
        return struct.pack("<I", v)
    if vtype == F32_T:
        return struct.pack("<f", v)
    if vtype == STRING:
        return string(v)
    if vtype == ARRAY:  # v = (element type, [elements])
        etype, items = v
        return struct.pack("<IQ", etype, len(items)) + b"".join(value(etype, x) for x in items)
    raise ValueError(vtype)


def gguf_bytes(
    metadata: list[tuple[str, int, object]],
    tensors: list[tuple[str, list[int], int, bytes]],
    *,
    version: int = 3,
    alignment: int = 32,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    offsets: list[int] | None = None,
) -> bytes:
    """A GGUF file: `metadata` (key, value type, value), `tensors` (name, ne, ggml type, data)
    laid out at aligned offsets (or at `offsets`); the counts in the header may lie."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                  len(metadata) if n_kv is None else n_kv)  # fmt: skip
    head += b"".join(string(k) + struct.pack("<I", t) + value(t, v) for k, t, v in metadata)
    data, offs = b"", []
    for _name, _ne, _t, raw in tensors:
        data += b"\x00" * (-len(data) % alignment)
        offs.append(len(data))
        data += raw
    offs = offsets or offs
    for (name, ne, t, _raw), off in zip(tensors, offs, strict=True):
        head += string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", t, off)
    head += b"\x00" * (-len(head) % alignment)
    return head + data


def gpt2_metadata(n_ctx: int, n_embd: int, n_head: int, n_layer: int) -> list:
    return [
        ("general.architecture", STRING, "gpt2"),
        ("gpt2.context_length", U32, n_ctx),
        ("gpt2.embedding_length", U32, n_embd),
        ("gpt2.feed_forward_length", U32, 4 * n_embd),
        ("gpt2.attention.head_count", U32, n_head),
        ("gpt2.block_count", U32, n_layer),
        ("gpt2.attention.layer_norm_epsilon", F32_T, 1e-5),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.tokens", ARRAY, (STRING, ["a", "b"])),
    ]


def q8_0_raw(w: np.ndarray) -> bytes:
    """ggml's reference q8_0 (quantize_row_q8_0_ref): d = absmax / 127, qs = round(w / d)."""
    N, K = w.shape
    blocks = w.reshape(N, K // 32, 32).astype(np.float32)
    d = np.abs(blocks).max(-1, keepdims=True) / 127
    inv = np.divide(1, d, out=np.zeros_like(d), where=d != 0)
    qs = np.trunc(blocks * inv + np.copysign(0.5, blocks)).astype(np.int8)  # half away from 0
    out = np.empty((N, K // 32, 34), np.uint8)
    out[:, :, :2] = d.astype("<f2").view(np.uint8)
    out[:, :, 2:] = qs.view(np.uint8)
    return out.tobytes()


def gpt2_tensors(n_vocab: int, n_ctx: int, n_embd: int, n_layer: int, seed: int = 0,
                 q8: bool = False) -> list:  # fmt: skip
    """Every tensor of a GPT-2 in llama.cpp's names and shapes (ne order), random, F32 (the
    matrices Q8_0 with `q8`)."""
    rng = np.random.default_rng(seed)
    C = n_embd

    def mat(name, n_out, k):
        w = (rng.standard_normal((n_out, k)) * 0.1).astype(np.float32)  # (N, K)
        if q8:
            return (name, [k, n_out], Q8_0, q8_0_raw(w))
        return (name, [k, n_out], F32, w.tobytes())

    def vec(name, n, fill=None):
        v = np.full(n, fill, np.float32) if fill is not None else rng.standard_normal(n) * 0.05
        return (name, [n], F32, v.astype(np.float32).tobytes())

    out = [mat("token_embd.weight", n_vocab, C)]
    w = (rng.standard_normal((n_ctx, C)) * 0.1).astype(np.float32)
    out.append(("position_embd.weight", [C, n_ctx], F32, w.tobytes()))
    for i in range(n_layer):
        p = f"blk.{i}."
        out += [vec(p + "attn_norm.weight", C, 1.0), vec(p + "attn_norm.bias", C)]
        out += [mat(p + "attn_qkv.weight", 3 * C, C), vec(p + "attn_qkv.bias", 3 * C)]
        out += [mat(p + "attn_output.weight", C, C), vec(p + "attn_output.bias", C)]
        out += [vec(p + "ffn_norm.weight", C, 1.0), vec(p + "ffn_norm.bias", C)]
        out += [mat(p + "ffn_up.weight", 4 * C, C), vec(p + "ffn_up.bias", 4 * C)]
        out += [mat(p + "ffn_down.weight", C, 4 * C), vec(p + "ffn_down.bias", C)]
    out += [vec("output_norm.weight", C, 1.0), vec("output_norm.bias", C)]
    return out
