"""The decoding loops: prefill the prompts, then one token per step from the KV cache.

Shape legend: P = prompts, R = rows decoded together (P * samples, or P * beams),
b = rows (or, in beam search, prompts) still running, T = padded prompt length,
K = num_beams, t = tokens generated so far, V = vocabulary.

A `model` is anything with `cfg`, `new_cache(batch, capacity)` (a cache with
`select(rows)`) and `forward(ids, cache=..., mask=..., last_only=...) -> logits (B, T, V)`
as numpy float32; the numpy reference (`gpt2.api.Model`) and the torch backends provide it.

`generate` samples (or decodes greedily) with the pipeline of `ref.sampling`; `beam_search`
keeps the K best partial sequences. Both take several prompts at once, left-padded into one
batch; a row that ends (<|endoftext|>, a stop string, max_new_tokens) is dropped from the
batch with `cache.select`, so it stops costing compute.

Text: given `decode_bytes` (token ids -> bytes), each row's bytes are decoded incrementally
(an unfinished UTF-8 character waits for its next byte). Stop strings are matched on that
text, across token boundaries; the returned text ends before the stop string, and the
returned tokens are the fewest whose text covers it. `on_text(row, piece)` streams each row's
text as it becomes final: text that could be the start of a stop string is held back until
it is known not to be one.
"""

from __future__ import annotations

import bisect
import codecs
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ref.model import ContextLengthError
from ref.sampling import (
    SamplingError,
    SamplingParams,
    check_params,
    choose,
    is_int,
    log_softmax,
    penalize,
    warp,
)

EOT = 50256  # <|endoftext|>
NEG = -1.0e9  # score of an impossible beam (as transformers uses, so ties break alike)


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, without the final <|endoftext|>
    finish_reason: str  # "eos" | "length" | "stop"
    logprobs: list[float] = field(default_factory=list)  # model log-prob of each token
    text: str | None = None  # with decode_bytes: the decoded text, cut before a stop string
    score: float | None = None  # beam search: sum of log-probs / length ** length_penalty


def left_pad(prompts: list[list[int]], pad_id: int = EOT) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> ids (P, T), mask (P, T) with padding on the left."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)  # (P, T)
    mask = np.zeros((len(prompts), T), dtype=bool)  # (P, T)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = True
    return ids, mask


