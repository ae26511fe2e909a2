"""The Triton kernels (fast/triton/*.py) against the numpy reference (ref/ops.py).

Without a GPU the kernels run in Triton's interpreter on CPU tensors. `@triton.jit` picks
the interpreter when a kernel is *defined*, so TRITON_INTERPRET=1 is set here before any
import of triton itself (triton.language's own `tl.sum`, `tl.max` are jit functions defined
when triton is imported). pytest imports every test module before running any test; if an
earlier module imported triton without it, the module-level check below fails loudly rather
than testing nothing. Setting TRITON_INTERPRET=1 in the environment always works.

Tolerances (float32): every result is a float32 reduction of length n (C, Tk, hs or V) on
values of order 1, computed in a different order from numpy's (pairwise or BLAS), so the
difference is bounded by about n * 2^-24 * max|term|; with n <= 129 here (V, where the
terms are probabilities, excepted) that is under 1e-5, hence atol = rtol = 1e-5 unless
stated otherwise. float16 / bfloat16 are compared with the float32 reference at their own
precision (2^-11 and 2^-8 relative).

bfloat16 attention is not checked in the interpreter: Triton 3.9's interpreter multiplies the
raw bit patterns of bfloat16 `tl.dot` operands (triton-lang/triton#11584; maintainers: "we
just don't support it yet"); the CUDA test at the end covers it. On this machine the CUDA
tests are skipped: a skip, not a pass.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():  # before triton itself: tl.sum & co. are jit functions too
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fast.triton import attention as ta  # noqa: E402
from fast.triton import backend as tb  # noqa: E402
from fast.triton import crossentropy as tc  # noqa: E402
from fast.triton import gelu as tg  # noqa: E402
from fast.triton import layernorm as tln  # noqa: E402
from fast.triton.common import TritonDeviceError, check_device, is_interpreted  # noqa: E402
from ref import ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not (
    is_interpreted(tln._layernorm_fwd_kernel) and is_interpreted(triton.language.sum)
):
    raise RuntimeError(
        "triton was imported before TRITON_INTERPRET=1 was set: its kernels are compiled for "
        "a GPU this machine lacks; set TRITON_INTERPRET=1 in the environment (or in "
        "tests/conftest.py) or run this file in its own process"
    )

ATOL = RTOL = 1e-5


def T(a: np.ndarray) -> torch.Tensor:
    """A copy on the test device (never a view of `a`: in-place kernels must not write into
    the numpy arrays the reference reads)."""
    return torch.tensor(np.ascontiguousarray(a), device=DEVICE)


def N(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def close(got, want, atol=ATOL, rtol=RTOL, what=""):
    np.testing.assert_allclose(N(got), want, atol=atol, rtol=rtol, err_msg=what)


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# LayerNorm


@given(
    rows=st.integers(1, 9),
    C=st.sampled_from([1, 2, 3, 7, 64, 100, 129]),
    seed=st.integers(0, 2**16),
)
def test_layernorm_matches_reference(rows, C, seed):
    rng = np.random.default_rng(seed)
    x = randn(rng, rows, 1, C, scale=3.0) + 1.0  # (rows, 1, C): a batch axis to flatten
    g, b = randn(rng, C) + 1.0, randn(rng, C)
    dout = randn(rng, rows, 1, C)
    want, cache = ops.layernorm_forward(x, g, b, 1e-5)
    dx, dg, db = ops.layernorm_backward(dout, cache)
    out, tcache = tln.layernorm_forward(T(x), T(g), T(b), 1e-5)
    close(out, want, what="out")
    got = tln.layernorm_backward(T(dout), tcache)
    for name, a, w in zip(("dx", "dg", "db"), got, (dx, dg, db), strict=True):
        close(a, w, what=name)


def test_layernorm_backward_partials_over_many_rows():
    """More rows than groups (256): some programs sum two rows into their partials."""
    rng = np.random.default_rng(0)
    x, dout = randn(rng, 300, 5), randn(rng, 300, 5)
    g, b = randn(rng, 5), randn(rng, 5)
    _, cache = ops.layernorm_forward(x, g, b)
    want = ops.layernorm_backward(dout, cache)
    _, tcache = tln.layernorm_forward(T(x), T(g), T(b))
    got = tln.layernorm_backward(T(dout), tcache)
    # dg, db sum 300 rows of order-1 terms: 300 * 2^-24 * a few ~ 1e-4
    for a, w in zip(got, want, strict=True):
        close(a, w, atol=1e-4)


@pytest.mark.parametrize("N, C", [(3001, 64), (2050, 7)])
def test_layernorm_forward_several_rows_per_program(N, C):
    """Enough short rows that each forward program takes several (ROWS > 1), N not a
    multiple of ROWS: the last program's extra rows must be masked off."""
    rows, _ = tln._fwd_launch(triton.next_power_of_2(C), N, tln.FWD_ELEMENTS, tln.FWD_WARPS)
    assert rows > 1
    rng = np.random.default_rng(N)
    x, g, b = randn(rng, N, C, scale=2.0), randn(rng, C) + 1.0, randn(rng, C)
    want, cache = ops.layernorm_forward(x, g, b)
    out, (_, _, mean, rstd) = tln.layernorm_forward(T(x), T(g), T(b))
    close(out, want)
    close(mean, x.mean(axis=1))
    close(rstd, cache[1].reshape(-1), rtol=1e-4)  # rstd ~ 1/2: rounding of 1/sqrt


