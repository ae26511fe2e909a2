"""The 16-bit KV cache (ref.model.KVCache dtype "float16", `--kv-dtype float16`): what it
stores, that every backend computes the same model on it, and its accuracy against float32.

Accuracy (issue 15: a 16-bit cache only where it is shown as accurate as float32): the
decisive greedy tokens of the Hugging Face fixture (tests/fixtures/reference.npz) and the
shipped model's held-out loss within +0.1% of the float32 cache's (the bound issue 15 sets
for 16-bit weights; +0.5% with int8 weights, int8's bound). Bounds are stated with what was
measured next to them.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tiny_model import TINY, tiny_params

from gpt2 import cli
from ref import generate as ref_generate
from ref.model import KV_DTYPES, KVCache, Model, forward
from weights import loader

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HF_TINY = os.path.join(FIXTURES, "hf-tiny")
SHIPPED = os.path.join(os.path.dirname(os.path.dirname(__file__)), "weights", "models")
HAS_SHIPPED = os.path.exists(os.path.join(SHIPPED, "shakespeare", "model.safetensors"))


def test_the_cache_stores_keys_and_values_rounded_to_float16():
    """Half the bytes; layer 0's keys and values (computed before any rounding can reach
    them) are the float32 cache's, rounded to the nearest float16 (numpy's cast)."""
    params = tiny_params(TINY, seed=3)
    ids = np.random.default_rng(0).integers(0, TINY.n_vocab, (2, 9))
    c32, c16 = KVCache(TINY, 2, 16), KVCache(TINY, 2, 16, "float16")
    assert c16.k.dtype == c16.v.dtype == np.float16 and c16.k.nbytes * 2 == c32.k.nbytes
    forward(params, ids, TINY, cache=c32)
    forward(params, ids, TINY, cache=c16)
    for a16, a32 in ((c16.k, c32.k), (c16.v, c32.v)):
        assert np.array_equal(a16[0, :, :, :9], a32[0, :, :, :9].astype(np.float16))
        assert not a16[:, :, :, 9:].any()  # slots not filled stay zero
    c16.select([1, 1, 0])  # beam search's reorder keeps the dtype
    assert c16.k.dtype == np.float16 and c16.k.shape[1] == 3


def test_a_dtype_it_cannot_store_is_refused_by_name():
    assert KV_DTYPES == tuple(cli.KV_DTYPES)  # the command's choices are the model's
    with pytest.raises(ValueError, match="KV cache dtype .*'bfloat16'"):
        KVCache(TINY, 1, 8, "bfloat16")
    with pytest.raises(ValueError, match="kv_dtype .*'int8'"):
        Model(TINY, tiny_params(TINY), kv_dtype="int8")


def test_numba_kv_store_rounds_as_numpy_does():
    """fast.numba's kv_store (a kernel for float16 caches) stores numpy's bits: ties to even,
    subnormals, overflow to inf, signed zeros, NaN, from the strided views of qkv the model
    passes; a float32 cache and arrays the kernel does not take go to numpy's assignment."""
    nat = pytest.importorskip("fast.numba.attention")
    from ref import ops

    rng = np.random.default_rng(4)
    B, NH, T, hs, cap, P = 2, 3, 5, 64, 12, 6
    x = rng.standard_normal((B, T, 3, NH, hs)) * 10.0 ** rng.uniform(-9, 6, (B, T, 3, NH, hs))
    x = x.astype(np.float32)
    special = [np.nan, np.inf, -np.inf, 65504, 65519.99, 65520, 2.0**-24, 2.0**-25, -0.0]
    special += [1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**-14 * (1 + 2.0**-11)]  # ties to even
    x[0, 0, 1, 0, : len(special)] = special  # into the keys (slot 1 of 3)
    k = x.transpose(2, 0, 3, 1, 4)[1]  # (B, NH, T, hs), the model's strided view
    for dtype in (np.float16, np.float32):
        got = np.zeros((B, NH, cap, hs), dtype)
        want = got.copy()
        with np.errstate(over="ignore", invalid="ignore"):
            nat.kv_store(got, P, k)
            ops.kv_store(want, P, k)
        bits = np.uint16 if dtype == np.float16 else np.uint32
        assert np.array_equal(got.view(bits), want.view(bits)), dtype
        assert np.isnan(got).sum() == 1 and np.isinf(got).sum() >= 2
    with pytest.raises(ValueError, match="kv_store: 5 new keys at slot 9 exceed .* 12 slots"):
        nat.kv_store(np.zeros((B, NH, cap, hs), np.float16), 9, k)


