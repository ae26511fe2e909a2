"""The decoding loop: prefill the prompts, then one token per step from the KV cache.

A `model` is anything with `cfg`, `new_cache(batch, capacity)` and
`forward(ids, cache=..., mask=..., last_only=...) -> logits (B, T, V)` as numpy float32;
the numpy reference (`gpt2.api.Model`) and the torch backends all provide it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

EOT = 50256  # <|endoftext|>


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    logprobs: list[float] = field(default_factory=list)


def left_pad(prompts: list[list[int]], pad_id: int = EOT) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths -> ids (B, T), mask (B, T) with padding on the left."""
    T = max(len(p) for p in prompts)
    ids = np.full((len(prompts), T), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), T), dtype=bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = p
        mask[i, T - len(p) :] = True
    return ids, mask


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def sample(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return logits.argmax(axis=-1)
    logp = log_softmax(logits.astype(np.float64) / temperature)  # (B, V)
    p = np.exp(logp)
    # inverse-CDF sampling with one uniform per row: reproducible for a given seed
    u = rng.random(len(p))[:, None]
    return np.minimum((p.cumsum(axis=-1) < u * p.sum(axis=-1, keepdims=True)).sum(-1),
                      p.shape[-1] - 1)


def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    rng: np.random.Generator | None = None,
    eos_id: int | None = EOT,
    on_token: Callable[[int, int], None] | None = None,
) -> list[Completion]:
    """Generate up to `max_new_tokens` for each prompt (lists of token ids).

    An empty prompt starts from <|endoftext|>, as GPT-2 was trained. `on_token(row, id)` is
    called for each new token as it is chosen (streaming).
    """
    rng = np.random.default_rng() if rng is None else rng
    prompts = [list(p) if len(p) else [EOT] for p in prompts]
    ids, mask = left_pad(prompts)
    B, T = ids.shape
    cfg = model.cfg
    if T + max_new_tokens > cfg.n_ctx:
        from ref.model import ContextLengthError

        raise ContextLengthError(
            f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the model's context "
            f"of {cfg.n_ctx}"
        )
    cache = model.new_cache(B, T + max_new_tokens)
    out = [Completion([], "length") for _ in range(B)]
    live = np.arange(B)  # rows still generating, in cache order
    logits = model.forward(ids, cache=cache, mask=mask, last_only=True)[:, -1]  # (B, V)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, rng)  # (b,)
        logp = log_softmax(logits.astype(np.float32))
        keep = []
        for j, row in enumerate(live):
            tok = int(nxt[j])
            if eos_id is not None and tok == eos_id:
                out[row].finish_reason = "eos"
                continue
            out[row].token_ids.append(tok)
            out[row].logprobs.append(float(logp[j, tok]))
            if on_token is not None:
                on_token(int(row), tok)
            keep.append(j)
        if not keep or len(out[live[keep[0]]].token_ids) >= max_new_tokens:
            break
        if len(keep) < len(live):  # finished rows stop costing compute
            cache.select(np.array(keep))
            nxt = nxt[keep]
            live = live[keep]
        step = nxt[:, None].astype(np.int64)  # (b, 1)
        logits = model.forward(step, cache=cache, last_only=True)[:, -1]  # (b, V)
    return out
