"""GPT-2's forward pass in numpy: batched, with a KV cache and padding masks.

Shape legend: B = batch, T = new tokens this call, P = tokens already in the cache,
C = n_embd, NH = n_head, hs = C // NH, V = n_vocab, L = n_layer.

Params are a nested dict with OpenAI's checkpoint names:
    {"wte": (V, C), "wpe": (n_ctx, C), "ln_f": {"g": (C,), "b": (C,)},
     "blocks": [{"ln_1": {g, b}, "attn": {"c_attn": {w: (C, 3C), b: (3C,)},
                                          "c_proj": {w: (C, C), b: (C,)}},
                 "ln_2": {g, b}, "mlp": {"c_fc": {w: (C, 4C), b: (4C,)},
                                         "c_proj": {w: (4C, C), b: (C,)}}}, ...]}

The ops (LayerNorm, GELU, attention, ...) come from `ops`, a module or namespace with the
functions of `ref/ops.py`; the default is the reference itself. Backends in `fast/` pass
their own. Linear layers are plain matmuls (BLAS) in every numpy backend.

LoRA (ref/lora.py): a projection dict may carry an adapter, {"w", "b", "lora": {...}}; `_linear`
adds its low-rank update, with dropout only when `forward` is given an `rng` (training).

Padding: a batch of prompts of different lengths is left-padded; `mask` (B, T) is False on
padding. Each row's positions count only its real tokens, and no query sees a padding key, so
every row gives the same logits as when run alone.
"""

from __future__ import annotations

import numpy as np

from ref import ops as ref_ops
from ref.config import GPT2Config
from ref.lora import lora_forward


class ContextLengthError(ValueError):
    """A sequence would exceed the model's context (n_ctx positions)."""


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    k, v: (L, B, NH, capacity, hs); mask: (B, capacity) bool, False on padding;
    n_real: (B,) real tokens per row, which gives the next position of each row.
    """

    def __init__(self, cfg: GPT2Config, batch: int, capacity: int | None = None):
        capacity = cfg.n_ctx if capacity is None else capacity
        if not 1 <= capacity <= cfg.n_ctx:
            raise ContextLengthError(f"KV cache capacity {capacity} must be in [1, {cfg.n_ctx}]")
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, cfg.head_size)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.mask = np.zeros((batch, capacity), dtype=bool)
        self.n_real = np.zeros(batch, dtype=np.int64)
        self.length = 0  # P: slots filled (the same for every row)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def select(self, rows: np.ndarray) -> None:
        """Keep (and reorder, or repeat) the rows `rows`: beam search and finished rows.
        Fancy indexing copies, so repeated rows never share memory; on axis 1 it also leaves
        a strided layout, so k and v are made contiguous again for the attention kernels."""
        self.k = np.ascontiguousarray(self.k[:, rows])  # (L, len(rows), NH, capacity, hs)
        self.v = np.ascontiguousarray(self.v[:, rows])
        self.mask = self.mask[rows]  # (len(rows), capacity)
        self.n_real = self.n_real[rows]  # (len(rows),)


def positions(mask: np.ndarray, n_before: np.ndarray) -> np.ndarray:
    """Position of each new token: real tokens before it in its row (padding gets 0).

    mask (B, T) bool, n_before (B,) -> pos (B, T) int64.
    """
    pos = n_before[:, None] + np.cumsum(mask, axis=1) - 1  # (B, T)
    return np.maximum(pos, 0)


def _linear(x: np.ndarray, p: dict, ops, tape: dict | None, name: str, rng=None) -> np.ndarray:
    """x @ w + b, plus the LoRA update when the projection carries an adapter (ref/lora.py);
    `rng` drives the adapter's dropout while training."""
    out, cache = ops.linear_forward(x, p["w"], p["b"])
    if tape is not None:
        tape[name] = cache
    if "lora" in p:
        delta, lcache = lora_forward(x, p["lora"], rng)
        out = out + delta
        if tape is not None:
            tape[name + "/lora"] = lcache
    return out


def _run(op, tape: dict | None, name: str, *args):
    out, cache = op(*args)
    if tape is not None:
        tape[name] = cache
    return out


def attention_block(x, c_attn, c_proj, *, n_head, ops, kv, key_mask, tape, rng=None):
    """Causal multi-head self-attention over the new tokens and the cached ones.

    x (B, T, C); kv = (k_cache, v_cache, P) with caches (B, NH, capacity, hs), or None.
    """
    B, T, C = x.shape
    hs = C // n_head
    qkv = _linear(x, c_attn, ops, tape, "c_attn", rng)  # (B, T, 3C)
    qkv = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, NH, T, hs)
    if kv is not None:
        k_cache, v_cache, P = kv
        k_cache[:, :, P : P + T] = k
        v_cache[:, :, P : P + T] = v
        k, v = k_cache[:, :, : P + T], v_cache[:, :, : P + T]  # (B, NH, P+T, hs)
    y = _run(ops.attention_forward, tape, "attention", q, k, v, key_mask)  # (B, NH, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
    return _linear(y, c_proj, ops, tape, "c_proj", rng)  # (B, T, C)


