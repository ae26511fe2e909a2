"""GPT-2 in numpy: the forward pass (batched, with a KV cache and padding masks) and, beside
each piece of it, its backward pass.

Shape legend: B = batch, T = new tokens this call, P = tokens already in the cache,
C = n_embd, NH = n_head, hs = C // NH, V = n_vocab, L = n_layer.

Params are a nested dict with OpenAI's checkpoint names:
    {"wte": (V, C), "wpe": (n_ctx, C), "ln_f": {"g": (C,), "b": (C,)},
     "blocks": [{"ln_1": {g, b}, "attn": {"c_attn": {w: (C, 3C), b: (3C,)},
                                          "c_proj": {w: (C, C), b: (C,)}},
                 "ln_2": {g, b}, "mlp": {"c_fc": {w: (C, 4C), b: (4C,)},
                                         "c_proj": {w: (4C, C), b: (C,)}}}, ...]}
and each function takes the part it reads, unpacked into its signature.

Every piece is a pair, as the ops of `ref/ops.py` are: `<piece>_forward(...) -> (out, cache)`,
the cache holding what the backward needs, and `<piece>_backward(dout, cache, <its params>)
-> (dx, grads)`, grads nested like the piece's params ({"c_attn": {"w", "b"}, ...}).
`model_forward` / `model_backward` chain them over the whole model; `model_backward` flattens
the gradients to the layout's canonical names (`h0/attn/c_attn/w`, ...) that the optimizer uses.
`forward` is the inference pass (nothing kept for a backward), and `Model` holds a config,
params and ops: the model interface that generation, evaluation and the benchmarks use.

The ops (LayerNorm, GELU, attention, ...) come from `ops`, a module or namespace with the
functions of `ref/ops.py`; the default is the reference itself. Backends in `fast/` pass their
own, so a backend that provides the *_forward and *_backward ops runs and trains with them.
Linear layers go through `ref.lora.lora_linear_forward`, which adds a LoRA adapter's update
where a projection carries one (dropout only when `rng` is given, i.e. while training).
A quantized tree (ref/quant.py: `quantize_params`, weights stored in 16 or 8 bits, inference
only) runs through the same functions: its QWeights go to `ops.qlinear_forward`, the LM head
included (params["lm_head"]); activations and the KV cache stay float32.

Dropout, `Dropout(embd, attn, resid)` (GPT-2's embd_pdrop, attn_pdrop, resid_pdrop), also
only while training: when an `rng` is given and a rate is > 0. It sits where GPT-2 and "Build
a Large Language Model (From Scratch)" put it: on the embeddings' sum, on the attention
probabilities, and on each residual branch (the output of the attention's and the MLP's
c_proj, before it is added to the residual). Its masks and LoRA's come from the one `rng`, in
the order the forward meets them, each a `rng.random(shape, dtype=np.float32)`:
    embd (B, T, C); then in each layer: c_attn's LoRA (B, T, C), attn (B, NH, T, P+T),
    c_proj's LoRA (B, T, C), resid (B, T, C), c_fc's LoRA (B, T, C),
    mlp/c_proj's LoRA (B, T, 4C), resid (B, T, C)
where a rate of 0 (or a projection without an adapter with dropout) draws nothing: with every
model rate 0, LoRA's masks, and so the whole run, are those of a model without dropout.
The dropout op is the reference's (`ref.ops.dropout_forward`) whatever `ops` is, so every
numpy backend draws the same masks; the attention's goes through `ops.attention_forward(q, k,
v, key_mask, rate, rng)`, called with those two arguments only when it drops.

Padding: a batch of prompts of different lengths is left-padded; `mask` (B, T) is False on
padding. Each row's positions count only its real tokens, and no query sees a padding key, so
every row gives the same logits as when run alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ref import ops as ref_ops
from ref.config import GPT2Config
from ref.lora import lora_linear_backward, lora_linear_forward
from ref.quant import QWeight

TRAIN_MODES = ("all", "lora")  # every parameter, or the LoRA adapters alone


@dataclass(frozen=True)
class Dropout:
    """Model dropout rates, each in [0, 1): on the embeddings, the attention probabilities and
    the residual branches (GPT-2 trained with 0.1 for each; the default, 0, drops nothing)."""

    embd: float = 0.0
    attn: float = 0.0
    resid: float = 0.0

    def __post_init__(self):
        for name in ("embd", "attn", "resid"):
            ref_ops.check_rate(getattr(self, name), f"{name} dropout")


NO_DROPOUT = Dropout()


class ContextLengthError(ValueError):
    """A sequence would exceed the model's context (n_ctx positions)."""


