"""The decoding loops (ref/generate.py), the API and `gpt2 generate`.

Two kinds of model: a small random GPT-2 (real forward passes, for greedy / beam / logprob
checks) and a scripted fake that emits given GPT-2 tokens (for stop strings, streaming, EOS,
batching and the CLI, where the text must be known in advance).
"""

from __future__ import annotations

import functools
import io
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from real_weights import cached_124m, needs_124m

import gpt2
from gpt2 import api
from gpt2.cli import main
from ref import generate as G
from ref.beam import beam_search, draw_without_replacement
from ref.config import GPT2Config
from ref.prompts import alpaca_prompt
from ref.sampling import SamplingError, log_softmax
from weights.layout import canonical_to_hf, expected_shapes, nest
from weights.tokenizer import decode, decode_bytes, encode

CFG = GPT2Config(n_vocab=96, n_ctx=64, n_embd=32, n_head=4, n_layer=2)
EOS = 33  # a token the random model below often picks, so that sequences do end


@functools.lru_cache(maxsize=4)
def tiny_flat(seed: int = 0) -> dict:
    """Random weights scaled so next-token distributions are neither flat nor one-hot
    (entropy about 2-3 nats over 96 tokens): wte N(0, 0.3), matrices N(0, 1/fan_in)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in expected_shapes(CFG).items():
        if name.endswith("/g"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("/b") or name == "wpe":
            a = 0.1 * rng.standard_normal(shape)
        elif name == "wte":
            a = 0.3 * rng.standard_normal(shape)
        else:
            a = rng.standard_normal(shape) / np.sqrt(shape[0])
        flat[name] = a.astype(np.float32)
    return flat


def tiny_model(seed: int = 0) -> api.Model:
    return api.Model(CFG, nest(tiny_flat(seed), CFG))


def greedy_reference(model, prompt: list[int], n: int, eos: int | None) -> list[int]:
    """Argmax of a fresh, cache-free forward pass over the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(n):
        tok = int(model.forward(np.array([seq]))[0, -1].argmax())
        if tok == eos:
            break
        seq.append(tok)
    return seq[len(prompt) :]


prompts_st = st.lists(st.integers(0, CFG.n_vocab - 1), min_size=1, max_size=8)


# ---------------------------------------------------------------------------------------------
# greedy, sampling, beams on the random model


@given(prompts_st, st.sampled_from([None, EOS]), st.integers(0, 1000))
def test_greedy_equivalences(prompt, eos, seed):
    model = tiny_model()
    want = greedy_reference(model, prompt, 10, eos)
    for kw in (
        {},
        {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
        {"temperature": 1.0, "top_k": 1},
        {"temperature": 0.8, "top_p": 1e-9},
    ):
        rng = np.random.default_rng(seed)
        got = G.generate(model, [prompt], 10, eos_id=eos, rng=rng, **kw)[0]
        assert got.token_ids == want, kw
        assert got.finish_reason == ("length" if len(want) == 10 else "eos")


@given(prompts_st, st.integers(0, 1000))
def test_neutral_filters_give_the_same_samples(prompt, seed):
    model = tiny_model()
    runs = [
        G.generate(model, [prompt], 8, eos_id=None, rng=np.random.default_rng(seed), **kw)
        for kw in ({"temperature": 0.9}, {"temperature": 0.9, "top_k": 0, "top_p": 1.0})
    ]
    assert runs[0][0].token_ids == runs[1][0].token_ids


@given(prompts_st)
def test_one_beam_is_greedy(prompt):
    model = tiny_model()
    beam = beam_search(model, [prompt], 10, num_beams=1, eos_id=None)[0]
    assert beam.token_ids == greedy_reference(model, prompt, 10, None)


def test_same_seed_same_text_and_samples_differ():
    model = tiny_model()
    kw = dict(temperature=1.0, num_return_sequences=3, eos_id=None)
    a = G.generate(model, [[1, 2, 3]], 12, rng=np.random.default_rng(5), **kw)
    b = G.generate(model, [[1, 2, 3]], 12, rng=np.random.default_rng(5), **kw)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) > 1  # three samples of 12 tokens at T=1


