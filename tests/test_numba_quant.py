"""fast/numba/quant.py against ref/quant.py, and quantized models on the Numba backend.

Kernels: both variants (rows, tiles) and the dispatching launcher against
ref.quant.qlinear_forward on awkward shapes (hypothesis): K not a multiple of 32, N = 1,
primes, rows of x from 1 to 1023, NaN and Inf in x. Tolerance: both sides compute in float32
from the same exactly-dequantized weights and differ only in summation order, so each output
is within K * eps32 * (|x| @ |W|.T) of the other (the standard bound of a length-K dot
product is K u for u = eps32 / 2, for each of the two sums), plus a half ulp of the output on
each side for the bias's addition (eps32 |out| in all). NaN and Inf fall where the reference
puts them.

Row invariance (the server's batch invariance): every row of the rows kernel's output is the
same bits whatever M (1 to 64) and whatever the other rows hold, NaN included.

Models: logits of quantized trees on numba against the same trees on the reference backend
(LOGITS_RTOL as in tests/test_numba_model.py: the same weights, the float32 summation orders
of two backends); the shipped model's held-out loss per dtype against float32's (issue 15:
+0.1% for the 16-bit formats, +0.5% for int8), on the first 1,000 of the 4,000 held-out
lines (the full figures, measured once, are in the fixture's comment).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_model import TINY, tiny_params

nq = pytest.importorskip("fast.numba.quant", reason="numba is not installed")
# NaN in x: numpy's matmul (the reference's and the tiles variant's BLAS) says so; expected here
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")

from fast import get_backend  # noqa: E402
from ref import quant  # noqa: E402
from ref.config import GPT2Config  # noqa: E402
from ref.model import KVCache, forward  # noqa: E402

LOGITS_RTOL = 5e-6  # of max |logits|, as tests/test_numba_model.py
ODD = GPT2Config(n_vocab=211, n_ctx=48, n_embd=15, n_head=3, n_layer=3)
EPS = float(np.finfo(np.float32).eps)


def check_against_reference(got: np.ndarray, x: np.ndarray, q: quant.QWeight, b) -> None:
    want = quant.qlinear_forward(x, q, b)
    assert got.shape == want.shape and got.dtype == np.float32
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf])
    w = np.abs(quant.dequantize(q))  # (N, K)
    x = x.reshape(-1, x.shape[-1])  # (M, K)
    if q.dtype == "int8":  # what both sides multiply: x rounded to its q8_0 blocks
        x = quant.f32_from_q8_0(*quant.q8_0_activations(x))
    finite_x = np.where(np.isfinite(x), np.abs(x), 0)  # (M, K)
    scale = (finite_x @ w.T).reshape(want.shape)  # (..., N)
    K = x.shape[-1]
    ok = ~(nan | inf)
    err = np.abs(got[ok] - want[ok])
    bound = K * EPS * scale[ok] + EPS * np.abs(want[ok])  # the dot products, the bias's add
    assert (err <= bound + 1e-30).all(), float(err.max(initial=0))


@st.composite
def cases(draw, max_m: int = 1023, dtypes: tuple[str, ...] = quant.DTYPES):
    N = draw(st.sampled_from([1, 2, 3, 4, 5, 7, 13, 16, 17, 31, 64, 97]))
    K = draw(st.sampled_from([1, 5, 31, 32, 33, 64, 97, 100, 257]))
    M = draw(
        st.sampled_from([m for m in (1, 2, 3, 4, 5, 8, 9, 17, 63, 64, 65, 100, 1023) if m <= max_m])
    )
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    w = (0.1 * rng.standard_normal((N, K))).astype(np.float32)  # (N, K)
    if draw(st.booleans()):
        w[:, : min(K, 32)] = 0.0  # an all-zero block in every row
    x = rng.standard_normal((M, K)).astype(np.float32)  # (M, K)
    if draw(st.booleans()):  # NaN and Inf in the activations
        x[rng.integers(0, M), rng.integers(0, K)] = np.nan
        x[rng.integers(0, M), rng.integers(0, K)] = np.inf
        x[rng.integers(0, M), rng.integers(0, K)] = -np.inf
    b = rng.standard_normal(N).astype(np.float32) if draw(st.booleans()) else None
    return x, quant.quantize(w, dtype), b


@settings(max_examples=120, deadline=None)
@given(cases())
def test_launcher_and_both_variants_match_the_reference(case):
    x, q, b = case
    check_against_reference(nq.qlinear_forward(x, q, b), x, q, b)
    bias = np.zeros(q.shape[0], np.float32) if b is None else b
    if x.shape[0] <= 100:  # the rows kernel at any M is correct, only slower beyond 64
        check_against_reference(nq.rows_forward(x, q, bias), x, q, b)
    check_against_reference(nq.tiles_forward(x, q, b), x, q, b)


def test_tiles_cover_many_tiles_and_a_short_last_one():
    """N larger than one tile (_TILE_BYTES of float32 rows), not a multiple of it."""
    rng = np.random.default_rng(3)
    K = 300
    rows = nq._TILE_BYTES // (4 * K)
    w = (0.1 * rng.standard_normal((2 * rows + 7, K))).astype(np.float32)
    x = rng.standard_normal((70, K)).astype(np.float32)
    for dtype in quant.DTYPES:
        q = quant.quantize(w, dtype)
        check_against_reference(nq.qlinear_forward(x, q), x, q, None)


def test_three_dimensional_x():
    rng = np.random.default_rng(4)
    q = quant.quantize(rng.standard_normal((9, 40)).astype(np.float32), "int8")
    x = rng.standard_normal((2, 3, 40)).astype(np.float32)
    got = nq.qlinear_forward(x, q)
    assert got.shape == (2, 3, 9)
    check_against_reference(got, x, q, None)


@settings(max_examples=40, deadline=None)
@given(cases(max_m=64), st.data())
def test_rows_are_invariant_to_the_batch_bit_for_bit(case, data):
    """Row m of a batch is the bits of that row computed alone, and of it in any other batch:
    other rows replaced by noise or NaN change nothing in it."""
    x, q, b = case
    M = x.shape[0]
    out = nq.qlinear_forward(x, q, b)  # (M, N)
    m = data.draw(st.integers(0, M - 1))
    alone = nq.qlinear_forward(x[m : m + 1], q, b)  # (1, N)
    assert np.array_equal(out[m], alone[0], equal_nan=True)
    others = np.random.default_rng(m).standard_normal(x.shape).astype(np.float32) * 1e3
    others[::2] = np.nan
    others[m] = x[m]
    M2 = data.draw(st.integers(m + 1, 64))
    bigger = np.concatenate([others, x[:1].repeat(M2 - M, axis=0)]) if M2 > M else others
    assert np.array_equal(nq.qlinear_forward(bigger[:M2], q, b)[m], out[m], equal_nan=True)


@st.composite
def activations(draw):
    """x (M, K) for the q8_0 quantizer: block boundaries, scales from subnormal float16 ones
    (absmax ~1e-6) up, all-zero blocks, NaN, Inf and values past 127 * 65504 in a row."""
    M = draw(st.sampled_from([1, 2, 5, 17]))
    K = draw(st.sampled_from([1, 5, 31, 32, 33, 64, 97, 257]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-7, 1e-3, 1.0, 300.0, 3e4]))
    x = (scale * rng.standard_normal((M, K))).astype(np.float32)  # (M, K)
    if draw(st.booleans()):
        x[:, : min(K, 32)] = 0.0
    if draw(st.booleans()):
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e7, -3e38]))
        x[rng.integers(0, M), rng.integers(0, K)] = bad
    return x


@settings(max_examples=80, deadline=None)
@given(activations())
def test_the_x_quantizer_is_the_references_bit_for_bit(x):
    """The int8 kernel's q8_0 of x: the reference's quants and scales, zeros past K, and the
    offset it starts each block's lanes from, -128 * the sum of the block's quants."""
    qs, d = quant.q8_0_activations(x)
    M, K = x.shape
    nb = quant.n_blocks(K)
    qx = np.full((M, nb * quant.QK), 99, np.int8)  # (M, Kp)
    dx = np.empty((M, nb), np.float32)  # (M, nb)
    cx = np.empty((M, nb), np.int32)  # (M, nb)
    nq.quantize_x_q8(x, qx, dx, cx)
    assert np.array_equal(qx[:, :K], qs) and not qx[:, K:].any()
    assert np.array_equal(dx, d.astype(np.float32), equal_nan=True)
    assert np.array_equal(cx, -128 * qx.reshape(M, nb, quant.QK).astype(np.int32).sum(axis=2))


def test_the_x_quantizer_rounds_ties_to_even_as_the_reference():
    """Full blocks go through the vector quantizer (_q8_block), the short last one through the
    loops: both round x / d halfway cases to even (d = 1 here: each block's absmax is 127) and
    give an all-zero block scale 0, the reference's bits; at M = 1 and M = 16, K = 32 * 24 + 5."""
    K = 32 * 24 + 5
    for M in (1, 16):
        rng = np.random.default_rng(M)
        halves = rng.choice(np.arange(-126, 126) + 0.5, size=(M, K)).astype(np.float32)
        halves[:, ::32] = 127.0  # absmax 127 in every block: d = 1
        halves[:, 64:96] = 0.0  # an all-zero block
        qs, d = quant.q8_0_activations(halves)
        nb = quant.n_blocks(K)
        qx = np.empty((M, nb * quant.QK), np.int8)  # (M, Kp)
        dx = np.empty((M, nb), np.float32)  # (M, nb)
        cx = np.empty((M, nb), np.int32)  # (M, nb)
        nq.quantize_x_q8(halves, qx, dx, cx)
        assert np.array_equal(qx[:, :K], qs) and np.array_equal(dx, d.astype(np.float32))
        assert (dx[:, 2] == 0).all() and (qs[:, 1:32] % 2 == 0).all()  # ties went to even


# the int8 kernel's instruction sets this CPU runs: its own (nq.ISA) and those after it
HOST_ISAS = nq.ISAS[nq.ISAS.index(nq.ISA) :]


@settings(max_examples=40, deadline=None)
@given(cases(dtypes=("int8",)))
def test_int8_kernel_is_the_same_bits_on_every_instruction_set(case):
    """VPDPBUSD, AVX2's sign trick and the widened 32-bit products compute the same integers,
    so the same outputs; each matches the reference."""
    x, q, b = case
    bias = np.zeros(q.shape[0], np.float32) if b is None else b
    wide = nq.q8_forward(x, q, bias, isa="wide")
    check_against_reference(wide, x, q, b)
    for isa in HOST_ISAS:
        assert np.array_equal(nq.q8_forward(x, q, bias, isa=isa), wide, equal_nan=True), isa


@pytest.mark.parametrize("isa", HOST_ISAS)
def test_int8_kernel_exact_at_the_extreme_quants(isa):
    """Quants at the ends of their range, where a 16-bit pair sum could overflow (AVX2's
    VPMADDUBSW saturates): weights -128 (a GGUF file may hold them; our quantizer stops at
    -127) and +127 against activations quantized to +-127 (every element of x is +-3, so
    every block's absmax is 3). Against the reference, and the widened products bit for bit."""
    rng = np.random.default_rng(7)
    N, K, M = 37, 96, 6
    qs = rng.choice(np.array([-128, -127, 127, 126, 0], np.int8), size=(N, K))  # (N, K)
    d = np.full((N, quant.n_blocks(K)), 0.5, np.float16)  # (N, nb)
    q = quant.QWeight("int8", qs, d)
    x = rng.choice(np.array([-3.0, 3.0], np.float32), size=(M, K))  # (M, K)
    assert (np.abs(quant.q8_0_activations(x)[0]) == 127).all()
    bias = np.zeros(N, np.float32)
    got = nq.q8_forward(x, q, bias, isa=isa)
    check_against_reference(got, x, q, None)
    assert np.array_equal(got, nq.q8_forward(x, q, bias, isa="wide"))


@pytest.mark.parametrize("K", [32, 96, 100])
def test_kernels_read_nothing_past_their_arrays(K):
    """Weights, scales and x each end where NaN bits begin (a C-contiguous view of a larger
    buffer): a kernel that read one element past an array (say the scale of a short last
    block that does not exist when K is a multiple of 32) would turn its output to NaN."""
    rng = np.random.default_rng(K)
    N, M = 7, 6  # M = 6: the 4-row and the 1-row dot products

    def fenced(a: np.ndarray, nan_bits) -> np.ndarray:
        buf = np.full(a.size + 64, nan_bits, a.dtype)
        buf[: a.size] = a.ravel()
        return buf[: a.size].reshape(a.shape)  # C-contiguous, NaN right after its end

    x = rng.standard_normal((M, K)).astype(np.float32)
    xf = fenced(x, np.float32(np.nan))
    for dtype in quant.DTYPES:
        q = quant.quantize((0.1 * rng.standard_normal((N, K))).astype(np.float32), dtype)
        nan = {"float32": np.float32(np.nan), "float16": np.float16(np.nan)}.get(dtype, 0x7FC0)
        data = fenced(q.data, nan if dtype != "int8" else q.data.dtype.type(-128))
        scale = None if q.scale is None else fenced(q.scale, np.float16(np.nan))
        fq = quant.QWeight(dtype, data, scale)
        b = np.zeros(N, np.float32)
        got = nq.rows_forward(xf, fq, b)
        assert not np.isnan(got).any(), dtype
        check_against_reference(got, x, q, None)


def test_bad_inputs_are_refused_by_name():
    rng = np.random.default_rng(0)
    q = quant.quantize(rng.standard_normal((6, 40)).astype(np.float32), "int8")
    x = rng.standard_normal((2, 40)).astype(np.float32)
    with pytest.raises(ValueError, match="does not match"):
        nq.qlinear_forward(x[:, :39], q)
    with pytest.raises(ValueError, match="bias"):
        nq.qlinear_forward(x, q, np.zeros(5, np.float32))
    with pytest.raises(TypeError, match="x as a float32"):
        nq.qlinear_forward(x.astype(np.float64), q)
    with pytest.raises(TypeError, match="QWeight"):
        nq.qlinear_forward(x, np.zeros((6, 40), np.float32))
    with pytest.raises(ValueError, match="scales of shape"):
        nq.qlinear_forward(x, quant.QWeight("int8", q.data, q.scale[:, :1]))
    with pytest.raises(ValueError, match="float16 data"):
        nq.qlinear_forward(x, quant.QWeight("float16", q.data))
    with pytest.raises(ValueError, match="unknown QWeight dtype"):
        nq.qlinear_forward(x, quant.QWeight("int4", q.data))


def test_read_only_weights_run():
    """Weights memory-mapped from a file (a GGUF reader's) are read-only arrays."""
    rng = np.random.default_rng(1)
    q = quant.quantize(rng.standard_normal((5, 64)).astype(np.float32), "int8")
    q.data.flags.writeable = False
    q.scale.flags.writeable = False
    x = rng.standard_normal((1, 64)).astype(np.float32)
    check_against_reference(nq.qlinear_forward(x, q), x, q, None)


# ---------------------------------------------------------------------------------------------
# models


@pytest.mark.parametrize("dtype", quant.DTYPES)
@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
def test_quantized_model_on_numba_matches_the_reference_backend(cfg, dtype):
    """Prompt with padding, then KV-cache decode steps, batch 3: the same quantized tree on
    both backends."""
    params = quant.quantize_params(tiny_params(cfg, seed=7), dtype)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.n_vocab, (3, 11))
    mask = np.ones(ids.shape, bool)
    mask[1, :4] = False
    nb, rb = get_backend("numba"), get_backend("ref")
    want = forward(params, ids, cfg, mask=mask, ops=rb)
    got = forward(params, ids, cfg, mask=mask, ops=nb)
    assert np.abs(got - want).max() <= LOGITS_RTOL * np.abs(want).max()
    caches = [KVCache(cfg, 3, 20), KVCache(cfg, 3, 20)]
    forward(params, ids[:, :6], cfg, cache=caches[0], mask=mask[:, :6], ops=rb)
    forward(params, ids[:, :6], cfg, cache=caches[1], mask=mask[:, :6], ops=nb)
    for t in range(6, 11):
        want = forward(params, ids[:, t : t + 1], cfg, cache=caches[0], ops=rb)
        got = forward(params, ids[:, t : t + 1], cfg, cache=caches[1], ops=nb)
        assert np.abs(got - want).max() <= LOGITS_RTOL * np.abs(want).max()