# ---------------------------------------------------------------------------------------------
# GELU and bias + GELU


# numpy warns when the interpreter's exp overflows to inf for x << 0 (sigmoid(2u) with u below
# -44); inf is the intended IEEE result there, as on the GPU: 1 / (1 + inf) = 0
EXP_OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def close_gelu(got, want, x, dout=None):
    """The reference's 1 + tanh(u) and 1 - tanh(u)^2 cancel for x << 0 (tanh u near -1), an
    absolute error of up to 2^-23 times the factor in front: 0.5 |x| forward, and
    0.5 |x| du/dx = 0.5 |x| sqrt(2/pi) (1 + 0.134 x^2) backward. The kernel's sigmoid form has
    no cancellation, so the difference is the reference's error, bounded per element."""
    x = x.astype(np.float64)
    factor = 0.5 * np.abs(x) if dout is None else 0.5 * np.abs(x * dout) * (1 + 0.134 * x * x)
    bound = 1e-6 + 1e-5 * np.abs(want) + 2.0**-22 * factor
    err = np.abs(N(got) - want)
    assert np.all(err <= bound), (
        f"max excess {np.max(err - bound)} at x={x[np.argmax(err - bound)]}"
    )


@EXP_OVERFLOW_OK
@given(n=st.sampled_from([1, 5, 1023, 1024, 1500]), seed=st.integers(0, 2**16))
def test_gelu_matches_reference(n, seed):
    rng = np.random.default_rng(seed)
    x, dout = randn(rng, n, scale=4.0), randn(rng, n)
    want, cache = ops.gelu_forward(x)
    out, tcache = tg.gelu_forward(T(x))
    close_gelu(out, want, x)
    close_gelu(tg.gelu_backward(T(dout), tcache), ops.gelu_backward(dout, cache), x, dout)


def check_bias_gelu(rows: int, H: int, seed: int):
    """out and dx against the reference; returns (db from the kernel, db reference, x + b, dout)
    for the caller's db tolerance, which depends on how many rows it sums."""
    rng = np.random.default_rng(seed)
    x, b, dout = randn(rng, rows, H, scale=3.0), randn(rng, H), randn(rng, rows, H)
    want, cache = ops.bias_gelu_forward(x, b)
    dx, db = ops.bias_gelu_backward(dout, cache)
    out, tcache = tg.bias_gelu_forward(T(x), T(b))
    close_gelu(out, want, x + b)
    gdx, gdb = tg.bias_gelu_backward(T(dout), tcache)
    close_gelu(gdx, dx, x + b, dout)
    return N(gdb), db, x + b, dout


