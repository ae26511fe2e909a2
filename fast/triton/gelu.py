"""GELU (OpenAI's tanh form) and the MLP's bias fused with it, in Triton.

Shape legend: N = rows (B * T), H = hidden channels (4C), n = elements.
    gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)      (ref.ops.gelu_forward)
Since 0.5 (1 + tanh(u)) = sigmoid(2u), the kernels compute s = sigmoid(2u) and
    gelu(x) = x s
    d gelu / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx = s + 2 x s (1 - s) du/dx
with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2) (1 - tanh^2 u = 4 s (1 - s)). Triton has no
portable tanh; sigmoid is exact in float32 for large |u| where 2 sigmoid(2u) - 1 would not be.

Variants: "gelu" (elementwise, 1D blocks) and "bias_gelu" (out = gelu(x + b) for x (N, H) and
b (H,), one pass over (ROWS, BLOCK_H) tiles that load the bias slice once, saving x and b, not
x + b, which backward recomputes; backward returns dxb and db = sum over rows of dxb, from
float32 partial sums per row group written by the kernel and added on the host, as
LayerNorm's dg, db). The forwards save their inputs only and backward recomputes s: one read
of x instead of saving a second activation. Math is float32 for float16 and bfloat16 inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fast.triton.common import check_device, check_float

# Blocks, tiles and warps from sweeping them with `python -m bench.tools.gpu_tune --only
# bias_gelu,gelu` on an H100 (results in bench/README.md); each is the default of the launchers'
# keyword argument named after it.
BLOCK = 1024  # block: elements per GELU program
BIAS_BLOCK_H = 512  # block_h: columns per bias + GELU program
BIAS_ROWS = 4  # rows: rows per tile, 2,048 elements per forward program
BIAS_GROUPS = 128  # groups: row groups of the backward (partial sums of db, summed on the host)
NUM_WARPS = 8  # warps: every GELU kernel


@triton.jit
def _gelu_terms(x):
    """s = sigmoid(2u) = 0.5 (1 + tanh u) and du/dx, for float32 x."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2/pi) = 0.79788456...
    s = tl.sigmoid(2.0 * u)
    du_dx = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    return s, du_dx


@triton.jit
def _gelu_fwd_kernel(
    x_ptr,  # (n,) input, contiguous
    out_ptr,  # (n,) gelu(x), x's dtype
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s, _ = _gelu_terms(x)
    tl.store(out_ptr + offs, (x * s).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gelu_bwd_kernel(
    dout_ptr,  # (n,) upstream gradient
    x_ptr,  # (n,) the GELU's input
    dx_ptr,  # (n,) gradient of the GELU's input
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    s, du_dx = _gelu_terms(x)
    dx = dout * (s + 2.0 * x * s * (1.0 - s) * du_dx)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # (N, H) input, contiguous
    b_ptr,  # (H,) bias
    out_ptr,  # (N, H) gelu(x + b), x's dtype
    N,
    H,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # a (ROWS, BLOCK_H) tile: the bias slice is loaded once, no per-element modulo
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    rows = tl.program_id(1).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col_ok = cols < H
    ok = (rows < N)[:, None] & col_ok[None, :]
    offs = rows[:, None] * H + cols[None, :]
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
    s, _ = _gelu_terms(x)
    tl.store(out_ptr + offs, (x * s).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _bias_gelu_bwd_kernel(
    dout_ptr,  # (N, H) upstream gradient, contiguous
    x_ptr,  # (N, H) the forward's input x (x + b is recomputed)
    b_ptr,  # (H,) bias
    dx_ptr,  # (N, H) gradient of x (= of x + b)
    db_part_ptr,  # (n_groups, H) float32 partial sums of dx over each group's rows
    N,
    H,
    ROWS_PER_GROUP,
    ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    group = tl.program_id(1).to(tl.int64)
    col_ok = cols < H
    row_end = tl.minimum((group + 1) * ROWS_PER_GROUP, N)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_H], dtype=tl.float32)
    for start in range(group * ROWS_PER_GROUP, row_end, ROWS):
        rows = start + tl.arange(0, ROWS)
        ok = (rows < row_end)[:, None] & col_ok[None, :]
        offs = rows[:, None] * H + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        dout = tl.load(dout_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        s, du_dx = _gelu_terms(x)
        dx = dout * (s + 2.0 * x * s * (1.0 - s) * du_dx)  # 0 where masked (dout = 0)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        db += tl.sum(dx, axis=0)
    tl.store(db_part_ptr + group * H + cols, db, mask=col_ok)


def _bias_shape(op: str, x: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    if b.dim() != 1 or x.dim() < 1 or x.shape[-1] != b.shape[0]:
        raise ValueError(
            f"{op}: b has shape {tuple(b.shape)}, expected ({x.shape[-1] if x.dim() else '?'},)"
        )
    H = b.shape[0]
    return x.numel() // H if H else 0, H


def _prepare(op: str, x: torch.Tensor, b: torch.Tensor | None):
    """Check x (and b); -> x contiguous, an output like it."""
    check_float(op, x=x, b=b)
    check_device(_gelu_fwd_kernel, op, x=x, b=b)
    xf = x.contiguous()
    return xf, torch.empty_like(xf)


def gelu_forward(x: torch.Tensor, *, block: int = BLOCK, warps: int = NUM_WARPS):
    """x (...) -> gelu(x) (...); cache = (x,)."""
    xf, out = _prepare("gelu_forward", x, None)
    n = xf.numel()
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, block),)](xf, out, n, BLOCK=block, num_warps=warps)
    return out, (xf,)


def gelu_backward(dout: torch.Tensor, cache, *, block: int = BLOCK, warps: int = NUM_WARPS):
    (x,) = cache
    op = "gelu_backward"
    if dout.shape != x.shape:
        raise ValueError(f"{op}: dout has shape {tuple(dout.shape)}, expected {tuple(x.shape)}")
    check_device(_gelu_bwd_kernel, op, dout=dout, x=x)
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, block),)](
            dout.contiguous(), x, dx, n, BLOCK=block, num_warps=warps
        )
    return dx


