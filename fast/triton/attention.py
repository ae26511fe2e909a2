"""Causal flash attention in Triton, forward and backward, with a KV-cache offset and padding.

Shape legend: B = batch, NH = heads, Tq = queries, Tk = keys (Tk >= Tq), hs = head size,
BM / BN = query / key block rows, BD = head size padded to a power of two (>= 16).
The maths is `ref.ops.attention_forward` / `attention_backward`, with the same symbols:
    query i sits at absolute position Tk - Tq + i and sees keys j <= Tk - Tq + i whose
    key_mask is True;  s = q k^T * scale,  att = softmax(s),  out = att v;
    a query that sees no key gets out = 0.
Forward (FlashAttention, Dao et al. 2022, Algorithm 1 with an online softmax): one program
per (query block, batch * head); it walks the key blocks up to the last one its queries can
see, keeping the running row max m, the running sum l and the unnormalised output acc in
float32, and saves lse = m + log(l) (B, NH, Tq) for backward, never the (Tq, Tk) matrix.
Backward (FlashAttention-2's split): delta = rowsum(dout * out); one kernel walks the query
blocks for each key block and accumulates dk and dv, another walks the key blocks for each
query block and accumulates dq. Each output has one writer, so there are no atomics and
the result is the same on every run. Inside both, p = exp(s - lse) recomputes att and
    dv = p^T dout,  dp = dout v^T,  ds = p * (dp - delta),  dq = ds k * scale,  dk = ds^T q * scale.
Limits (checked on the host): 1 <= hs <= 256, B * NH <= 65535 (a grid axis), any Tq <= Tk
(blocks are masked at the edges, no "T must be a multiple of 128"), q, k, v of one dtype among
float32, float16, bfloat16 (accumulation is float32; float32 matmuls use IEEE precision, not
TF32, so float32 results match the reference), any strides (the model passes views of its qkv
buffer and KV cache).
Blocks and launch options: FWD_CONFIG, DKDV_CONFIG, DQ_CONFIG below, per input width, tuned
on an H100 (DECODE_CONFIG, BM = 16, for a decode step: Tq <= 16); they are the defaults of the
launchers' `config`, `dkdv_config`, `dq_config` arguments, which bench/tools/gpu_tune.py
sweeps. Variants: "flash" (those defaults), "flash64" and "flash32" (both passes at
(BM, BN) = (64, 64), (32, 32)).
Forward details: scores are kept in log2 units (scale * log2 e) for exp2; the key blocks
visible to every query of a block are walked first without causal or bounds masks, then the
blocks on the diagonal with them (FlashAttention-2's split of the causal loop).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fast.triton.common import check_device, check_float

MAX_HEAD_SIZE = 256
MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which runs over B * NH

# exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction. The kernels write log2(e)
# = 1.4426950408889634 and ln(2) = 0.6931471805599453 as literals (a jit function reads no
# plain Python globals).
LOG2E = 1.4426950408889634

# (BM, BN, num_warps, num_stages) per kernel and input width (4: float32, 2: float16/bfloat16),
# from sweeping them on an H100 at GPT-2's shapes with `python -m bench.tools.gpu_tune`
# (results in bench/README.md).
# A decode step (Tq <= 16) takes DECODE_CONFIG: BM = 16, the smallest block tl.dot accepts.
# dk, dv walk query blocks of BM for each key block of BN (large BN, small BM pays); dq the
# other way round.
FWD_CONFIG = {4: (32, 32, 4, 2), 2: (128, 64, 8, 3)}
DECODE_CONFIG = {4: (16, 64, 4, 2), 2: (16, 128, 2, 2)}  # Tq <= 16
DKDV_CONFIG = {4: (32, 64, 8, 2), 2: (64, 64, 4, 3)}
DQ_CONFIG = {4: (64, 64, 8, 2), 2: (64, 64, 4, 3)}


@triton.jit
def _load_tile(ptr, rows, cols, s_row, s_col, row_ok, hs):
    """The (R, BD) tile ptr[rows * s_row + cols * s_col], zero outside row_ok and past hs."""
    ok = row_ok[:, None] & (cols < hs)[None, :]
    return tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=ok, other=0.0)


@triton.jit
def _head(NH):
    """(bh, b, h) of this program: the grid's axis 1 runs over the B * NH heads."""
    bh = tl.program_id(1).to(tl.int64)
    b = bh // NH
    return bh, b, bh % NH


