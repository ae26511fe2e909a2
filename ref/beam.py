"""Beam search: the K best partial sequences per prompt, and beam sampling.

Shape legend: P = prompts, b = prompts still searching, K = num_beams, t = tokens generated
so far, V = vocabulary; a cache row is one beam, so the cache holds b * K rows.

The decoding loop of `ref.generate` with its pieces (prefill, checks, stop strings, timing)
and the model interface it describes; what differs is the choice each step: instead of one
token per row, the 2K best (or, sampling, 2K drawn) continuations over all K x V of a prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ref.generate import (
    EOT,
    Completion,
    RowText,
    check_generate_args,
    prefill,
    record_stats,
    sampling_params,
)
from ref.sampling import SamplingParams, log_softmax, penalize, warp

NEG = -1.0e9  # score of an impossible beam (as transformers uses, so ties break alike)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, best first; ties go to the lower index."""
    k = min(k, scores.shape[-1])
    part = np.argpartition(-scores, k - 1, axis=-1)[:, :k]  # (b, k), unordered
    # sort the k by (score desc, index asc), so equal scores come out in a fixed order
    key = np.lexsort((part, -np.take_along_axis(scores, part, axis=-1)), axis=-1)
    return np.take_along_axis(part, key, axis=-1)


def draw_without_replacement(scores: np.ndarray, n: int, rng) -> np.ndarray:
    """n distinct indices per row, drawn one after another with probabilities softmax(scores)
    renormalised over what is left (the Gumbel-top-k trick: the n largest of scores + Gumbel
    noise, in draw order). scores (b, m) -> (b, n); -inf entries come last, in index order.
    `rng`: a Generator, or one per row."""
    if isinstance(rng, np.random.Generator):
        noise = rng.gumbel(size=scores.shape)  # (b, m)
    else:
        noise = np.stack([g.gumbel(size=scores.shape[1:]) for g in rng])  # (b, m)
    noisy = scores + noise  # -inf stays -inf
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
    seed: int | None = None,
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
    order, instead of taken best first (with `seed`, every prompt draws from its own
    generator default_rng([seed, 0]), so a prompt gives the same beams alone or in a batch;
    `rng` is one generator for all). Scores are
    those processed log-probs. Where the filters leave fewer than 2K continuations, the draw
    is topped up with ones of probability 0 (score -inf, or about NEG from the initial
    copies of a prompt), which are returned only if nothing better finished.
    """
    params = sampling_params(params, sampling)
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
    if seed is not None and rng is not None:
        raise TypeError("pass seed= or rng=, not both")
    if sampled and seed is not None:
        rng = [np.random.default_rng([seed, 0]) for _ in prompts]  # (P,), one per prompt
    elif sampled and rng is None:
        rng = np.random.default_rng()
    t0 = time.perf_counter()
    prompts, cache, logits = prefill(model, prompts, max_new_tokens, params)  # logits (P, V)
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
            live_rng = rng if isinstance(rng, np.random.Generator) else [rng[p] for p in live]
            cand = draw_without_replacement(total, 2 * K, live_rng)  # (b, 2K), in draw order
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
    record_stats(stats, t0, t_first, decode_tokens)

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
