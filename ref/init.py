"""GPT-2's initialisation, for training from scratch.

Radford et al. 2019 (GPT-2), section 2.3: "a modified initialization which accounts for the
accumulation on the residual path with model depth ... we scale the weights of residual
layers at initialization by a factor of 1/sqrt(N) where N is the number of residual layers".
Each block has two residual branches, so N = 2 n_layer; nanoGPT (model.py, _init_weights)
does the same, on the same base of N(0, 0.02):

    wte, wpe, every projection's w      ~ N(0, 0.02)
    attn.c_proj.w, mlp.c_proj.w         ~ N(0, 0.02 / sqrt(2 n_layer))   (the residual ones)
    every bias                          = 0
    LayerNorm g, b                      = 1, 0

An untied LM head (cfg.tie_word_embeddings False) is params["lm_head"] (V, C) ~ N(0, 0.02).

scheme="pytorch": what a GPT-2 written with torch.nn modules gets from PyTorch's defaults, as
"Build a Large Language Model (From Scratch)" builds its GPTModel (chapter 4) and pretrains it
(chapter 5). nn.Embedding draws N(0, 1); nn.Linear(fan_in, fan_out) draws its weight and bias
from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform_ with a = sqrt(5)); LayerNorm 1, 0:

    wte, wpe                            ~ N(0, 1)
    every projection's w and b          ~ U(-1/sqrt(Cin), 1/sqrt(Cin))
    attn.c_attn.b                       = 0      (the book's q, k, v have no bias: qkv_bias=False)
    lm_head (untied, no bias)           ~ U(-1/sqrt(C), 1/sqrt(C))

Its embeddings are 50 times GPT-2's, so tied to the head they would give logits of standard
deviation ~sqrt(C) and an initial loss in the hundreds: the book's model has its own head, and
init_params refuses scheme="pytorch" with a tied one. Why it matters: on the book's 5,145-token
run GPT-2's scheme stays near the unigram loss (about 6) for all 90 steps where this one
memorises the text (runs/the-verdict/README.md has both runs).

Draws are float32 from one seeded `numpy.random.Generator`, in the order the nested params
are written below, so a seed gives the same weights on every machine.
"""

from __future__ import annotations

import math

import numpy as np

from ref.config import GPT2Config

STD = 0.02
SCHEMES = ("gpt2", "pytorch")


def init_params(
    cfg: GPT2Config, rng: np.random.Generator, std: float = STD, scheme: str = "gpt2"
) -> dict:
    """Fresh nested params (the layout of ref/model.py) for `cfg`, by `scheme` (SCHEMES)."""
    if scheme not in SCHEMES:
        raise ValueError(f"--init must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "pytorch" and cfg.tie_word_embeddings:
        raise ValueError(
            "--init pytorch needs an untied LM head (--untied-head): N(0, 1) embeddings used "
            "as the head give logits of std ~sqrt(n_embd)"
        )
    C, L = cfg.n_embd, cfg.n_layer
    resid_std = std / math.sqrt(2 * L)

    def normal(shape: tuple, s: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    def uniform(shape: tuple, fan_in: int) -> np.ndarray:
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    def proj(cin: int, cout: int, s: float = std, bias: bool = True) -> dict:
        if scheme == "pytorch":
            b = uniform((cout,), cin) if bias else np.zeros(cout, np.float32)
            return {"w": uniform((cin, cout), cin), "b": b}
        return {"w": normal((cin, cout), s), "b": np.zeros(cout, np.float32)}

    def ln() -> dict:
        return {"g": np.ones(C, np.float32), "b": np.zeros(C, np.float32)}

    emb_std = 1.0 if scheme == "pytorch" else std
    params = {"wte": normal((cfg.n_vocab, C), emb_std), "wpe": normal((cfg.n_ctx, C), emb_std)}
    params["blocks"] = [
        {
            "ln_1": ln(),
            "attn": {"c_attn": proj(C, 3 * C, bias=False), "c_proj": proj(C, C, resid_std)},
            "ln_2": ln(),
            "mlp": {"c_fc": proj(C, 4 * C), "c_proj": proj(4 * C, C, resid_std)},
        }
        for _ in range(L)
    ]
    params["ln_f"] = ln()
    if not cfg.tie_word_embeddings:
        head = (
            uniform((cfg.n_vocab, C), C) if scheme == "pytorch" else normal((cfg.n_vocab, C), std)
        )
        params["lm_head"] = head  # (V, C)
    return params