@triton.jit
def _query_rows(q_base, sqt, sqd, do_ptr, lse_ptr, delta_ptr, bh, offs_m, offs_d, Tq, hs):
    """The query side of a backward block: q, dout (BM, BD), lse, delta (BM,), zero past Tq,
    and row_ok (BM,). dout, lse and delta are contiguous: (B * NH, Tq, hs), (B * NH, Tq)."""
    row_ok = offs_m < Tq
    q = _load_tile(q_base, offs_m, offs_d, sqt, sqd, row_ok, hs)  # (BM, BD)
    do = _load_tile(do_ptr + bh * Tq * hs, offs_m, offs_d, hs, 1, row_ok, hs)  # (BM, BD)
    lse = tl.load(lse_ptr + bh * Tq + offs_m, mask=row_ok, other=0.0)  # (BM,)
    delta = tl.load(delta_ptr + bh * Tq + offs_m, mask=row_ok, other=0.0)  # (BM,)
    return q, do, lse, delta, row_ok


@triton.jit
def _key_rows(
    k_base, skt, skd, v_base, svt, svd, mask_base, smt, offs_n, offs_d, Tk, hs,
    HAS_MASK: tl.constexpr,
):  # fmt: skip
    """The key side of a backward block: k, v (BN, BD), zero past Tk, col_ok (BN,) (keys
    before Tk) and key_ok (BN,) (those that are not padding either)."""
    col_ok = offs_n < Tk
    k = _load_tile(k_base, offs_n, offs_d, skt, skd, col_ok, hs)  # (BN, BD)
    v = _load_tile(v_base, offs_n, offs_d, svt, svd, col_ok, hs)  # (BN, BD)
    key_ok = col_ok
    if HAS_MASK:
        km = tl.load(mask_base + offs_n * smt, mask=col_ok, other=0)
        key_ok = key_ok & (km != 0)
    return k, v, col_ok, key_ok