@EXP_OVERFLOW_OK
@given(rows=st.integers(1, 7), H=st.sampled_from([1, 3, 64, 257]), seed=st.integers(0, 2**16))
def test_bias_gelu_matches_reference(rows, H, seed):
    gdb, db, xb, dout = check_bias_gelu(rows, H, seed)
    bound = (2.0**-22 * 0.5 * np.abs(xb * dout) * (1 + 0.134 * xb**2)).sum(0)
    # the per-element bounds, summed over the rows
    assert np.all(np.abs(gdb - db) <= 1e-5 + 1e-5 * np.abs(db) + bound)


@EXP_OVERFLOW_OK
def test_bias_gelu_tiles_and_row_groups():
    """Wider than one column block (BIAS_BLOCK_H), more rows than row groups, groups whose row
    count is not a multiple of the tile's rows: every tile edge is masked."""
    gdb, db, _, _ = check_bias_gelu(701, tg.BIAS_BLOCK_H * 2 + 7, 5)
    # db sums 701 rows of terms of order 1: 701 * 2^-24 * a few ~ 1e-4
    np.testing.assert_allclose(gdb, db, atol=2e-4, rtol=1e-5)


def test_gelu_extremes_stay_finite():
    x = np.array([-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4], np.float32)
    out, cache = tg.gelu_forward(T(x))
    want, rcache = ops.gelu_forward(x)
    assert np.isfinite(N(out)).all()
    close_gelu(out, want, x)
    one = np.ones_like(x)
    close_gelu(tg.gelu_backward(T(one), cache), ops.gelu_backward(one, rcache), x, one)


# ---------------------------------------------------------------------------------------------
# attention


def attention_case(rng, B, NH, Tq, Tk, hs, masked):
    q, k, v = randn(rng, B, NH, Tq, hs), randn(rng, B, NH, Tk, hs), randn(rng, B, NH, Tk, hs)
    key_mask = None
    if masked:
        key_mask = rng.random((B, Tk)) > 0.3  # (B, Tk)
        key_mask[:, : rng.integers(0, Tk + 1)] = False  # left padding, sometimes all of it
    return q, k, v, key_mask


def check_attention(q, k, v, key_mask, atol=2e-5, **blocks):
    """Scores are q.k over hs <= 64 terms, then sums over Tk <= 40 keys: 2e-5 covers both."""
    want, cache = ops.attention_forward(q, k, v, key_mask)
    dout = randn(np.random.default_rng(1), *want.shape)
    dq, dk, dv = ops.attention_backward(dout, cache)
    km = None if key_mask is None else T(key_mask)
    out, tcache = ta.attention_forward(T(q), T(k), T(v), km, **blocks)
    close(out, want, atol=atol, rtol=1e-4, what="out")
    got = ta.attention_backward(T(dout), tcache)
    for name, a, w in zip(("dq", "dk", "dv"), got, (dq, dk, dv), strict=True):
        close(a, w, atol=atol, rtol=1e-4, what=name)


