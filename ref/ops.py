"""GPT-2's ops as `*_forward` / `*_backward` pairs: the reference every backend is held to.

Shape legend (used in every file of the project):
    B = batch, T = time (sequence), C = channels (n_embd), NH = heads, hs = head size (C // NH),
    V = vocabulary, N = rows (B * T), Tq = query length, Tk = key length (Tk >= Tq).

The contract (see `fast/` for the other backends):
    out, cache = <op>_forward(...)      # cache holds exactly what backward needs; opaque
    grads      = <op>_backward(dout, cache)   # fresh arrays, never accumulated in place

Dropout's masks come from an explicit numpy Generator (`rng`), never a global one.

Everything is float32. Python float constants are "weak" in numpy >= 2 and keep float32;
numpy float64 scalars (np.sqrt(...), np.pi) would silently upcast, so constants are math.*.
"""

from __future__ import annotations

import math

import numpy as np

# a quantized model's linear layer (weights stored in 16 or 8 bits; inference only, no
# backward): its reference lives with the storage formats, and is an op of this contract too
from ref.quant import qlinear_forward  # noqa: F401

# ---------------------------------------------------------------------------------------------
# embeddings: x[b, t] = wte[ids[b, t]] + wpe[pos[b, t]]


def embedding_forward(ids: np.ndarray, pos: np.ndarray, wte: np.ndarray, wpe: np.ndarray):
    """ids, pos (B, T) int -> x (B, T, C)."""
    x = wte[ids] + wpe[pos]  # (B, T, C)
    return x, (ids, pos, wte.shape, wpe.shape)


def embedding_backward(dx: np.ndarray, cache):
    """Each row of wte / wpe receives the sum of dx over the positions that read it."""
    ids, pos, wte_shape, wpe_shape = cache
    dwte = np.zeros(wte_shape, dx.dtype)  # (V, C)
    dwpe = np.zeros(wpe_shape, dx.dtype)  # (n_ctx, C)
    np.add.at(dwte, ids.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    np.add.at(dwpe, pos.reshape(-1), dx.reshape(-1, dx.shape[-1]))
    return dwte, dwpe


# ---------------------------------------------------------------------------------------------
# LayerNorm over the last axis:
#   mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
#   xhat = (x - mean) * rstd,  out = xhat * g + b


def layernorm_forward(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-5):
    """x (..., C), g (C,), b (C,) -> out (..., C)."""
    mean = x.mean(axis=-1, keepdims=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(axis=-1, keepdims=True)  # (..., 1), biased variance as in OpenAI's code
    rstd = 1.0 / np.sqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    out = xhat * g + b  # (..., C)
    return out, (xhat, rstd, g)


def layernorm_backward(dout: np.ndarray, cache):
    """Backward of `out = xhat * g + b` and `xhat = (x - mean) * rstd`.

    dg = sum over rows of dout * xhat, db = sum over rows of dout. With dxhat = dout * g:
        dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    (the two means are over C: the gradient through mean and through rstd).
    """
    xhat, rstd, g = cache
    C = dout.shape[-1]
    dg = (dout * xhat).reshape(-1, C).sum(axis=0)  # (C,)
    db = dout.reshape(-1, C).sum(axis=0)  # (C,)
    dxhat = dout * g  # (..., C)
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )  # (..., C)
    return dx, dg, db


# ---------------------------------------------------------------------------------------------
# linear (OpenAI's "conv1d" with a (C_in, C_out) weight): out = x @ w + b, the bias optional
# (the MLP's first projection leaves its bias to the fused bias + GELU op)


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None):
    """x (..., Cin), w (Cin, Cout), b (Cout,) or None -> (..., Cout).

    One 2-D matmul: numpy multiplies a (B, T, Cin) stack by w slice by slice, which in a decode
    step (T = 1) reads all of w once per sequence; (B*T, Cin) @ w reads it once.
    """
    out = x.reshape(-1, x.shape[-1]) @ w  # (B*T, Cout)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], w.shape[1]), (x, w, b is not None)  # (..., Cout)


def linear_backward(dout: np.ndarray, cache):
    """dx = dout w^T;  dw = x^T dout and db = sum of dout, both over every row (B * T);
    db is None when the forward had no bias."""
    x, w, has_bias = cache
    dx = dout @ w.T  # (..., Cin)
    dw = x.reshape(-1, x.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])  # (Cin, Cout)
    db = dout.reshape(-1, dout.shape[-1]).sum(axis=0) if has_bias else None  # (Cout,)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# GELU, OpenAI's tanh form:
#   gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)