@triton.jit
def _attn_fwd_keys(
    acc, l_i, m_i, q,
    k_base, v_base, mask_base, skt, skd, svt, svd, smt,
    offs_m, offs_d, shift, Tk, hs, lo, hi, qk_scale,
    HAS_MASK: tl.constexpr,
    EDGE: tl.constexpr,
    EVEN_D: tl.constexpr,
    PRECISION: tl.constexpr,
    BN: tl.constexpr,
):  # fmt: skip
    """Fold the key blocks [lo, hi) into the running (acc, l_i, m_i) of one query block.
    EDGE: blocks that may hold keys in some query's future or past Tk (the causal diagonal,
    the end); the blocks before it are visible to every query and skip that masking."""
    for start_n in range(lo, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k_ptrs = k_base + offs_n[:, None] * skt + offs_d[None, :] * skd
        v_ptrs = v_base + offs_n[:, None] * svt + offs_d[None, :] * svd
        if EDGE:
            kv_ok = (offs_n < Tk)[:, None] & (offs_d < hs)[None, :]
            k = tl.load(k_ptrs, mask=kv_ok, other=0.0)  # (BN, BD)
            v = tl.load(v_ptrs, mask=kv_ok, other=0.0)  # (BN, BD)
        elif EVEN_D:  # no mask at all: the loads can be full-width
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=(offs_d < hs)[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=(offs_d < hs)[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN), log2 units
        if EDGE:
            visible = (offs_n[None, :] <= shift + offs_m[:, None]) & (offs_n < Tk)[None, :]
            s = tl.where(visible, s, float("-inf"))
        if HAS_MASK:
            km = tl.load(mask_base + offs_n * smt, mask=offs_n < Tk, other=0)
            s = tl.where((km != 0)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # (BM,)
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])  # (BM, BN), 0 where hidden
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, NH, Tq, hs) queries, strides sq*
    k_ptr,  # (B, NH, Tk, hs) keys, strides sk*
    v_ptr,  # (B, NH, Tk, hs) values, strides sv*
    mask_ptr,  # (B, Tk) int8 key mask, 1 = real key, 0 = padding (read when HAS_MASK)
    out_ptr,  # (B, NH, Tq, hs) output, q's dtype, strides so*
    lse_ptr,  # (B, NH, Tq) float32 logsumexp of each query's scores, contiguous
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    sob, soh, sot, sod,
    smb, smt,
    NH, Tq, Tk, hs,
    qk_scale,  # log2(e) / sqrt(hs): scores in log2 units, for exp2
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh, b, h = _head(NH)
    shift = Tk - Tq  # query i sits at absolute position shift + i
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    row_ok = offs_m < Tq
    d_ok = offs_d < hs
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, offs_d, sqt, sqd, row_ok, hs)  # (BM, BD)
    m_i = tl.full([BM], -1.0e30, dtype=tl.float32)  # finite: a fully masked block gives p = 0
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    k_base = k_ptr + b * skb + h * skh
    v_base = v_ptr + b * svb + h * svh
    mask_base = mask_ptr + b * smb
    # keys < full_end are visible to every query of the block (all sit at >= shift + pid_m BM);
    # keys past hi are in every query's future
    full_end = ((shift + pid_m * BM + 1) // BN) * BN
    hi = tl.minimum(Tk, shift + (pid_m + 1) * BM)
    acc, l_i, m_i = _attn_fwd_keys(
        acc, l_i, m_i, q, k_base, v_base, mask_base, skt, skd, svt, svd, smt,
        offs_m, offs_d, shift, Tk, hs, 0, full_end, qk_scale,
        HAS_MASK, False, BD == hs, PRECISION, BN,
    )  # fmt: skip
    acc, l_i, m_i = _attn_fwd_keys(
        acc, l_i, m_i, q, k_base, v_base, mask_base, skt, skd, svt, svd, smt,
        offs_m, offs_d, shift, Tk, hs, full_end, hi, qk_scale,
        HAS_MASK, True, BD == hs, PRECISION, BN,
    )  # fmt: skip
    seen = l_i > 0.0  # False for a query with no visible key
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # (BM, BD), 0 for such a query
    # lse in natural-log units, as the reference keeps it: (m + log2 l) * ln 2
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, 0.0)
    o_ptrs = out_ptr + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh * Tq + offs_m, lse, mask=row_ok)


