"""Every numpy backend's ops against the reference (ref/ops.py), forward and backward.

Parametrised over `fast.NUMPY_BACKENDS` and each backend's named variants (`VARIANTS`), so a new
backend or variant is tested by registering it. Shapes are awkward on purpose (C = 1, primes,
1023, T = 1, Tq < Tk, padding masks, fully masked rows, ignored targets) with a few at GPT-2's
sizes (C = 768, T = 128, V = 50257).

Tolerances. float32 has eps = 2^-23 ~ 1.2e-7. An output that is a reduction of n terms
carries a rounding error of up to ~n eps relative to the sum of the magnitudes of its terms
(~sqrt(n) eps typically), and two implementations that add in different orders (numpy's
pairwise sums against vectorised loops) differ by about that much. Each tolerance below is
written as a multiple of eps times the reduction length or of the output's scale, and says why.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fast import NUMPY_BACKENDS, BackendUnavailable, get_backend
from ref import ops as ref

EPS32 = float(np.finfo(np.float32).eps)


def variants(op: str) -> list:
    """One pytest param per (backend, variant) of `op`: (forward, backward)."""
    out = []
    for name in NUMPY_BACKENDS:
        try:
            backend = get_backend(name)
        except BackendUnavailable as e:
            out.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=str(e))))
            continue
        for vname, pair in backend.VARIANTS[op].items():
            out.append(pytest.param(pair, id=f"{name}-{vname}"))
    return out


def close(got, want, atol: float, rtol: float, what: str) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=what)


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


seeds = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# LayerNorm


def check_layernorm(impl, x, g, b, dout):
    fwd, bwd = impl
    C = x.shape[-1]
    out, cache = fwd(x, g, b, 1e-5)
    want, rcache = ref.layernorm_forward(x, g, b, 1e-5)
    # out = xhat * g + b with xhat O(1): the mean is a sum over C, off by ~C eps |mean|, which
    # moves xhat = (x - mean) rstd by C eps |mean| rstd (rows far from 0 against their spread
    # lose digits in float32 whatever the order of the sum); times |g|. Measured over 3000
    # random rows (offset -50): both backends stay within 0.3 C eps (1 + |mean| rstd) of float64.
    rstd = float(np.max(rcache[1], initial=1.0))
    cond = 1.0 + float(np.max(np.abs(x.mean(axis=-1)), initial=0.0)) * rstd
    scale = (1.0 + float(np.abs(g).max(initial=0.0))) * cond
    close(out, want, atol=2 * C * EPS32 * scale, rtol=1e-6, what="layernorm out")
    dx, dg, db = bwd(dout, cache)
    rdx, rdg, rdb = ref.layernorm_backward(dout, rcache)
    N = dout.size // C
    # dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)): sums over C of terms of size
    # |dout| |g|, times rstd (~1 for unit spread, 1/sqrt(eps) ~ 316 when C = 1: var = 0).
    dscale = float(np.abs(dout).max(initial=0.0)) * scale * max(rstd, 1.0)
    close(dx, rdx, atol=8 * C * EPS32 * dscale, rtol=1e-5, what="layernorm dx")
    # dg = sum over N rows of dout * xhat: xhat's error above (C eps cond) times sum |dout|,
    # plus the rounding of an N-term sum of terms up to |dout| sqrt(C) (|xhat| <= sqrt(C)).
    rows = float(np.abs(dout).sum(axis=tuple(range(dout.ndim - 1))).max(initial=0.0))
    dg_atol = 2 * (C * cond + N * math.sqrt(C)) * EPS32 * rows
    close(dg, rdg, atol=dg_atol, rtol=1e-5, what="dg")
    close(db, rdb, atol=4 * N * EPS32 * rows, rtol=1e-6, what="db")


@pytest.mark.parametrize("impl", variants("layernorm"))
@given(
    lead=st.sampled_from([(1,), (3,), (2, 5), (1, 1, 7)]),
    C=st.sampled_from([1, 2, 3, 7, 31, 64, 127, 768, 1023]),
    offset=st.sampled_from([0.0, 3.0, -50.0]),
    seed=seeds,
)
def test_layernorm_matches_reference(impl, lead, C, offset, seed):
    rng = np.random.default_rng(seed)
    # rows with a large common offset: the statistics must not lose digits to it
    x = f32(offset + rng.standard_normal((*lead, C)) * rng.uniform(0.5, 3.0, (*lead, 1)))
    g, b = f32(1 + 0.5 * rng.standard_normal(C)), f32(rng.standard_normal(C))
    check_layernorm(impl, x, g, b, f32(rng.standard_normal(x.shape)))


@pytest.mark.parametrize("impl", variants("layernorm"))
def test_layernorm_gpt2_size_and_views(impl):
    rng = np.random.default_rng(1)
    x = f32(rng.standard_normal((2, 128, 768)) * 2 + 0.5)
    g, b = f32(1 + 0.1 * rng.standard_normal(768)), f32(0.1 * rng.standard_normal(768))
    check_layernorm(impl, x, g, b, f32(rng.standard_normal(x.shape)))
    # a non-contiguous view (the model's last-position slice) is accepted
    view = x[:, -1:]
    out, _ = impl[0](view, g, b, 1e-5)
    close(out, ref.layernorm_forward(view, g, b)[0], atol=1e-5, rtol=1e-5, what="view")


# ---------------------------------------------------------------------------------------------
# GELU and bias + GELU


def gelu_inputs(rng, shape):
    x = rng.standard_normal(shape) * 3.0
    flat = x.reshape(-1)
    # the far tails, where tanh saturates and exp(-2u) over- or underflows
    extremes = [-100.0, -20.0, -9.0, -5.0, 0.0, 5.0, 9.0, 20.0, 100.0]
    flat[: min(len(extremes), flat.size)] = extremes[: flat.size]
    return f32(x)


# gelu(x) is elementwise: a few float32 roundings on either side, so rtol 1e-5 (~80 eps);
# atol 1e-6 where gelu ~ 0 (x << 0), where the reference's 1 + tanh(u) cancels to ~eps.
GELU_RTOL, GELU_ATOL = 1e-5, 1e-6


def gelu_grad_atol(x, dout) -> float:
    # gelu'(x) holds 0.5 x (1 - tanh^2 u) du/dx; 1 - th^2 cancels to ~eps in float32, times
    # 0.5 |x| du/dx <= 0.5 |x| * 0.8 (1 + 0.134 x^2); counted only where th^2 is not yet 1
    # (|x| < 6, beyond it both give exactly 0 for that term).
    xm = min(float(np.abs(x).max(initial=0.0)), 6.0)
    return 4 * EPS32 * 0.4 * xm * (1 + 0.134 * xm * xm) * float(np.abs(dout).max(initial=1.0))


@pytest.mark.parametrize("impl", variants("gelu"))
@given(shape=st.sampled_from([(1,), (7,), (2, 3, 17), (1023,), (4, 3072)]), seed=seeds)
def test_gelu_matches_reference(impl, shape, seed):
    rng = np.random.default_rng(seed)
    x, dout = gelu_inputs(rng, shape), f32(rng.standard_normal(shape))
    out, cache = impl[0](x)
    want, rcache = ref.gelu_forward(x)
    close(out, want, atol=GELU_ATOL, rtol=GELU_RTOL, what="gelu")
    close(
        impl[1](dout, cache),
        ref.gelu_backward(dout, rcache),
        gelu_grad_atol(x, dout),
        GELU_RTOL,
        "gelu dx",
    )


# 3,072 and 147,456 elements: below and above the 2**17 where the numba forwards go parallel
SERIAL_AND_PARALLEL_ROWS = [1, 48]


@pytest.mark.parametrize("impl", variants("gelu"))
@pytest.mark.parametrize("rows", SERIAL_AND_PARALLEL_ROWS)
def test_gelu_serial_and_parallel_paths(impl, rows):
    """A decode step's small input runs a serial kernel, a prompt's the parallel one."""
    x = gelu_inputs(np.random.default_rng(rows), (rows, 3072))
    close(impl[0](x)[0], ref.gelu_forward(x)[0], GELU_ATOL, GELU_RTOL, f"gelu rows={rows}")


@pytest.mark.parametrize("impl", variants("bias_gelu"))
@pytest.mark.parametrize("rows", SERIAL_AND_PARALLEL_ROWS)
def test_bias_gelu_serial_and_parallel_paths(impl, rows):
    rng = np.random.default_rng(rows)
    x, b = gelu_inputs(rng, (rows, 3072)), f32(0.1 * rng.standard_normal(3072))
    want = ref.bias_gelu_forward(x, b)[0]
    close(impl[0](x, b)[0], want, GELU_ATOL, GELU_RTOL, f"bias_gelu rows={rows}")


@pytest.mark.parametrize("impl", variants("bias_gelu"))
@given(
    lead=st.sampled_from([(1,), (5,), (2, 3)]),
    D=st.sampled_from([1, 3, 17, 1023, 3072]),
    seed=seeds,
)
def test_bias_gelu_matches_reference(impl, lead, D, seed):
    rng = np.random.default_rng(seed)
    x, dout = gelu_inputs(rng, (*lead, D)), f32(rng.standard_normal((*lead, D)))
    b = f32(rng.standard_normal(D))
    out, cache = impl[0](x, b)
    want, rcache = ref.bias_gelu_forward(x, b)
    close(out, want, atol=GELU_ATOL, rtol=GELU_RTOL, what="bias_gelu")
    dxb, db = impl[1](dout, cache)
    rdxb, rdb = ref.bias_gelu_backward(dout, rcache)
    atol = gelu_grad_atol(x + b, dout)
    close(dxb, rdxb, atol, GELU_RTOL, "bias_gelu dx")
    # db sums N rows of dxb: each row's error adds up
    N = x.size // D
    close(
        db,
        rdb,
        N * atol + 4 * N * EPS32 * float(np.abs(rdxb).max(initial=0.0)),
        GELU_RTOL,
        "bias_gelu db",
    )


# ---------------------------------------------------------------------------------------------
# attention


def check_attention(impl, q, k, v, key_mask, dout):
    fwd, bwd = impl
    hs, Tk = q.shape[-1], k.shape[-2]
    out, cache = fwd(q, k, v, key_mask)
    want, rcache = ref.attention_forward(q, k, v, key_mask)
    # out = att v: scores are dots of length hs (rounding ~hs eps |q||k| scale, O(1) here,
    # moving att by that relative amount), then a weighted mean of Tk values of size |v|.
    vmax = float(np.abs(v).max(initial=0.0))
    atol = 4 * (hs + Tk) * EPS32 * vmax
    close(out, want, atol=atol, rtol=1e-5, what="attention out")
    dq, dk, dv = bwd(dout, cache)
    rdq, rdk, rdv = ref.attention_backward(dout, rcache)
    # each gradient is a sum over up to max(Tq, Tk) pairs of products of O(1) factors with
    # |dout|, |q|, |k|, |v|, and each factor carries the forward's rounding; hs inside.
    Tq = q.shape[-2]
    scale = float(max(np.abs(a).max(initial=0.0) for a in (q, k, v, dout))) ** 2
    gatol = 8 * (hs + Tk + Tq) * EPS32 * scale
    close(dq, rdq, gatol, 1e-4, "dq")
    close(dk, rdk, gatol, 1e-4, "dk")
    close(dv, rdv, gatol, 1e-4, "dv")


@pytest.mark.parametrize("impl", variants("attention"))
@given(
    B=st.integers(1, 2),
    NH=st.integers(1, 3),
    hs=st.sampled_from([1, 3, 16, 64]),
    Tq=st.sampled_from([1, 2, 5, 13, 67]),
    extra=st.sampled_from([0, 1, 3, 70]),
    masking=st.sampled_from(["none", "all", "left", "random"]),
    kv_dtype=st.sampled_from(["float32", "float16"]),
    seed=seeds,
)
def test_attention_matches_reference(impl, B, NH, hs, Tq, extra, masking, kv_dtype, seed):
    """float16 k and v: a 16-bit KV cache (ref.model.KVCache). The reference widens them
    exactly, so the tolerances are float32's."""
    rng = np.random.default_rng(seed)
    Tk = Tq + extra  # extra > 0: a KV cache in front of the new queries
    q = f32(rng.standard_normal((B, NH, Tq, hs)))
    k, v = (rng.standard_normal((B, NH, Tk, hs)).astype(kv_dtype) for _ in range(2))
    if masking == "none":
        key_mask = None
    elif masking == "all":
        key_mask = np.ones((B, Tk), bool)
    elif masking == "left":  # left padding as the model makes it: some queries see no key
        key_mask = np.arange(Tk)[None, :] >= rng.integers(0, Tk + 1, (B, 1))
    else:
        key_mask = rng.random((B, Tk)) < 0.6
    check_attention(impl, q, k, v, key_mask, f32(rng.standard_normal(q.shape)))