def test_a_sequence_decodes_to_the_same_bits_alone_or_in_a_batch():
    """Decode steps of a batch of 5 against the same sequence alone, int8 and float32
    QWeights: the linear layers are row-invariant, and so is every other op of a decode step
    on numba (LayerNorm, GELU and attention work row by row)."""
    cfg = ODD
    for dtype in ("int8", "float32"):
        params = quant.quantize_params(tiny_params(cfg, seed=5), dtype)
        nb = get_backend("numba")
        rng = np.random.default_rng(2)
        ids = rng.integers(0, cfg.n_vocab, (5, 8))
        batch, alone = KVCache(cfg, 5, 16), KVCache(cfg, 1, 16)
        forward(params, ids[:, :1], cfg, cache=batch, ops=nb)
        forward(params, ids[2:3, :1], cfg, cache=alone, ops=nb)
        for t in range(1, 8):
            got = forward(params, ids[:, t : t + 1], cfg, cache=batch, ops=nb)[2]
            want = forward(params, ids[2:3, t : t + 1], cfg, cache=alone, ops=nb)[0]
            assert np.array_equal(got, want), (dtype, t)


# ---------------------------------------------------------------------------------------------
# the shipped model's held-out loss per dtype (issue 15's accuracy target)

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "models")
LOSS_LIMIT = {"bfloat16": 1e-3, "float16": 1e-3, "int8": 5e-3}  # of float32's held-out loss