def test_logprobs_are_the_models():
    model = tiny_model()
    prompt = [5, 6, 7]
    c = G.generate(model, [prompt], 6, temperature=1.2, rng=np.random.default_rng(0))[0]
    seq = prompt + c.token_ids
    ref = log_softmax(model.forward(np.array([seq]))[0])  # (T, V)
    want = [ref[len(prompt) - 1 + i, t] for i, t in enumerate(c.token_ids)]
    # float32 logits of the cached and the fresh pass differ by ~1e-6
    np.testing.assert_allclose(c.logprobs, want, atol=1e-5)


@given(
    prompts_st,
    st.integers(2, 5),
    st.sampled_from([-1.0, 0.0, 1.0, 2.0]),
    st.sampled_from([True, False, "never"]),
    st.sampled_from([None, EOS]),
)
def test_beam_scores_are_recomputed_log_probs(prompt, K, lp, early, eos):
    model = tiny_model()
    outs = beam_search(
        model,
        [prompt],
        10,
        num_beams=K,
        length_penalty=lp,
        early_stopping=early,
        num_return_sequences=K,
        eos_id=eos,
    )
    scores = [c.score for c in outs]
    assert scores == sorted(scores, reverse=True)
    for c in outs:
        gen = c.token_ids + ([eos] if c.finish_reason == "eos" else [])
        seq = prompt + gen
        logp = log_softmax(model.forward(np.array([seq]))[0])  # (T, V)
        total = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(gen))
        # sums of <= 10 float32-derived log-probs: 1e-4 absolute covers the round-off
        assert c.score == pytest.approx(total / len(gen) ** lp, abs=1e-4)
        assert c.finish_reason in ("eos", "length")


# ---------------------------------------------------------------------------------------------
# beam sampling (temperature > 0 with num_beams > 1)


def test_draws_without_replacement_follow_the_probabilities():
    """Gumbel-top-k: the first draw has probability p_i, the second p_j / (1 - p_i) given the
    first; entries of probability 0 come last. 40,000 seeded rows, chi-square at the 0.001
    level (critical values for df 3 and 11: 16.27 and 31.26)."""
    p = np.array([0.5, 0.25, 0.15, 0.1, 0.0])
    rows = 40_000
    with np.errstate(divide="ignore"):
        scores = np.tile(np.log(p), (rows, 1))  # (rows, 5), -inf for the last
    d = draw_without_replacement(scores, 5, np.random.default_rng(7))  # (rows, 5)
    assert (d[:, 4] == 4).all()  # probability 0: never drawn before the others
    assert all(sorted(r) == list(range(5)) for r in d[:100])  # distinct
    first = np.bincount(d[:, 0], minlength=5)[:4]
    stat = (((first - rows * p[:4]) ** 2) / (rows * p[:4])).sum()
    assert stat < 16.27, stat
    pairs = np.zeros((4, 4))
    np.add.at(pairs, (d[:, 0], d[:, 1]), 1)
    want = np.array(
        [[0 if i == j else p[i] * p[j] / (1 - p[i]) for j in range(4)] for i in range(4)]
    )
    off = ~np.eye(4, dtype=bool)
    stat = (((pairs[off] - rows * want[off]) ** 2) / (rows * want[off])).sum()
    assert stat < 31.26, stat


@given(prompts_st, st.integers(2, 4), st.sampled_from([None, EOS]))
def test_beam_sampling_at_low_temperature_is_beam_search(prompt, K, eos):
    """At temperature 1e-3 the log-probs are scaled by 1000, so the Gumbel noise (order 1)
    cannot reorder continuations whose log-probs differ by more than ~1e-2: the draws come
    best first, and beam sampling returns beam search's beams, with its scores x 1000."""
    model = tiny_model()
    kw = dict(num_beams=K, num_return_sequences=K, eos_id=eos)
    want = beam_search(model, [prompt], 8, **kw)
    got = beam_search(model, [prompt], 8, temperature=1e-3, rng=np.random.default_rng(0), **kw)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for g, w in zip(got, want, strict=True):
        # log-probs / 1e-3 summed: float64 sums of float32-derived terms, relative 1e-6
        assert g.score * 1e-3 == pytest.approx(w.score, rel=1e-6)
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-6)  # the model's, unscaled


def test_beam_sampling_is_seeded_and_random():
    model = tiny_model()

    def run(seed):
        out = api.generate_batch(
            model, [[1, 2]], max_new_tokens=6, num_beams=3, num_return_sequences=3,
            temperature=1.5, top_k=20, seed=seed, eos_id=None,
        )  # fmt: skip
        return [r.token_ids for r in out[0]]

    assert run(1) == run(1)
    assert len({str(run(s)) for s in range(6)}) > 1  # six seeds do not all agree
    ((r,),) = api.generate_batch(
        model, [[1, 2]], max_new_tokens=6, num_beams=2, temperature=1.0, top_k=1, seed=0
    )
    # top_k = 1 leaves one continuation of probability > 0 per beam, under the 2K drawn
    assert len(r.token_ids) == 6 and np.isfinite(r.score)


