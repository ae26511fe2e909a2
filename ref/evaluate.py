"""Mean cross-entropy (nats per token) and perplexity of a token stream.

Each token after the first is predicted from the tokens before it. A stream longer than the
context is scored in windows of n_ctx tokens that advance by `stride`: every window scores
only the tokens no earlier window scored, each with at least n_ctx - stride tokens of context
before it. Windows always overlap by at least one token, so no target goes unpredicted
(stride = n_ctx is the cheapest; a smaller stride gives more context and costs more forwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ref.sampling import log_softmax


@dataclass
class EvalResult:
    loss: float  # mean nats per predicted token
    tokens: int  # tokens predicted (len(ids) - 1)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.loss))


def windows(n_tokens: int, n_ctx: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first_scored): window ids[start:end] scores targets ids[first_scored:end]."""
    if n_ctx < 2:
        raise ValueError(f"evaluation needs a context of at least 2 tokens, got {n_ctx}")
    if not 1 <= stride <= n_ctx:
        raise ValueError(f"--stride must be in [1, {n_ctx}], got {stride}")
    scored = 1  # ids[0] has no prediction
    start = 0
    while scored < n_tokens:
        end = min(start + n_ctx, n_tokens)
        yield start, end, scored
        scored = end
        # advance by `stride`, but keep at least one token of context for the first new target
        start = max(0, min(start + stride, end - 1, n_tokens - n_ctx))
        if end == n_tokens:
            break


def evaluate(
    model,
    ids: list[int] | np.ndarray,
    stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Cross-entropy of `ids` under `model` (see `ref.generate` for the model interface).

    A model whose KV cache is not float32 (`kv_dtype`, ref.model.KVCache) runs each window
    through a fresh cache, so the keys it attends to are rounded as they are in generation."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to evaluate, got {len(ids)}")
    n_ctx = model.cfg.n_ctx
    stride = n_ctx if stride is None else stride
    total = 0.0
    rounding_cache = getattr(model, "kv_dtype", "float32") != "float32"
    for start, end, first in windows(len(ids), n_ctx, stride):
        cache = model.new_cache(1, end - start) if rounding_cache else None
        logits = model.forward(ids[None, start:end], cache=cache)[0]  # (end - start, V)
        # logits[i] predicts ids[start + i + 1]; score targets first..end-1
        logp = log_softmax(logits[first - start - 1 : end - start - 1])  # (n, V) float64
        tgt = ids[first:end]  # (n,)
        total -= float(logp[np.arange(len(tgt)), tgt].sum())
        if progress is not None:
            progress(end - 1, len(ids) - 1)
    return EvalResult(loss=total / (len(ids) - 1), tokens=len(ids) - 1)