def check_generate_args(
    max_new_tokens: int,
    params: SamplingParams,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    stop: Sequence[str] = (),
) -> None:
    """Raise SamplingError naming the first argument out of range (before any work)."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise SamplingError("max_new_tokens", f"must be an integer >= 1, got {max_new_tokens!r}")
    if not is_int(num_beams) or num_beams < 1:
        raise SamplingError("num_beams", f"must be an integer >= 1, got {num_beams!r}")
    if not is_int(num_return_sequences) or num_return_sequences < 1:
        raise SamplingError(
            "num_return_sequences", f"must be an integer >= 1, got {num_return_sequences!r}"
        )
    if num_beams > 1:
        if num_return_sequences > num_beams:
            raise SamplingError(
                "num_return_sequences",
                f"must be <= the number of beams ({num_beams}), got {num_return_sequences}",
            )
        if params.greedy and (params.top_k or params.top_p < 1 or params.min_p > 0):
            raise SamplingError(
                "num_beams",
                "> 1 with temperature 0 is deterministic beam search: top_k, top_p and min_p "
                "apply only to beam sampling (temperature > 0)",
            )
    elif params.greedy and num_return_sequences > 1:
        raise SamplingError(
            "num_return_sequences",
            "> 1 needs sampling (temperature > 0) or beam search; greedy "
            "decoding would return the same text every time",
        )
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise SamplingError("length_penalty", f"must be a finite number, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise SamplingError(
            "early_stopping", f"must be True, False or 'never', got {early_stopping!r}"
        )
    if isinstance(stop, str):
        raise SamplingError("stop", "must be a list of strings, got a single string")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise SamplingError("stop", f"stop strings must be non-empty strings, got {s!r}")


def _params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError("pass either params= or sampling keywords, not both")
    return params if params is not None else SamplingParams(**sampling)


def _prefill(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams):
    """Check the prompts against the model, left-pad them into one batch and run it.

    Returns (prompts, with an empty one replaced by [<|endoftext|>] as GPT-2 was trained;
    the KV cache, room for max_new_tokens more; the last position's logits (P, V)).
    """
    if not prompts:
        raise ValueError("prompts: need at least one prompt")
    cfg = model.cfg
    check_params(params, cfg.n_vocab)
    prompts = [list(p) if len(p) else [EOT] for p in prompts]
    ids, mask = left_pad(prompts, pad_id=0)  # (P, T); padding is masked, any id will do
    P, T = ids.shape
    if T + max_new_tokens > cfg.n_ctx:
        raise ContextLengthError(
            f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context "
            f"of {cfg.n_ctx}"
        )
    cache = model.new_cache(P, T + max_new_tokens)
    logits = model.forward(ids, cache=cache, mask=mask, last_only=True)[:, -1]  # (P, V)
    return prompts, cache, logits


class RowText:
    """One row's decoded text: incremental UTF-8, stop strings, and what is safe to stream."""

    def __init__(self, decode_bytes: Callable[[list[int]], bytes], stop: Sequence[str]):
        self.decode_bytes = decode_bytes
        self.stop = list(stop)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.ends: list[int] = []  # len(text) after each token
        self.streamed = 0  # characters already given to on_text
        self.cut: int | None = None  # where the first stop string starts, once found

    def push(self, tok: int) -> bool:
        """Add a token; True when the text now contains a stop string."""
        before = len(self.text)
        self.text += self.decoder.decode(self.decode_bytes([tok]))
        self.ends.append(len(self.text))
        return self._find_stop(before)

    def flush(self) -> bool:
        """No more tokens: an unfinished character becomes U+FFFD."""
        before = len(self.text)
        self.text += self.decoder.decode(b"", final=True)
        if self.ends:
            self.ends[-1] = len(self.text)
        return self._find_stop(before)

    def _find_stop(self, before: int) -> bool:
        if self.cut is not None:
            return True
        hits = []
        for s in self.stop:
            i = self.text.find(s, max(0, before - len(s) + 1))  # only matches that are new
            if i >= 0:
                hits.append(i)
        if hits:
            self.cut = min(hits)
        return self.cut is not None

    def final_text(self) -> str:
        return self.text if self.cut is None else self.text[: self.cut]

    def n_tokens(self) -> int:
        """Tokens to return: all, or after a stop, the fewest whose text covers final_text()."""
        if self.cut is None:
            return len(self.ends)
        return 0 if self.cut == 0 else bisect.bisect_left(self.ends, self.cut) + 1

    def take_stream(self, done: bool) -> str:
        """Text newly safe to show: all of it when done, else all but a possible stop start."""
        end = len(self.final_text())
        if not done:
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.streamed : max(end, self.streamed)]
        self.streamed = max(end, self.streamed)
        return piece


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    params: SamplingParams | None = None,
    rng: np.random.Generator | None = None,
    num_return_sequences: int = 1,
    eos_id: int | None = EOT,
    stop: Sequence[str] = (),
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    on_token: Callable[[int, int], None] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    stats: dict | None = None,
    **sampling,
) -> list[Completion]:
    """Sample (or greedily decode) up to `max_new_tokens` for each prompt (lists of ids).

    Sampling options come as `params` or as keywords (temperature=0.8, top_k=40, ...; see
    `ref.sampling.SamplingParams`). Returns P * num_return_sequences completions, prompt
    major: row r continues prompts[r // num_return_sequences]. An empty prompt starts from
    <|endoftext|>, as GPT-2 was trained. `on_token(row, id)` is called for each new token;
    `on_text(row, text)` (needs decode_bytes) for each piece of final text. `stats`, if given,
    receives prefill_s, decode_s and decode_tokens (token positions run in decode steps).
    """
    params = _params(params, sampling)
    check_generate_args(max_new_tokens, params, 1, num_return_sequences, stop=stop)
    if (stop or on_text is not None) and decode_bytes is None:
        raise ValueError("stop strings and on_text need decode_bytes")
    rng = np.random.default_rng() if rng is None else rng
    n = num_return_sequences
    t0 = time.perf_counter()
    prompts, cache, logits = _prefill(model, prompts, max_new_tokens, params)  # logits (P, V)
    P = len(prompts)
    if n > 1:  # the samples of a prompt share its prefill
        rows = np.repeat(np.arange(P), n)  # (R,)
        cache.select(rows)
        logits = logits[rows]  # (R, V)
    R, V = logits.shape
    out = [Completion([], "length") for _ in range(R)]
    seqs = [list(prompts[r // n]) for r in range(R)]  # prompt + generated, for the penalties
    texts = [RowText(decode_bytes, stop) for _ in range(R)] if decode_bytes else None
    needs_counts = params.frequency_penalty != 0.0 or params.presence_penalty != 0.0
    counts = np.zeros((R, V), np.int32) if needs_counts else None  # (R, V), live rows only
    live = np.arange(R)  # rows still generating, in cache order
    t_first = None
    decode_tokens = 0

    def finish(row: int, reason: str) -> None:
        c = out[row]
        c.finish_reason = reason
        if texts is None:
            return
        rt = texts[row]
        if rt.flush() and reason != "stop":
            c.finish_reason = "stop"
        k = rt.n_tokens()
        c.token_ids, c.logprobs = c.token_ids[:k], c.logprobs[:k]
        c.text = rt.final_text()
        if on_text is not None:
            piece = rt.take_stream(done=True)
            if piece:
                on_text(row, piece)

    for _ in range(max_new_tokens):
        nxt = choose(logits, params, [seqs[r] for r in live], rng, counts)  # (b,)
        logp = log_softmax(logits)  # (b, V): the model's own log-probs, before the sampler
        if t_first is None:
            t_first = time.perf_counter()
        keep = []
        for j, row in enumerate(live):
            row, tok = int(row), int(nxt[j])
            if eos_id is not None and tok == eos_id:
                finish(row, "eos")
                continue
            out[row].token_ids.append(tok)
            out[row].logprobs.append(float(logp[j, tok]))
            seqs[row].append(tok)
            if counts is not None:
                counts[j, tok] += 1
            if on_token is not None:
                on_token(row, tok)
            if texts is not None and texts[row].push(tok):
                finish(row, "stop")
                continue
            if len(out[row].token_ids) >= max_new_tokens:
                finish(row, "length")
                continue
            if on_text is not None:
                piece = texts[row].take_stream(done=False)
                if piece:
                    on_text(row, piece)
            keep.append(j)
        if not keep:
            break
        if len(keep) < len(live):  # finished rows stop costing compute
            cache.select(np.array(keep))
            nxt, live = nxt[keep], live[keep]
            counts = None if counts is None else counts[keep]
        step = nxt[:, None].astype(np.int64)  # (b, 1)
        logits = model.forward(step, cache=cache, last_only=True)[:, -1]  # (b, V)
        decode_tokens += len(step)
    _record(stats, t0, t_first, decode_tokens)
    return out


def _record(stats: dict | None, t0: float, t_first: float | None, decode_tokens: int) -> None:
    if stats is None:
        return
    t_end = time.perf_counter()
    t_first = t_end if t_first is None else t_first
    stats.update(prefill_s=t_first - t0, decode_s=t_end - t_first, decode_tokens=decode_tokens)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first; ties go to the lower index."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]  # (b, k), unordered
    # sort the k by (score desc, index asc), so equal scores come out in a fixed order
    key = np.lexsort((part, -np.take_along_axis(scores, part, axis=-1)), axis=-1)
    return np.take_along_axis(part, key, axis=-1)


def draw_without_replacement(scores: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct indices per row, drawn one after another with probabilities softmax(scores)
    renormalised over what is left (the Gumbel-top-k trick: the n largest of scores + Gumbel
    noise, in draw order). scores (b, m) -> (b, n); -inf entries come last, in index order."""
    noisy = scores + rng.gumbel(size=scores.shape)  # -inf stays -inf
    return _top(noisy, n)


def beam_search(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    num_beams: int = 4,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    params: SamplingParams | None = None,
    rng: np.random.Generator | None = None,
    eos_id: int | None = EOT,
    stop: Sequence[str] = (),
    decode_bytes: Callable[[list[int]], bytes] | None = None,
    stats: dict | None = None,
    **sampling,
) -> list[Completion]:
    """Beam search with K = num_beams beams per prompt, as transformers (>= 4.50) does it.

    Each step, every beam's log-probs (after the penalties of `params`, steps 1-4 of
    `ref.sampling`) are added to its score; the 2K best continuations over all beams are
    kept. Of those, the ones among the best K that end (<|endoftext|>, a stop string, or
    the max_new_tokens-th token) become finished hypotheses with
        score = sum of the token log-probs / n ** length_penalty,
    n = tokens generated, the final <|endoftext|> included; the K best unfinished ones go on.
    A prompt is done when
        early_stopping=True:   K hypotheses are finished;
        early_stopping=False:  K are finished and the best running beam, scored at its
                               current length, cannot beat the worst of them;
        early_stopping="never": as False, but scored at max_new_tokens when
                               length_penalty > 0 (the best it could reach);
    or after max_new_tokens. Returns num_return_sequences completions per prompt (prompt
    major), best score first. length_penalty > 0 favours longer sequences (log-probs are
    negative, and dividing by a larger n raises them).

    Beam sampling (params.temperature > 0, transformers' do_sample=True with num_beams > 1):
    each beam's log-probs also go through temperature, top-k, top-p and min-p (steps 5-8)
    before they are added to its score, and the 2K continuations are drawn without
    replacement with probabilities softmax(score + log-prob) over all K x V of them, in draw
    order, instead of taken best first (`rng`; the same seed gives the same beams). Scores are
    those processed log-probs. Where the filters leave fewer than 2K continuations, the draw
    is topped up with ones of probability 0 (score -inf, or about NEG from the initial
    copies of a prompt), which are returned only if nothing better finished.
    """
    params = _params(params, sampling)
    check_generate_args(
        max_new_tokens,
        params,
        num_beams,
        num_return_sequences,
        length_penalty,
        early_stopping,
        stop,
    )
    if stop and decode_bytes is None:
        raise ValueError("stop strings need decode_bytes")
    K = num_beams
    sampled = not params.greedy
    if sampled and rng is None:
        rng = np.random.default_rng()
    t0 = time.perf_counter()
    prompts, cache, logits = _prefill(model, prompts, max_new_tokens, params)  # logits (P, V)
    P = len(prompts)
    rows = np.repeat(np.arange(P), K)  # (P*K,): every beam starts as a copy of its prompt
    cache.select(rows)
    logits = logits[rows]  # (P*K, V)
    V = logits.shape[-1]
    live = list(range(P))  # prompts still searching, in cache order
    gen = np.zeros((P, K, 0), np.int64)  # (b, K, t) generated tokens of each running beam
    gen_lp = np.zeros((P, K, 0), np.float64)  # (b, K, t) their model log-probs
    score = np.full((P, K), NEG)  # (b, K) summed log-probs; only beam 0 is real at first
    score[:, 0] = 0.0
    finished: list[list[tuple[float, list[int], list[float]]]] = [[] for _ in range(P)]
    improvable = [True] * P  # the early-stopping heuristic has not ruled out improvement
    t_first = None
    decode_tokens = 0

    def text_of(tokens: list[int]) -> str:
        return decode_bytes(tokens).decode("utf-8", errors="replace")

    for t in range(max_new_tokens):
        b = len(live)
        logp_model = log_softmax(logits)  # (bK, V)
        seqs = []  # prompt + generated per beam, for the penalties that look at history
        if params.repetition_penalty != 1.0 or params.no_repeat_ngram_size:
            seqs = [prompts[live[i // K]] + gen[i // K, i % K].tolist() for i in range(b * K)]
        counts = None
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            counts = np.zeros((b * K, V), np.int32)  # (bK, V)
            np.add.at(counts, (np.repeat(np.arange(b * K), t), gen.reshape(-1)), 1)
        logp = penalize(logp_model, params, seqs, counts)  # (bK, V)
        if sampled:
            logp = warp(logp, params)  # temperature, top-k, top-p, min-p
        total = (logp.reshape(b, K, V) + score[:, :, None]).reshape(b, K * V)  # (b, KV)
        if sampled:
            cand = draw_without_replacement(total, 2 * K, rng)  # (b, 2K), in draw order
        else:
            cand = _top(total, 2 * K)  # (b, 2K) best continuations, best first
        cand_score = np.take_along_axis(total, cand, axis=-1)  # (b, 2K)
        src, tok = cand // V, cand % V  # (b, 2K) beam each extends, and its new token
        ar = np.arange(b)[:, None]  # (b, 1)
        cand_gen = np.concatenate([gen[ar, src], tok[:, :, None]], axis=-1)  # (b, 2K, t+1)
        tok_lp = logp_model.reshape(b, K, V)[ar, src, tok]  # (b, 2K)
        cand_lp = np.concatenate([gen_lp[ar, src], tok_lp[:, :, None]], axis=-1)
        hits = np.full(tok.shape, t + 1 == max_new_tokens)  # (b, 2K) candidate ends here
        if eos_id is not None:
            hits |= tok == eos_id
        if stop:
            for i in range(b):
                for r in range(2 * K):
                    text = text_of(cand_gen[i, r].tolist())
                    hits[i, r] |= any(s in text for s in stop)
        if t_first is None:
            t_first = time.perf_counter()

        # the K best unfinished continuations go on (finished ones pushed to the bottom)
        run_score = cand_score + NEG * hits  # (b, 2K)
        nxt = _top(run_score, K)  # (b, K)
        score = np.take_along_axis(run_score, nxt, axis=-1)  # (b, K)
        gen = cand_gen[ar, nxt]  # (b, K, t+1)
        gen_lp = cand_lp[ar, nxt]  # (b, K, t+1)
        beam_src = np.take_along_axis(src, nxt, axis=-1)  # (b, K)

        keep = []
        for i, p in enumerate(live):
            full = len(finished[p]) == K
            if improvable[p] and not (full and early_stopping is True):
                for r in range(K):  # only the best K candidates may finish
                    if hits[i, r]:
                        s = float(cand_score[i, r]) / (t + 1) ** length_penalty
                        finished[p].append((s, cand_gen[i, r].tolist(), cand_lp[i, r].tolist()))
                finished[p].sort(key=lambda h: -h[0])  # stable: earlier ones win ties
                del finished[p][K:]
            if improvable[p] and len(finished[p]) == K:
                n = max_new_tokens if early_stopping == "never" and length_penalty > 0 else t + 1
                best_running = float(score[i, 0]) / n**length_penalty
                improvable[p] = best_running > finished[p][-1][0]
            done = (
                not improvable[p]
                or (early_stopping is True and len(finished[p]) == K)
                or bool(hits[i].all())
            )
            if not done:
                keep.append(i)
        if not keep:
            break
        sel = (np.array(keep)[:, None] * K + beam_src[keep]).reshape(-1)  # (b'K,) cache rows
        cache.select(sel)
        live = [live[i] for i in keep]
        gen, gen_lp, score = gen[keep], gen_lp[keep], score[keep]
        step = gen[:, :, -1].reshape(-1, 1)  # (b'K, 1)
        logits = model.forward(step, cache=cache, last_only=True)[:, -1]  # (b'K, V)
        decode_tokens += len(step)
    _record(stats, t0, t_first, decode_tokens)

    out = []
    for p in range(P):
        for s, tokens, lps in finished[p][:num_return_sequences]:
            reason = "length"
            if eos_id is not None and tokens and tokens[-1] == eos_id:
                tokens, lps, reason = tokens[:-1], lps[:-1], "eos"
            c = Completion(tokens, reason, lps, score=s)
            if decode_bytes is not None:
                rt = RowText(decode_bytes, stop)
                for tk in tokens:
                    rt.push(tk)
                if rt.flush():
                    c.finish_reason = "stop"
                    k = rt.n_tokens()
                    c.token_ids, c.logprobs = tokens[:k], lps[:k]
                c.text = rt.final_text()
            out.append(c)
    return out