@given(
    B=st.integers(1, 2),
    NH=st.integers(1, 2),
    Tq=st.integers(1, 20),
    extra=st.integers(0, 20),
    hs=st.sampled_from([1, 5, 8, 16, 20, 64]),
    masked=st.booleans(),
    blocks=st.sampled_from([(16, 16), (16, 32), (32, 16)]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_reference(B, NH, Tq, extra, hs, masked, blocks, seed):
    """Tq <= Tk (a KV-cache offset of `extra`), any T, odd head sizes, padding masks, and
    blocks smaller than T so the kernels walk several query and key blocks."""
    rng = np.random.default_rng(seed)
    q, k, v, key_mask = attention_case(rng, B, NH, Tq, Tq + extra, hs, masked)
    check_attention(q, k, v, key_mask, block_m=blocks[0], block_n=blocks[1])


# float32: scores over 64 terms, sums over <= 200 keys of order-1 values: 2e-5 as above
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("Tq, Tk", [(70, 200), (1, 133), (200, 200)])
def test_attention_default_blocks(dtype, atol, Tq, Tk):
    """The tuned default blocks (FWD_CONFIG, DKDV_CONFIG, DQ_CONFIG, BM = 16 for a decode step):
    key blocks visible to whole query blocks (the unmasked loop), then the diagonal."""
    rng = np.random.default_rng(Tq)
    q, k, v, key_mask = attention_case(rng, 1, 2, Tq, Tk, 64, Tq == 70)
    want, cache = ops.attention_forward(q, k, v, key_mask)
    dout = randn(rng, *want.shape)
    grads = ops.attention_backward(dout, cache)
    km = None if key_mask is None else T(key_mask)
    out, tcache = ta.attention_forward(*[T(a).to(dtype) for a in (q, k, v)], km)
    assert tcache[-1] is None  # default blocks: backward takes DKDV_CONFIG, DQ_CONFIG
    close(out, want, atol=atol, rtol=atol)
    for a, w in zip(ta.attention_backward(T(dout).to(dtype), tcache), grads, strict=True):
        close(a, w, atol=4 * atol, rtol=4 * atol)


def test_attention_query_with_no_visible_key_is_zero():
    rng = np.random.default_rng(0)
    q, k, v, _ = attention_case(rng, 2, 2, 6, 6, 8, False)
    key_mask = np.ones((2, 6), bool)
    key_mask[0, :3] = False  # row 0: queries 0..2 are padding and see no key
    out, cache = ta.attention_forward(T(q), T(k), T(v), T(key_mask), block_m=16, block_n=16)
    assert np.all(N(out)[0, :, :3] == 0.0)
    dq, dk, dv = ta.attention_backward(T(np.ones_like(q)), cache)
    assert np.all(N(dq)[0, :, :3] == 0.0)
    assert np.isfinite(N(dk)).all() and np.isfinite(N(dv)).all()
    check_attention(q, k, v, key_mask, block_m=16, block_n=16)


def test_attention_on_strided_views():
    """The model passes q, k, v as views of one (B, T, 3, NH, hs) buffer, and cache slices."""
    rng = np.random.default_rng(3)
    B, Tn, NH, hs = 2, 9, 3, 8
    qkv = T(randn(rng, B, Tn, 3, NH, hs)).permute(2, 0, 3, 1, 4)  # (3, B, NH, T, hs) view
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert not q.is_contiguous()
    check_attention(N(q), N(k), N(v), None)  # reference on copies
    want, _ = ops.attention_forward(N(q), N(k), N(v))
    out, _ = ta.attention_forward(q, k, v, block_m=16, block_n=16)
    close(out, want, atol=2e-5)


@pytest.mark.parametrize(
    "dtype, atol",
    [
        # inputs rounded to float16 (2^-11 relative), float32 accumulation, output rounded
        (torch.float16, 5e-3),
        pytest.param(
            torch.bfloat16,
            4e-2,
            marks=pytest.mark.skipif(
                not CUDA, reason="interpreter lacks bfloat16 tl.dot (triton#11584)"
            ),
        ),
    ],
)
def test_attention_half_precision(dtype, atol):
    rng = np.random.default_rng(5)
    q, k, v, key_mask = attention_case(rng, 2, 2, 19, 23, 64, True)
    want, cache = ops.attention_forward(q, k, v, key_mask)
    dout = randn(rng, *want.shape)
    dq, dk, dv = ops.attention_backward(dout, cache)
    h = [T(a).to(dtype) for a in (q, k, v)]
    out, tcache = ta.attention_forward(*h, T(key_mask), block_m=16, block_n=16)
    assert out.dtype == dtype
    close(out, want, atol=atol, rtol=atol)
    got = ta.attention_backward(T(dout).to(dtype), tcache)
    for a, w in zip(got, (dq, dk, dv), strict=True):
        assert a.dtype == dtype
        close(a, w, atol=4 * atol, rtol=4 * atol)  # gradients chain two more roundings


# ---------------------------------------------------------------------------------------------
# cross-entropy


@given(
    rows=st.integers(1, 6),
    V=st.sampled_from([1, 2, 13, 4097, 50257]),
    n_ignored=st.integers(0, 6),
    variant=st.sampled_from(["online", "fused", "inplace"]),
    dloss=st.sampled_from([0.7, 1.0]),  # 1.0: the fused variant hands its buffer over as is
    seed=st.integers(0, 2**16),
)
def test_crossentropy_matches_reference(rows, V, n_ignored, variant, dloss, seed):
    rng = np.random.default_rng(seed)
    logits = randn(rng, rows, V, scale=4.0)
    targets = rng.integers(0, V, rows)
    targets[: min(n_ignored, rows)] = -100  # sometimes every row is ignored
    loss, cache = ops.crossentropy_forward(logits, targets, -100)
    want = ops.crossentropy_backward(np.float32(dloss), cache)
    fwd = tb.VARIANTS["crossentropy"][variant][0]
    tlogits = T(logits)
    tloss, tcache = fwd(tlogits, T(targets), -100)
    if variant == "inplace":  # the logits now hold the gradient for dloss = 1
        _, cache1 = ops.crossentropy_forward(logits, targets, -100)  # a cache is single-use
        close(tlogits, ops.crossentropy_backward(np.float32(1.0), cache1), atol=1e-6)
    # logsumexp over V terms: float32 sums of up to 50,257 positive terms, relative 1e-5
    np.testing.assert_allclose(float(tloss), float(loss), rtol=1e-5, atol=1e-5)
    # probabilities <= 1 scaled by dloss / count: absolute 1e-6
    close(tc.crossentropy_backward(torch.tensor(dloss), tcache), want, atol=1e-6)


def test_crossentropy_errors_name_the_problem():
    logits = T(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="target 7 is outside the vocabulary"):
        tc.crossentropy_forward(logits, T(np.array([1, 7])))
    with pytest.raises(ValueError, match="targets must be"):
        tc.crossentropy_forward(logits, T(np.array([1, 2, 3])))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tc.crossentropy_forward(logits.double(), T(np.array([1, 2])))


# ---------------------------------------------------------------------------------------------
# half precision for the row kernels


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 4e-2)])
def test_row_kernels_half_precision(dtype, tol):
    """float16 / bfloat16 in, float32 math, output rounded: errors at the dtype's precision."""
    rng = np.random.default_rng(2)
    x, g, b = randn(rng, 6, 77), randn(rng, 77) + 1.0, randn(rng, 77)
    out, _ = tln.layernorm_forward(T(x).to(dtype), T(g).to(dtype), T(b).to(dtype))
    want, _ = ops.layernorm_forward(x, g, b)
    close(out, want, atol=4 * tol, rtol=tol)
    out, _ = tg.bias_gelu_forward(T(x).to(dtype), T(b).to(dtype))
    close(out, ops.bias_gelu_forward(x, b)[0], atol=4 * tol, rtol=tol)
    targets = rng.integers(0, 77, 6)
    lossh, _ = tc.crossentropy_forward(T(x).to(dtype), T(targets))
    xr = N(T(x).to(dtype))  # the logits as the kernel saw them
    np.testing.assert_allclose(float(lossh), float(ops.crossentropy_forward(xr, targets)[0]),
                               rtol=1e-5)  # float32 math on the same rounded inputs  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the registry, the autograd Functions, host-side limits