def bias_gelu_forward(
    x: torch.Tensor, b: torch.Tensor, *, rows: int = BIAS_ROWS, block_h: int = BIAS_BLOCK_H,
    warps: int = NUM_WARPS,
):  # fmt: skip
    """gelu(x + b): x (..., H), b (H,) -> (..., H); cache = (x, b): backward recomputes x + b
    (as many bytes read as a saved x + b, and the forward writes half as many)."""
    op = "bias_gelu_forward"
    xf, out = _prepare(op, x, b)
    N, H = _bias_shape(op, x, b)
    b = b.contiguous()
    if N and H:
        _bias_gelu_fwd_kernel[(triton.cdiv(H, block_h), triton.cdiv(N, rows))](
            xf, b, out, N, H, ROWS=rows, BLOCK_H=block_h, num_warps=warps,
        )  # fmt: skip
    return out, (xf, b)


def bias_gelu_backward(
    dout: torch.Tensor, cache, *, rows: int = BIAS_ROWS, block_h: int = BIAS_BLOCK_H,
    groups: int = BIAS_GROUPS, warps: int = NUM_WARPS,
):  # fmt: skip
    """-> dx (..., H) (= d(x + b)), db (H,) = sum over rows of dx (float32 partial sums per
    row group in the kernel, then over the groups here: no second pass over dx)."""
    x, b = cache
    op = "bias_gelu_backward"
    if dout.shape != x.shape:
        raise ValueError(f"{op}: dout has shape {tuple(dout.shape)}, expected {tuple(x.shape)}")
    check_device(_bias_gelu_bwd_kernel, op, dout=dout, x=x, b=b)
    H = b.shape[0]
    N = x.numel() // H if H else 0
    dx = torch.empty_like(x)  # (..., H)
    groups = max(1, min(groups, triton.cdiv(N, rows)))
    per_group = triton.cdiv(N, groups) if N else 1
    db_part = torch.zeros(groups, H, dtype=torch.float32, device=x.device)  # (groups, H)
    if N and H:
        _bias_gelu_bwd_kernel[(triton.cdiv(H, block_h), groups)](
            dout.contiguous(), x, b, dx, db_part, N, H, per_group,
            ROWS=rows, BLOCK_H=block_h, num_warps=warps,
        )  # fmt: skip
    return dx, db_part.sum(dim=0).to(b.dtype)


class GeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        out, (xf,) = gelu_forward(x)
        ctx.save_for_backward(xf)
        return out

    @staticmethod
    def backward(ctx, dout):
        return gelu_backward(dout, tuple(ctx.saved_tensors))


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b):
        out, cache = bias_gelu_forward(x, b)
        ctx.save_for_backward(*cache)
        return out

    @staticmethod
    def backward(ctx, dout):
        return bias_gelu_backward(dout, tuple(ctx.saved_tensors))


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Differentiable tanh GELU through the Triton kernels."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return gelu_forward(x)[0]  # inference: no autograd node to build
    return GeluFunction.apply(x)


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable gelu(x + b) through the Triton kernels."""
    if not (torch.is_grad_enabled() and (x.requires_grad or b.requires_grad)):
        return bias_gelu_forward(x, b)[0]
    return BiasGeluFunction.apply(x, b)
