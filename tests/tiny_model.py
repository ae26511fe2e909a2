"""Small random GPT-2s for the training tests (test_backward, test_train, test_checkpoint)."""

from __future__ import annotations

import numpy as np

from ref.config import GPT2Config
from weights.layout import expected_shapes, nest


def tiny_params(cfg: GPT2Config, seed: int = 0, dtype=np.float32) -> dict:
    """Nested params with GPT-2-like scales: weights N(0, 0.02), LayerNorm gains near 1.

    Biases and gains are random too (not 0 / 1), so a gradient that ignores them shows.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("/g"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("/b"):
            a = 0.02 * rng.standard_normal(shape)
        else:
            a = 0.02 * rng.standard_normal(shape)
        flat[name] = a.astype(dtype)
    return nest(flat, cfg)


TINY = GPT2Config(n_vocab=96, n_ctx=32, n_embd=32, n_head=4, n_layer=2)
