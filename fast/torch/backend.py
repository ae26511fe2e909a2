"""The torch backend: GPT-2's ops in plain torch, on CPU or GPU (the baseline for Triton).

Shape legend: B = batch, T = time, C = channels, NH = heads, hs = head size, V = vocabulary,
N = rows (B * T), Tq / Tk = query / key length (Tk >= Tq).

Two faces, one maths (that of `ref/ops.py`, whose docstrings hold the derivations):
  * the backend contract: `<op>_forward(...) -> (out, cache)` and `<op>_backward(dout, cache)`
    returning fresh gradients, on torch tensors, written out by hand like the reference so a
    test can hold each backward to the numpy one;
  * differentiable functions `layernorm, gelu, bias_gelu, attention, crossentropy, dropout`
    that the torch model (`fast/torch/model.py`) calls and autograd differentiates; here they
    are torch's own kernels (F.layer_norm, F.gelu, scaled_dot_product_attention, F.cross_entropy).
Dropout (training only) takes an explicit torch.Generator `gen` and draws each mask as
`torch.rand(shape, generator=gen) >= p`; attention with dropout is unfused torch (softmax,
drop, matmul), because SDPA's dropout draws from torch's global generator, which a trainer's
seed does not set.
`VARIANTS` = {op: {variant: (forward, backward)}}: "torch" is the hand-written pair, "autograd"
wraps the differentiable function (forward records a graph, backward asks autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GELU_SCALE = math.sqrt(2.0 / math.pi)

# ---------------------------------------------------------------------------------------------
# embeddings: x[b, t] = wte[ids[b, t]] + wpe[pos[b, t]]


def embedding_forward(ids: torch.Tensor, pos: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor):
    """ids, pos (B, T) int64 -> x (B, T, C)."""
    x = wte[ids] + wpe[pos]  # (B, T, C)
    return x, (ids, pos, wte.shape, wpe.shape)


def embedding_backward(dx: torch.Tensor, cache):
    ids, pos, wte_shape, wpe_shape = cache
    C = dx.shape[-1]
    dwte = torch.zeros(wte_shape, dtype=dx.dtype, device=dx.device)  # (V, C)
    dwpe = torch.zeros(wpe_shape, dtype=dx.dtype, device=dx.device)  # (n_ctx, C)
    dwte.index_add_(0, ids.reshape(-1), dx.reshape(-1, C))
    dwpe.index_add_(0, pos.reshape(-1), dx.reshape(-1, C))
    return dwte, dwpe


# ---------------------------------------------------------------------------------------------
# LayerNorm over the last axis


def layernorm_forward(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    """x (..., C), g (C,), b (C,) -> out (..., C)."""
    mean = x.mean(dim=-1, keepdim=True)  # (..., 1)
    xc = x - mean  # (..., C)
    var = (xc * xc).mean(dim=-1, keepdim=True)  # (..., 1)
    rstd = torch.rsqrt(var + eps)  # (..., 1)
    xhat = xc * rstd  # (..., C)
    return xhat * g + b, (xhat, rstd, g)


def layernorm_backward(dout: torch.Tensor, cache):
    """dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dout * g."""
    xhat, rstd, g = cache
    C = dout.shape[-1]
    dg = (dout * xhat).reshape(-1, C).sum(dim=0)  # (C,)
    db = dout.reshape(-1, C).sum(dim=0)  # (C,)
    dxhat = dout * g  # (..., C)
    dx = rstd * (
        dxhat - dxhat.mean(dim=-1, keepdim=True) - xhat * (dxhat * xhat).mean(dim=-1, keepdim=True)
    )  # (..., C)
    return dx, dg, db


# ---------------------------------------------------------------------------------------------
# linear: out = x @ w + b, w (Cin, Cout) as in OpenAI's checkpoint


def linear_forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
    """x (..., Cin), w (Cin, Cout), b (Cout,) or None -> (..., Cout)."""
    out = x @ w if b is None else x @ w + b
    return out, (x, w, b is not None)


def linear_backward(dout: torch.Tensor, cache):
    x, w, has_bias = cache
    dx = dout @ w.T  # (..., Cin)
    dw = x.reshape(-1, x.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])  # (Cin, Cout)
    db = dout.reshape(-1, dout.shape[-1]).sum(dim=0) if has_bias else None  # (Cout,)
    return dx, dw, db


# ---------------------------------------------------------------------------------------------
# GELU, tanh form: gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3)


def gelu_forward(x: torch.Tensor):
    u = GELU_SCALE * (x + 0.044715 * (x * x * x))
    return 0.5 * x * (1.0 + torch.tanh(u)), (x,)


def gelu_backward(dout: torch.Tensor, cache):
    (x,) = cache
    th = torch.tanh(GELU_SCALE * (x + 0.044715 * (x * x * x)))
    du_dx = GELU_SCALE * (1.0 + 3.0 * 0.044715 * (x * x))
    return dout * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * du_dx)


def bias_gelu_forward(x: torch.Tensor, b: torch.Tensor):
    """gelu(x + b): x (..., H), b (H,)."""
    out, (xb,) = gelu_forward(x + b)
    return out, (xb,)


def bias_gelu_backward(dout: torch.Tensor, cache):
    dxb = gelu_backward(dout, cache)
    return dxb, dxb.reshape(-1, dxb.shape[-1]).sum(dim=0)


# ---------------------------------------------------------------------------------------------
# dropout, inverted (see ref.ops.dropout_forward): out = x * mask, mask = keep / (1 - p) with
# keep = torch.rand(x.shape, generator=gen) >= p (float32 uniforms, as LoRA's dropout in
# fast/torch/model.py); the identity, drawing nothing, when p == 0 or gen is None


def dropout_forward(x: torch.Tensor, p: float, gen: torch.Generator | None = None):
    """x (...) -> (out (...), mask or None)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    if p == 0.0 or gen is None:
        return x, None
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p  # (...) bool
    mask = keep.to(x.dtype) * (1.0 / (1.0 - p))  # (...) 0 or 1 / (1 - p)
    return x * mask, mask