# ---------------------------------------------------------------------------------------------
# the KV cache, and where each new token sits


KV_DTYPES = ("float32", "float16")  # what a KVCache can store its keys and values as


class KVCache:
    """Keys and values of every layer for the tokens seen so far.

    k, v: (L, B, NH, capacity, hs); mask: (B, capacity) bool, False on padding;
    n_real: (B,) real tokens per row, which gives the next position of each row.
    dtype "float16" stores k and v in half the bytes (llama.cpp's default cache type): each
    key and value is rounded to the nearest float16 when it is stored (numpy's cast, ties to
    even; beyond +-65504 it becomes inf, and the attention then gives NaN) and read back as
    that value exactly, so the attention still computes in float32, on the rounded keys and
    values (relative error at most 2^-11 per element). Only the cache rounds: a forward
    without one sees float32 keys. Accuracy against float32: tests/test_kv_cache.py.
    The bookkeeping (mask, n_real, length) is numpy for every backend; a backend's cache
    (fast/torch/model.py) overrides `_zeros` and `_take` to keep k and v on its device.
    """

    def __init__(
        self, cfg: GPT2Config, batch: int, capacity: int | None = None, dtype: str = "float32"
    ):
        capacity = cfg.n_ctx if capacity is None else capacity
        if not 1 <= capacity <= cfg.n_ctx:
            raise ContextLengthError(f"KV cache capacity {capacity} must be in [1, {cfg.n_ctx}]")
        if dtype not in KV_DTYPES:
            raise ValueError(f"KV cache dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        self.kv_dtype = dtype
        shape = (cfg.n_layer, batch, cfg.n_head, capacity, cfg.head_size)
        self.k = self._zeros(shape)
        self.v = self._zeros(shape)
        self.mask = np.zeros((batch, capacity), dtype=bool)
        self.n_real = np.zeros(batch, dtype=np.int64)
        self.length = 0  # P: slots filled (the same for every row)

    def _zeros(self, shape: tuple) -> np.ndarray:
        return np.zeros(shape, self.kv_dtype)

    def _take(self, kv: np.ndarray, rows: np.ndarray) -> np.ndarray:
        # fancy indexing copies, so repeated rows never share memory; on axis 1 it also leaves
        # a strided layout, so the result is made contiguous again for the attention kernels
        return np.ascontiguousarray(kv[:, rows])  # (L, len(rows), NH, capacity, hs)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def select(self, rows) -> None:
        """Keep (and reorder, or repeat) the rows `rows`: beam search and finished rows."""
        rows = np.asarray(rows, dtype=np.int64)
        self.k = self._take(self.k, rows)
        self.v = self._take(self.v, rows)
        self.mask = self.mask[rows]  # (len(rows), capacity)
        self.n_real = self.n_real[rows]  # (len(rows),)


def positions(mask: np.ndarray, n_before: np.ndarray) -> np.ndarray:
    """Position of each new token: real tokens before it in its row (padding gets 0).

    mask (B, T) bool, n_before (B,) -> pos (B, T) int64.
    """
    pos = n_before[:, None] + np.cumsum(mask, axis=1) - 1  # (B, T)
    return np.maximum(pos, 0)


@dataclass
class Step:
    """Where the T new tokens of a forward go: P slots already filled, their mask (B, T), their
    positions (B, T), and the keys each query may see, key_mask (B, P+T) (None: all of them)."""

    P: int
    mask: np.ndarray
    pos: np.ndarray
    key_mask: np.ndarray | None


def plan_step(cfg: GPT2Config, B: int, T: int, mask, cache: KVCache | None) -> Step:
    """Check a forward of (B, T) new tokens against the context and the cache, and place them.

    Shared by every model (numpy and torch): masks and positions are small host arrays.
    """
    mask = np.ones((B, T), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
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
    return Step(P, mask, pos, key_mask)


def commit_step(cache: KVCache | None, step: Step) -> None:
    """Record the new tokens in the cache, once the forward has succeeded (a forward that
    raised leaves the cache as it was; its keys beyond `length` are never read)."""
    if cache is None:
        return
    B, T = step.mask.shape
    cache.mask[:, step.P : step.P + T] = step.mask
    cache.n_real = cache.n_real + step.mask.sum(axis=1)
    cache.length = step.P + T


def as_ids(ids, what: str = "forward(): ids") -> np.ndarray:
    """Token ids as users pass them (a (B, T) array or nested list; a 1-D array or list is one
    row) -> (B, T) int64, or a ValueError that names the call and the argument."""
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[None, :]  # (1, T)
    if a.ndim != 2:
        raise ValueError(f"{what} must have shape (B, T) or (T,), got shape {a.shape}")
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"{what} must be integer token ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def check_ids(ids: np.ndarray, n_vocab: int) -> None:
    """Token ids must lie in [0, n_vocab): numpy would read wte[-1] for id -1 without a word."""
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = ids[(ids < 0) | (ids >= n_vocab)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {n_vocab})")


# ---------------------------------------------------------------------------------------------
# attention: x + c_proj(attention(split(c_attn(x)))), with the keys of earlier tokens cached


def attn_forward(
    x, c_attn, c_proj, *, n_head, ops, kv, key_mask, rng=None, dropout: Dropout = NO_DROPOUT
):
    """Causal multi-head self-attention over the new tokens and the cached ones.

    x (B, T, C) -> (B, T, C); kv = (k_cache, v_cache, P) with caches (B, NH, capacity, hs),
    or None; key_mask (B, P+T) bool or None. With `rng`: dropout.attn on the attention
    probabilities, dropout.resid on the output.
    """
    B, T, C = x.shape
    hs = C // n_head
    qkv, c_attn_cache = lora_linear_forward(x, c_attn, ops, rng)  # (B, T, 3C)
    qkv = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, NH, T, hs)
    if kv is not None:
        k_cache, v_cache, P = kv
        ops.kv_store(k_cache, P, k)  # k_cache[:, :, P : P + T] = k; a float16 cache rounds
        ops.kv_store(v_cache, P, v)  # them here (KVCache)
        k, v = k_cache[:, :, : P + T], v_cache[:, :, : P + T]  # (B, NH, P+T, hs)
    if rng is not None and dropout.attn > 0.0:
        y, att_cache = ops.attention_forward(q, k, v, key_mask, dropout.attn, rng)
    else:  # the call every backend's attention takes (dropout arguments only when dropping)
        y, att_cache = ops.attention_forward(q, k, v, key_mask)  # (B, NH, T, hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # (B, T, C)
    out, c_proj_cache = lora_linear_forward(y, c_proj, ops, rng)  # (B, T, C)
    out, drop_cache = ref_ops.dropout_forward(out, dropout.resid, rng)  # (B, T, C)
    return out, (c_attn_cache, att_cache, c_proj_cache, drop_cache, n_head)


def attn_backward(dout, cache, c_attn, c_proj, *, ops, train):
    """dout (B, T, C) -> dx (B, T, C), {"c_attn": ..., "c_proj": ...}; undoes attn_forward
    line by line, last line first."""
    c_attn_cache, att_cache, c_proj_cache, drop_cache, n_head = cache
    B, T, C = dout.shape
    hs = C // n_head
    # out = drop(c_proj(y))
    dout = ref_ops.dropout_backward(dout, drop_cache)  # (B, T, C)
    dy, g_proj = lora_linear_backward(dout, c_proj_cache, c_proj, ops, train)  # (B, T, C)
    # y = attention(q, k, v).transpose(0, 2, 1, 3).reshape(B, T, C), its dropout in att_cache
    dy = dy.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
    dq, dk, dv = ops.attention_backward(dy, att_cache)  # each (B, NH, T, hs)
    # q, k, v = c_attn(x).reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    dqkv = np.stack([dq, dk, dv])  # (3, B, NH, T, hs)
    dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)  # (B, T, 3C)
    dx, g_attn = lora_linear_backward(dqkv, c_attn_cache, c_attn, ops, train)  # (B, T, C)
    return dx, {"c_attn": g_attn, "c_proj": g_proj}