@pytest.mark.parametrize(
    "op, variant", [(op, v) for op, vs in tb.VARIANTS.items() for v in vs]
)  # fmt: skip
def test_every_variant_matches_reference(op, variant):
    fwd, bwd = tb.VARIANTS[op][variant]
    rng = np.random.default_rng(7)
    if op == "attention":
        q, k, v, km = attention_case(rng, 1, 2, 7, 40, 16, True)  # 40 keys: > one 32-block
        args = (q, k, v, km)
    elif op == "layernorm":
        args = (randn(rng, 4, 33), randn(rng, 33), randn(rng, 33), 1e-5)
    elif op == "gelu":
        args = (randn(rng, 4, 33),)
    elif op == "bias_gelu":
        args = (randn(rng, 4, 33), randn(rng, 33))
    else:
        args = (randn(rng, 4, 33), rng.integers(0, 33, 4), -100)
    want, rcache = getattr(ops, f"{op}_forward")(*args)
    out, cache = fwd(*[T(a) if isinstance(a, np.ndarray) else a for a in args])
    close(out, want, atol=2e-5)
    dout = np.float32(1.0) if op == "crossentropy" else randn(rng, *np.shape(want))
    rgrads = getattr(ops, f"{op}_backward")(dout, rcache)
    grads = bwd(T(np.asarray(dout)), cache)
    rgrads = rgrads if isinstance(rgrads, tuple) else (rgrads,)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for a, w in zip(grads, rgrads, strict=True):
        close(a, w, atol=2e-5)


