"""fast.numba.flash (tiled causal attention) against the numpy reference, ref.ops.

The reference runs in float64 on the same float32 inputs, so every difference is the kernel's
own float32 round-off. Shapes are chosen to cross the tile edges (_BQ = _BK = 128): primes,
T = 1, Tq < Tk with the diagonal offset landing inside a tile, hs = 1 and 64, B * NH > 1.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ref import ops

flash = pytest.importorskip("fast.numba.flash")
common = pytest.importorskip("fast.numba.common")

EPS32 = float(np.finfo(np.float32).eps)


def _tolerance(Tk: int, hs: int) -> float:
    """Bound on |kernel - reference| relative to the largest reference entry (at least 1).

    Every output is a float32 sum of at most hs (scores, dp) then Tk (p v, p^T dout, ds k,
    ds^T q) rounded terms, and the standard bound on a float32 sum of n terms is n * eps times
    the sum of their magnitudes; exp32 adds ~2 ulp to each probability. With inputs of size
    ~1 the sums of magnitudes stay within a small factor of the largest entry, so
    4 * (hs + Tk) * eps covers both sums with room: measured errors are ~10 eps at Tk = 300,
    hs = 64, well inside the bound (4.2e-4 there).
    """
    return 4.0 * (hs + Tk) * EPS32


def _inputs(rng: np.random.Generator, B: int, NH: int, Tq: int, Tk: int, hs: int):
    q = rng.standard_normal((B, NH, Tq, hs)).astype(np.float32)  # (B, NH, Tq, hs)
    k = rng.standard_normal((B, NH, Tk, hs)).astype(np.float32)  # (B, NH, Tk, hs)
    v = rng.standard_normal((B, NH, Tk, hs)).astype(np.float32)  # (B, NH, Tk, hs)
    dout = rng.standard_normal((B, NH, Tq, hs)).astype(np.float32)  # (B, NH, Tq, hs)
    return q, k, v, dout


def _reference(q, k, v, dout, key_mask):
    """ref.ops in float64 on the float32 inputs: out, dq, dk, dv."""
    f64 = [a.astype(np.float64) for a in (q, k, v, dout)]
    out, cache = ops.attention_forward(*f64[:3], key_mask)
    return (out, *ops.attention_backward(f64[3], cache))


def _assert_close(got, want, Tk: int, hs: int, names=("out", "dq", "dk", "dv")) -> None:
    tol = _tolerance(Tk, hs)
    for name, g, w in zip(names, got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape, name
        scale = max(1.0, float(np.abs(w).max(initial=0.0)))
        err = float(np.abs(g - w).max(initial=0.0)) / scale
        assert err <= tol, f"{name}: max error {err:.3g} x {scale:.3g} > tolerance {tol:.3g}"


def _run(q, k, v, dout, key_mask):
    out, cache = flash.attention_forward(q, k, v, key_mask)
    return (out, *flash.attention_backward(dout, cache))


@given(
    B=st.integers(1, 2),
    NH=st.integers(1, 3),
    Tq=st.sampled_from([1, 2, 7, 31, 127, 128, 131]),
    extra=st.sampled_from([0, 1, 5, 64, 127, 130]),
    hs=st.sampled_from([1, 3, 64]),
    padded=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(B, NH, Tq, extra, hs, padded, seed):
    rng = np.random.default_rng(seed)
    Tk = Tq + extra
    q, k, v, dout = _inputs(rng, B, NH, Tq, Tk, hs)
    key_mask = None
    if padded:
        key_mask = rng.random((B, Tk)) < 0.7  # (B, Tk) about 30% padding
        key_mask[0, : Tk - Tq + 1] = False  # query 0 of batch 0 sees no key at all
    got = _run(q, k, v, dout, key_mask)
    _assert_close(got, _reference(q, k, v, dout, key_mask), Tk, hs)
    if padded:
        assert not got[0][0, :, 0].any() and not got[1][0, :, 0].any()  # out = 0, dq = 0


@pytest.mark.parametrize(("bq", "bk"), [(1, 1), (3, 5), (8, 16), (16, 8)])
@pytest.mark.parametrize(("Tq", "Tk"), [(1, 1), (13, 13), (29, 40), (37, 37)])
def test_small_tiles(monkeypatch, bq, bk, Tq, Tk):
    """Tile sizes far below the defaults: many ragged tiles, the diagonal inside a tile, and
    several query tiles per key tile in the backward (its `+=` branch), at small cost."""
    for name, size in (("_BQ", bq), ("_BK", bk), ("_BWD_BQ", bq), ("_BWD_BK", bk)):
        monkeypatch.setattr(flash, name, size)
    rng = np.random.default_rng(Tq * 1000 + Tk)
    B, NH, hs = 2, 2, 4
    q, k, v, dout = _inputs(rng, B, NH, Tq, Tk, hs)
    key_mask = rng.random((B, Tk)) < 0.8  # (B, Tk)
    key_mask[1, : Tk - Tq + 1] = False  # query 0 of batch 1 sees no key
    _assert_close(_run(q, k, v, dout, key_mask), _reference(q, k, v, dout, key_mask), Tk, hs)


def test_gpt2_sized_prompt_with_cache_offset():
    """A 124M-shaped head set past one tile both ways, diagonal offset inside a tile."""
    rng = np.random.default_rng(1)
    B, NH, Tq, Tk, hs = 1, 12, 300, 333, 64
    q, k, v, dout = _inputs(rng, B, NH, Tq, Tk, hs)
    _assert_close(_run(q, k, v, dout, None), _reference(q, k, v, dout, None), Tk, hs)


def test_strided_views_as_the_model_passes_them():
    """k and v sliced out of one (B, T, 3, NH, hs) array (row stride 3C, read in place), q
    read-only, and a k whose hs axis is not contiguous (copied)."""
    rng = np.random.default_rng(2)
    B, NH, T, hs = 2, 3, 150, 8
    qkv = rng.standard_normal((B, T, 3, NH, hs)).astype(np.float32)  # (B, T, 3, NH, hs)
    q, k, v = (qkv[:, :, j].transpose(0, 2, 1, 3) for j in range(3))  # (B, NH, T, hs) views
    q.flags.writeable = False
    dout = rng.standard_normal((B, NH, T, hs)).astype(np.float32)  # (B, NH, T, hs)
    contiguous = [np.ascontiguousarray(a) for a in (q, k, v)]
    _assert_close(_run(q, k, v, dout, None), _reference(*contiguous, dout, None), T, hs)
    kt = np.ascontiguousarray(k.swapaxes(2, 3)).swapaxes(2, 3)  # hs not contiguous: a copy
    _assert_close(_run(q, kt, v, dout, None), _reference(*contiguous, dout, None), T, hs)


def test_deterministic():
    """Bit-identical twice: no thread adds into shared memory, tile order is fixed."""
    rng = np.random.default_rng(3)
    B, NH, Tq, Tk, hs = 2, 5, 200, 261, 64
    q, k, v, dout = _inputs(rng, B, NH, Tq, Tk, hs)
    key_mask = rng.random((B, Tk)) < 0.9  # (B, Tk)
    first = _run(q, k, v, dout, key_mask)
    second = _run(q, k, v, dout, key_mask)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("B, NH", [(1, 12), (3, 5), (2, 1)])
def test_forward_on_one_thread_or_several_is_the_same_bits(B, NH):
    """The forward splits the heads among numba's thread count of workers, each computing
    its heads' tiles in the same order as one thread would: the same bits at 1 and 2 workers
    (and 3 where numba has 3 threads; NH = 1 leaves one worker), within the reference's
    bound."""
    import numba

    rng = np.random.default_rng(5)
    q, k, v, _ = _inputs(rng, B, NH, 140, 300, 16)
    key_mask = rng.random((B, 300)) < 0.9  # (B, Tk)
    before = numba.get_num_threads()
    outs = []
    try:
        for n in (1, 2, min(3, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(n)
            outs.append(flash.attention_forward(q, k, v, key_mask)[0])
    finally:
        numba.set_num_threads(before)
    for out in outs[1:]:
        assert np.array_equal(out, outs[0])
    want, _ = ops.attention_forward(q, k, v, key_mask)
    np.testing.assert_allclose(outs[0], want, atol=_tolerance(300, 16), rtol=0)


def test_a_forked_child_does_not_inherit_the_worker_pool():
    """The workers are threads of the process that made them: a child forked after a forward
    would wait forever on the parent's pool, so it starts without one. (Numba's OpenMP layer
    itself refuses parallel kernels in such a child; its workqueue layer does not.)"""
    import os

    import numba

    if numba.get_num_threads() < 2:
        pytest.skip("numba has one thread: the forward makes no pool")
    rng = np.random.default_rng(6)
    q, k, v, _ = _inputs(rng, 1, 4, 32, 300, 8)
    flash.attention_forward(q, k, v)
    assert common._POOL  # made by that forward
    pid = os.fork()
    if pid == 0:  # the child: no numba, no threads, just the answer
        os._exit(0 if not common._POOL else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_nan_propagates_like_the_reference():
    rng = np.random.default_rng(4)
    q, k, v, dout = _inputs(rng, 1, 2, 5, 9, 4)
    q[0, 1, 2, 0] = np.nan  # one query row of head 1
    out, _ = flash.attention_forward(q, k, v)
    want, _ = ops.attention_forward(q, k, v)
    assert np.array_equal(np.isnan(out), np.isnan(want))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda q, k, v: (q.astype(np.float64), k, v, None), "q as a float32"),
        (lambda q, k, v: (q, k.astype(np.float16), v, None), "k as a float32"),
        (lambda q, k, v: (q, k, v[:, :, :-1], None), "k, v"),
        (lambda q, k, v: (q[:, :, :, :2], k, v, None), "does not match"),
        (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2], None), "must be >= Tq"),
        (lambda q, k, v: (q, k, v, np.ones((1, 4), bool)), "key_mask"),
        (lambda q, k, v: (q, k, v, np.ones((1, 6), np.int8)), "key_mask"),
    ],
)
def test_bad_input_is_named(change, message):
    rng = np.random.default_rng(5)
    q, k, v, _ = _inputs(rng, 1, 2, 4, 6, 3)
    with pytest.raises((TypeError, ValueError), match=message):
        flash.attention_forward(*change(q, k, v))


def test_backward_checks_dout():
    rng = np.random.default_rng(6)
    q, k, v, dout = _inputs(rng, 1, 2, 4, 6, 3)
    _, cache = flash.attention_forward(q, k, v)
    with pytest.raises(ValueError, match="dout"):
        flash.attention_backward(dout[:, :, :2], cache)
    with pytest.raises(TypeError, match="dout"):
        flash.attention_backward(dout.astype(np.float64), cache)


def test_registry_entry():
    assert flash.VARIANTS == {
        "attention": {"numba_flash": (flash.attention_forward, flash.attention_backward)}
    }