def mlp_block(x, c_fc, c_proj, *, ops, tape, rng=None):
    """x (B, T, C) -> (B, T, C): expand to 4C, GELU, project back."""
    h = _linear(x, c_fc, ops, tape, "c_fc", rng)  # (B, T, 4C)
    h = _run(ops.gelu_forward, tape, "gelu", h)  # (B, T, 4C)
    return _linear(h, c_proj, ops, tape, "mlp_c_proj", rng)  # (B, T, C)


def transformer_block(x, ln_1, attn, ln_2, mlp, *, n_head, eps, ops, kv, key_mask, tape, rng=None):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    h = _run(ops.layernorm_forward, tape, "ln_1", x, ln_1["g"], ln_1["b"], eps)  # (B, T, C)
    x = x + attention_block(
        h, **attn, n_head=n_head, ops=ops, kv=kv, key_mask=key_mask, tape=tape, rng=rng
    )  # (B, T, C)
    h = _run(ops.layernorm_forward, tape, "ln_2", x, ln_2["g"], ln_2["b"], eps)  # (B, T, C)
    return x + mlp_block(h, **mlp, ops=ops, tape=tape, rng=rng)  # (B, T, C)


def check_ids(ids: np.ndarray, n_vocab: int) -> None:
    """Token ids must lie in [0, n_vocab): numpy would read wte[-1] for id -1 without a word."""
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = ids[(ids < 0) | (ids >= n_vocab)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")


def forward(
    params: dict,
    ids: np.ndarray,
    cfg: GPT2Config,
    *,
    cache: KVCache | None = None,
    mask: np.ndarray | None = None,
    last_only: bool = False,
    ops=ref_ops,
    tape: dict | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Logits for the tokens `ids` (B, T), continuing from `cache` if one is given.

    mask (B, T) bool: False on left padding (default: all real).
    last_only: return logits for the last position only, (B, 1, V); the LM head over all
        positions costs as much as several blocks, and generation needs only the last.
    tape: a dict that receives every op's cache, for the backward pass (training).
    rng: drives LoRA dropout while training (ref/lora.py); None (the default) means no dropout.
    Returns logits (B, T, V) float32. `cache` is updated in place.
    """
    B, T = ids.shape
    check_ids(ids, cfg.n_vocab)
    if mask is None:
        mask = np.ones((B, T), dtype=bool)
    if mask.shape != (B, T):
        raise ValueError(f"mask has shape {mask.shape}, expected that of ids {(B, T)}")
    if cache is None:
        P, n_before, key_mask = 0, np.zeros(B, np.int64), mask  # key_mask (B, T)
        limit, what = cfg.n_ctx, "the model's context"
    else:
        if cache.n_real.shape != (B,):
            raise ValueError(f"ids have {B} rows but the KV cache holds {len(cache.n_real)}")
        P, n_before = cache.length, cache.n_real
        key_mask = np.concatenate([cache.mask[:, :P], mask], axis=1)  # (B, P+T)
        limit, what = cache.capacity, "the KV cache"
    # a row's position never passes its slot (P + t), so fitting the slots fits wpe too
    if P + T > limit:
        raise ContextLengthError(f"{P + T} tokens exceed {what} of {limit} positions")
    pos = positions(mask, n_before)  # (B, T)
    if key_mask.all():
        key_mask = None  # nothing to hide: let the attention op take its fast path

    x = _run(ops.embedding_forward, tape, "embedding", ids, pos, params["wte"], params["wpe"])
    blocks_tape = [] if tape is not None else None
    shared = {"n_head": cfg.n_head, "eps": cfg.eps, "ops": ops, "key_mask": key_mask, "rng": rng}
    for layer, block in enumerate(params["blocks"]):
        kv = None if cache is None else (cache.k[layer], cache.v[layer], P)
        bt = {} if tape is not None else None
        x = transformer_block(x, **block, **shared, kv=kv, tape=bt)  # (B, T, C)
        if tape is not None:
            blocks_tape.append(bt)
    if cache is not None:  # only now: a forward that raised leaves the cache as it was
        cache.mask[:, P : P + T] = mask
        cache.n_real = n_before + mask.sum(axis=1)
        cache.length = P + T
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    x = _run(
        ops.layernorm_forward, tape, "ln_f", x, params["ln_f"]["g"], params["ln_f"]["b"], cfg.eps
    )  # (B, T, C)
    if tape is not None:
        tape["blocks"] = blocks_tape
        tape["x_final"] = x
    B, T, C = x.shape
    # the LM head is tied to the token embedding; one 2-D matmul reads wte once for all rows
    logits = x.reshape(B * T, C) @ params["wte"].T  # (B*T, V)
    return logits.reshape(B, T, -1)  # (B, T, V)