# ---------------------------------------------------------------------------------------------
# MLP: c_proj(gelu(c_fc(x))), the c_fc bias fused into the GELU (the bias_gelu op)


def mlp_forward(x, c_fc, c_proj, *, ops, rng=None, dropout: Dropout = NO_DROPOUT):
    """x (B, T, C) -> (B, T, C): expand to 4C, GELU, project back (with `rng`: then
    dropout.resid)."""
    h, c_fc_cache = lora_linear_forward(x, c_fc, ops, rng, bias=False)  # (B, T, 4C)
    h, gelu_cache = ops.bias_gelu_forward(h, c_fc["b"])  # (B, T, 4C)
    out, c_proj_cache = lora_linear_forward(h, c_proj, ops, rng)  # (B, T, C)
    out, drop_cache = ref_ops.dropout_forward(out, dropout.resid, rng)  # (B, T, C)
    return out, (c_fc_cache, gelu_cache, c_proj_cache, drop_cache)


def mlp_backward(dout, cache, c_fc, c_proj, *, ops, train):
    """dout (B, T, C) -> dx (B, T, C), {"c_fc": ..., "c_proj": ...}."""
    c_fc_cache, gelu_cache, c_proj_cache, drop_cache = cache
    # out = drop(c_proj(h))
    dout = ref_ops.dropout_backward(dout, drop_cache)  # (B, T, C)
    dh, g_proj = lora_linear_backward(dout, c_proj_cache, c_proj, ops, train)  # (B, T, 4C)
    # h = gelu(x @ w_fc + b_fc): the bias's gradient comes from the fused op
    dh, db_fc = ops.bias_gelu_backward(dh, gelu_cache)  # (B, T, 4C), (4C,)
    dx, g_fc = lora_linear_backward(dh, c_fc_cache, c_fc, ops, train)  # (B, T, C)
    if train == "all":
        g_fc["b"] = db_fc
    return dx, {"c_fc": g_fc, "c_proj": g_proj}