def test_batches_give_what_each_prompt_gives_alone():
    model = tiny_model()
    prompts = [[1, 2, 3, 4, 5], [9], [40, 41, 42]]
    batch = G.generate(model, prompts, 10, eos_id=EOS)
    alone = [G.generate(model, [p], 10, eos_id=EOS)[0] for p in prompts]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    kw = dict(num_beams=3, num_return_sequences=2, eos_id=EOS)
    batch = beam_search(model, prompts, 8, **kw)
    alone = [c for p in prompts for c in beam_search(model, [p], 8, **kw)]
    assert [c.token_ids for c in batch] == [c.token_ids for c in alone]
    # cached float32 logits differ by ~1e-6 between batch shapes; scores agree to 1e-5
    np.testing.assert_allclose([c.score for c in batch], [c.score for c in alone], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# transformers' beam search on the same weights


def hf_model(eos: int):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hc = CFG.to_hf_config()
    hc.pop("architectures")
    hc.pop("torch_dtype")
    hc["bos_token_id"] = hc["eos_token_id"] = eos
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hc)).eval()
    sd = {"transformer." + canonical_to_hf(k): torch.from_numpy(v) for k, v in tiny_flat().items()}
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to wte
    return torch, m


@pytest.mark.parametrize(
    "kw",
    [
        dict(early_stopping=True),
        dict(early_stopping=False),
        dict(early_stopping=False, length_penalty=2.0),
        dict(early_stopping="never", length_penalty=0.5),
        dict(early_stopping=True, no_repeat_ngram_size=2),
    ],
)
def test_beam_search_matches_transformers(kw):
    """transformers divides the summed log-probs by n ** length_penalty with n = generated
    tokens including the final EOS (not the prompt): `_update_finished_beams` uses
    cur_len + 1 - decoder_prompt_len. We do the same, so ids and scores agree."""
    torch, hf = hf_model(EOS)
    prompt = [1, 2, 3, 4, 5]
    with torch.no_grad():
        o = hf.generate(
            torch.tensor([prompt]),
            num_beams=4,
            max_new_tokens=12,
            num_return_sequences=3,
            eos_token_id=EOS,
            pad_token_id=EOS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            **kw,
        )
    ours = beam_search(
        tiny_model(), [prompt], 12, num_beams=4, num_return_sequences=3, eos_id=EOS, **kw
    )
    for row, c in zip(o.sequences.tolist(), ours, strict=True):
        gen = c.token_ids + ([EOS] if c.finish_reason == "eos" else [])
        padded = gen + [EOS] * (len(row) - len(prompt) - len(gen))  # HF pads with pad_token_id
        assert row[len(prompt) :] == padded
    # float32 (torch) vs float64 (ours) log-softmax: 1e-5 on scores of size ~1
    np.testing.assert_allclose([c.score for c in ours], o.sequences_scores.numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# a scripted model: known text, for stop strings, EOS, streaming, batching and the CLI


class ScriptCache:
    def __init__(self, batch: int):
        self.rows = np.arange(batch)  # which script each cache row follows
        self.steps = np.zeros(batch, np.int64)  # tokens emitted so far per row

    def select(self, rows: np.ndarray) -> None:
        self.rows, self.steps = self.rows[rows], self.steps[rows]


class ScriptModel:
    """Row r's k-th new token is scripts[r][k] (then token 0): its logit is 50, others 0, so
    even sampling at temperature 1 picks it (other tokens share e^-50 * V ~ 1e-17)."""

    def __init__(self, scripts: list[list[int]]):
        self.cfg = GPT2Config(n_vocab=50257, n_ctx=1024, n_embd=8, n_head=1, n_layer=1)
        self.scripts = scripts
        self.fed: list[np.ndarray] = []  # the ids of every forward call

    def new_cache(self, batch: int, capacity: int | None = None) -> ScriptCache:
        return ScriptCache(batch)

    def forward(self, ids, cache=None, mask=None, last_only=False):
        self.fed.append(ids.copy())
        logits = np.zeros((ids.shape[0], 1, self.cfg.n_vocab), np.float32)  # (B, 1, V)
        for b in range(ids.shape[0]):
            script, k = self.scripts[cache.rows[b]], cache.steps[b]
            logits[b, 0, script[k] if k < len(script) else 0] = 50.0
            cache.steps[b] += 1
        return logits


def run_script(text: str, stop: list[str], n: int = 60, **kw):
    model = ScriptModel([encode(text) + [G.EOT]])
    pieces: list[str] = []
    c = G.generate(
        model,
        [encode("Hi")],
        n,
        stop=stop,
        decode_bytes=decode_bytes,
        on_text=lambda row, piece: pieces.append(piece),
        **kw,
    )[0]
    return c, pieces


@pytest.mark.parametrize(
    "text, stop, want",
    [
        (" The cat sat on the mat. THE END is near", ["THE END"], " The cat sat on the mat. "),
        (" once upon a time, there", ["on a ti"], " once up"),  # starts mid-token
        (" alpha beta gamma", ["beta gam"], " alpha "),  # spans three tokens
        (" alpha beta gamma", ["zzz", "a g", "beta"], " alpha "),  # earliest of several
        (" no stop here", ["STOP"], " no stop here"),
        (" a\n\n### Instruction:\nmore", ["### Instruction"], " a\n\n"),
    ],
)
def test_stop_strings_across_tokens(text, stop, want):
    c, pieces = run_script(text, stop)
    assert c.text == want
    assert "".join(pieces) == want  # the stream never shows any of the stop string
    assert c.finish_reason == ("eos" if want == text else "stop")
    if c.finish_reason == "stop":
        # the fewest tokens whose text covers the result
        assert decode(c.token_ids).startswith(want)
        assert len(decode(c.token_ids[:-1])) < len(want) or not c.token_ids
        assert len(c.logprobs) == len(c.token_ids)


words = st.sampled_from([" the", " cat", "s", " sat", ",", " on", " mat", "\n", " é", "té", "!"])


@given(st.lists(words, min_size=2, max_size=12), st.data())
def test_stop_strings_any_substring(parts, data):
    text = "".join(parts)
    i = data.draw(st.integers(0, len(text) - 1))
    j = data.draw(st.integers(i + 1, min(len(text), i + 12)))
    stop = text[i:j]
    c, pieces = run_script(text, [stop])
    assert c.text == text[: text.find(stop)]
    assert c.finish_reason == "stop"
    assert "".join(pieces) == c.text


def test_stream_holds_back_a_possible_stop_start():
    c, pieces = run_script(" abc abd", ["abd"])
    assert c.text == " abc "
    assert pieces[-1].endswith(" ") and "".join(pieces) == " abc "


def test_beam_search_stop_strings():
    model = ScriptModel([encode(" one two. three") + [G.EOT]])
    outs = beam_search(
        model,
        [[1]],
        10,
        num_beams=2,
        num_return_sequences=2,
        stop=["."],
        decode_bytes=decode_bytes,
    )
    best = outs[0]
    assert (best.text, best.finish_reason) == (" one two", "stop")
    assert decode(best.token_ids) == " one two"
    assert outs[0].score >= outs[1].score


def test_eos_ends_and_is_not_returned_and_empty_prompt_starts_from_eot():
    model = ScriptModel([encode(" Hello") + [G.EOT] + encode(" after")])
    c = G.generate(model, [[]], 10, decode_bytes=decode_bytes)[0]
    assert (c.text, c.finish_reason) == (" Hello", "eos")
    assert model.fed[0].tolist() == [[G.EOT]]


def test_finished_rows_stop_costing_compute():
    scripts = [encode(" a b c d e f g h"), encode(" x") + [G.EOT], encode(" p q") + [G.EOT]]
    model = ScriptModel(scripts)
    out = G.generate(model, [[1], [2], [3]], 8)
    assert [c.finish_reason for c in out] == ["length", "eos", "eos"]
    rows = [f.shape[0] for f in model.fed]
    assert rows[0] == 3 and rows[-1] == 1 and rows == sorted(rows, reverse=True)


def test_samples_per_prompt_share_one_prefill():
    model = ScriptModel([encode(" a b") + [G.EOT], encode(" c d") + [G.EOT]])
    out = G.generate(
        model,
        [[1, 2], [3]],
        4,
        temperature=1.0,
        num_return_sequences=3,
        rng=np.random.default_rng(0),
        decode_bytes=decode_bytes,
    )
    assert model.fed[0].shape[0] == 2  # one prefill row per prompt
    assert [c.text for c in out] == [" a b"] * 3 + [" c d"] * 3


# ---------------------------------------------------------------------------------------------
# argument checks and the API


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=True), "max_new_tokens"),  # a bool is not a count
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(num_beams=2, top_k=5), "num_beams"),  # top-k needs temperature > 0
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(stop=[""]), "stop"),
        (dict(length_penalty=float("nan"), num_beams=2), "length_penalty"),
        (dict(logit_bias={96: 1.0}), "logit_bias"),  # outside the model's vocabulary
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_api_rejects_bad_arguments(kw, field):
    with pytest.raises(SamplingError) as e:
        api.generate_batch(tiny_model(), [[1, 2]], **{"max_new_tokens": 4, **kw})
    assert e.value.field == field