def dropout_backward(dout: torch.Tensor, cache):
    """dx = dout * mask (dout itself where nothing was dropped)."""
    return dout if cache is None else dout * cache


# ---------------------------------------------------------------------------------------------
# causal attention with a cache offset and padding keys (see ref.ops.attention_forward)


def visible_mask(Tq: int, Tk: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
    """(Tq, Tk) or (B, 1, Tq, Tk) bool: query i sees key j <= Tk - Tq + i that is not padding."""
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(diagonal=Tk - Tq)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]  # (B, 1, Tq, Tk)
    return visible


def _probabilities(q, k, key_mask) -> torch.Tensor:
    """att = softmax(q k^T / sqrt(hs) + mask) (B, NH, Tq, Tk), all zeros for a query that sees
    no key; written out so that autograd can differentiate it too (no NaN on such rows)."""
    Tq, hs = q.shape[-2:]
    Tk = k.shape[-2]
    if Tk < Tq:
        raise ValueError(f"attention: Tk={Tk} must be >= Tq={Tq}")
    visible = visible_mask(Tq, Tk, key_mask, q.device)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(hs))  # (B, NH, Tq, Tk)
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()  # (B, NH, Tq, 1); softmax does not depend on it
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # fully masked row -> zeros
    e = torch.exp(s - m)  # (B, NH, Tq, Tk)
    z = e.sum(dim=-1, keepdim=True)  # (B, NH, Tq, 1)
    return e / torch.where(z == 0, torch.ones_like(z), z)  # (B, NH, Tq, Tk)


def attention_forward(q, k, v, key_mask=None, dropout: float = 0.0, gen=None):
    """q (B, NH, Tq, hs), k and v (B, NH, Tk, hs), key_mask (B, Tk) bool or None; dropout on
    the probabilities att with a generator `gen` (one draw of att's shape, as the reference)."""
    att = _probabilities(q, k, key_mask)  # (B, NH, Tq, Tk)
    att_d, drop = dropout_forward(att, dropout, gen)  # (B, NH, Tq, Tk); att itself if no drop
    return att_d @ v, (q, k, v, att, drop)


def attention_backward(dout, cache):
    """dv = att_d^T dout; datt = (dout v^T) * mask; ds = att (datt - rowsum(datt att)); dq, dk
    from ds (att_d = att * mask, the dropped probabilities; mask = 1 without dropout)."""
    q, k, v, att, drop = cache
    scale = 1.0 / math.sqrt(q.shape[-1])
    att_d = att if drop is None else att * drop  # (B, NH, Tq, Tk)
    dv = att_d.transpose(-1, -2) @ dout  # (B, NH, Tk, hs)
    datt = dropout_backward(dout @ v.transpose(-1, -2), drop)  # (B, NH, Tq, Tk)
    ds = att * (datt - (datt * att).sum(dim=-1, keepdim=True))  # (B, NH, Tq, Tk)
    return (ds @ k) * scale, (ds.transpose(-1, -2) @ q) * scale, dv


# ---------------------------------------------------------------------------------------------
# softmax cross-entropy, mean over targets that are not ignore_index


