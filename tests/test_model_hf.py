"""Our numpy GPT-2 against Hugging Face transformers, through stored reference outputs.

tests/fixtures/reference.npz holds what transformers computed on the fixture model (see
tests/fixtures/make_fixtures.py), so these tests need neither torch nor transformers. Then
properties of the forward pass on the same model (KV cache, padding, causality), and the
real 124M model where its weights are in the cache (marked real_weights, skipped otherwise).

Tolerances. The fixture's logits are at most ~5 in size; float32 keeps 24 bits (eps 1.2e-7),
and each logit goes through reductions of at most 4C = 96 terms per layer and 24 in the head,
in a different order in torch than in numpy's BLAS. The differences seen are below 2e-6;
LOGIT_ATOL = 2e-5 leaves a factor of 10 for other BLAS builds and thread counts. The greedy
reference picks every token by a margin of at least 1e-3 (checked when it was made), far above
that, so greedy tokens must match exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from real_weights import SKIP_REASON, cached_124m

from gpt2 import api
from ref.evaluate import evaluate
from ref.generate import generate, left_pad
from ref.model import forward
from weights import loader
from weights.tokenizer import decode, encode

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
LOGIT_ATOL = 2e-5  # see the module docstring
# The loss is a mean over 58 targets of logsumexp - logit, each off by ~LOGIT_ATOL at most
LOSS_ATOL = 2e-5


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIX, "reference.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module", params=["hf-tiny", "tf-tiny"])
def model(request) -> api.Model:
    """The fixture model, loaded from either format (they hold the same bits)."""
    cfg, params = loader.load(os.path.join(FIX, request.param))
    return api.Model(cfg, params)


@pytest.fixture(scope="module")
def hf_model() -> api.Model:
    cfg, params = loader.load(os.path.join(FIX, "hf-tiny"))
    return api.Model(cfg, params)


def _prompts(ref) -> list[list[int]]:
    return [ref["prompt_ids"][b, :n].tolist() for b, n in enumerate(ref["prompt_lens"])]


def _lse(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(-1)
    return m + np.log(np.exp(x - m[..., None]).sum(-1))


def _check_logits(logits: np.ndarray, ref, b: int) -> None:
    """logits (T, V) of prompt b against the stored slice, full-vocab logsumexp and argmax."""
    n = ref["prompt_lens"][b]
    np.testing.assert_allclose(
        logits[:, ref["logit_cols"]], ref["logits_slice"][b, :n], rtol=0, atol=LOGIT_ATOL
    )
    np.testing.assert_allclose(_lse(logits), ref["logits_lse"][b, :n], rtol=0, atol=LOGIT_ATOL)
    np.testing.assert_array_equal(logits.argmax(-1), ref["logits_argmax"][b, :n])


# ---------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------


def test_logits_match_transformers(model, ref):
    for b, p in enumerate(_prompts(ref)):
        logits = forward(model.params, np.array([p]), model.cfg)[0]  # (T, V)
        assert logits.dtype == np.float32
        _check_logits(logits, ref, b)


def test_left_padded_batch_matches_transformers(model, ref):
    prompts = _prompts(ref)
    ids, mask = left_pad(prompts)
    logits = model.forward(ids, mask=mask)  # (B, T, V)
    for b, p in enumerate(prompts):
        _check_logits(logits[b, ids.shape[1] - len(p) :], ref, b)


def test_greedy_tokens_match_transformers(model, ref):
    want = ref["greedy_tokens"].tolist()
    prompt = ref["greedy_prompt"].tolist()
    (out,) = generate(model, [prompt], len(want), temperature=0.0)
    assert out.token_ids == want
    (res,) = api.generate(model, prompt, max_new_tokens=len(want), temperature=0.0)
    assert res.token_ids == want
    assert res.text == decode(want)


def test_loss_matches_transformers(model, ref):
    result = evaluate(model, ref["loss_ids"])
    assert result.tokens == len(ref["loss_ids"]) - 1
    assert abs(result.loss - float(ref["loss"])) < LOSS_ATOL


def test_stride_1_gives_every_target_the_last_n_ctx_minus_1_tokens(hf_model):
    """A stream longer than the context, stride 1: target t is scored from the tokens
    ids[max(0, t - n_ctx + 1):t], each computed here by its own forward pass."""
    n_ctx = hf_model.cfg.n_ctx
    ids = np.random.default_rng(5).integers(0, hf_model.cfg.n_vocab, n_ctx + 6)
    want = 0.0
    for t in range(1, len(ids)):
        last = hf_model.forward(ids[None, max(0, t - n_ctx + 1) : t], last_only=True)[0, -1]
        want += float(_lse(last) - last[ids[t]])
    want /= len(ids) - 1
    result = evaluate(hf_model, ids, stride=1)
    assert result.tokens == len(ids) - 1
    # each target's lse and logit come from a differently shaped forward: up to LOGIT_ATOL each
    assert abs(result.loss - want) < 2 * LOGIT_ATOL


def test_sharded_small_model_matches_transformers(ref):
    cfg, params = loader.load(os.path.join(FIX, "hf-tiny-sharded"))
    logits = forward(params, ref["small_ids"][None], cfg)[0]
    np.testing.assert_allclose(logits, ref["small_logits"], rtol=0, atol=LOGIT_ATOL)


# ---------------------------------------------------------------------------------------
# Properties of the forward pass on the fixture model
# ---------------------------------------------------------------------------------------

# The cached and padded paths do the same arithmetic as the full forward in other matmul shapes
# (BLAS may sum in another order): the same float32 round-off argument as LOGIT_ATOL applies.
PROPERTY_ATOL = LOGIT_ATOL

token_ids = st.integers(0, 50256)


@given(ids=st.lists(token_ids, min_size=2, max_size=40), data=st.data())
def test_kv_cached_decoding_equals_full_forward(hf_model, ids, data):
    cuts = sorted(data.draw(st.sets(st.integers(1, len(ids) - 1), max_size=4)))
    full = hf_model.forward(np.array([ids]))[0]  # (T, V)
    cache = hf_model.new_cache(1, len(ids))
    pieces = [
        hf_model.forward(np.array([ids[a:b]]), cache=cache)[0]
        for a, b in zip([0, *cuts], [*cuts, len(ids)], strict=True)
    ]
    np.testing.assert_allclose(np.concatenate(pieces), full, rtol=0, atol=PROPERTY_ATOL)
    assert cache.length == len(ids)


@given(prompts=st.lists(st.lists(token_ids, min_size=1, max_size=12), min_size=2, max_size=4))
def test_left_padded_batch_equals_rows_alone(hf_model, prompts):
    ids, mask = left_pad(prompts)
    T = ids.shape[1]
    cache = hf_model.new_cache(len(prompts), T + 1)
    batch = hf_model.forward(ids, cache=cache, mask=mask)  # (B, T, V)
    nxt = np.array([[p[0]] for p in prompts])  # one more token each, from the cache
    step = hf_model.forward(nxt, cache=cache)[:, 0]  # (B, V)
    for b, p in enumerate(prompts):
        alone = hf_model.forward(np.array([p + [p[0]]]))[0]  # (len(p) + 1, V)
        np.testing.assert_allclose(batch[b, T - len(p) :], alone[:-1], rtol=0, atol=PROPERTY_ATOL)
        np.testing.assert_allclose(step[b], alone[-1], rtol=0, atol=PROPERTY_ATOL)


def test_a_forward_that_raises_leaves_the_cache_as_it_was(hf_model):
    """The cache's mask, row counts and length change only once a forward has finished, so a
    step that failed midway (here in layer 1's attention) can be run again."""
    from types import SimpleNamespace

    from ref import ops

    ids = np.array([[5, 17, 300, 2, 9, 44, 1000, 7]])
    cache = hf_model.new_cache(1, 8)
    hf_model.forward(ids[:, :5], cache=cache)
    calls = []

    def attention_once(*args):  # layer 0 runs (and writes its keys), layer 1 fails
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("attention failed")
        return ops.attention_forward(*args)

    bad = SimpleNamespace(**{**vars(ops), "attention_forward": attention_once})
    with pytest.raises(RuntimeError, match="attention failed"):
        forward(hf_model.params, ids[:, 5:], hf_model.cfg, cache=cache, ops=bad)
    assert cache.length == 5 and cache.n_real.tolist() == [5] and not cache.mask[0, 5:].any()
    again = hf_model.forward(ids[:, 5:], cache=cache)[0]
    full = hf_model.forward(ids)[0]
    np.testing.assert_allclose(again, full[5:], rtol=0, atol=PROPERTY_ATOL)
    with pytest.raises(ValueError, match="mask has shape"):
        hf_model.forward(ids, mask=np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="KV cache holds 2"):
        hf_model.forward(ids[:, :2], cache=hf_model.new_cache(2, 8))


@given(ids=st.lists(token_ids, min_size=2, max_size=40), data=st.data())
def test_later_tokens_never_change_earlier_logits(hf_model, ids, data):
    j = data.draw(st.integers(1, len(ids) - 1))
    other = list(ids)
    other[j] = data.draw(token_ids.filter(lambda t: t != ids[j]))
    a = hf_model.forward(np.array([ids]))[0]
    b = hf_model.forward(np.array([other]))[0]
    # Each row of every matmul is computed alone, and masked keys get exactly zero weight,
    # so the logits before j are the same bits, not merely close.
    np.testing.assert_array_equal(a[:j], b[:j])
    assert not np.array_equal(a[j], b[j])


# ---------------------------------------------------------------------------------------
# The released 124M model
# ---------------------------------------------------------------------------------------


def test_tokenizer_matches_openai():
    assert encode("Hello my name is") == [15496, 616, 1438, 318]


@pytest.fixture(scope="module")
def gpt2_124m() -> api.Model:
    path = cached_124m()
    if path is None:
        pytest.skip(SKIP_REASON)
    cfg, params = loader.load(path)
    return api.Model(cfg, params)


@pytest.mark.real_weights
def test_124m_parameter_count(gpt2_124m):
    from weights.layout import flatten

    n = sum(a.size for a in flatten(gpt2_124m.params).values())
    assert n == gpt2_124m.cfg.n_params() == 124_439_808


@pytest.mark.real_weights
def test_124m_greedy_from_ids(gpt2_124m):
    # 20 tokens in all from "The dog" (464 3290), greedy
    want = [464, 3290, 373, 1043, 287, 257, 2214, 1474, 262, 16246, 286, 2688, 290, 2688, 27262,
            13, 198, 198, 464, 3290]  # fmt: skip
    (out,) = generate(gpt2_124m, [want[:2]], len(want) - 2, temperature=0.0)
    assert want[:2] + out.token_ids == want


@pytest.mark.real_weights
def test_124m_greedy_alan_turing(gpt2_124m):
    prompt = "Alan Turing theorized that computers would one day become"
    want = (
        " the most powerful machines on the planet.\n\nThe computer is a machine that can perform"
        " complex calculations, and it can perform these calculations in a way that is very"
        " similar to the human brain.\n"
    )
    (res,) = api.generate(gpt2_124m, prompt, max_new_tokens=40, temperature=0.0)
    assert len(res.token_ids) == 40
    assert res.text == want