def test_numpy_integer_counts_are_accepted():
    (r,) = api.generate(tiny_model(), [1, 2], max_new_tokens=np.int64(3), eos_id=None)
    assert len(r.token_ids) == 3


def test_token_ids_outside_the_vocabulary_and_no_prompts_are_rejected():
    # numpy indexing read wte[-1] for id -1: the model ran on a token nobody asked for
    model = tiny_model()
    for bad in (-1, CFG.n_vocab):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            api.generate_batch(model, [[1, bad]], 4)
    with pytest.raises(ValueError, match="at least one prompt"):
        api.generate_batch(model, [], 4)


def test_api_generate_text_and_timing():
    model = ScriptModel([encode(" world, again")])
    timing = api.Timing()
    r = gpt2.generate(model, "Hello", 10, stop=[","], timing=timing)
    assert (r[0].text, r[0].finish_reason) == (" world", "stop")
    assert timing.prefill_s >= 0 and timing.decode_s >= 0 and timing.new_tokens == 1


def test_alpaca_prompt_format():
    head = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n"
    )
    assert alpaca_prompt("Add 2 and 2.") == head + "Add 2 and 2.\n\n### Response:\n"
    assert alpaca_prompt("Add.", "2 and 2") == (
        head + "Add.\n\n### Input:\n2 and 2\n\n### Response:\n"
    )