# ---------------------------------------------------------------------------------------------
# LayerNorm with its params: the gradients of g and b count only in full training


def ln_forward(x, g, b, *, eps, ops):
    return ops.layernorm_forward(x, g, b, eps)


def ln_backward(dout, cache, *, ops, train):
    dx, dg, db = ops.layernorm_backward(dout, cache)
    return dx, ({"g": dg, "b": db} if train == "all" else {})


# ---------------------------------------------------------------------------------------------
# the transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (pre-LayerNorm residuals)


def block_forward(
    x, ln_1, attn, ln_2, mlp, *, n_head, eps, ops, kv, key_mask, rng=None,
    dropout: Dropout = NO_DROPOUT,
):  # fmt: skip
    """x (B, T, C) -> (B, T, C)."""
    h, ln_1_cache = ln_forward(x, **ln_1, eps=eps, ops=ops)  # (B, T, C)
    a, attn_cache = attn_forward(
        h, **attn, n_head=n_head, ops=ops, kv=kv, key_mask=key_mask, rng=rng, dropout=dropout
    )  # (B, T, C)
    x = x + a  # (B, T, C)
    h, ln_2_cache = ln_forward(x, **ln_2, eps=eps, ops=ops)  # (B, T, C)
    m, mlp_cache = mlp_forward(h, **mlp, ops=ops, rng=rng, dropout=dropout)  # (B, T, C)
    return x + m, (ln_1_cache, attn_cache, ln_2_cache, mlp_cache)


def block_backward(dout, cache, ln_1, attn, ln_2, mlp, *, ops, train):
    """dout (B, T, C) -> dx (B, T, C), grads nested like the block's params. Each residual
    passes dout through unchanged and adds its branch's gradient."""
    ln_1_cache, attn_cache, ln_2_cache, mlp_cache = cache
    # out = x_mid + mlp(ln_2(x_mid))
    dh, g_mlp = mlp_backward(dout, mlp_cache, **mlp, ops=ops, train=train)
    dh, g_ln_2 = ln_backward(dh, ln_2_cache, ops=ops, train=train)
    dx = dout + dh  # (B, T, C)
    # x_mid = x + attn(ln_1(x))
    dh, g_attn = attn_backward(dx, attn_cache, **attn, ops=ops, train=train)
    dh, g_ln_1 = ln_backward(dh, ln_1_cache, ops=ops, train=train)
    return dx + dh, {"ln_1": g_ln_1, "attn": g_attn, "ln_2": g_ln_2, "mlp": g_mlp}


# ---------------------------------------------------------------------------------------------
# the whole model: embeddings, L blocks, the final LayerNorm, the LM head (tied to wte)


