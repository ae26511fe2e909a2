"""Fused softmax cross-entropy in Triton over a large vocabulary (GPT-2's V = 50,257).

Shape legend: N = rows (B * T), V = vocabulary, BV = vocabulary block.
The maths is `ref.ops.crossentropy_forward` / `crossentropy_backward`:
    lse[n] = logsumexp(logits[n]),  loss = mean over rows with targets[n] != ignore_index of
    (lse[n] - logits[n, targets[n]]),  dlogits[n] = (softmax(logits[n]) - onehot(targets[n]))
    * dloss / count, zero on ignored rows (count = number of rows not ignored, at least 1).
One program per row walks the vocabulary in blocks of BV with an online max and sum
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), so the softmax is
never stored by the forward. Variants:
  "online": the forward saves lse (N,) only; the backward re-reads the logits once and writes
      dlogits = exp(logits - lse) - onehot: the probabilities exist once, as the gradient.
  "fused": the forward writes the gradient (for dloss = 1) in a second pass over the row while
      the row is hot in L2, as Liger-Kernel does; the backward hands it over as it is when
      dloss is 1 (one scalar read back; loss.backward() gives 1) and scales a copy otherwise.
      Costs an (N, V) buffer held from forward to backward, saves re-reading the logits.
  "inplace": "fused" with the gradient written over the logits (Liger-Kernel's trick): no
      (N, V) allocation at all; the model's loss uses it, its logits being a temporary.
The loss is float32; logits may be float32, float16 or bfloat16 (math in float32); dlogits
take the logits' dtype. Targets out of [0, V) that are not ignore_index are an error.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fast.triton.common import check_device, check_float

# (BV, num_warps) per variant, the defaults of the launchers' `config`: from sweeping both with
# `python -m bench.tools.gpu_tune --only crossentropy` on an H100, forward + backward on
# 8 x 1024 rows of 50,257 float32 (results in bench/README.md).
ONLINE_CONFIG = (8192, 4)
FUSED_CONFIG = (8192, 16)


@triton.jit
def _ce_grad_row(logits_row, grad_row, target, lse, coef, V, BV: tl.constexpr):
    """grad_row[:] = (exp(logits_row - lse) - onehot(target)) * coef, block by block."""
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        inside = cols < V
        x = tl.load(logits_row + cols, mask=inside, other=float("-inf")).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
        tl.store(grad_row + cols, (g * coef).to(grad_row.dtype.element_ty), mask=inside)


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,  # (N, V) logits, contiguous
    targets_ptr,  # (N,) int64 targets
    losses_ptr,  # (N,) float32 per-row loss, 0 on ignored rows
    lse_ptr,  # (N,) float32 logsumexp of each row
    grad_ptr,  # (N, V) gradient for dloss = 1 (written only when COMPUTE_GRAD)
    inv_count_ptr,  # (1,) float32 1 / count (read only when COMPUTE_GRAD)
    V,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * V
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    m = float("-inf")  # running max
    d = 0.0  # running sum of exp(x - m)
    for start in range(0, V, BV):
        cols = start + tl.arange(0, BV)
        x = tl.load(logits_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    safe = tl.where(valid, target, 0)
    picked = tl.load(logits_row + safe).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, lse - picked, 0.0))
    tl.store(lse_ptr + row, lse)
    if COMPUTE_GRAD:
        coef = tl.where(valid, tl.load(inv_count_ptr), 0.0)
        _ce_grad_row(logits_row, grad_ptr + row * V, target, lse, coef, V, BV)


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,  # (N, V) logits, contiguous
    targets_ptr,  # (N,) int64 targets
    lse_ptr,  # (N,) float32 from forward
    coef_ptr,  # (1,) float32 dloss / count
    dlogits_ptr,  # (N, V) output, the logits' dtype
    V,
    ignore_index,
    BV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    coef = tl.where(target != ignore_index, tl.load(coef_ptr), 0.0)
    lse = tl.load(lse_ptr + row)
    _ce_grad_row(logits_ptr + row * V, dlogits_ptr + row * V, target, lse, coef, V, BV)


def _check(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
    op = "crossentropy_forward"
    check_float(op, logits=logits)
    check_device(_ce_fwd_kernel, op, logits=logits, targets=targets)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (N, V), got {tuple(logits.shape)}")
    N, V = logits.shape
    if V < 1:
        raise ValueError(f"{op}: the vocabulary is empty (V = 0)")
    if tuple(targets.shape) != (N,):
        raise ValueError(f"{op}: targets must be ({N},), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: targets must be int32 or int64, got {targets.dtype}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
    if N and bool(bad.any()):
        first = int(targets[bad][0])
        raise ValueError(f"{op}: target {first} is outside the vocabulary [0, {V})")


def _forward(logits, targets, ignore_index: int, fused: bool, inplace: bool, config):
    _check(logits, targets, ignore_index)
    N, V = logits.shape
    if inplace and not logits.is_contiguous():
        raise ValueError("crossentropy_forward_fused: inplace needs contiguous logits")
    logits = logits.contiguous()
    targets = targets.to(torch.int64).contiguous()
    count = (targets != ignore_index).sum().clamp(min=1).to(torch.float32)  # () on device
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # (N,)
    grad = (logits if inplace else torch.empty_like(logits)) if fused else lse  # (N, V)
    inv_count = (1.0 / count).reshape(1)  # (1,)
    block_v, warps = config
    if N:
        _ce_fwd_kernel[(N,)](
            logits, targets, losses, lse, grad, inv_count, V, ignore_index,
            COMPUTE_GRAD=fused, BV=min(block_v, triton.next_power_of_2(V)), num_warps=warps,
        )  # fmt: skip
    loss = losses.sum() / count  # () float32
    if fused:  # the gradient is all backward needs: the logits can be freed
        return loss, (None, targets, lse, count, grad, ignore_index)
    return loss, (logits, targets, lse, count, None, ignore_index)


def crossentropy_forward(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, *,
    config: tuple[int, int] = ONLINE_CONFIG,
):  # fmt: skip
    """logits (N, V), targets (N,) int -> mean loss () float32 ("online" variant).
    config: the forward kernel's (BV, num_warps)."""
    return _forward(logits, targets, ignore_index, fused=False, inplace=False, config=config)