def test_instruct_returns_only_the_response():
    model = ScriptModel([encode("The answer is 4.\n\n### Instruction:\nSay more")])
    r = api.instruct(model, "Add 2 and 2.")
    assert (r.text, r.finish_reason) == ("The answer is 4.", "stop")


# ---------------------------------------------------------------------------------------------
# the CLI (gpt2.load is replaced by a scripted model)


@pytest.fixture
def cli(monkeypatch, capsys):
    loaded = []

    def run(argv, script=" the end", stdin=None):
        def fake_load(*a, **k):
            loaded.append(a)
            return ScriptModel([encode(script)] * 8)

        monkeypatch.setattr(gpt2, "load", fake_load)
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        rc = main(["generate", *argv])
        out, err = capsys.readouterr()
        return rc, out, err

    run.loaded = loaded
    return run


def test_cli_streams_prompt_and_completion(cli):
    rc, out, _ = cli(["Once", "--max-new-tokens", "2"], script=" upon a time")
    assert (rc, out) == (0, "Once upon a\n")


def test_cli_context_overflow_is_a_flag_error_before_any_output(cli):
    rc, out, err = cli(["Once", "--max-new-tokens", "1024"])  # ScriptModel: n_ctx 1024
    assert rc == 2 and out == "" and "--max-new-tokens 1024" in err


def test_cli_stop_and_every_option_together(cli):
    rc, out, _ = cli(["Once", "--stop", " end", "--stop", "zz"], script=" the end")
    assert (rc, out) == (0, "Once the\n")
    argv = [
        "Once",
        "--temperature",
        "0.7",
        "--top-k",
        "40",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.1",
        "--frequency-penalty",
        "0.2",
        "--presence-penalty",
        "0.1",
        "--no-repeat-ngram-size",
        "3",
        "--logit-bias",
        "50256=-inf",
        "--seed",
        "3",
        "--num-return-sequences",
        "2",
        "--json",
        "--max-new-tokens",
        "2",
    ]
    rc, out, _ = cli(argv, script=" the end")
    assert [c["text"] for c in json.loads(out)["completions"]] == [" the end"] * 2
    argv = ["Once", "--num-beams", "3", "--length-penalty", "0.5", "--early-stopping"]
    rc, out, _ = cli([*argv, "--max-new-tokens", "2"], script=" the end")
    assert (rc, out) == (0, "Once the end\n")