@triton.jit
def _att_and_ds(q, k, v, do, lse, delta, visible, qk_scale, PRECISION: tl.constexpr):
    """Backward's recomputation for a (BM, BN) block: p = att = exp(s - lse) where visible
    (scores in log2 units, lse in natural ones), dp = dout v^T, ds = p * (dp - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BM, BN)
    p = tl.where(visible, tl.exp2(s - lse[:, None] * 1.4426950408889634), 0.0)  # (BM, BN)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BM, BN)
    return p, p * (dp - delta[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, NH, Tq, hs) queries, strides sq*
    k_ptr,  # (B, NH, Tk, hs) keys, strides sk*
    v_ptr,  # (B, NH, Tk, hs) values, strides sv*
    mask_ptr,  # (B, Tk) int8 key mask (read when HAS_MASK)
    do_ptr,  # (B, NH, Tq, hs) upstream gradient, contiguous
    lse_ptr,  # (B, NH, Tq) float32 from forward
    delta_ptr,  # (B, NH, Tq) float32 rowsum(dout * out)
    dk_ptr,  # (B, NH, Tk, hs) output, contiguous
    dv_ptr,  # (B, NH, Tk, hs) output, contiguous
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    NH, Tq, Tk, hs,
    scale,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh, b, h = _head(NH)
    shift = Tk - Tq
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    k, v, col_ok, key_ok = _key_rows(
        k_ptr + b * skb + h * skh, skt, skd, v_ptr + b * svb + h * svh, svt, svd,
        mask_ptr + b * smb, smt, offs_n, offs_d, Tk, hs, HAS_MASK,
    )  # fmt: skip
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    lo = tl.maximum(pid_n * BN - shift, 0)  # queries before lo see none of these keys
    lo = (lo // BM) * BM
    for start_m in range(lo, Tq, BM):
        offs_m = start_m + tl.arange(0, BM)
        q, do, lse, delta, row_ok = _query_rows(
            q_ptr + b * sqb + h * sqh, sqt, sqd, do_ptr, lse_ptr, delta_ptr, bh, offs_m,
            offs_d, Tq, hs,
        )  # fmt: skip
        visible = (offs_n[None, :] <= shift + offs_m[:, None]) & key_ok[None, :] & row_ok[:, None]
        p, ds = _att_and_ds(
            q, k, v, do, lse, delta, visible, scale * 1.4426950408889634, PRECISION
        )  # (BM, BN) each
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # (BN, BD)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # (BN, BD)
    dk = dk * scale
    out_ptrs = bh * Tk * hs + offs_n[:, None] * hs + offs_d[None, :]
    kv_ok = col_ok[:, None] & (offs_d < hs)[None, :]
    tl.store(dk_ptr + out_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptr + out_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, NH, Tq, hs) queries, strides sq*
    k_ptr,  # (B, NH, Tk, hs) keys, strides sk*
    v_ptr,  # (B, NH, Tk, hs) values, strides sv*
    mask_ptr,  # (B, Tk) int8 key mask (read when HAS_MASK)
    do_ptr,  # (B, NH, Tq, hs) upstream gradient, contiguous
    lse_ptr,  # (B, NH, Tq) float32 from forward
    delta_ptr,  # (B, NH, Tq) float32 rowsum(dout * out)
    dq_ptr,  # (B, NH, Tq, hs) output, contiguous
    sqb, sqh, sqt, sqd,
    skb, skh, skt, skd,
    svb, svh, svt, svd,
    smb, smt,
    NH, Tq, Tk, hs,
    scale,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BD: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh, b, h = _head(NH)
    shift = Tk - Tq
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q, do, lse, delta, row_ok = _query_rows(
        q_ptr + b * sqb + h * sqh, sqt, sqd, do_ptr, lse_ptr, delta_ptr, bh, offs_m, offs_d,
        Tq, hs,
    )  # fmt: skip
    dq = tl.zeros([BM, BD], dtype=tl.float32)
    hi = tl.minimum(Tk, shift + (pid_m + 1) * BM)
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        k, v, _, key_ok = _key_rows(
            k_ptr + b * skb + h * skh, skt, skd, v_ptr + b * svb + h * svh, svt, svd,
            mask_ptr + b * smb, smt, offs_n, offs_d, Tk, hs, HAS_MASK,
        )  # fmt: skip
        visible = (offs_n[None, :] <= shift + offs_m[:, None]) & key_ok[None, :]
        _, ds = _att_and_ds(
            q, k, v, do, lse, delta, visible, scale * 1.4426950408889634, PRECISION
        )  # (BM, BN)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BM, BD)
    dq = dq * scale
    tl.store(
        dq_ptr + bh * Tq * hs + offs_m[:, None] * hs + offs_d[None, :],
        dq.to(dq_ptr.dtype.element_ty),
        mask=row_ok[:, None] & (offs_d < hs)[None, :],
    )


def _check(q, k, v, key_mask) -> None:
    op = "attention_forward"
    check_float(op, q=q, k=k, v=v)
    check_device(_attn_fwd_kernel, op, q=q, k=k, v=v, key_mask=key_mask)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{op}: q, k, v must be (B, NH, T, hs), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    if tuple(k.shape) != (B, NH, Tk, hs) or tuple(v.shape) != (B, NH, Tk, hs):
        raise ValueError(
            f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
            f"(B={B}, NH={NH}, Tk, hs={hs})"
        )
    if Tq < 1 or Tk < Tq:
        raise ValueError(f"{op}: need 1 <= Tq <= Tk, got Tq={Tq}, Tk={Tk}")
    if B * NH > MAX_GRID_Y:
        raise ValueError(
            f"{op}: B * NH = {B * NH} exceeds CUDA's grid limit of {MAX_GRID_Y} (axis 1); "
            "split the batch"
        )
    if not 1 <= hs <= MAX_HEAD_SIZE:
        raise ValueError(f"{op}: head size {hs} is outside the kernel's range 1..{MAX_HEAD_SIZE}")
    if key_mask is not None:
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, Tk):
            raise ValueError(
                f"{op}: key_mask must be bool ({B}, {Tk}), got {key_mask.dtype} "
                f"{tuple(key_mask.shape)}"
            )


def _shared_bytes(bm: int, bn: int, bd: int, elem: int) -> int:
    """Shared memory the kernels need, from compiling them for sm_90 (bench/tools/triton_aot.py):
    the largest, dq's, is 28 B (float32, IEEE dots) or 9 B (16-bit) per max(BM, BN) x BD."""
    return (28 if elem == 4 else 9) * max(bm, bn) * bd