def _forward(params, ids, cfg, *, cache, mask, last_only, ops, rng, dropout, keep: bool):
    """The forward pass; with keep=True also the caches of every piece, for model_backward."""
    B, T = ids.shape
    check_ids(ids, cfg.n_vocab)
    dropout = NO_DROPOUT if dropout is None else dropout
    step = plan_step(cfg, B, T, mask, cache)
    x, emb_cache = ops.embedding_forward(ids, step.pos, params["wte"], params["wpe"])
    x, emb_drop = ref_ops.dropout_forward(x, dropout.embd, rng)  # (B, T, C)
    block_caches = []
    for layer, block in enumerate(params["blocks"]):
        kv = None if cache is None else (cache.k[layer], cache.v[layer], step.P)
        x, bc = block_forward(
            x, **block, n_head=cfg.n_head, eps=cfg.eps, ops=ops, kv=kv,
            key_mask=step.key_mask, rng=rng, dropout=dropout,
        )  # fmt: skip
        if keep:
            block_caches.append(bc)
    commit_step(cache, step)
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    x, ln_f_cache = ln_forward(x, **params["ln_f"], eps=cfg.eps, ops=ops)  # (B, T, C)
    B, T, C = x.shape
    # the LM head is tied to the token embedding (an untied one is params["lm_head"] (V, C)); one
    # 2-D matmul reads it once for all rows. A quantized model (ref/quant.py) stores the head
    # apart, as a QWeight (V, C).
    head = params.get("lm_head", params["wte"])  # (V, C)
    if isinstance(head, QWeight):
        logits = ops.qlinear_forward(x.reshape(B * T, C), head)  # (B*T, V)
    else:
        logits = x.reshape(B * T, C) @ head.T  # (B*T, V)
    logits = logits.reshape(B, T, -1)  # (B, T, V)
    acts = (emb_cache, emb_drop, block_caches, ln_f_cache, x) if keep else None
    return logits, acts


def forward(
    params: dict,
    ids: np.ndarray,
    cfg: GPT2Config,
    *,
    cache: KVCache | None = None,
    mask: np.ndarray | None = None,
    last_only: bool = False,
    ops=ref_ops,
    rng: np.random.Generator | None = None,
    dropout: Dropout | None = None,
) -> np.ndarray:
    """Logits (B, T, V) float32 for the tokens `ids` (B, T), continuing from `cache` if given.

    mask (B, T) bool: False on left padding (default: all real).
    last_only: return logits for the last position only, (B, 1, V); the LM head over all
        positions costs as much as several blocks, and generation needs only the last.
    rng: drives LoRA's dropout and the model's (`dropout`, None: none) while training; None
        (the default) means no dropout at all, whatever the rates.
    `cache` is updated in place.
    """
    logits, _ = _forward(
        params, ids, cfg, cache=cache, mask=mask, last_only=last_only, ops=ops, rng=rng,
        dropout=dropout, keep=False,
    )  # fmt: skip
    return logits


def model_forward(
    params: dict,
    ids: np.ndarray,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    rng: np.random.Generator | None = None,
    dropout: Dropout | None = None,
) -> tuple[np.ndarray, tuple]:
    """The training forward: (logits (B, T, V), the caches `model_backward` needs, dropout
    masks included)."""
    return _forward(
        params, ids, cfg, cache=None, mask=None, last_only=False, ops=ops, rng=rng,
        dropout=dropout, keep=True,
    )  # fmt: skip


def _flatten(grads: dict, prefix: str, out: dict[str, np.ndarray]) -> None:
    """Nested gradients -> the canonical flat names of weights.layout ("h0/attn/c_attn/w")."""
    for k, g in grads.items():
        if isinstance(g, dict):
            _flatten(g, f"{prefix}{k}/", out)
        else:
            out[prefix + k] = g


