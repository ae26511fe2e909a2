"""GELU (OpenAI's tanh form) and the MLP's bias fused with it, in Triton.

Shape legend: N = rows (B * T), H = hidden channels (4C), n = elements.
    gelu(x) = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)      (ref.ops.gelu_forward)
Since 0.5 (1 + tanh(u)) = sigmoid(2u), the kernels compute s = sigmoid(2u) and
    gelu(x) = x s
    d gelu / dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) du/dx = s + 2 x s (1 - s) du/dx
with du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2) (1 - tanh^2 u = 4 s (1 - s)). Triton has no
portable tanh; sigmoid is exact in float32 for large |u| where 2 sigmoid(2u) - 1 would not be.

Variants: "gelu" (elementwise, 1D blocks) and "bias_gelu" (out = gelu(x + b) for x (N, H) and
b (H,), one pass; backward returns dxb and db = sum over rows of dxb, reduced on the host from
the float32 dxb). The forward saves x (or x + b) only, backward recomputes s: one read of x
instead of saving a second activation. Math is float32 for float16 and bfloat16 inputs.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fast.triton_common import check_device, check_float

GELU_SCALE = math.sqrt(2.0 / math.pi)
BLOCK = 1024


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
    b_ptr,  # (H,) bias added before the GELU (read only when HAS_BIAS)
    out_ptr,  # (n,) gelu(x [+ b]), x's dtype
    xb_ptr,  # (n,) x + b saved for backward (written only when HAS_BIAS)
    n,
    H,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(b_ptr + offs % H, mask=inside, other=0.0).to(tl.float32)
        tl.store(xb_ptr + offs, x.to(xb_ptr.dtype.element_ty), mask=inside)
    s, _ = _gelu_terms(x)
    tl.store(out_ptr + offs, (x * s).to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _gelu_bwd_kernel(
    dout_ptr,  # (n,) upstream gradient
    x_ptr,  # (n,) the GELU's input (x, or x + b for bias_gelu)
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


def _launch_fwd(op: str, x: torch.Tensor, b: torch.Tensor | None):
    check_float(op, x=x, b=b)
    check_device(_gelu_fwd_kernel, op, x=x, b=b)
    xf = x.contiguous()
    n = xf.numel()
    H = 1 if b is None else b.numel()
    if b is not None and (b.dim() != 1 or x.dim() < 1 or x.shape[-1] != H):
        raise ValueError(
            f"{op}: b has shape {tuple(b.shape)}, expected ({x.shape[-1] if x.dim() else '?'},)"
        )
    out = torch.empty_like(xf)
    xb = torch.empty_like(xf) if b is not None else xf
    if n:
        _gelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
            xf, xf if b is None else b.contiguous(), out, xb, n, H,
            HAS_BIAS=b is not None, BLOCK=BLOCK,
        )  # fmt: skip
    return out, xb


def _launch_bwd(op: str, dout: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if dout.shape != x.shape:
        raise ValueError(f"{op}: dout has shape {tuple(dout.shape)}, expected {tuple(x.shape)}")
    check_device(_gelu_bwd_kernel, op, dout=dout, x=x)
    doutf = dout.contiguous()
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        _gelu_bwd_kernel[(triton.cdiv(n, BLOCK),)](doutf, x, dx, n, BLOCK=BLOCK)
    return dx


def gelu_forward(x: torch.Tensor):
    """x (...) -> gelu(x) (...); cache = (x,)."""
    out, xf = _launch_fwd("gelu_forward", x, None)
    return out, (xf,)


def gelu_backward(dout: torch.Tensor, cache):
    (x,) = cache
    return _launch_bwd("gelu_backward", dout, x)


def bias_gelu_forward(x: torch.Tensor, b: torch.Tensor):
    """gelu(x + b): x (..., H), b (H,) -> (..., H); cache = (x + b,)."""
    out, xb = _launch_fwd("bias_gelu_forward", x, b)
    return out, (xb,)


def bias_gelu_backward(dout: torch.Tensor, cache):
    """-> dx (..., H) (= d(x + b)), db (H,) = sum over rows of dx."""
    (xb,) = cache
    dxb = _launch_bwd("bias_gelu_backward", dout, xb)  # (..., H)
    db = dxb.reshape(-1, dxb.shape[-1]).sum(dim=0, dtype=torch.float32).to(dxb.dtype)  # (H,)
    return dxb, db


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
        out, (xb,) = bias_gelu_forward(x, b)
        ctx.save_for_backward(xb)
        return out

    @staticmethod
    def backward(ctx, dout):
        dxb, db = bias_gelu_backward(dout, tuple(ctx.saved_tensors))
        return dxb, db.to(ctx.saved_tensors[0].dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Differentiable tanh GELU through the Triton kernels."""
    return GeluFunction.apply(x)


def bias_gelu(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Differentiable gelu(x + b) through the Triton kernels."""
    return BiasGeluFunction.apply(x, b)
