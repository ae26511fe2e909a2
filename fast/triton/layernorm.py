"""Fused LayerNorm in Triton: forward, and a backward with partial sums for dg and db.

Shape legend: N = rows (B * T), C = channels. Formulas and symbol names are those of
`ref.ops.layernorm_forward` / `layernorm_backward`:
    mean = sum(x) / C,  rstd = 1 / sqrt(sum((x - mean)^2) / C + eps),  xhat = (x - mean) * rstd
    out = xhat * g + b
    dxhat = dout * g
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dg = sum over rows of dout * xhat,  db = sum over rows of dout

Forward: each program normalises ROWS whole rows held in one (ROWS, C) block (C <= 65536;
ROWS > 1 for short rows, so each program moves a few thousand elements). The row statistics
mean and rstd (N,) float32 are saved for backward, as in Triton's tutorial 05. Means are sums
times 1/C (one rounding: the GPU's fast division is not correctly rounded).
Backward: each program takes a contiguous group of rows, writes dx for them and one row of
partial dg and db to an (n_groups, C) float32 buffer; the host sums the partials. No atomics,
so the result is the same on every run.
Math is float32 whatever the input dtype (float32, float16, bfloat16); outputs take x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fast.triton.common import check_device, check_float, row_block

# elements per forward program and its warps (None: one per 256 elements of the block, at most
# 16), the defaults of layernorm_forward's `elements` and `warps`: from sweeping both with
# `python -m bench.tools.gpu_tune --only layernorm` on an H100 (results in bench/README.md).
FWD_ELEMENTS = 4096
FWD_WARPS: int | None = 4


@triton.jit
def _layernorm_fwd_kernel(
    x_ptr,  # (N, C) input, contiguous
    g_ptr,  # (C,) scale
    b_ptr,  # (C,) shift
    out_ptr,  # (N, C) output, x's dtype
    mean_ptr,  # (N,) float32, saved for backward
    rstd_ptr,  # (N,) float32, saved for backward
    N,
    C,
    inv_C,  # 1 / C: a product rounds once, where the GPU's fast division may not
    eps,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C
    ok = (rows < N)[:, None] & inside[None, :]  # (ROWS, BLOCK_C)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # (ROWS, BLOCK_C)
    mean = tl.sum(x, axis=1) * inv_C  # (ROWS,)
    xc = tl.where(inside[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) * inv_C
    rstd = 1.0 / tl.sqrt(var + eps)
    g = tl.load(g_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * g[None, :] + b[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=rows < N)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@triton.jit
def _layernorm_bwd_kernel(
    dout_ptr,  # (N, C) upstream gradient, contiguous
    x_ptr,  # (N, C) forward input
    g_ptr,  # (C,) scale
    mean_ptr,  # (N,) float32 from forward
    rstd_ptr,  # (N,) float32 from forward
    dx_ptr,  # (N, C) output gradient, x's dtype
    dg_part_ptr,  # (n_groups, C) float32 partial sums of dout * xhat
    db_part_ptr,  # (n_groups, C) float32 partial sums of dout
    N,
    C,
    inv_C,
    ROWS_PER_GROUP,
    BLOCK_C: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < C
    g = tl.load(g_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dg = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    row_start = group * ROWS_PER_GROUP
    row_end = tl.minimum(row_start + ROWS_PER_GROUP, N)
    for row in range(row_start, row_end):
        x = tl.load(x_ptr + row * C + cols, mask=inside, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + row * C + cols, mask=inside, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(inside, (x - mean) * rstd, 0.0)
        dxhat = dout * g
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        c1 = tl.sum(dxhat * xhat, axis=0) * inv_C
        c2 = tl.sum(dxhat, axis=0) * inv_C
        dx = rstd * (dxhat - c2 - xhat * c1)
        tl.store(dx_ptr + row * C + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        dg += dout * xhat
        db += dout
    tl.store(dg_part_ptr + group * C + cols, dg, mask=inside)
    tl.store(db_part_ptr + group * C + cols, db, mask=inside)


def _warps(block_c: int) -> int:
    """One warp per 256 columns, 1 to 8 (Triton's tutorial 05): a row's values stay in
    registers without spilling, and short rows do not idle most of the threads."""
    return min(max(block_c // 256, 1), 8)


def _fwd_launch(block_c: int, n_rows: int, elements: int, warps: int | None) -> tuple[int, int]:
    """(rows per forward program, num_warps). Short rows are batched so that each program moves
    about `elements` elements (more bytes in flight per launch); one row when there are few.
    warps None: one per 256 elements of the program's (rows, block_c) block, at most 16."""
    rows = max(1, min(elements // block_c, 16))
    while rows > 1 and n_rows < 512 * rows:  # >= 512 programs: a few per multiprocessor
        rows //= 2
    return rows, warps or min(_warps(block_c * rows), 16)


def _check(op: str, x: torch.Tensor, g: torch.Tensor, b: torch.Tensor | None) -> int:
    check_float(op, x=x, g=g, b=b)
    check_device(_layernorm_fwd_kernel, op, x=x, g=g, b=b)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a channel axis, got a scalar")
    C = x.shape[-1]
    for name, p in (("g", g), ("b", b)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"{op}: {name} has shape {tuple(p.shape)}, expected ({C},)")
    return row_block(C, op, "C")


def layernorm_forward(
    x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float = 1e-5, *,
    elements: int = FWD_ELEMENTS, warps: int | None = FWD_WARPS,
):  # fmt: skip
    """x (..., C), g (C,), b (C,) -> out (..., C); cache = (x2d, g, mean, rstd).
    elements, warps: elements per program and its warps (see FWD_ELEMENTS, FWD_WARPS)."""
    BLOCK_C = _check("layernorm_forward", x, g, b)
    C = x.shape[-1]
    x2d = x.reshape(-1, C).contiguous()  # (N, C)
    N = x2d.shape[0]
    out = torch.empty_like(x2d)  # (N, C)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)  # (N,)
    if N:
        rows, num_warps = _fwd_launch(BLOCK_C, N, elements, warps)
        _layernorm_fwd_kernel[(triton.cdiv(N, rows),)](
            x2d, g.contiguous(), b.contiguous(), out, mean, rstd, N, C, 1.0 / C, eps,
            ROWS=rows, BLOCK_C=BLOCK_C, num_warps=num_warps,
        )  # fmt: skip
    return out.reshape(x.shape), (x2d, g, mean, rstd)


def layernorm_backward(dout: torch.Tensor, cache):
    """dout (..., C) -> dx (..., C), dg (C,), db (C,)."""
    x2d, g, mean, rstd = cache
    N, C = x2d.shape
    if dout.shape[-1] != C or dout.numel() != x2d.numel():
        raise ValueError(
            f"layernorm_backward: dout has shape {tuple(dout.shape)}, expected (..., {C}) "
            f"with {N} rows"
        )
    BLOCK_C = row_block(C, "layernorm_backward", "C")
    dout2d = dout.reshape(-1, C).contiguous()  # (N, C)
    dx = torch.empty_like(x2d)  # (N, C)
    # enough groups to fill a GPU, few enough that summing the partials on the host is cheap
    n_groups = max(1, min(N, 256))
    rows_per_group = triton.cdiv(N, n_groups) if N else 1
    n_groups = triton.cdiv(N, rows_per_group) if N else 1
    dg_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x2d.device)  # (n_groups, C)
    db_part = torch.zeros(n_groups, C, dtype=torch.float32, device=x2d.device)  # (n_groups, C)
    if N:
        _layernorm_bwd_kernel[(n_groups,)](
            dout2d, x2d, g.contiguous(), mean, rstd, dx, dg_part, db_part,
            N, C, 1.0 / C, rows_per_group, BLOCK_C=BLOCK_C, num_warps=_warps(BLOCK_C),
        )  # fmt: skip
    dg = dg_part.sum(dim=0).to(g.dtype)  # (C,)
    db = db_part.sum(dim=0).to(g.dtype)  # (C,)
    return dx.reshape(dout.shape), dg, db


class LayerNormFunction(torch.autograd.Function):
    """out = layernorm(x) * g + b through the Triton kernels, differentiable in x, g and b."""

    @staticmethod
    def forward(ctx, x, g, b, eps):
        out, cache = layernorm_forward(x, g, b, eps)
        x2d, g_, mean, rstd = cache
        ctx.save_for_backward(x2d, g_, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        dx, dg, db = layernorm_backward(dout, tuple(ctx.saved_tensors))
        return dx, dg, db, None


def layernorm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    """Differentiable LayerNorm: x (..., C) -> (..., C)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad or b.requires_grad)):
        return layernorm_forward(x, g, b, eps)[0]  # inference: no autograd node to build
    return LayerNormFunction.apply(x, g, b, eps)