@pytest.mark.skipif(
    not os.path.exists(os.path.join(SHIPPED, "shakespeare", "model.safetensors")),
    reason="no shipped model",
)
def test_numba_loads_float32_as_a_stored_tree_with_the_references_logits():
    """gpt2.load(backend="numba") keeps float32 weights as float32 QWeights (the row kernel's
    layout); its logits are the plain tree's on the reference backend (LOGITS_RTOL), the
    values being the same float32 weights."""
    import gpt2

    fast = gpt2.load("shakespeare", backend="numba")
    ref = gpt2.load("shakespeare", backend="ref")
    assert quant.is_quantized(fast.params) and quant.params_dtype(fast.params) == "float32"
    assert not quant.is_quantized(ref.params)
    ids = np.array([[5, 17, 30, 2, 9, 11]])
    want = ref.forward(ids)
    got = fast.forward(ids)
    assert np.abs(got - want).max() <= LOGITS_RTOL * np.abs(want).max()


@pytest.fixture(scope="module")
def held_out_losses():
    from test_shipped import held_out

    import gpt2

    # the first 1,000 of the 4,000 held-out lines (7.5k tokens, ~6 s per dtype on 2 cores; all
    # 4,000 take ~25 s each: measured 5.490604 float32, 5.490880 bfloat16 (+0.005%), 5.490604
    # float16, 5.490711 int8 with float32 activations (+0.002%), 5.490813 int8 as it is now,
    # activations rounded to q8_0 (+0.004%))
    text = "".join(held_out().splitlines(keepends=True)[:1000])
    return {
        dtype: gpt2.evaluate(gpt2.load("shakespeare", backend="numba", dtype=dtype), text).loss
        for dtype in quant.DTYPES
    }