def test_numba_on_a_float16_cache_is_the_reference_on_one():
    """Prompt with padding, then decode steps, on float16 caches: numba against the reference.
    The two backends' float32 keys differ by a few ulps, and where one lies next to a float16
    rounding boundary the two caches store values one float16 step apart (2^-11 relative), so
    the bound is looser than tests/test_numba_model.py's 5e-6: 1e-4 of max |logits|. Measured
    on this setup with 20 other seeds: 3e-7 to 2.7e-5 of max |logits|, 3 to 44 cache elements
    a float16 step apart between the backends."""
    nb = pytest.importorskip("fast.numba.backend")
    params = tiny_params(TINY, seed=5)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, TINY.n_vocab, (3, 11))
    mask = np.ones(ids.shape, bool)
    mask[1, :4] = False
    caches = [KVCache(TINY, 3, 20, "float16") for _ in range(2)]
    want = forward(params, ids, TINY, cache=caches[0], mask=mask)
    got = forward(params, ids, TINY, cache=caches[1], mask=mask, ops=nb)
    for step in range(5):
        scale = float(np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-4 * scale, step
        new = rng.integers(0, TINY.n_vocab, (3, 1))
        want = forward(params, new, TINY, cache=caches[0], last_only=True)
        got = forward(params, new, TINY, cache=caches[1], last_only=True, ops=nb)


# The largest logit error the float16 cache may make along the fixture's greedy sequence,
# stated beforehand: measured 1.75e-3 (ref and numba alike; logits reach 5); the bound leaves
# 2.3x. Every float32 lead of the 20 tokens (the least 0.013) exceeds twice the bound.
LOGIT_BOUND_KV16 = 4e-3


@pytest.mark.skipif(not os.path.isdir(HF_TINY), reason="fixture tests/fixtures/hf-tiny absent")
@pytest.mark.parametrize("backend", ["ref", "numba"])
def test_decisive_greedy_tokens_survive_a_float16_cache(backend):
    """The decisive-argmax oracle (as tests/test_quant.py's for the weight dtypes): along the
    fixture's 20 greedy tokens (transformers' own) the float16 cache's logits stay within
    LOGIT_BOUND_KV16 of float32's, and greedy generation through it gives all 20 tokens."""
    from fast import get_backend

    ops = get_backend(backend)
    ref = np.load(os.path.join(FIXTURES, "reference.npz"))
    cfg, params = loader.load(HF_TINY)
    prompt, tokens = ref["greedy_prompt"].tolist(), ref["greedy_tokens"].tolist()
    assert (ref["greedy_margins"] > 2 * LOGIT_BOUND_KV16).all()
    seq = np.array([prompt + tokens])  # (1, 30)
    n = len(prompt)
    want = forward(params, seq, cfg)[0, n - 1 : -1]  # (20, V)
    cache = KVCache(cfg, 1, seq.shape[1], "float16")
    got = forward(params, seq, cfg, cache=cache, ops=ops)[0, n - 1 : -1]  # (20, V)
    err = float(np.abs(got - want).max())
    assert 0 < err <= LOGIT_BOUND_KV16  # > 0: the cache did round something
    model = Model(cfg, params, ops, kv_dtype="float16")
    (out,) = ref_generate.generate(model, [prompt], 20, temperature=0.0, eos_id=None)
    assert out.token_ids == tokens


@pytest.fixture(scope="module")
def shipped_losses():
    from test_shipped import held_out

    import gpt2

    # the first 1,000 of the 4,000 held-out lines, as tests/test_numba_quant.py's per-dtype
    # losses (7.5k tokens, each window through a fresh cache: ref.evaluate)
    text = "".join(held_out().splitlines(keepends=True)[:1000])
    out = {}
    for dtype in ("float32", "int8"):
        for kv in KV_DTYPES:
            m = gpt2.load("shakespeare", backend="numba", dtype=dtype, kv_dtype=kv)
            out[dtype, kv] = gpt2.evaluate(m, text).loss
    return out


@pytest.mark.skipif(not HAS_SHIPPED, reason="no shipped model")
@pytest.mark.parametrize("dtype, limit", [("float32", 1e-3), ("int8", 5e-3)])
def test_shipped_model_held_out_loss_on_a_float16_cache(shipped_losses, dtype, limit):
    """The float16 cache adds at most `limit` of the float32 cache's held-out loss, with the
    same weights (lower is fine); and it does change the loss (the windows did go through
    it). Measured on these 1,000 lines (float32 / float16 cache): float32 weights 5.602374 /
    5.602375, int8 5.602961 / 5.603006 (+0.0008%); on all 4,000: 5.490604 / 5.490603 and
    5.490811 / 5.490823."""
    f32 = shipped_losses[dtype, "float32"]
    f16 = shipped_losses[dtype, "float16"]
    assert 5.5 < f32 < 5.7  # the shipped model, not a broken one
    assert f16 <= f32 * (1 + limit), shipped_losses
    assert f16 != f32


def test_generate_and_eval_take_kv_dtype(tmp_path, capsys):
    """--kv-dtype float16 end to end on both numpy backends (the same tokens, the JSON says
    which cache ran); torch backends refuse it by name (they keep the cache in --dtype)."""
    pytest.importorskip("fast.numba.backend")
    if not os.path.isdir(HF_TINY):
        pytest.skip("fixture tests/fixtures/hf-tiny absent")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. It was a sunny day.")
    ids = {}
    for backend in ("ref", "numba"):
        gen = ["generate", "Hello, my name is", "--model", HF_TINY, "--backend", backend]
        assert cli.main([*gen, "-n", "8", "--kv-dtype", "float16", "--json"]) == 0
        g = json.loads(capsys.readouterr().out)
        assert g["settings"]["kv_dtype"] == "float16"
        ids[backend] = g["completions"][0]["token_ids"]
        ev = ["eval", str(text), "--model", HF_TINY, "--backend", backend, "--json"]
        assert cli.main([*ev, "--kv-dtype", "float16"]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] > 0
    assert ids["ref"] == ids["numba"] and len(ids["ref"]) == 8
    bad = ["generate", "x", "--model", HF_TINY, "--backend", "torch", "--kv-dtype", "float16"]
    assert cli.main(bad) == 2
    assert "--kv-dtype float16 needs --backend numba or ref" in capsys.readouterr().err