@pytest.mark.parametrize("impl", variants("attention"))
def test_attention_gpt2_size_with_strided_views(impl):
    rng = np.random.default_rng(2)
    B, NH, T, hs = 1, 12, 128, 64
    # q, k, v as the model passes them: views into one (B, T, 3, NH, hs) array
    qkv = f32(rng.standard_normal((B, T, 3, NH, hs))).transpose(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    key_mask = np.ones((B, T), bool)
    key_mask[:, :9] = False  # left padding
    check_attention(
        impl, qkv[0], qkv[1], qkv[2], key_mask, f32(rng.standard_normal((B, NH, T, hs)))
    )


@pytest.mark.parametrize("impl", variants("attention"))
def test_attention_decode_step_against_a_cache_view(impl):
    rng = np.random.default_rng(3)
    cache = f32(rng.standard_normal((2, 2, 4, 40, 16)))  # (k/v, B, NH, capacity, hs)
    q = f32(rng.standard_normal((2, 4, 1, 16)))
    k, v = cache[0, :, :, :29], cache[1, :, :, :29]  # (B, NH, 29, hs) strided views
    key_mask = np.ones((2, 29), bool)
    key_mask[1, :5] = False
    check_attention(impl, q, k, v, key_mask, f32(rng.standard_normal(q.shape)))


@pytest.mark.parametrize("impl", variants("attention"))
@pytest.mark.parametrize("Tq", [1, 3])
def test_attention_on_a_strided_cache_view_with_padding(impl, Tq):
    """The KV cache as the model passes it: prefix views of a (B, NH, capacity, hs) buffer,
    capacity > Tk, Tk not a multiple of 4, left padding that differs per row, a hidden key
    inside a row; a decode step (Tq = 1) and a short continuation (Tq = 3)."""
    rng = np.random.default_rng(7)
    B, NH, capacity, hs, Tk = 3, 4, 64, 64, 41
    cache = f32(rng.standard_normal((2, B, NH, capacity, hs)))  # (k/v, B, NH, capacity, hs)
    k, v = cache[0, :, :, :Tk], cache[1, :, :, :Tk]  # (B, NH, Tk, hs) strided views
    q = f32(rng.standard_normal((B, NH, Tq, hs)))
    key_mask = np.arange(Tk)[None, :] >= np.array([[0], [5], [Tk - 2]])  # (B, Tk)
    key_mask[0, 17] = False
    check_attention(impl, q, k, v, key_mask, f32(rng.standard_normal(q.shape)))


@pytest.mark.parametrize("impl", variants("attention"))
def test_attention_layouts_that_need_a_copy(impl):
    """k, v that cannot be read as rows of hs floats (reversed keys, hs not contiguous,
    read-only) give the reference's result too."""
    rng = np.random.default_rng(8)
    q = f32(rng.standard_normal((2, 3, 2, 16)))
    kt = f32(rng.standard_normal((2, 3, 16, 23)))  # (B, NH, hs, Tk)
    v = f32(rng.standard_normal((2, 3, 23, 16)))[:, :, ::-1]  # (B, NH, Tk, hs) reversed keys
    ro = v.copy()
    ro.flags.writeable = False
    for k, vv in ((kt.swapaxes(2, 3), v), (ro, ro)):
        check_attention(impl, q, k, vv, None, f32(rng.standard_normal(q.shape)))


NUMBA_ATTENTION = [p for p in variants("attention") if "numba" in p.id]


@pytest.mark.parametrize(
    "impl, kv_dtype",
    [
        pytest.param(p.values[0], kv, id=f"{p.id}-{kv}", marks=p.marks)
        for p in NUMBA_ATTENTION
        for kv in ("float32", "float16")
        if kv == "float32" or "flash" not in p.id  # flash: prompts only, where it widens a
    ],  # float16 cache into a float32 copy (fast/numba/flash.py)
)
@pytest.mark.parametrize("B", [1, 3])  # the serial kernel (small calls), the parallel one
def test_numba_decode_step_reads_the_cache_in_place(impl, kv_dtype, B):
    """No copy of k, v (nor a widened one of a float16 cache): the numpy allocations of a
    decode step (q, mask, out) stay far below the size of k (1-2 MB per sequence here; a copy
    of k and v would be twice that)."""
    fwd = impl[0]
    rng = np.random.default_rng(9)
    NH, capacity, hs, Tk = 8, 1024, 64, 1001
    cache = rng.standard_normal((2, B, NH, capacity, hs)).astype(kv_dtype)
    k, v = cache[0, :, :, :Tk], cache[1, :, :, :Tk]  # (B, NH, Tk, hs) views
    q = f32(rng.standard_normal((B, NH, 1, hs)))
    key_mask = np.ones((B, Tk), bool)
    key_mask[-1, :7] = False
    fwd(q, k, v, key_mask)  # compiles, or loads the compiled kernel
    tracemalloc.start()
    try:
        out, _ = fwd(q, k, v, key_mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < k.nbytes / 20, f"peak {peak} B of numpy allocations, k is {k.nbytes} B"
    want, _ = ref.attention_forward(q, k, v, key_mask)
    close(out, want, atol=4 * (hs + Tk) * EPS32 * float(np.abs(v).max()), rtol=1e-5, what="out")


# ---------------------------------------------------------------------------------------------
# cross-entropy


def check_crossentropy(impl, logits, targets, dloss):
    fwd, bwd = impl
    N, V = logits.shape
    loss, cache = fwd(logits, targets, -100)
    want, rcache = ref.crossentropy_forward(logits, targets, -100)
    assert isinstance(loss, np.float32 | float)
    # loss = mean(lse - picked): lse is the log of a sum of V exps, relative error ~V eps at
    # worst in the sum (absolute in its log); then a mean over N rows (~N eps relative).
    assert abs(float(loss) - float(want)) <= 2 * (V + N) * EPS32 * max(1.0, abs(float(want)))
    dl = bwd(dloss, cache)
    rdl = ref.crossentropy_backward(dloss, rcache)
    # softmax entries exp(l - lse): lse's error (~V eps) becomes a relative error of every
    # entry; at the target, p - 1 cancels, so that error is absolute there, times dloss.
    tol = 2 * (V + 2) * EPS32
    close(dl, rdl, atol=tol * float(dloss), rtol=tol, what="dlogits")


@pytest.mark.parametrize("impl", variants("crossentropy"))
@given(
    N=st.integers(1, 6),
    V=st.sampled_from([1, 2, 7, 1023, 50257]),
    n_ignored=st.integers(0, 6),
    seed=seeds,
)
def test_crossentropy_matches_reference(impl, N, V, n_ignored, seed):
    rng = np.random.default_rng(seed)
    logits = f32(rng.standard_normal((N, V)) * 4)
    targets = rng.integers(0, V, N)
    targets[rng.permutation(N)[: min(n_ignored, N)]] = -100  # possibly every row
    check_crossentropy(impl, logits, targets, np.float32(rng.uniform(0.1, 3.0)))


@pytest.mark.parametrize("impl", variants("crossentropy"))
def test_crossentropy_gpt2_size(impl):
    rng = np.random.default_rng(4)
    logits = f32(rng.standard_normal((128, 50257)) * 3)
    targets = rng.integers(0, 50257, 128)
    targets[:10] = -100
    check_crossentropy(impl, logits, targets, np.float32(1.0))


# ---------------------------------------------------------------------------------------------
# determinism: parallel kernels must not race (a shared `+=` gives a different sum each run)


@pytest.mark.parametrize("op", ["layernorm", "gelu", "bias_gelu", "attention", "crossentropy"])
def test_gradients_are_bit_identical_run_to_run(op):
    rng = np.random.default_rng(5)
    x = f32(rng.standard_normal((4, 130, 96)))
    inputs = {
        "layernorm": (x, f32(rng.standard_normal(96)), f32(rng.standard_normal(96))),
        "gelu": (x,),
        "bias_gelu": (x, f32(rng.standard_normal(96))),
        "attention": tuple(f32(rng.standard_normal((2, 4, 130, 32))) for _ in range(3)),
        "crossentropy": (f32(rng.standard_normal((300, 777))), rng.integers(0, 777, 300)),
    }[op]
    for impl in variants(op):
        if impl.values[0] is None:
            continue
        fwd, bwd = impl.values[0]
        runs = []
        for _ in range(2):
            out, cache = fwd(*inputs)
            dout = np.float32(1.0) if op == "crossentropy" else f32(np.cos(np.arange(out.size)))
            grads = bwd(dout if op == "crossentropy" else dout.reshape(out.shape), cache)
            runs.append([np.asarray(out)] + list(grads if isinstance(grads, tuple) else [grads]))
        for a, b in zip(runs[0], runs[1], strict=True):
            assert a.tobytes() == b.tobytes(), f"{op} {impl.id}: results differ between runs"


# ---------------------------------------------------------------------------------------------
# NaN in, NaN out, where the reference has it: a diverged model must not look healthy


def test_nan_reaches_the_same_outputs_as_in_the_reference():
    rng = np.random.default_rng(6)
    x = f32(rng.standard_normal((3, 8)))
    x[1, 2] = np.nan
    g, b = f32(rng.standard_normal(8)), f32(rng.standard_normal(8))
    q, k, v = (f32(rng.standard_normal((1, 2, 6, 4))) for _ in range(3))
    k[0, 0, 2, 1] = np.nan  # seen by the queries i >= 2 of head 0
    q[0, 1, 4, 0] = np.nan  # every score of query 4 of head 1
    logits = f32(rng.standard_normal((2, 9)))
    logits[1, 5] = np.nan
    cases = {
        "layernorm": ((x, g, b), ref.layernorm_forward),
        "gelu": ((x,), ref.gelu_forward),
        "attention": ((q, k, v), ref.attention_forward),
        "crossentropy": ((logits, np.array([1, 2])), ref.crossentropy_forward),
    }
    with np.errstate(invalid="ignore"):
        for op, (args, ref_fwd) in cases.items():
            want = np.isnan(ref_fwd(*args)[0])
            assert want.any()
            for impl in variants(op):
                if impl.values[0] is not None:
                    got = np.isnan(impl.values[0][0](*args)[0])
                    np.testing.assert_array_equal(got, want, err_msg=f"{op} {impl.id}")


# ---------------------------------------------------------------------------------------------
# bad input is refused by name


def test_numba_refuses_bad_input_by_name():
    nb = pytest.importorskip("fast.numba.backend")
    x64 = np.zeros((2, 8))
    with pytest.raises(TypeError, match="layernorm.*x.*float32.*float64"):
        nb.layernorm_forward(x64, np.ones(8, np.float32), np.zeros(8, np.float32))
    with pytest.raises(ValueError, match="g, b of shape"):
        nb.layernorm_forward(f32(x64), np.ones(7, np.float32), np.zeros(7, np.float32))
    q = np.zeros((1, 1, 3, 4), np.float32)
    with pytest.raises(ValueError, match="Tk=2 must be >= Tq=3"):
        nb.attention_forward(q, q[:, :, :2], q[:, :, :2])
    with pytest.raises(ValueError, match="key_mask"):
        nb.attention_forward(q, q, q, np.ones((1, 4), bool))
    with pytest.raises(ValueError, match="target 9 is outside"):
        nb.crossentropy_forward(np.zeros((2, 5), np.float32), np.array([1, 9]))
