"""The serving engine without HTTP: batch invariance, the row-invariant linear, failures.

Batch invariance is checked bit for bit: every job's tokens and log-probs when it shares its
decode steps with others (arriving at steps hypothesis picks) equal those of the same job run
alone. The engine is driven with `run_once()` from the test's thread, so each arrival lands at
an exact step and nothing depends on timing. Models: the repo's tiny fixture (2 layers,
n_embd 24) and the shipped shakespeare model, on the ref and numba backends.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gpt2
from gpt2.serve.engine import Engine, Job, QueueFull
from ref import ops as ref_ops
from ref.batching import decode_step, row_linear
from ref.sampling import SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "fixtures", "hf-tiny")
SHAKESPEARE = os.path.join(ROOT, "weights", "models", "shakespeare")

_models: dict = {}


def model(path: str, backend: str):
    if (path, backend) not in _models:
        _models[path, backend] = gpt2.load(path, backend=backend)
    return _models[path, backend]


def collect(job: Job, out: dict) -> None:
    """Route the job's events into out[job] = {"tokens": {j: [...]}, "logprobs", ...}."""
    rec = out.setdefault(id(job), {"tokens": {}, "logprobs": {}, "text": {}, "finish": {}})

    def emit(ev):
        if ev["type"] == "delta":
            j = ev["index"]
            rec["tokens"].setdefault(j, []).extend(ev["tokens"])
            rec["logprobs"].setdefault(j, []).extend(ev.get("logprobs", []))
            rec["text"][j] = rec["text"].get(j, "") + ev["text"]
        elif ev["type"] == "finish":
            rec["finish"][ev["index"]] = ev["reason"]
        elif ev["type"] in ("done", "error"):
            rec["end"] = ev

    job.emit = emit


def make_job(spec: dict) -> Job:
    params = SamplingParams(**spec["params"])
    return Job(
        list(spec["prompt"]), spec["max_tokens"], params, None, n=spec["n"],
        seed=spec["seed"], stop=spec["stop"], logprobs=True, top_logprobs=2,
    )  # fmt: skip


def drive(engine: Engine, specs: list[dict], arrivals: list[int], out: dict) -> list[Job]:
    """Submit spec i at scheduler iteration arrivals[i]; iterate until nothing is left."""
    jobs = [make_job(s) for s in specs]
    for job in jobs:
        collect(job, out)
    it = 0
    while it <= max(arrivals) or engine.pending or engine.rows:
        due = [j for j, a in zip(jobs, arrivals, strict=True) if a == it]
        if due:
            engine.submit(due)
        engine.run_once()
        it += 1
        assert it < 10_000
    return jobs


job_specs = st.fixed_dictionaries(
    {
        "prompt": st.lists(st.integers(0, 50256), min_size=1, max_size=24),
        "max_tokens": st.integers(1, 12),
        "n": st.integers(1, 3),
        "seed": st.integers(0, 2**31 - 1),
        "stop": st.sampled_from([[], ["e"], [" the", "\n"]]),
        "params": st.sampled_from(
            [
                {},  # greedy
                {"temperature": 0.9},
                {"temperature": 1.2, "top_k": 20, "top_p": 0.9},
                {"temperature": 0.8, "repetition_penalty": 1.3, "frequency_penalty": 0.5},
                {"temperature": 1.0, "min_p": 0.05, "no_repeat_ngram_size": 2},
            ]
        ),
    }
)


@pytest.mark.parametrize("backend", ["ref", "numba"])
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_batch_invariance(backend, data):
    """Each job's tokens and log-probs, bit for bit, are those of the job run alone, whatever
    arrives beside it and when."""
    m = model(TINY, backend)
    specs = data.draw(st.lists(job_specs, min_size=2, max_size=6))
    specs = [s for s in specs if len(s["prompt"]) + s["max_tokens"] <= m.cfg.n_ctx]
    arrivals = data.draw(st.lists(st.integers(0, 8), min_size=len(specs), max_size=len(specs)))
    together: dict = {}
    jobs = drive(Engine(m), specs, arrivals, together)
    for spec, job in zip(specs, jobs, strict=True):
        alone: dict = {}
        (ref_job,) = drive(Engine(m), [spec], [0], alone)
        a, b = alone[id(ref_job)], together[id(job)]
        assert b["end"]["type"] == "done"
        assert a["tokens"] == b["tokens"] and a["finish"] == b["finish"] and a["text"] == b["text"]
        for j in a["logprobs"]:  # floats compared as bits: == on lists of floats is exact
            assert a["logprobs"][j] == b["logprobs"][j]


