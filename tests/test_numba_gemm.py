"""fast/numba/gemm.py (the packed gemm of prompts) against ref/quant.py's qlinear_forward.

Shapes (hypothesis): M and N on both sides of a whole tile (8 rows of x, 48 of W) and of
their multiples, so the overlapping last group and last panel are exercised; K below, at and
past a multiple of the 16-wide transposed blocks, K = 1; primes; NaN and Inf in x and in W.
Tolerance: check_against_reference's bound (tests/test_numba_quant.py), both sides computing
in float32 from the same exactly-widened weights in different orders. Bits: each out[m, n] is
one fma chain in k order, so a row's bits do not depend on M, on the other rows or on the
thread count; the tiles variant takes this kernel where it fits (on AVX-512 hosts).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

gemm = pytest.importorskip("fast.numba.gemm", reason="numba is not installed")

import numba  # noqa: E402
from test_numba_quant import check_against_reference  # noqa: E402

from fast.numba import quant as nq  # noqa: E402
from ref import quant  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")


def run(x: np.ndarray, q: quant.QWeight, b: np.ndarray | None) -> np.ndarray:
    data, _ = nq._stored(q)
    bias = np.zeros(q.shape[0], np.float32) if b is None else b
    return gemm.packed_forward(x, data, q.dtype, bias)


@st.composite
def cases(draw):
    M = draw(st.sampled_from([8, 9, 15, 16, 17, 64, 65, 100, 1023]))
    N = draw(st.sampled_from([48, 49, 50, 95, 96, 97, 144, 1023]))
    K = draw(st.sampled_from([1, 2, 15, 16, 17, 31, 33, 100, 257]))
    dtype = draw(st.sampled_from(gemm.DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    w = (0.1 * rng.standard_normal((N, K))).astype(np.float32)  # (N, K)
    x = rng.standard_normal((M, K)).astype(np.float32)  # (M, K)
    if draw(st.booleans()):  # NaN and Inf in the activations and in the weights
        x[rng.integers(0, M), rng.integers(0, K)] = np.nan
        x[rng.integers(0, M), rng.integers(0, K)] = np.inf
        w[rng.integers(0, N), rng.integers(0, K)] = -np.inf
        w[rng.integers(0, N), rng.integers(0, K)] = np.nan
    b = rng.standard_normal(N).astype(np.float32) if draw(st.booleans()) else None
    return x, quant.quantize(w, dtype), b


@settings(max_examples=80, deadline=None)
@given(cases())
def test_packed_gemm_matches_the_reference(case):
    x, q, b = case
    check_against_reference(run(x, q, b), x, q, b)


@settings(max_examples=20, deadline=None)
@given(cases(), st.integers(8, 64))
def test_a_rows_bits_depend_on_nothing_else(case, m):
    """Rows of a shorter x (its own overlapping last group), another x around them, one
    thread or all: the same bits."""
    x, q, b = case
    full = run(x, q, b)
    m = min(m, x.shape[0])
    assert np.array_equal(run(x[:m].copy(), q, b), full[:m], equal_nan=True)
    other = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    other[:m] = x[:m]
    assert np.array_equal(run(other, q, b)[:m], full[:m], equal_nan=True)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run(x, q, b)
    finally:
        numba.set_num_threads(threads)
    assert np.array_equal(one, full, equal_nan=True)


@pytest.mark.parametrize("K", [16, 47, 96])
def test_reads_nothing_past_its_arrays(K):
    """W and x each end where NaN bits begin: a pack or tile that read past its array (a
    16-wide block of a short last column group, one row past the last panel) turns NaN."""
    rng = np.random.default_rng(K)
    M, N = 13, 53

    def fenced(a: np.ndarray, nan_bits) -> np.ndarray:
        buf = np.full(a.size + 64, nan_bits, a.dtype)
        buf[: a.size] = a.ravel()
        return buf[: a.size].reshape(a.shape)  # C-contiguous, NaN right after its end

    x = rng.standard_normal((M, K)).astype(np.float32)
    for dtype in gemm.DTYPES:
        q = quant.quantize((0.1 * rng.standard_normal((N, K))).astype(np.float32), dtype)
        data, _ = nq._stored(q)
        nan = {"float32": np.float32(np.nan)}.get(dtype, 0x7FC0 if dtype == "bfloat16" else 0x7E00)
        got = gemm.packed_forward(
            fenced(x, np.float32(np.nan)), fenced(data, nan), dtype, np.zeros(N, np.float32)
        )
        assert not np.isnan(got).any(), dtype
        check_against_reference(got, x, q, None)


@pytest.mark.skipif(not gemm.USE, reason="the tiles variant takes the packed gemm on AVX-512")
def test_the_tiles_variant_takes_it_where_a_tile_fits():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((70, 40)).astype(np.float32)
    for dtype in gemm.DTYPES:
        q = quant.quantize((0.1 * rng.standard_normal((50, 40))).astype(np.float32), dtype)
        assert np.array_equal(nq.tiles_forward(x, q, None), run(x, q, None))
        narrow = quant.quantize((0.1 * rng.standard_normal((47, 40))).astype(np.float32), dtype)
        check_against_reference(nq.tiles_forward(x, narrow, None), x, narrow, None)  # BLAS


def test_bad_inputs_are_refused_by_name():
    x = np.ones((8, 5), np.float32)
    w = np.ones((48, 5), np.float32)
    b = np.zeros(48, np.float32)
    with pytest.raises(ValueError, match="M >= 8 and N >= 48"):
        gemm.packed_forward(x[:7], w, "float32", b)
    with pytest.raises(ValueError, match="M >= 8 and N >= 48"):
        gemm.packed_forward(x, w[:47], "float32", b[:47])
    with pytest.raises(ValueError, match="dtype 'int8'"):
        gemm.packed_forward(x, w, "int8", b)
    with pytest.raises(ValueError, match=r"W \(48, 4\)"):
        gemm.packed_forward(x, w[:, :4].copy(), "float32", b)
