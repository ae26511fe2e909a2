"""The sampler: small pure functions over next-token logits, applied in a fixed order.

Shape legend: B = rows (sequences decoded together), V = vocabulary.

The pipeline (`process_logits`), in this order; a step whose parameter has its neutral value
is skipped, so default params leave the logits untouched:

    1. logit bias          l[i] += bias[i]                            (logit_bias, {})
    2. repetition penalty  l[i] = l[i] / r if l[i] > 0 else l[i] * r  for every token i already
                           in the sequence, prompt included (CTRL, Keskar et al. 2019, in the
                           form transformers uses)                    (repetition_penalty, 1)
    3. frequency/presence  l[i] -= f * c[i] + p * (c[i] > 0), c[i] = times token i was
                           generated so far (OpenAI API)             (frequency/presence, 0)
    4. no-repeat n-gram    l[i] = -inf if token i would complete an n-gram that already occurs
                           in the sequence, prompt included          (no_repeat_ngram_size, 0)
    5. temperature         l = l / T; T = 0 means greedy: argmax of the logits after 1-4
    6. top-k               keep the k largest logits (ties with the k-th kept), -inf elsewhere
    7. top-p (nucleus)     keep the smallest set of most likely tokens whose probability sums to
                           at least p                                 (top_p, 1)
    8. min-p               keep tokens with prob >= min_p * (largest prob)   (min_p, 0)

Each step sees the output of the one before: top-p measures mass in the distribution left
by top-k (renormalised), as transformers' warpers do. Then `sample` draws from the softmax
of what is left. Steps 6-8 always keep the most likely
token, so they never change a greedy choice. Every random draw comes from a
`numpy.random.Generator` passed in, so a seed fixes the output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class SamplingError(ValueError):
    """A decoding parameter is out of range; `field` names it (the CLI turns it into a flag)."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field} {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    no_repeat_ngram_size: int = 0  # 0: off
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_params(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def is_int(x: object) -> bool:
    """A Python or numpy integer, and not a bool (True would pass for 1)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _finite(name: str, x: object) -> float:
    if not isinstance(x, (int, float, np.floating)) or isinstance(x, bool):
        raise SamplingError(name, f"must be a number, got {x!r}")
    if not math.isfinite(x):
        raise SamplingError(name, f"must be finite, got {x!r}")
    return float(x)


def check_params(p: SamplingParams, n_vocab: int | None = None) -> None:
    """Raise SamplingError naming the first parameter out of range."""
    if _finite("temperature", p.temperature) < 0:
        raise SamplingError("temperature", f"must be >= 0 (0 is greedy), got {p.temperature}")
    if not is_int(p.top_k) or p.top_k < 0:
        raise SamplingError("top_k", f"must be an integer >= 0 (0 is off), got {p.top_k!r}")
    if not 0.0 < _finite("top_p", p.top_p) <= 1.0:
        raise SamplingError("top_p", f"must be in (0, 1] (1 is off), got {p.top_p}")
    if not 0.0 <= _finite("min_p", p.min_p) <= 1.0:
        raise SamplingError("min_p", f"must be in [0, 1] (0 is off), got {p.min_p}")
    if _finite("repetition_penalty", p.repetition_penalty) <= 0:
        raise SamplingError(
            "repetition_penalty", f"must be > 0 (1 is off), got {p.repetition_penalty}"
        )
    _finite("frequency_penalty", p.frequency_penalty)
    _finite("presence_penalty", p.presence_penalty)
    if not is_int(p.no_repeat_ngram_size) or p.no_repeat_ngram_size < 0:
        raise SamplingError(
            "no_repeat_ngram_size",
            f"must be an integer >= 0 (0 is off), got {p.no_repeat_ngram_size!r}",
        )
    if not isinstance(p.logit_bias, dict):
        raise SamplingError("logit_bias", f"must be a dict {{id: bias}}, got {p.logit_bias!r}")
    for tok, bias in p.logit_bias.items():
        if not is_int(tok) or tok < 0 or (n_vocab is not None and tok >= n_vocab):
            where = ">= 0" if n_vocab is None else f"in [0, {n_vocab}) (the vocabulary)"
            raise SamplingError("logit_bias", f"token id must be an integer {where}, got {tok!r}")
        if not isinstance(bias, (int, float, np.floating)) or isinstance(bias, bool):
            raise SamplingError("logit_bias", f"bias of token {tok} must be a number: {bias!r}")
        # -inf bans a token; +inf would give softmax inf - inf = NaN for every token
        if math.isnan(bias) or bias == math.inf:
            raise SamplingError("logit_bias", f"bias of token {tok} must be < inf: {bias!r}")


# ---------------------------------------------------------------------------------------------
# the steps; each takes logits (B, V) and returns new logits (B, V)


def apply_logit_bias(logits: np.ndarray, logit_bias: dict[int, float]) -> np.ndarray:
    """l[:, i] += bias[i] for each (i, bias) in `logit_bias` (-inf bans a token)."""
    out = logits.copy()  # (B, V)
    for tok, bias in logit_bias.items():
        out[:, tok] += bias
    return out


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's penalty: for tokens already seen, l / r where l > 0, l * r where l <= 0.

    seen (B, V) bool. r > 1 makes every seen token less likely whatever the sign of its
    logit (dividing a negative logit, as the CTRL paper wrote it, would raise it instead).
    """
    penalised = np.where(logits > 0, logits / penalty, logits * penalty)  # (B, V)
    return np.where(seen, penalised, logits).astype(logits.dtype)


def apply_frequency_presence(
    logits: np.ndarray, counts: np.ndarray, frequency: float, presence: float
) -> np.ndarray:
    """OpenAI's penalties: l -= frequency * c + presence * (c > 0).

    counts (B, V): how many times each token was generated so far (the prompt not counted).
    """
    return (logits - frequency * counts - presence * (counts > 0)).astype(logits.dtype)


def banned_ngram_tokens(seq: list[int], n: int) -> set[int]:
    """Tokens t such that seq[-(n-1):] + [t] is an n-gram already in seq."""
    if n < 1 or len(seq) < n:
        return set()
    prefix = tuple(seq[len(seq) - n + 1 :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == prefix}


def apply_no_repeat_ngram(logits: np.ndarray, seqs: list[list[int]], n: int) -> np.ndarray:
    """l[b, t] = -inf for each t in banned_ngram_tokens(seqs[b], n)."""
    out = logits.copy()  # (B, V)
    for b, seq in enumerate(seqs):
        banned = list(banned_ngram_tokens(seq, n))
        out[b, banned] = -np.inf
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """l / T for T > 0: T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep l[i] >= (k-th largest logit of its row); k = 0 or k >= V keeps everything."""
    V = logits.shape[-1]
    if k == 0 or k >= V:
        return logits
    kth = np.partition(logits, V - k, axis=-1)[:, V - k : V - k + 1]  # (B, 1)
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus: with tokens sorted by probability q_(1) >= q_(2) >= ..., keep token (j) when
    q_(1) + ... + q_(j-1) < p, i.e. the smallest prefix whose mass reaches p (and any token
    tied with its last one). p = 1 keeps all (a tail of tokens with probability below float
    round-off would otherwise be lost)."""
    if p >= 1.0:
        return logits
    q = softmax(logits)  # (B, V) float64
    q_sorted = -np.sort(-q, axis=-1)  # (B, V) descending
    mass_before = np.cumsum(q_sorted, axis=-1) - q_sorted  # (B, V), non-decreasing
    n_keep = (mass_before < p).sum(axis=-1)  # (B,) >= 1: the first has mass_before 0
    q_last = np.take_along_axis(q_sorted, n_keep[:, None] - 1, axis=-1)  # (B, 1)
    return np.where(q >= q_last, logits, -np.inf)


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Keep q[i] >= min_p * max(q), i.e. l[i] >= max(l) + log(min_p); min_p = 0 keeps all."""
    if min_p <= 0.0:
        return logits
    top = logits.max(axis=-1, keepdims=True)  # (B, 1)
    return np.where(logits >= top + math.log(min_p), logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> probabilities (B, V) in float64; -inf logits get probability 0."""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # (B, V)
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(B, V) -> log-probabilities (B, V) in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)  # (B, 1)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# the pipeline


def penalize(
    logits: np.ndarray,
    p: SamplingParams,
    seqs: list[list[int]],
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Steps 1-4: bias and penalties. seqs[b]: row b's tokens so far (prompt + generated);
    counts (B, V): generated-token counts, needed only for frequency/presence penalties."""
    if p.logit_bias:
        logits = apply_logit_bias(logits, p.logit_bias)
    if p.repetition_penalty != 1.0:
        seen = np.zeros(logits.shape, dtype=bool)  # (B, V)
        for b, seq in enumerate(seqs):
            seen[b, seq] = True
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
        if counts is None:
            raise ValueError("frequency/presence penalties need the generated-token counts")
        logits = apply_frequency_presence(logits, counts, p.frequency_penalty, p.presence_penalty)
    if p.no_repeat_ngram_size:
        logits = apply_no_repeat_ngram(logits, seqs, p.no_repeat_ngram_size)
    return logits


def warp(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Steps 5-8: temperature, top-k, top-p, min-p (for sampling; T > 0)."""
    logits = apply_temperature(logits, p.temperature)
    logits = top_k_filter(logits, p.top_k)
    logits = top_p_filter(logits, p.top_p)
    return min_p_filter(logits, p.min_p)


def process_logits(
    logits: np.ndarray,
    p: SamplingParams,
    seqs: list[list[int]],
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """The whole pipeline, steps 1-8 (1-4 when greedy). logits (B, V) -> (B, V)."""
    logits = penalize(logits, p, seqs, counts)
    return logits if p.greedy else warp(logits, p)


def uniforms(rng, n: int) -> np.ndarray:
    """n uniforms in [0, 1): from one Generator, or one from each of a list of n generators
    (a generator per row, so a row's draws do not depend on the rows beside it)."""
    if isinstance(rng, np.random.Generator):
        return rng.random(n)
    if len(rng) != n:
        raise ValueError(f"{len(rng)} generators for {n} rows")
    return np.array([g.random() for g in rng])


def sample(logits: np.ndarray, rng) -> np.ndarray:
    """One draw per row from softmax(logits): logits (B, V) -> ids (B,).

    Inverse CDF with one uniform u per row: the first i with cumsum(q)[i] > u * sum(q);
    tokens of probability 0 are never drawn. `rng`: a Generator, or one per row.
    """
    q = softmax(logits)  # (B, V)
    cdf = np.cumsum(q, axis=-1)  # (B, V)
    u = uniforms(rng, len(q))[:, None]  # (B, 1)
    ids = (cdf <= u * cdf[:, -1:]).sum(axis=-1)  # (B,)
    # u * total rounding up to total would step past the end: take the last possible token
    last = q.shape[-1] - 1 - np.argmax(q[:, ::-1] > 0, axis=-1)  # (B,)
    return np.minimum(ids, last)


def choose(
    logits: np.ndarray,
    p: SamplingParams,
    seqs: list[list[int]],
    rng,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    """Next ids (B,): argmax after steps 1-4 when greedy, else a draw after steps 1-8."""
    x = process_logits(logits, p, seqs, counts)  # (B, V)
    return x.argmax(axis=-1) if p.greedy else sample(x, rng)