def crossentropy_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100):
    """logits (N, V), targets (N,) int -> loss () float32."""
    valid = targets != ignore_index  # (N,)
    count = valid.sum().clamp(min=1).to(torch.float32)  # ()
    lse = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    safe = torch.where(valid, targets, torch.zeros_like(targets))  # (N,)
    picked = logits.float().gather(1, safe[:, None])[:, 0]  # (N,)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum() / count
    return loss, (logits, safe, valid, lse, count)


def crossentropy_backward(dloss, cache):
    logits, safe, valid, lse, count = cache
    dlogits = torch.exp(logits.float() - lse[:, None])  # (N, V) the probabilities
    dlogits[torch.arange(len(safe), device=logits.device), safe] -= 1.0
    dlogits *= (valid.float() * (torch.as_tensor(dloss, device=logits.device) / count))[:, None]
    return dlogits.to(logits.dtype)


# ---------------------------------------------------------------------------------------------
# differentiable functions for the torch model (autograd does the backward)


def layernorm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), g, b, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + b, approximate="tanh")


def dropout(x: torch.Tensor, p: float, gen: torch.Generator | None = None) -> torch.Tensor:
    """Inverted dropout with the generator `gen` (identity when p == 0 or gen is None)."""
    return dropout_forward(x, p, gen)[0]


def attention(q, k, v, key_mask=None, dropout: float = 0.0, gen=None) -> torch.Tensor:
    """Causal attention; torch's fused kernel where no query can be left without a key.
    With dropout > 0 and a generator (training): unfused, softmax then dropout then att @ v,
    the mask drawn from `gen` (SDPA's dropout would use torch's global generator).

    On CUDA, SDPA may not pick cuDNN's kernel: cuDNN builds an execution plan for every new
    shape (about a millisecond, seen on an H100 with torch 2.11: bfloat16 decoding ran 10x
    slower than float32), and a decode loop, whose key count grows by one each step, would
    pay it on every token. The switch is flipped around the call only (two C calls; the
    `sdpa_kernel` context manager costs ~10 us of Python per call)."""
    if dropout > 0.0 and gen is not None:
        att = _probabilities(q, k, key_mask)  # (B, NH, Tq, Tk)
        return dropout_forward(att, dropout, gen)[0] @ v  # (B, NH, Tq, hs)
    if not q.is_cuda:
        return _attention(q, k, v, key_mask)
    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _attention(q, k, v, key_mask)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def _attention(q, k, v, key_mask) -> torch.Tensor:
    Tq, Tk = q.shape[-2], k.shape[-2]
    if key_mask is None and Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if key_mask is None and Tq == 1:
        return F.scaled_dot_product_attention(q, k, v)
    visible = visible_mask(Tq, Tk, key_mask, q.device)  # (B, 1, Tq, Tk)
    # SDPA gives NaN for a query with no visible key; pad it with a finite "visible" score
    # row (any row: its output is zeroed below) so neither forward nor backward sees NaN
    seen = visible.any(dim=-1, keepdim=True)  # (B, 1, Tq, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~seen)
    return out * seen


def crossentropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, inplace: bool = False
):
    """Mean over targets that are not ignore_index (0 when there are none, like the reference).
    inplace: accepted for the model's sake (the triton backend may then overwrite the logits);
    torch's kernel never does."""
    valid = targets != ignore_index
    count = valid.sum().clamp(min=1).to(torch.float32)
    losses = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="none")
    return losses.sum() / count


def autograd_pair(fn):
    """(forward, backward) in the backend contract for a differentiable function `fn`."""

    def forward(*args):
        with torch.enable_grad():
            inputs = [
                a.detach().requires_grad_(True)
                if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a
                for a in args
            ]
            out = fn(*inputs)
        return out.detach(), (out, inputs)

    def backward(dout, cache):
        out, inputs = cache
        wrt = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
        grads = torch.autograd.grad(out, wrt, torch.as_tensor(dout, device=out.device))
        return grads[0] if len(grads) == 1 else grads

    return forward, backward


VARIANTS = {
    "layernorm": {
        "torch": (layernorm_forward, layernorm_backward),
        "autograd": autograd_pair(layernorm),
    },
    "gelu": {"torch": (gelu_forward, gelu_backward), "autograd": autograd_pair(gelu)},
    "bias_gelu": {
        "torch": (bias_gelu_forward, bias_gelu_backward),
        "autograd": autograd_pair(bias_gelu),
    },
    "attention": {
        "torch": (attention_forward, attention_backward),
        "autograd": autograd_pair(attention),
    },
    "crossentropy": {
        "torch": (crossentropy_forward, crossentropy_backward),
        "autograd": autograd_pair(crossentropy),
    },
}