def crossentropy_forward_fused(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
    inplace: bool = False, *, config: tuple[int, int] = FUSED_CONFIG,
):  # fmt: skip
    """As `crossentropy_forward`, also writing the gradient in the same pass ("fused").
    inplace: the gradient overwrites the logits (each block is read before it is written), so
    the op allocates no (N, V) buffer at all; the caller's logits are gone afterwards."""
    return _forward(logits, targets, ignore_index, fused=True, inplace=inplace, config=config)


def crossentropy_backward(dloss, cache, *, config: tuple[int, int] = ONLINE_CONFIG) -> torch.Tensor:
    """dloss () -> dlogits (N, V); works for the caches of both variants.
    config: the "online" backward kernel's (BV, num_warps) (the fused variant launches none)."""
    logits, targets, lse, count, grad, ignore_index = cache
    dloss = torch.as_tensor(dloss, dtype=torch.float32, device=lse.device)
    if grad is not None:  # "fused": the forward wrote the gradient for dloss = 1
        if dloss.numel() == 1 and float(dloss) == 1.0:  # loss.backward(): nothing to scale
            return grad
        return (grad.float() * dloss).to(grad.dtype)
    N, V = logits.shape
    block_v, warps = config
    dlogits = torch.empty_like(logits)  # (N, V)
    coef = (dloss / count).reshape(1)  # (1,)
    if N:
        _ce_bwd_kernel[(N,)](
            logits, targets, lse, coef, dlogits, V, ignore_index,
            BV=min(block_v, triton.next_power_of_2(V)), num_warps=warps,
        )  # fmt: skip
    return dlogits


class CrossEntropyFunction(torch.autograd.Function):
    """Mean softmax cross-entropy, differentiable in the logits."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, fused, inplace):
        config = FUSED_CONFIG if fused else ONLINE_CONFIG
        loss, cache = _forward(logits, targets, ignore_index, fused, inplace and fused, config)
        ctx.cache = cache
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dlogits = crossentropy_backward(dloss, ctx.cache)
        ctx.cache = None
        return dlogits, None, None, None, None


def crossentropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    fused: bool = True,
    inplace: bool = False,
) -> torch.Tensor:
    """Differentiable mean cross-entropy: logits (N, V), targets (N,) -> () float32.
    fused (default): the gradient is written during the forward (the faster variant when a
    backward follows; without one, as in evaluation, the online variant runs instead).
    inplace: that gradient overwrites the logits, as Liger-Kernel does: for a loss whose
    logits are a temporary (gpt2_loss), no (N, V) buffer beyond the logits themselves. Safe
    under autograd when no other node saved the logits (a matmul does not save its output)."""
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return crossentropy_forward(logits, targets, ignore_index)[0]
    return CrossEntropyFunction.apply(logits, targets, ignore_index, fused, inplace)