def model_backward(
    dlogits: np.ndarray,
    acts: tuple,
    params: dict,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    train: str = "all",
) -> dict[str, np.ndarray]:
    """dlogits (B, T, V): the loss's gradient w.r.t. the logits of `model_forward`.

    Returns {canonical name: gradient} for the parameters that `train` selects: every tensor
    ("all", full finetuning), or the adapters alone ("lora"), skipping the work the frozen
    weights would need (their dw, db, and the embeddings' gradients).
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    if isinstance(params.get("lm_head"), QWeight):
        raise ValueError("a quantized model is for inference only: train a float32 model")
    emb_cache, emb_drop, block_caches, ln_f_cache, x_final = acts
    V, C = dlogits.shape[-1], x_final.shape[-1]
    grads: dict[str, np.ndarray] = {}
    # logits = x_final @ head.T, head = wte (tied) or lm_head
    untied = "lm_head" in params
    dx = dlogits @ params["lm_head" if untied else "wte"]  # (B, T, C)
    if train == "all":
        dhead = dlogits.reshape(-1, V).T @ x_final.reshape(-1, C)  # (V, C)
    # x_final = ln_f(x)
    dx, g_ln_f = ln_backward(dx, ln_f_cache, ops=ops, train=train)  # (B, T, C)
    for i in reversed(range(cfg.n_layer)):
        dx, g_block = block_backward(
            dx, block_caches[i], **params["blocks"][i], ops=ops, train=train
        )  # (B, T, C)
        _flatten(g_block, f"h{i}/", grads)
    if train == "all":
        _flatten({"ln_f": g_ln_f}, "", grads)
        # x = drop(wte[ids] + wpe[pos])
        dx = ref_ops.dropout_backward(dx, emb_drop)  # (B, T, C)
        dwte, dwpe = ops.embedding_backward(dx, emb_cache)
        if untied:
            grads["wte"], grads["lm_head"] = dwte, dhead  # (V, C) each
        else:
            grads["wte"] = dwte + dhead  # (V, C)
        grads["wpe"] = dwpe  # (n_ctx, C)
    return grads


# ---------------------------------------------------------------------------------------------
# the loss


def loss_and_grads(
    params: dict,
    ids: np.ndarray,
    targets: np.ndarray,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    train: str = "all",
    rng: np.random.Generator | None = None,
    dropout: Dropout | None = None,
    ignore_index: int = -100,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of `targets` (B, T) given `ids` (B, T) and its gradients.

    Targets equal to `ignore_index` (padding, masked prompts) do not count. `rng` drives LoRA's
    dropout and the model's (`dropout`); the backward uses the masks the forward drew.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    B, T = ids.shape
    logits, acts = model_forward(params, ids, cfg, ops=ops, rng=rng, dropout=dropout)
    V = logits.shape[-1]
    loss, ce_cache = ops.crossentropy_forward(
        logits.reshape(B * T, V), targets.reshape(B * T), ignore_index
    )
    del logits  # the cross-entropy cache holds it; free the name early on big vocabularies
    dlogits = ops.crossentropy_backward(np.float32(1.0), ce_cache).reshape(B, T, V)
    del ce_cache
    grads = model_backward(dlogits, acts, params, cfg, ops=ops, train=train)
    return float(loss), grads


def loss_only(
    params: dict,
    ids: np.ndarray,
    targets: np.ndarray,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    ignore_index: int = -100,
) -> tuple[float, int]:
    """(mean cross-entropy, number of counted targets) without keeping caches: validation."""
    B, T = ids.shape
    logits = forward(params, ids, cfg, ops=ops)  # (B, T, V)
    tgt = targets.reshape(B * T)
    loss, _ = ops.crossentropy_forward(logits.reshape(B * T, -1), tgt, ignore_index)
    return float(loss), int((tgt != ignore_index).sum())


# ---------------------------------------------------------------------------------------------
# the model interface


class Model:
    """GPT-2 on a numpy backend: config, params and the ops to run them with.

    The one model interface (the torch models of fast/torch/model.py offer the same):
    `cfg`, `new_cache(batch, capacity)` -> a cache with `select(rows)`, and
    `forward(ids, cache=None, mask=None, last_only=False)` -> numpy float32 logits.
    `ref.generate`, `ref.evaluate`, the trainers' samples and the benchmarks all take it.
    """

    def __init__(self, cfg: GPT2Config, params: dict, ops=ref_ops, kv_dtype: str = "float32"):
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.cfg = cfg
        self.params = params
        self.ops = ops
        self.kv_dtype = kv_dtype  # what new_cache stores keys and values as (KVCache)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Model({c.n_params() / 1e6:.1f}M parameters: n_layer={c.n_layer}, "
            f"n_head={c.n_head}, n_embd={c.n_embd}, n_ctx={c.n_ctx}, n_vocab={c.n_vocab}; "
            f"ops {getattr(self.ops, '__name__', self.ops)}; KV cache {self.kv_dtype})"
        )

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, capacity, self.kv_dtype)

    def forward(
        self,
        ids,
        cache: KVCache | None = None,
        mask: np.ndarray | None = None,
        last_only: bool = False,
    ) -> np.ndarray:
        """ids (B, T) int (or (T,), one row) -> logits (B, T, V) float32 (B, 1, V with
        last_only)."""
        return forward(
            self.params, as_ids(ids), self.cfg, cache=cache, mask=mask, last_only=last_only,
            ops=self.ops,
        )  # fmt: skip
