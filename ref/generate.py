"""The decoding loops: prefill the prompts, then one token per step from the KV cache.

Shape legend: P = prompts, R = rows decoded together (P * samples), b = rows still running,
T = padded prompt length, t = tokens generated so far, V = vocabulary.

A `model` is anything with `cfg`, `new_cache(batch, capacity)` (a cache with
`select(rows)`) and `forward(ids, cache=..., mask=..., last_only=...) -> logits (B, T, V)`
as numpy float32: `ref.model.Model` on the numpy backends, `fast.torch.model.TorchModel` on
the torch ones.

`generate` samples (or decodes greedily) with the pipeline of `ref.sampling`; beam search
(`ref/beam.py`) shares its prefill, checks and stop strings. Several prompts run at once,
left-padded into one batch; a row that ends (<|endoftext|>, a stop string, max_new_tokens) is
dropped from the batch with `cache.select`, so it stops costing compute.

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
)

EOT = 50256  # <|endoftext|>


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


def sampling_params(params: SamplingParams | None, sampling: dict) -> SamplingParams:
    if params is not None and sampling:
        raise TypeError("pass either params= or sampling keywords, not both")
    return params if params is not None else SamplingParams(**sampling)


def prefill(model, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams):
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
    seed: int | None = None,
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

    Randomness: with `seed`, sample j of every prompt draws from its own generator,
    default_rng([seed, j]), so a prompt gives the same text alone or in a batch; `rng`, one
    generator shared by every row, is the other way (neither: fresh entropy).
    """
    params = sampling_params(params, sampling)
    check_generate_args(max_new_tokens, params, 1, num_return_sequences, stop=stop)
    if seed is not None and rng is not None:
        raise TypeError("pass seed= or rng=, not both")
    if (stop or on_text is not None) and decode_bytes is None:
        raise ValueError("stop strings and on_text need decode_bytes")
    n = num_return_sequences
    if seed is not None:
        rng = [np.random.default_rng([seed, j]) for _ in prompts for j in range(n)]  # (R,)
    elif rng is None:
        rng = np.random.default_rng()
    t0 = time.perf_counter()
    prompts, cache, logits = prefill(model, prompts, max_new_tokens, params)  # logits (P, V)
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
        live_rng = rng if isinstance(rng, np.random.Generator) else [rng[r] for r in live]
        nxt = choose(logits, params, [seqs[r] for r in live], live_rng, counts)  # (b,)
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
    record_stats(stats, t0, t_first, decode_tokens)
    return out


def record_stats(stats: dict | None, t0: float, t_first: float | None, decode_tokens: int) -> None:
    if stats is None:
        return
    t_end = time.perf_counter()
    t_first = t_end if t_first is None else t_first
    stats.update(prefill_s=t_first - t0, decode_s=t_end - t_first, decode_tokens=decode_tokens)