@pytest.mark.skipif(
    not os.path.exists(os.path.join(SHIPPED, "shakespeare", "model.safetensors")),
    reason="no shipped model",
)
@pytest.mark.parametrize("dtype", list(LOSS_LIMIT))
def test_shipped_model_held_out_loss_per_dtype(held_out_losses, dtype):
    """A dtype may add at most LOSS_LIMIT of float32's held-out loss (a loss is compared, not
    an absolute change: lower is fine). The model's weights are float16 to begin with, so
    float16 must give float32's loss to float32 rounding (measured: equal to the last digit);
    on these 1,000 lines float32 gives 5.6024, bfloat16 +0.005%, int8 +0.011% (+0.003% when its
    activations were float32)."""
    f32 = held_out_losses["float32"]
    assert 5.5 < f32 < 5.7  # the shipped model, not a broken one
    assert held_out_losses[dtype] <= f32 * (1 + LOSS_LIMIT[dtype]), held_out_losses
    if dtype == "float16":
        assert abs(held_out_losses[dtype] - f32) <= 1e-5


# ---------------------------------------------------------------------------------------------
# the generate suite's rows for the stored dtypes


def test_generate_suite_has_a_row_per_stored_dtype_at_its_three_points():
    """The tiny plan (its longest prompt, 32 tokens, for 512; decode batch 1 at the
    smallest context and batch 4, the plan's batch): each stored dtype's prefill and decode
    records, with the bytes of weights a step reads at the stored sizes and the GB/s that
    makes."""
    from bench import suite_generate
    from bench.backends import load_backends
    from bench.plan import SuiteSetup, make_plan

    plan = make_plan("tiny", None, None)
    backends, _ = load_backends(["numba"])
    limits = {"read_GBps": 10.0, "matmul_f32_GFLOPs": 100.0}
    setup = SuiteSetup(plan, backends, limits, np.random.default_rng(0), baselines=False)
    recs = [r for r in suite_generate.run(setup) if r["backend"] in suite_generate.QUANT_LABELS]
    assert all(r["status"] == "ok" for r in recs), [r.get("reason") for r in recs]
    cfg = plan.models[0][1]
    (T,), points = suite_generate._quant_points(plan, cfg)
    assert T == max(plan.prefill_T) < 512 and [B for B, _ in points] == [1, 4]
    got = {(r["backend"], r["case"], r["params"]["B"], r["params"].get("T")) for r in recs}
    for label in suite_generate.QUANT_LABELS:
        want = {(label, "prefill", 1, T), (label, "decode", 1, None), (label, "decode", 4, None)}
        assert want == {g for g in got if g[0] == label}
    f32 = suite_generate.weight_bytes(cfg)
    for r in recs:
        if r["case"] != "decode":
            continue
        m = r["metrics"]
        C, L, V = cfg.n_embd, cfg.n_layer, cfg.n_vocab
        shapes = [(3 * C, C), (C, C), (4 * C, C), (C, 4 * C)] * L + [(V, C)]  # (N, K) each
        dtype = r["params"]["dtype"]
        stored = sum(
            N * (K + 2 * -(-K // 32))
            if dtype == "int8"
            else N * K * (4 if dtype == "float32" else 2)
            for N, K in shapes
        )
        assert m["weight_bytes"] == f32 - 4 * sum(N * K for N, K in shapes) + stored
        assert m["weight_GBps"] == pytest.approx(
            m["weight_bytes"] * m["tokens_per_s"] / r["params"]["B"] / 1e9
        )
        assert m["bytes_per_step"] > m["weight_bytes"]


@pytest.mark.skipif(not nq.VNNI, reason="the probe is VPDPBUSD's: needs AVX-512 VNNI")
def test_the_vpdpbusd_probe_does_its_work_and_gives_a_rate():
    """The limit numba_quant_timing prints beside the int8 kernel: each of the probe's 16
    chains starts at its index and adds 4 (four products of 1 x 1) per round, so after n rounds
    their lane 0 sums to 120 + 64 n; the rate is positive and finite."""
    ones = np.ones(64, np.uint8)
    assert nq._probe(5, ones) == 120 + 64 * 5
    rate = nq.vpdpbusd_rate(rounds=10_000, repeat=1)
    assert 0 < rate < float("inf")
