"""A batch-invariant decode step: R sequences, each with its own KV cache, one token each.

Shape legend: R = rows decoded together, C = n_embd, NH = n_head, hs = C // NH,
V = n_vocab, K = a linear's input width, N = its output width, cap = a row's cache capacity.

Continuous batching (gpt2/serve/) puts requests that arrived at different times into one
decode step, and a request's tokens must not depend on which others shared its steps. A
batched float32 forward does not give that: BLAS picks different kernels and blockings for
different M (a gemv for one row, a gemm for several), so row r's bits change with the rows
beside it; a shared left-padded cache puts a row's keys at offsets that depend on the others.
So here:
  * every row keeps its own cache (`ref.model.KVCache` of batch 1): its keys sit at the same
    offsets whatever else runs, and its attention is computed on that cache alone;
  * every op that is not a linear (LayerNorm, attention, bias + GELU) is called on one row at
    a time, with the shapes the row has when it runs alone (a kernel's vectorised body and
    remainder loop split a row the same way every time), unless the backend says its kernel
    is row-invariant: `ROW_INVARIANT` names such ops (one call on all the rows), and
    `attention_rows_forward` runs every row's attention on its own cache in one launch;
  * the linears go through `linear(x (R, K), w (K, N), b (N,) | None) -> (R, N)`, which must
    be row-invariant: out[r] depends on x[r], w and b only, bit for bit, for every R.
    `row_linear` below is the reference one (a mat-vec per row); gpt2/serve/engine.py has a
    faster Numba kernel with the same property.
The embedding gather and the residual adds are elementwise, hence row-invariant as they are.
The model is the one of `ref.model.forward`; only the order of the work differs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ref import ops as ref_ops
from ref.config import GPT2Config
from ref.model import ContextLengthError, KVCache, check_ids

Linear = Callable[[np.ndarray, np.ndarray, "np.ndarray | None"], np.ndarray]


def row_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """x (R, K) @ w (K, N) (+ b) one row at a time: row r is always the same (K,) @ (K, N)
    call, so its result cannot depend on R."""
    out = np.empty((x.shape[0], w.shape[1]), np.float32)  # (R, N)
    for r in range(x.shape[0]):
        out[r] = x[r] @ w if b is None else x[r] @ w + b
    return out


def _per_row(ops, name: str, x: np.ndarray, *args) -> np.ndarray:
    """ops.<name>(x[r:r+1], *args)[0] for each row: the op sees a batch of one, as when run
    alone; one call on all the rows where the backend lists the op in ROW_INVARIANT (its
    kernel computes each row the same way whatever the others, which its tests check)."""
    fn = getattr(ops, name)
    if name in getattr(ops, "ROW_INVARIANT", ()):
        return fn(x, *args)[0]
    out = np.empty_like(x)  # (R, ...)
    for r in range(x.shape[0]):
        y, _ = fn(x[r : r + 1], *args)
        out[r] = y[0]
    return out


def attention_rows(ops, q: np.ndarray, ks: list, vs: list, n: list[int]) -> np.ndarray:
    """Each row's query against its own cache: q (R, NH, hs), ks[r], vs[r] (NH, cap_r, hs),
    the first n[r] keys visible -> (R, NH, hs). The backend's `attention_rows_forward` (one
    launch for all the rows; it must be row-invariant) where it has one, else
    ops.attention_forward on each row alone."""
    if hasattr(ops, "attention_rows_forward"):
        return ops.attention_rows_forward(q, ks, vs, n)
    out = np.empty(q.shape, np.float32)  # (R, NH, hs)
    for r in range(q.shape[0]):
        y, _ = ops.attention_forward(
            q[r][None, :, None], ks[r][None, :, : n[r]], vs[r][None, :, : n[r]], None
        )  # (1, NH, 1, hs)
        out[r] = y[0, :, 0]
    return out


def decode_step(
    params: dict,
    cfg: GPT2Config,
    tokens: np.ndarray,
    caches: list[KVCache],
    *,
    ops=ref_ops,
    linear: Linear = row_linear,
    lm_head: np.ndarray | None = None,
) -> np.ndarray:
    """One new token per row -> next-token logits (R, V) float32; each cache gains a slot.

    tokens (R,) int; caches[r] a batch-1 KVCache holding row r's tokens so far (no padding).
    lm_head (C, V): the head's transpose as `linear` takes it (default: the view
    params.get("lm_head", params["wte"]).T; an untied head is params["lm_head"] (V, C)).
    `ops` supplies layernorm, attention and bias_gelu (a backend's, as in `ref.model`);
    `linear` must be row-invariant (module docstring).
    """
    tokens = np.asarray(tokens, dtype=np.int64)  # (R,)
    R = len(tokens)
    if R != len(caches):
        raise ValueError(f"{R} tokens for {len(caches)} caches")
    C, NH = cfg.n_embd, cfg.n_head
    hs = C // NH
    for r, c in enumerate(caches):
        if c.n_real.shape != (1,):
            raise ValueError(f"row {r}: decode_step needs a cache of batch 1, got {c.n_real}")
        if c.length + 1 > c.capacity:
            raise ContextLengthError(
                f"row {r}: {c.length + 1} tokens exceed its KV cache of {c.capacity} positions"
            )
    check_ids(tokens, cfg.n_vocab)
    P = [c.length for c in caches]  # slots filled per row
    n = [p + 1 for p in P]  # keys each row's query sees: its own tokens, this one included
    pos = np.array([c.n_real[0] for c in caches], dtype=np.int64)  # (R,) no padding: = P
    x = params["wte"][tokens] + params["wpe"][pos]  # (R, C)
    eps = cfg.eps
    for layer, blk in enumerate(params["blocks"]):
        attn, mlp = blk["attn"], blk["mlp"]
        h = _per_row(ops, "layernorm_forward", x, blk["ln_1"]["g"], blk["ln_1"]["b"], eps)
        qkv = linear(h, attn["c_attn"]["w"], attn["c_attn"]["b"]).reshape(R, 3, NH, hs)
        ks = [c.k[layer, 0] for c in caches]  # each (NH, cap, hs)
        vs = [c.v[layer, 0] for c in caches]
        for r in range(R):
            ks[r][:, P[r]] = qkv[r, 1]
            vs[r][:, P[r]] = qkv[r, 2]
        y = attention_rows(ops, qkv[:, 0], ks, vs, n).reshape(R, C)  # (R, C)
        x = x + linear(y, attn["c_proj"]["w"], attn["c_proj"]["b"])  # (R, C)
        h = _per_row(ops, "layernorm_forward", x, blk["ln_2"]["g"], blk["ln_2"]["b"], eps)
        f = linear(h, mlp["c_fc"]["w"], None)  # (R, 4C)
        f = _per_row(ops, "bias_gelu_forward", f, mlp["c_fc"]["b"])  # (R, 4C)
        x = x + linear(f, mlp["c_proj"]["w"], mlp["c_proj"]["b"])  # (R, C)
    for r, c in enumerate(caches):  # commit, as ref.model.commit_step does for a real token
        c.mask[0, P[r]] = True
        c.n_real = c.n_real + 1
        c.length = P[r] + 1
    x = _per_row(ops, "layernorm_forward", x, params["ln_f"]["g"], params["ln_f"]["b"], eps)
    head = params.get("lm_head", params["wte"]).T if lm_head is None else lm_head  # (C, V)
    return linear(x, head, None)  # (R, V)