def test_autograd_functions_match_torch():
    """A torch graph through the autograd Functions gives torch's own gradients."""
    from fast.torch import backend as pb

    rng = np.random.default_rng(11)
    x = T(randn(rng, 2, 5, 24))  # (B, T, C)
    g, b = T(randn(rng, 24) + 1.0), T(randn(rng, 24))
    w = T(randn(rng, 24, 3 * 24, scale=0.2))
    bias = T(randn(rng, 3 * 24))
    tgt = T(rng.integers(0, 3 * 24, 10))
    km = T(np.array([[False, True, True, True, True], [True] * 5]))

    def run(mod):
        leaves = [t.clone().requires_grad_(True) for t in (x, g, b, w, bias)]
        xx, gg, bb, ww, bi = leaves
        h = mod.layernorm(xx, gg, bb, 1e-5)  # (B, T, C)
        h = mod.bias_gelu(h @ ww, bi)  # (B, T, 3C)
        q, k, v = h.view(2, 5, 3, 2, 12).permute(2, 0, 3, 1, 4)  # (B, NH, T, hs) each
        y = mod.attention(q, k, v, km).transpose(1, 2).reshape(2, 5, 24)  # (B, T, C)
        logits = mod.gelu(y) @ ww  # (B, T, 3C)
        loss = mod.crossentropy(logits.reshape(10, -1), tgt)
        loss.backward()
        return [loss] + [t.grad for t in leaves]

    for a, w_ in zip(run(tb), run(pb), strict=True):
        close(a, N(w_), atol=2e-5, rtol=1e-4)


