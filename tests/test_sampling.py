"""The sampler's steps, each alone, on random logits (ref/sampling.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ref import sampling as S
from ref.sampling import SamplingError, SamplingParams

seeds = st.integers(0, 2**32 - 1)


def random_logits(seed: int, B: int = 3, V: int = 50, scale: float = 3.0) -> np.ndarray:
    """Continuous random float32 logits: ties have probability 0."""
    return (scale * np.random.default_rng(seed).standard_normal((B, V))).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# greedy equivalences and neutral values


@given(seeds, st.integers(0, 10_000))
def test_top_k_1_top_p_near_0_and_temperature_0_are_greedy(seed, draw_seed):
    logits = random_logits(seed)
    greedy = logits.argmax(axis=-1)
    seqs = [[] for _ in logits]
    rng = np.random.default_rng(draw_seed)
    for p in (
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.3, top_k=1),
        SamplingParams(temperature=0.7, top_p=1e-9),
    ):
        np.testing.assert_array_equal(S.choose(logits, p, seqs, rng), greedy)


@given(seeds, st.floats(0.05, 5.0))
def test_neutral_filters_change_nothing(seed, temperature):
    logits = random_logits(seed)
    np.testing.assert_array_equal(S.top_k_filter(logits, 0), logits)
    np.testing.assert_array_equal(S.top_k_filter(logits, logits.shape[-1]), logits)
    np.testing.assert_array_equal(S.top_p_filter(logits, 1.0), logits)
    np.testing.assert_array_equal(S.min_p_filter(logits, 0.0), logits)
    plain = SamplingParams(temperature=temperature)
    neutral = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
    np.testing.assert_array_equal(S.process_logits(logits, neutral, [[]] * 3), logits / temperature)
    np.testing.assert_array_equal(S.process_logits(logits, plain, [[]] * 3), logits / temperature)
    # default penalties leave the logits untouched, and greedy skips steps 5-8
    np.testing.assert_array_equal(S.process_logits(logits, SamplingParams(), [[1, 1]] * 3), logits)


# ---------------------------------------------------------------------------------------------
# each filter against its definition


@given(seeds, st.integers(1, 50))
def test_top_k_keeps_the_k_largest(seed, k):
    logits = random_logits(seed)
    out = S.top_k_filter(logits, k)
    for row, orow in zip(logits, out, strict=True):
        kept = np.flatnonzero(np.isfinite(orow))
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-row)[:k]))
        np.testing.assert_array_equal(orow[kept], row[kept])


@given(seeds, st.floats(0.01, 0.99))
def test_top_p_keeps_the_smallest_set_reaching_p(seed, p):
    logits = random_logits(seed)
    q = S.softmax(logits)
    out = S.top_p_filter(logits, p)
    for qrow, orow in zip(q, out, strict=True):
        kept = np.isfinite(orow)
        # the kept tokens are the most likely ones ...
        assert qrow[kept].min() >= qrow[~kept].max(initial=0.0)
        # ... their mass reaches p, and without the least likely of them it would not
        # (1e-12: float64 round-off of a 50-term sum of numbers <= 1)
        assert qrow[kept].sum() >= p - 1e-12
        assert qrow[kept].sum() - qrow[kept].min() < p + 1e-12


@given(seeds, st.floats(0.001, 1.0))
def test_min_p_keeps_tokens_above_a_fraction_of_the_top(seed, min_p):
    logits = random_logits(seed)
    q = S.softmax(logits)
    out = S.min_p_filter(logits, min_p)
    ratio = q / q.max(axis=-1, keepdims=True)
    # away from the boundary (1e-6 relative: float32 logits vs float64 probabilities) the
    # rule is exact; at the boundary either answer is right
    clear = np.abs(ratio - min_p) > 1e-6 * min_p
    np.testing.assert_array_equal(np.isfinite(out)[clear], (ratio >= min_p)[clear])
    assert np.isfinite(out[np.arange(3), logits.argmax(-1)]).all()


@given(seeds, st.floats(0.1, 10.0))
def test_temperature_divides(seed, t):
    logits = random_logits(seed)
    np.testing.assert_array_equal(S.apply_temperature(logits, t), logits / t)


# ---------------------------------------------------------------------------------------------
# penalties against their formulas, with tokens seen several times

V = 12
histories = st.lists(st.lists(st.integers(0, V - 1), max_size=15), min_size=1, max_size=4)


@given(seeds, histories, st.floats(0.2, 5.0))
def test_repetition_penalty_formula(seed, seqs, r):
    logits = random_logits(seed, len(seqs), V)
    out = S.penalize(logits, SamplingParams(repetition_penalty=r), seqs)
    for b, seq in enumerate(seqs):
        for i in range(V):
            l = float(logits[b, i])
            want = (l / r if l > 0 else l * r) if i in seq else l  # once, however many times
            assert out[b, i] == pytest.approx(want, rel=1e-6)  # float32 division/multiply


@given(seeds, histories, st.floats(-2, 2), st.floats(-2, 2))
def test_frequency_and_presence_penalty_formula(seed, seqs, f, p):
    logits = random_logits(seed, len(seqs), V)
    counts = np.zeros((len(seqs), V), np.int32)
    for b, seq in enumerate(seqs):
        for t in seq:
            counts[b, t] += 1
    params = SamplingParams(frequency_penalty=f, presence_penalty=p)
    out = S.penalize(logits, params, [[]] * len(seqs), counts)
    for b, seq in enumerate(seqs):
        for i in range(V):
            c = seq.count(i)
            want = float(logits[b, i]) - f * c - p * (c > 0)
            # float32 result: 1e-5 absolute covers the rounding of |values| < 50
            assert out[b, i] == pytest.approx(want, abs=1e-5)


def naive_banned(seq: list[int], n: int) -> set[int]:
    grams = {tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)}
    return {
        t for t in range(V) if len(seq) >= n - 1 and tuple(seq[len(seq) - n + 1 :] + [t]) in grams
    }


@given(st.lists(st.integers(0, 3), max_size=20), st.integers(1, 4))
def test_no_repeat_ngram_bans_exactly_the_repeating_tokens(seq, n):
    assert S.banned_ngram_tokens(seq, n) == naive_banned(seq, n)
    out = S.penalize(np.zeros((1, V), np.float32), SamplingParams(no_repeat_ngram_size=n), [seq])
    assert set(np.flatnonzero(np.isneginf(out[0]))) == naive_banned(seq, n)


def test_no_repeat_ngram_example():
    # "a b c a b" with n = 3: "a b c" exists, so after "a b" the token "c" is banned
    assert S.banned_ngram_tokens([0, 1, 2, 0, 1], 3) == {2}
    assert S.banned_ngram_tokens([0, 1, 2, 0, 1], 2) == {2}  # "1 2" exists


@given(seeds, st.dictionaries(st.integers(0, V - 1), st.floats(-5, 5), max_size=5))
def test_logit_bias_adds(seed, bias):
    logits = random_logits(seed, 2, V)
    out = S.penalize(logits, SamplingParams(logit_bias=bias), [[], []])
    want = logits.copy()
    for t, b in bias.items():
        want[:, t] += np.float32(b)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)  # one float32 addition


def test_logit_bias_minus_inf_bans():
    logits = np.zeros((1, 4), np.float32)
    logits[0, 2] = 10
    p = SamplingParams(logit_bias={2: -math.inf})
    assert S.choose(logits, p, [[]], np.random.default_rng(0))[0] != 2


def test_logit_bias_accepts_numpy_floats():
    p = SamplingParams(logit_bias={2: np.float32(-1.5)})
    assert S.penalize(np.zeros((1, 4), np.float32), p, [[]])[0, 2] == np.float32(-1.5)


# ---------------------------------------------------------------------------------------------
# sampling


def chi2_critical(df: int, z: float) -> float:
    """Upper quantile of chi-square(df) by the Wilson-Hilferty approximation (relative error
    well under 1% for df >= 5); z is the standard normal quantile of the same level."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=12),
        SamplingParams(temperature=1.5, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.05),
        SamplingParams(temperature=0.9, top_k=15, top_p=0.9, min_p=0.02),
    ],
)
def test_sampled_frequencies_match_the_filtered_softmax(params):
    """Chi-square goodness of fit, significance 0.001 (z = 3.090), seeded: the test is
    deterministic, and a correct sampler fails it for 1 seed in 1000."""
    logits = (np.random.default_rng(7).standard_normal(24) * 1.5).astype(np.float32)
    N = 40_000
    # expected: the definitions, written out again independently of ref/sampling.py
    x = logits.astype(np.float64) / params.temperature
    q = np.exp(x - x.max())
    q /= q.sum()
    keep = np.ones(len(q), bool)
    if params.top_k:
        keep &= x >= np.sort(x)[-params.top_k]
    if params.top_p < 1:  # over what top-k left, renormalised: each step sees the last one's
        qk = np.where(keep, q, 0.0) / q[keep].sum()
        order = np.argsort(-qk)
        before = np.concatenate([[0.0], np.cumsum(qk[order])[:-1]])
        keep[order[before >= params.top_p]] = False
    if params.min_p:
        keep &= q >= params.min_p * q.max()
    expected = np.where(keep, q, 0.0)
    expected /= expected.sum()

    x = S.process_logits(np.tile(logits, (N, 1)), params, [[]] * N)
    draws = S.sample(x, np.random.default_rng(123))
    observed = np.bincount(draws, minlength=len(logits))
    assert observed[~keep].sum() == 0, "a filtered-out token was drawn"
    e = N * expected[keep]
    stat = float(((observed[keep] - e) ** 2 / e).sum())
    df = int(keep.sum()) - 1
    assert df >= 5
    assert stat < chi2_critical(df, 3.090), (stat, df)


@given(seeds)
def test_same_seed_same_draws(seed):
    logits = random_logits(seed, B=8)
    a = S.sample(logits, np.random.default_rng(seed))
    b = S.sample(logits, np.random.default_rng(seed))
    np.testing.assert_array_equal(a, b)


def test_zero_probability_tokens_are_never_drawn():
    logits = np.full((5000, 6), -np.inf, np.float32)
    logits[:, 1] = 0.0
    logits[:, 4] = 0.0
    draws = S.sample(logits, np.random.default_rng(0))
    assert set(np.unique(draws)) == {1, 4}


# ---------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"frequency_penalty": math.nan}, "frequency_penalty"),
        ({"presence_penalty": math.inf}, "presence_penalty"),
        ({"no_repeat_ngram_size": -2}, "no_repeat_ngram_size"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        # +inf made softmax NaN everywhere, and sampling then drew token 0 silently
        ({"logit_bias": {3: math.inf}}, "logit_bias"),
    ],
)
def test_invalid_params_name_the_field(kw, field):
    with pytest.raises(SamplingError) as e:
        SamplingParams(**kw)
    assert e.value.field == field
    assert field in str(e.value)