GELU_SCALE = math.sqrt(2.0 / math.pi)


def gelu_forward(x: np.ndarray):
    """x (..., 4C) -> (..., 4C), elementwise."""
    u = GELU_SCALE * (x + 0.044715 * (x * x * x))  # (..., 4C); float32 x**3 is far slower
    out = 0.5 * x * (1.0 + np.tanh(u))  # (..., 4C)
    return out, (x,)


def gelu_backward(dout: np.ndarray, cache):
    """d/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    (x,) = cache
    u = GELU_SCALE * (x + 0.044715 * (x * x * x))
    th = np.tanh(u)
    du_dx = GELU_SCALE * (1.0 + 3.0 * 0.044715 * (x * x))
    return dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_dx)


def bias_gelu_forward(x: np.ndarray, b: np.ndarray):
    """gelu(x + b): the MLP's first bias fused with its activation (x (..., 4C), b (4C,))."""
    out, (xb,) = gelu_forward(x + b)
    return out, (xb,)


def bias_gelu_backward(dout: np.ndarray, cache):
    """dx = gelu'(x + b) * dout; db = the sum of dx over every row."""
    dxb = gelu_backward(dout, cache)  # (..., 4C)
    return dxb, dxb.reshape(-1, dxb.shape[-1]).sum(axis=0)  # (4C,)


# ---------------------------------------------------------------------------------------------
# dropout, inverted (as GPT-2's and torch.nn.Dropout): out = x * keep / (1 - p),
#   keep ~ Bernoulli(1 - p) for each entry, so E[out] = x and evaluation needs no rescaling.
# Training only: without an rng (evaluation, generation) or at p = 0 it is the identity and
# draws nothing, so a run with every rate 0 is bit for bit a run without dropout.


def check_rate(p: float, what: str = "dropout") -> float:
    """p as a float, or a ValueError unless 0 <= p < 1 (p = 1 would divide by zero)."""
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{what} rate must be in [0, 1), got {p}")
    return p


def dropout_forward(x: np.ndarray, p: float, rng: np.random.Generator | None):
    """x (...) -> (out (...), cache); cache is None where nothing is dropped.

    The mask is drawn as LoRA's (ref/lora.py): one float32 uniform per entry of x in C order,
    `rng.random(x.shape, dtype=np.float32)`, the entry kept where it is >= p. The draw is
    float32 whatever x's dtype, so a float64 run (the gradient tests) drops the same entries.
    """
    if check_rate(p) == 0.0 or rng is None:
        return x, None
    mask = (rng.random(x.shape, dtype=np.float32) >= p).astype(x.dtype)  # (...) 0 or 1
    mask *= x.dtype.type(1.0 / (1.0 - p))  # (...) 0 or 1 / (1 - p)
    return x * mask, mask


def dropout_backward(dout: np.ndarray, cache):
    """out = x * mask, so dx = dout * mask (dout itself, unchanged, where nothing was dropped)."""
    return dout if cache is None else dout * cache


# ---------------------------------------------------------------------------------------------
# softmax over the last axis; rows that are entirely -inf (no visible key) give all zeros


def softmax(x: np.ndarray) -> np.ndarray:
    """x (..., Tk) -> probabilities (..., Tk); exp(x - max) cannot overflow."""
    m = x.max(axis=-1, keepdims=True)  # (..., 1)
    m = np.where(np.isfinite(m), m, 0.0)  # a fully masked row: exp(-inf) = 0 everywhere
    e = np.exp(x - m)  # (..., Tk)
    s = e.sum(axis=-1, keepdims=True)  # (..., 1)
    return e / np.where(s == 0.0, 1.0, s)  # (..., Tk)


# ---------------------------------------------------------------------------------------------
# causal attention of queries q against keys k and values v that may include a cache:
#   query i (0 <= i < Tq) sits at absolute position Tk - Tq + i and sees keys j <= Tk - Tq + i,
#   and only keys whose key_mask is True (padding is False).
#   att = softmax(q k^T / sqrt(hs) + mask),  out = drop(att) v
# A query that sees no key at all (a padding position) gets out = 0. drop is dropout on the
# attention probabilities (GPT-2's attn_pdrop), training only.


def causal_mask(Tq: int, Tk: int) -> np.ndarray:
    """(Tq, Tk) bool, True where query i may see key j."""
    return np.tril(np.ones((Tq, Tk), dtype=bool), k=Tk - Tq)