def test_cli_json_with_logprobs_and_beams(cli):
    rc, out, _ = cli(["Once", "--json", "--logprobs", "--max-new-tokens", "2"])
    obj = json.loads(out)
    assert obj["prompt_token_ids"] == encode("Once")
    (c,) = obj["completions"]
    assert c["text"] == " the end" and c["finish_reason"] == "length"
    assert len(c["logprobs"]) == len(c["token_ids"]) == 2
    assert set(obj["timing"]) == {"prefill_s", "decode_s", "tokens_per_s"}
    rc, out, _ = cli(["Once", "--json", "--num-beams", "2", "--num-return-sequences", "2"])
    assert [("score" in c) for c in json.loads(out)["completions"]] == [True, True]


def test_cli_prompt_file_and_stdin(cli, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("first\n\nsecond\n", encoding="utf-8")
    rc, out, _ = cli(["--prompt-file", str(f), "--json", "--max-new-tokens", "2"])
    assert [json.loads(line)["prompt"] for line in out.splitlines()] == ["first", "second"]
    rc, out, _ = cli(["-", "--max-new-tokens", "1"], stdin="from stdin")
    assert out == "from stdin the\n"
    rc, out, _ = cli(["--prompt-file", "-", "--max-new-tokens", "1"], stdin="a\nb\n")
    assert out.splitlines() == [
        "--- prompt 1, completion 1 ---",
        "a the",
        "--- prompt 2, completion 1 ---",
        "b the",
    ]


def test_cli_instruction_prints_only_the_response(cli):
    script = "\n The answer is 4.\n\n### Instruction:\nnext"
    for extra in ([], ["--json"]):
        rc, out, _ = cli(["--instruction", "Add 2 and 2.", *extra], script=script)
        text = json.loads(out)["completions"][0]["text"] if extra else out
        assert text.rstrip("\n") == "The answer is 4."


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "1.5"], "--top-p"),
        (["--top-p", "0"], "--top-p"),
        (["--min-p", "2"], "--min-p"),
        (["--top-k", "-3"], "--top-k"),
        (["--num-beams", "0"], "--num-beams"),
        (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size"),
        (["--logit-bias", "abc"], "--logit-bias"),
        (["--logit-bias", "5=nan"], "--logit-bias"),
        (["--logit-bias", "50257=1"], "--logit-bias"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--stop", ""], "--stop"),
        (["--logprobs"], "--logprobs"),
        (["--input", "x"], "--input"),
        (["--prompt-file", "/nonexistent/p.txt"], "--prompt-file"),
        # a path through a file: NotADirectoryError was a traceback
        (["--prompt-file", os.path.join(os.path.abspath(__file__), "p.txt")], "--prompt-file"),
    ],
)
def test_cli_rejects_bad_flags_before_loading(cli, argv, flag):
    prompt = [] if "--prompt-file" in argv else ["Hi"]
    rc, out, err = cli([*prompt, *argv])
    assert rc == 2 and flag in err and not cli.loaded


# ---------------------------------------------------------------------------------------------
# OpenAI's 124M weights (skipped where they are not downloaded)


PROMPT = "I enjoy walking with my cute dog"


@pytest.fixture(scope="module")
def real_model():
    return gpt2.load(cached_124m())


@pytest.mark.real_weights
@needs_124m
def test_real_greedy(real_model):
    n = 50 - len(encode(PROMPT))  # 50 tokens in all
    r = gpt2.generate(real_model, PROMPT, n)[0]
    assert PROMPT + r.text == (
        "I enjoy walking with my cute dog, but I'm not sure if I'll ever be able to walk with "
        "my dog. I'm not sure if I'll ever be able to walk with my dog.\n\nI'm not sure if I'll"
    )


@pytest.mark.real_weights
@needs_124m
def test_real_beam_search(real_model):
    n = 50 - len(encode(PROMPT))
    r = gpt2.generate(
        real_model, PROMPT, n, num_beams=5, early_stopping=True, no_repeat_ngram_size=2
    )[0]
    assert PROMPT + r.text == (
        "I enjoy walking with my cute dog, but I'm not sure if I'll ever be able to walk with "
        "him again.\n\nI've been thinking about this for a while now, and I think it's time "
        "for me to take a break"
    )