def _blocks(q: torch.Tensor, bm: int, bn: int) -> tuple[int, int, int, str]:
    """(BM, BN, BD, dot precision): the requested blocks, halved until they fit the GPU."""
    BD = max(16, triton.next_power_of_2(q.shape[-1]))  # tl.dot needs every side >= 16
    if bm < 16 or bn < 16 or bm & (bm - 1) or bn & (bn - 1):
        raise ValueError(f"attention: blocks must be powers of two >= 16, got {bm}, {bn}")
    if q.is_cuda:
        props = torch.cuda.get_device_properties(q.device)
        limit = getattr(props, "shared_memory_per_block_optin", 99 * 1024)
        while _shared_bytes(bm, bn, BD, q.element_size()) > limit and max(bm, bn) > 16:
            bm, bn = max(bm // 2, 16), max(bn // 2, 16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit
    return bm, bn, BD, precision


def attention_forward(
    q, k, v, key_mask=None, *, block_m: int | None = None, block_n: int | None = None,
    config: tuple[int, int, int, int] | None = None,
):  # fmt: skip
    """q (B, NH, Tq, hs), k and v (B, NH, Tk, hs), key_mask (B, Tk) bool or None
    -> out (B, NH, Tq, hs); cache = (q, k, v, mask8, out, lse, blocks).
    config: the forward's (BM, BN, num_warps, num_stages), default FWD_CONFIG (DECODE_CONFIG
    when Tq <= 16) for q's dtype; block_m, block_n replace its blocks, and backward's too."""
    _check(q, k, v, key_mask)
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    if config is None:
        config = (DECODE_CONFIG if Tq <= 16 else FWD_CONFIG)[min(q.element_size(), 4)]
    bm, bn, warps, stages = config
    BM, BN, BD, precision = _blocks(q, block_m or bm, block_n or bn)
    out = torch.empty(B, NH, Tq, hs, dtype=q.dtype, device=q.device)  # (B, NH, Tq, hs)
    lse = torch.empty(B, NH, Tq, dtype=torch.float32, device=q.device)  # (B, NH, Tq)
    mask8 = None if key_mask is None else key_mask.to(torch.int8)  # (B, Tk)
    mask_arg = lse if mask8 is None else mask8  # any pointer: not read without HAS_MASK
    smb, smt = (0, 0) if mask8 is None else mask8.stride()
    grid = (triton.cdiv(Tq, BM), B * NH)
    if B * NH:
        _attn_fwd_kernel[grid](
            q, k, v, mask_arg, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smt,
            NH, Tq, Tk, hs, LOG2E / math.sqrt(hs),
            HAS_MASK=mask8 is not None, PRECISION=precision, BM=BM, BN=BN, BD=BD,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    asked = (BM, BN) if block_m or block_n else None  # backward takes the same, if asked
    return out, (q, k, v, mask8, out, lse, asked)


def attention_backward(
    dout, cache, *, dkdv_config: tuple[int, int, int, int] | None = None,
    dq_config: tuple[int, int, int, int] | None = None,
):  # fmt: skip
    """dout (B, NH, Tq, hs) -> dq (B, NH, Tq, hs), dk, dv (B, NH, Tk, hs).
    dkdv_config, dq_config: each kernel's (BM, BN, num_warps, num_stages), default DKDV_CONFIG,
    DQ_CONFIG for q's dtype, with the blocks the forward was given, if any."""
    q, k, v, mask8, out, lse, blocks = cache
    B, NH, Tq, hs = q.shape
    Tk = k.shape[2]
    if tuple(dout.shape) != (B, NH, Tq, hs):
        raise ValueError(
            f"attention_backward: dout has shape {tuple(dout.shape)}, expected {(B, NH, Tq, hs)}"
        )
    check_device(_attn_bwd_dq_kernel, "attention_backward", dout=dout, q=q)
    width = min(q.element_size(), 4)
    do = dout.to(q.dtype).contiguous()  # (B, NH, Tq, hs)
    delta = (do.float() * out.float()).sum(dim=-1).contiguous()  # (B, NH, Tq) = rowsum(p * dp)
    dq = torch.empty(B, NH, Tq, hs, dtype=q.dtype, device=q.device)  # (B, NH, Tq, hs)
    dk = torch.empty(B, NH, Tk, hs, dtype=q.dtype, device=q.device)  # (B, NH, Tk, hs)
    dv = torch.empty(B, NH, Tk, hs, dtype=q.dtype, device=q.device)  # (B, NH, Tk, hs)
    mask_arg = lse if mask8 is None else mask8
    smb, smt = (0, 0) if mask8 is None else mask8.stride()
    launches = (
        (_attn_bwd_dkdv_kernel, dkdv_config, DKDV_CONFIG),
        (_attn_bwd_dq_kernel, dq_config, DQ_CONFIG),
    )
    for kernel, config, table in launches:
        if not B * NH:
            break
        if config is None:
            config = (*(blocks or table[width][:2]), *table[width][2:])
        bm, bn, warps, stages = config
        BM, BN, BD, precision = _blocks(q, bm, bn)
        dkdv = kernel is _attn_bwd_dkdv_kernel
        grid = (triton.cdiv(Tk, BN) if dkdv else triton.cdiv(Tq, BM), B * NH)
        kernel[grid](
            q, k, v, mask_arg, do, lse, delta, *((dk, dv) if dkdv else (dq,)),
            *q.stride(), *k.stride(), *v.stride(), smb, smt,
            NH, Tq, Tk, hs, 1.0 / math.sqrt(hs),
            HAS_MASK=mask8 is not None, PRECISION=precision, BM=BM, BN=BN, BD=BD,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return dq, dk, dv


class AttentionFunction(torch.autograd.Function):
    """Causal flash attention, differentiable in q, k and v (not in the key mask)."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, block_m=None, block_n=None):
        out, cache = attention_forward(q, k, v, key_mask, block_m=block_m, block_n=block_n)
        q_, k_, v_, mask8, out_, lse, blocks = cache
        ctx.save_for_backward(q_, k_, v_, out_, lse)
        ctx.mask8, ctx.blocks = mask8, blocks
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout, (q, k, v, ctx.mask8, out, lse, ctx.blocks))
        return dq, dk, dv, None, None, None


def attention(q, k, v, key_mask=None, *, block_m: int | None = None, block_n: int | None = None):
    """Differentiable causal attention: q (B, NH, Tq, hs), k, v (B, NH, Tk, hs) -> like q."""
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return attention_forward(q, k, v, key_mask, block_m=block_m, block_n=block_n)[0]
    return AttentionFunction.apply(q, k, v, key_mask, block_m, block_n)