def attention_forward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    key_mask=None,
    dropout: float = 0.0,
    rng: np.random.Generator | None = None,
):
    """q (B, NH, Tq, hs), k and v (B, NH, Tk, hs), key_mask (B, Tk) bool or None
    -> out (B, NH, Tq, hs). k and v may be float16 (a 16-bit KV cache, ref.model.KVCache):
    they are widened to float32 exactly and the attention computed in float32.

    dropout, rng: dropout on the probabilities att (after the softmax, before att @ v), only
    when rng is given and dropout > 0; its mask is one `dropout_forward` draw of att's shape
    (B, NH, Tq, Tk), masked entries included (so the mask depends on the shapes alone).
    """
    Tq, hs = q.shape[-2:]
    Tk = k.shape[-2]
    assert Tk >= Tq, f"attention: Tk={Tk} must be >= Tq={Tq}"
    scale = 1.0 / math.sqrt(hs)
    if k.dtype == np.float16:  # a 16-bit KV cache: its values widened exactly
        k, v = k.astype(np.float32), v.astype(np.float32)  # (B, NH, Tk, hs)
    visible = causal_mask(Tq, Tk)  # (Tq, Tk)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]  # (B, 1, Tq, Tk)
    s = (q @ k.swapaxes(-1, -2)) * scale  # (B, NH, Tq, Tk)
    s = np.where(visible, s, -np.inf)
    att = softmax(s)  # (B, NH, Tq, Tk)
    att_d, drop = dropout_forward(att, dropout, rng)  # (B, NH, Tq, Tk); att itself if no drop
    out = att_d @ v  # (B, NH, Tq, hs)
    return out, (q, k, v, att, drop)


def kv_store(cache: np.ndarray, P: int, new: np.ndarray) -> None:
    """cache[:, :, P : P + T] = new, in place: the T new keys (or values) of a forward, new
    (B, NH, T, hs) float32, into a KV cache layer (B, NH, capacity, hs), float32 or float16
    (ref.model.KVCache: each value rounded to the nearest float16, ties to even). Inference
    only: nothing to undo in a backward."""
    cache[:, :, P : P + new.shape[2]] = new


def attention_backward(dout: np.ndarray, cache):
    """With s = q k^T * scale, att = softmax(s), att_d = att * mask (dropout; mask = 1 without
    it), out = att_d v:
    dv = att_d^T dout;  datt = (dout v^T) * mask;  ds = att * (datt - sum_j(datt * att));
    dq = ds k * scale;  dk = ds^T q * scale.  Masked entries have att = 0, so ds = 0 there.
    """
    q, k, v, att, drop = cache
    scale = 1.0 / math.sqrt(q.shape[-1])
    att_d = att if drop is None else att * drop  # (B, NH, Tq, Tk)
    dv = att_d.swapaxes(-1, -2) @ dout  # (B, NH, Tk, hs)
    datt = dropout_backward(dout @ v.swapaxes(-1, -2), drop)  # (B, NH, Tq, Tk)
    ds = att * (datt - (datt * att).sum(axis=-1, keepdims=True))  # (B, NH, Tq, Tk)
    dq = (ds @ k) * scale  # (B, NH, Tq, hs)
    dk = (ds.swapaxes(-1, -2) @ q) * scale  # (B, NH, Tk, hs)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# softmax cross-entropy, mean over the targets that are not `ignore_index`:
#   loss = mean_n (logsumexp(logits[n]) - logits[n, targets[n]])
#   dlogits[n] = (softmax(logits[n]) - onehot(targets[n])) / count, zero on ignored rows


def crossentropy_forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -100):
    """logits (N, V) float32, targets (N,) int -> loss (float32 scalar)."""
    valid = targets != ignore_index  # (N,)
    count = max(int(valid.sum()), 1)
    m = logits.max(axis=-1, keepdims=True)  # (N, 1)
    lse = np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)) + m  # (N, 1)
    safe = np.where(valid, targets, 0)  # (N,)
    picked = np.take_along_axis(logits, safe[:, None], axis=-1)  # (N, 1)
    losses = np.where(valid, (lse - picked)[:, 0], 0.0)  # (N,)
    # the dtype of logits throughout (float32 in the model; float64 lets tests check gradients)
    loss = losses.dtype.type(losses.sum() / count)
    return loss, (logits, safe, valid, lse, count)


def crossentropy_backward(dloss, cache):
    """dloss (scalar) -> dlogits (N, V), the formula above scaled by dloss."""
    logits, safe, valid, lse, count = cache
    dlogits = np.exp(logits - lse)  # (N, V) the probabilities
    dlogits[np.arange(len(safe)), safe] -= 1.0
    dlogits *= (valid[:, None] * (logits.dtype.type(dloss) / count)).astype(logits.dtype)
    return dlogits