def test_host_checks_name_the_limit():
    z = T(np.zeros((1, 1, 4, 300), np.float32))
    with pytest.raises(ValueError, match="head size 300"):
        ta.attention_forward(z, z, z)
    q = T(np.zeros((1, 1, 5, 8), np.float32))
    kv = T(np.zeros((1, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match="Tq <= Tk"):
        ta.attention_forward(q, kv, kv)
    with pytest.raises(ValueError, match="key_mask"):
        ta.attention_forward(q, q, q, T(np.ones((1, 4), bool)))
    with pytest.raises(ValueError, match="row limit"):
        tln.layernorm_forward(T(np.zeros((1, 70000), np.float32)), *[
            T(np.zeros(70000, np.float32))] * 2)  # fmt: skip
    with pytest.raises(ValueError, match="g has shape"):
        tln.layernorm_forward(T(np.zeros((2, 4), np.float32)), T(np.zeros(5, np.float32)),
                              T(np.zeros(4, np.float32)))  # fmt: skip


def test_cpu_tensors_without_interpreter_are_refused():
    compiled = object()  # stands for a kernel compiled for CUDA (not an InterpretedFunction)
    with pytest.raises(TritonDeviceError, match="TRITON_INTERPRET=1"):
        check_device(compiled, "layernorm_forward", x=torch.zeros(2))


# ---------------------------------------------------------------------------------------------
# compiled for a GPU, without one: what the interpreter cannot check (types, dot operands,
# shared memory). The full sweep is `python -m bench.tools.triton_aot` (every kernel, dtype, block).


@pytest.mark.slow
def test_attention_kernels_compile_for_sm90_in_bfloat16():
    """bfloat16 attention is the one path the interpreter cannot run (triton#11584); this
    compiles its forward and dq kernels to a cubin for sm_90 in a process without the
    interpreter (about 15 s on 2 cores; Triton's cache makes reruns faster)."""
    code = (
        "from bench.tools.triton_aot import SHARED_LIMIT, compile_all\n"
        "rs = compile_all(90, ('bf16',), quick=True,"
        " only=('_attn_fwd_kernel', '_attn_bwd_dq_kernel'))\n"
        "assert len(rs) == 3, rs\n"  # forward at prefill and decode blocks, dq
        "for r in rs:\n"
        "    assert r.error is None, r.error\n"
        "    assert 0 < r.shared <= SHARED_LIMIT[90], r\n"
        "print('compiled', [r.kernel for r in rs])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, set to silence its warning
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "compiled" in r.stdout


# ---------------------------------------------------------------------------------------------
# on a GPU: real shapes, three dtypes (skipped without CUDA, which is not a pass)

GPU_TOLERANCES = [
    # dtype, atol, rtol: float32 uses IEEE dot products (no TF32); half types round inputs
    # and outputs to 11 / 8 significant bits
    (torch.float32, 1e-4, 1e-4),
    (torch.float16, 1e-2, 1e-2),
    (torch.bfloat16, 6e-2, 6e-2),
]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, atol, rtol", GPU_TOLERANCES)
def test_gpu_kernels_at_gpt2_sizes(dtype, atol, rtol):
    rng = np.random.default_rng(0)
    q, k, v, km = attention_case(rng, 2, 12, 200, 1027, 64, True)
    want, cache = ops.attention_forward(q, k, v, km)
    dout = randn(rng, *want.shape)
    rg = ops.attention_backward(dout, cache)
    out, tcache = ta.attention_forward(*[T(a).to(dtype) for a in (q, k, v)], T(km))
    close(out, want, atol=atol, rtol=rtol)
    for a, w in zip(ta.attention_backward(T(dout).to(dtype), tcache), rg, strict=True):
        close(a, w, atol=4 * atol, rtol=4 * rtol)
    x, g, b = randn(rng, 1024, 768), randn(rng, 768) + 1.0, randn(rng, 768)
    out, _ = tln.layernorm_forward(*[T(a).to(dtype) for a in (x, g, b)])
    close(out, ops.layernorm_forward(x, g, b)[0], atol=4 * atol, rtol=rtol)
    logits, targets = randn(rng, 64, 50257, scale=3.0), rng.integers(0, 50257, 64)
    loss, lcache = tc.crossentropy_forward(T(logits).to(dtype), T(targets))
    ref_loss, rcache = ops.crossentropy_forward(N(T(logits).to(dtype)), targets)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4)
    close(tc.crossentropy_backward(1.0, lcache), ops.crossentropy_backward(1.0, rcache),
          atol=atol * 1e-2, rtol=rtol)  # fmt: skip