def test_invariance_holds_on_the_real_model_with_many_rows():
    """16 rows of the shakespeare model at staggered arrivals equal each alone (numba)."""
    m = model(SHAKESPEARE, "numba")
    rng = np.random.default_rng(0)
    specs = [
        {"prompt": rng.integers(0, 50257, int(rng.integers(1, 30))).tolist(), "max_tokens": 10,
         "n": 1, "seed": i, "stop": [], "params": {"temperature": 1.0} if i % 2 else {}}
        for i in range(16)
    ]  # fmt: skip
    together: dict = {}
    jobs = drive(Engine(m), specs, [i // 3 for i in range(16)], together)
    for spec, job in zip(specs, jobs, strict=True):
        alone: dict = {}
        (ref_job,) = drive(Engine(m), [spec], [0], alone)
        assert alone[id(ref_job)]["tokens"] == together[id(job)]["tokens"]
        assert alone[id(ref_job)]["logprobs"] == together[id(job)]["logprobs"]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_numba_decode_linear_is_row_invariant(dtype):
    """The linear the engine gives decode_step on --backend numba (fast/numba/quant.py's
    qlinear_forward over the stored weights): row r's output does not depend on how many rows
    share the call nor on the slot r takes, bit for bit, for every projection and the head;
    and it is the product of the weights it stores to float32 round-off (|err| <= 1e-4 on
    N(0, 1) activations: the float32 error of a sum over K <= 512 is ~ sqrt(K) * 6e-8 * |x||w|
    ~ 1e-5 here)."""
    from gpt2.serve.engine import linear_for
    from ref.quant import qlinear_forward  # int8: x rounded to q8_0 too, as the kernel does

    m = gpt2.load(SHAKESPEARE, backend="numba", dtype=dtype)
    linear, head = linear_for(m)
    rng = np.random.default_rng(0)
    blk, C = m.params["blocks"][0], m.cfg.n_embd
    for w, b, K in [(blk["attn"]["c_attn"]["w"], blk["attn"]["c_attn"]["b"], C),
                    (blk["mlp"]["c_proj"]["w"], blk["mlp"]["c_proj"]["b"], 4 * C),
                    (head, None, C)]:  # fmt: skip
        x = rng.standard_normal((11, K)).astype(np.float32)  # (R, K)
        full = linear(x, w, b)  # (R, N)
        for r in range(11):
            assert np.array_equal(linear(x[r : r + 1], w, b)[0], full[r])
        perm = rng.permutation(11)
        assert np.array_equal(linear(x[perm], w, b), full[perm])
        if w is head:
            want = qlinear_forward(x, head)
            np.testing.assert_allclose(full, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ["ref", "numba"])
@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
def test_decode_step_is_the_model(backend, kv_dtype):
    """decode_step over per-row caches gives the logits of ref.model.forward, each row run
    alone from its own cache (to 1e-4: the numba linears sum in another order than BLAS;
    logits are O(10) here, float32 round-off over C = 128 is ~1e-5), on caches of either
    dtype (the new keys go into a float16 cache rounded, as the model's forward stores them)."""
    from gpt2.serve.engine import linear_for

    m = copy.copy(model(SHAKESPEARE, backend))  # the shared model keeps its float32 cache
    m.kv_dtype = kv_dtype  # what gpt2.load(kv_dtype=...) sets; new_cache reads it
    linear, head = linear_for(m)
    prompts = [[5, 6, 7], [100], list(range(200, 220))]
    mine, theirs, toks = [], [], []
    for p in prompts:
        c = m.new_cache(1, 32)
        lg = m.forward(np.array([p]), cache=c, last_only=True)[0, -1]
        c2 = m.new_cache(1, 32)
        m.forward(np.array([p]), cache=c2, last_only=True)
        mine.append(c)
        theirs.append(c2)
        toks.append(int(lg.argmax()))
    out = decode_step(m.params, m.cfg, np.array(toks), mine, ops=m.ops, linear=linear,
                      lm_head=head)  # fmt: skip
    for r, c2 in enumerate(theirs):
        assert mine[r].k.dtype == np.dtype(kv_dtype)
        want = m.forward(np.array([[toks[r]]]), cache=c2, last_only=True)[0, -1]
        np.testing.assert_allclose(out[r], want, atol=1e-4, rtol=0)
        assert mine[r].length == c2.length and mine[r].n_real[0] == c2.n_real[0]


# the numba ops decode_step calls on all its rows at once (ROW_INVARIANT, attention_rows_forward)


@settings(max_examples=25, deadline=None)
@given(
    R=st.integers(1, 64),
    D=st.sampled_from([1, 7, 24, 33, 768, 3072]),
    seed=st.integers(0, 2**31 - 1),
)
@example(R=64, D=3072, seed=0)  # past the bias + GELU kernel switch
@example(R=42, D=3072, seed=1)  # just below it
def test_numba_row_invariant_ops(R, D, seed):
    """Each op the numba backend lists in ROW_INVARIANT gives row r of an R-row call the bits
    of row r called alone, and rows in another order the same rows (R up to the serving
    batch's 64: bias + GELU changes kernel at 2**17 elements, R = 43 at D = 3072)."""
    nb = pytest.importorskip("fast.numba.backend")
    assert nb.ROW_INVARIANT == {"layernorm_forward", "bias_gelu_forward"}
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((R, D))).astype(np.float32)  # (R, D)
    x[rng.random((R, D)) < 0.01] = np.nan
    g, b = rng.standard_normal((2, D)).astype(np.float32)  # (D,) each
    calls = {"layernorm_forward": lambda a: nb.layernorm_forward(a, g, b, 1e-5)[0],
             "bias_gelu_forward": lambda a: nb.bias_gelu_forward(a, b)[0]}  # fmt: skip
    perm = rng.permutation(R)
    for name in nb.ROW_INVARIANT:
        full = calls[name](x)  # (R, D)
        for r in {0, R - 1, int(rng.integers(R))}:
            assert np.array_equal(calls[name](x[r : r + 1])[0], full[r], equal_nan=True), name
        assert np.array_equal(calls[name](x[perm]), full[perm], equal_nan=True), name


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_numba_attention_rows_is_each_row_alone(data):
    """attention_rows_forward (R rows, a cache each, one launch) gives each row the bits of
    numba's attention_forward on that row alone, and of itself called on that row alone; a
    NaN in one row's keys stays in that row. Caches of float32 or of float16 (a 16-bit KV
    cache, then also within float32's rounding of the reference on the same float16 values)."""
    nat = pytest.importorskip("fast.numba.attention")
    R = data.draw(st.integers(1, 20))
    NH, hs = data.draw(st.sampled_from([(1, 1), (2, 3), (12, 64), (3, 17)]))
    kv_dtype = data.draw(st.sampled_from(["float32", "float16"]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    caps = [int(c) for c in rng.integers(1, 90, R)]
    n = [int(rng.integers(1, c + 1)) for c in caps]
    ks = [rng.standard_normal((NH, c, hs)).astype(kv_dtype) for c in caps]
    vs = [rng.standard_normal((NH, c, hs)).astype(kv_dtype) for c in caps]
    q = rng.standard_normal((R, NH, hs)).astype(np.float32)  # (R, NH, hs)
    bad = int(rng.integers(R))
    ks[bad][0, n[bad] - 1, 0] = np.nan
    out = nat.attention_rows_forward(q, ks, vs, n)  # (R, NH, hs)
    assert out.shape == (R, NH, hs)
    for r in range(R):
        one, _ = nat.attention_forward(
            q[r][None, :, None], ks[r][None, :, : n[r]], vs[r][None, :, : n[r]], None
        )  # (1, NH, 1, hs)
        assert np.array_equal(one[0, :, 0], out[r], equal_nan=True)
        alone = nat.attention_rows_forward(q[r : r + 1], ks[r : r + 1], vs[r : r + 1], n[r : r + 1])
        assert np.array_equal(alone[0], out[r], equal_nan=True)
        assert np.isnan(out[r, 0]).all() == (r == bad)
        if r != bad:  # the reference on the same stored values: tests/test_backends.py's bound
            want, _ = ref_ops.attention_forward(
                q[r][None, :, None], ks[r][None, :, : n[r]], vs[r][None, :, : n[r]]
            )
            atol = 4 * (hs + n[r]) * 2.0**-23 * float(np.abs(vs[r]).max())
            np.testing.assert_allclose(out[r], want[0, :, 0], rtol=1e-5, atol=atol)


def test_numba_attention_rows_refuses_what_it_cannot_read():
    """Each row's arrays are read through their addresses, so every one is checked first."""
    nat = pytest.importorskip("fast.numba.attention")
    q = np.zeros((2, 2, 4), np.float32)  # (R, NH, hs)
    k = np.zeros((2, 5, 4), np.float32)  # (NH, cap, hs)
    for ks, vs, n, msg in [
        ([k, k], [k, k], [5, 6], "row 1: n = 6"),
        ([k, k], [k, k], [0, 1], "row 0: n = 0"),
        ([k, k[:, :, :2]], [k, k], [1, 1], r"ks\[1\] must be"),
        ([k, k], [k, k[:, ::2]], [1, 1], r"vs\[1\] must be"),
        ([k, k.astype(np.float64)], [k, k], [1, 1], r"ks\[1\] must be"),
        ([k, k.astype(np.float16)], [k, k], [1, 1], r"ks\[1\] must be .*float32"),
        ([k, k], [k, k.astype(np.float16)], [1, 1], r"vs\[1\] must be .*float32"),
        ([k], [k, k], [1, 1], "2 rows"),
        ([k, k], [k, np.zeros((2, 4, 4), np.float32)], [1, 1], "row 1"),
    ]:
        with pytest.raises(ValueError, match=msg):
            nat.attention_rows_forward(q, ks, vs, n)


def test_row_linear_is_the_product():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    w = np.ones((3, 2), np.float32)
    assert np.array_equal(row_linear(x, w, np.array([1, 2], np.float32)), [[4, 5], [13, 14]])


def test_same_sampler_as_generate():
    """Greedy and seeded sampled output of the engine (alone) is `gpt2.generate`'s."""
    m = model(SHAKESPEARE, "numba")
    from weights.tokenizer import encode

    prompt = encode("ROMEO:")
    for params, seed in (({}, None), ({"temperature": 0.8, "top_k": 40}, 3)):
        spec = {"prompt": prompt, "max_tokens": 25, "n": 2 if seed else 1, "seed": seed,
                "stop": ["\n\n"], "params": params}  # fmt: skip
        out: dict = {}
        (job,) = drive(Engine(m), [spec], [0], out)
        want = gpt2.generate(m, prompt, 25, seed=seed, stop=["\n\n"],
                             num_return_sequences=spec["n"], **params)  # fmt: skip
        for j, w in enumerate(want):
            assert out[id(job)]["tokens"][j] == w.token_ids
            assert out[id(job)]["text"][j] == w.text


def test_a_failing_request_fails_alone(monkeypatch):
    """An exception in one job's sampling, or in its decode step, fails that job; the others
    finish with their own output, and the engine is empty afterwards."""
    m = model(TINY, "numba")
    eng = Engine(m)
    spec = {"prompt": [1, 2, 3], "max_tokens": 8, "n": 1, "seed": 0, "stop": [], "params": {}}
    alone: dict = {}
    (ref_job,) = drive(Engine(m), [spec], [0], alone)
    real_choose, real_step = eng.choose_row, eng.step

    def choose_row(row):
        if row.job.seed == 666 and len(row.tokens) == 2:
            raise RuntimeError("boom in sampling")
        return real_choose(row)

    def step(rows):
        if any(r.job.seed == 777 for r in rows):
            raise FloatingPointError("boom in the decode step")
        return real_step(rows)

    monkeypatch.setattr(eng, "choose_row", choose_row)
    monkeypatch.setattr(eng, "step", step)
    bad1, bad2 = dict(spec, seed=666), dict(spec, seed=777)
    out: dict = {}
    jobs = drive(eng, [spec, bad1, spec, bad2], [0, 0, 1, 2], out)
    for good in (jobs[0], jobs[2]):
        assert out[id(good)]["end"]["type"] == "done"
        assert out[id(good)]["tokens"] == alone[id(ref_job)]["tokens"]
    assert "boom in sampling" in out[id(jobs[1])]["end"]["message"]
    assert "boom in the decode step" in out[id(jobs[3])]["end"]["message"]
    assert not eng.rows and not eng.pending


def test_bounded_queue_and_cancel():
    m = model(TINY, "ref")
    eng = Engine(m, max_queue=2)
    spec = {"prompt": [1], "max_tokens": 20, "n": 1, "seed": 0, "stop": [], "params": {}}
    jobs = [make_job(spec) for _ in range(3)]
    out: dict = {}
    for j in jobs:
        collect(j, out)
    eng.submit(jobs[:2])
    with pytest.raises(QueueFull):
        eng.submit(jobs[2:])
    eng.run_once()
    assert len(eng.rows) == 2 and not eng.pending
    eng.cancel(jobs[0])
    eng.run_once()
    assert [r.job for r in eng.rows] == [jobs[1]]
    assert eng.metrics.finished.get(reason="cancelled") == 1
