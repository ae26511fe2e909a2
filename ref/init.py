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

Draws are float32 from one seeded `numpy.random.Generator`, in the order the nested params
are written below, so a seed gives the same weights on every machine.
"""

from __future__ import annotations

import math

import numpy as np

from ref.config import GPT2Config

STD = 0.02


def init_params(cfg: GPT2Config, rng: np.random.Generator, std: float = STD) -> dict:
    """Fresh nested params (the layout of ref/model.py) for `cfg`."""
    C, L = cfg.n_embd, cfg.n_layer
    resid_std = std / math.sqrt(2 * L)

    def normal(shape: tuple, s: float) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(s)

    def proj(cin: int, cout: int, s: float = std) -> dict:
        return {"w": normal((cin, cout), s), "b": np.zeros(cout, np.float32)}

    def ln() -> dict:
        return {"g": np.ones(C, np.float32), "b": np.zeros(C, np.float32)}

    params = {"wte": normal((cfg.n_vocab, C), std), "wpe": normal((cfg.n_ctx, C), std)}
    params["blocks"] = [
        {
            "ln_1": ln(),
            "attn": {"c_attn": proj(C, 3 * C), "c_proj": proj(C, C, resid_std)},
            "ln_2": ln(),
            "mlp": {"c_fc": proj(C, 4 * C), "c_proj": proj(4 * C, C, resid_std)},
        }
        for _ in range(L)
    ]
    params["ln_f"] = ln()
    return params
