"""Small random GPT-2s for the training tests (test_backward, test_train, test_checkpoint)."""

from __future__ import annotations

import math

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
        z = rng.standard_normal(shape)
        a = 1.0 + 0.1 * z if name.endswith("/g") else 0.02 * z
        flat[name] = a.astype(dtype)
    return nest(flat, cfg)


TINY = GPT2Config(n_vocab=96, n_ctx=32, n_embd=32, n_head=4, n_layer=2)


def torch_loss(tp: dict, ids, targets, cfg: GPT2Config, lora: dict | None = None):
    """GPT-2 in torch from the same flat params (tp: name -> tensor), written from the paper's
    equations independently of ref/model.py. lora: {prefix: (A, B, scale)}."""
    import torch
    import torch.nn.functional as F

    B, T = ids.shape
    C, NH = cfg.n_embd, cfg.n_head
    ids_t = torch.as_tensor(ids)

    def lin(x, pre):
        y = x @ tp[pre + "/w"] + tp[pre + "/b"]
        if lora and pre in lora:
            a, b, s = lora[pre]
            y = y + s * ((x @ a) @ b)
        return y

    x = tp["wte"][ids_t] + tp["wpe"][:T]
    for i in range(cfg.n_layer):
        h = F.layer_norm(x, (C,), tp[f"h{i}/ln_1/g"], tp[f"h{i}/ln_1/b"], cfg.eps)
        q, k, v = lin(h, f"h{i}/attn/c_attn").split(C, dim=-1)
        q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(C // NH)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + lin(y, f"h{i}/attn/c_proj")
        h = F.layer_norm(x, (C,), tp[f"h{i}/ln_2/g"], tp[f"h{i}/ln_2/b"], cfg.eps)
        x = x + lin(F.gelu(lin(h, f"h{i}/mlp/c_fc"), approximate="tanh"), f"h{i}/mlp/c_proj")
    x = F.layer_norm(x, (C,), tp["ln_f/g"], tp["ln_f/b"], cfg.eps)
    logits = x @ tp.get("lm_head", tp["wte"]).T  # the head: tied to wte unless untied
    return F.cross_entropy(
        logits.view(B * T, -1), torch.as_tensor(targets).view(-1), ignore_index=-100
    )
