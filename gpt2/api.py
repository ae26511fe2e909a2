"""The small Python API: load a model, tokenize, forward, generate, evaluate."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fast import NUMPY_BACKENDS, get_backend
from ref import evaluate as ref_evaluate
from ref import generate as ref_generate
from ref.config import GPT2Config
from ref.model import KVCache, forward
from weights import loader
from weights.tokenizer import decode, encode


class Model:
    """A GPT-2 on a numpy backend ("ref" or "numba"): config, params and the ops to run."""

    def __init__(self, cfg: GPT2Config, params: dict, backend: str = "ref"):
        self.cfg = cfg
        self.params = params
        self.backend = backend
        self.ops = get_backend(backend)

    def new_cache(self, batch: int, capacity: int | None = None) -> KVCache:
        return KVCache(self.cfg, batch, capacity)

    def forward(
        self,
        ids: np.ndarray,
        cache: KVCache | None = None,
        mask: np.ndarray | None = None,
        last_only: bool = False,
    ) -> np.ndarray:
        """ids (B, T) int -> logits (B, T, V) float32 (B, 1, V with last_only)."""
        return forward(
            self.params, ids, self.cfg, cache=cache, mask=mask, last_only=last_only, ops=self.ops
        )


def load(model: str = "124M", backend: str = "ref", cache_dir: str | None = None):
    """Load `model` (a size name, a model directory or a .safetensors file) on `backend`."""
    get_backend(backend)  # fail on a missing library before reading gigabytes
    cfg, params = loader.load(model, cache_dir=cache_dir)
    if backend in NUMPY_BACKENDS:
        return Model(cfg, params, backend)
    from fast.torch_model import TorchModel

    return TorchModel(cfg, params, backend)


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)


@dataclass
class Timing:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def generate(
    model,
    prompt: str | list[int],
    max_new_tokens: int = 40,
    temperature: float = 0.0,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    timing: Timing | None = None,
) -> list[GenerateResult]:
    """Generate a continuation of `prompt` (text, or token ids)."""
    ids = encode(prompt) if isinstance(prompt, str) else list(prompt)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    first: list[float] = []

    def cb(row: int, tok: int) -> None:
        if not first:
            first.append(time.perf_counter())
        if on_token is not None:
            on_token(row, tok)

    outs = ref_generate.generate(
        model, [ids], max_new_tokens, temperature=temperature, rng=rng, on_token=cb
    )
    t1 = time.perf_counter()
    if timing is not None:
        timing.prefill_s = (first[0] if first else t1) - t0
        timing.decode_s = t1 - (first[0] if first else t1)
        timing.new_tokens = max(sum(len(o.token_ids) for o in outs) - 1, 0)
    return [GenerateResult(decode(o.token_ids), o.token_ids, o.finish_reason, o.logprobs)
            for o in outs]


def evaluate(model, text: str | list[int], stride: int | None = None, progress=None):
    """Mean cross-entropy (nats/token) and perplexity of `text`."""
    ids = encode(text) if isinstance(text, str) else list(text)
    return ref_evaluate.evaluate(model, ids, stride=stride, progress=progress)
