"""AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule, and gradient
clipping by global norm.

Parameters, gradients and the optimizer's moments are flat dicts {name: array} with the
canonical names of `weights.layout` (plus `.../lora_a|lora_b` for adapters).

AdamW (Loshchilov & Hutter 2019, as torch.optim.AdamW computes it), step t = 1, 2, ...:
    p <- p - lr * wd * p                          (decoupled decay, only where `decay` says)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
Everything stays float32, like the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def decay_mask(names: list[str], decay: str = "matrices") -> dict[str, bool]:
    """Which parameters get weight decay.

    "matrices" (the usual choice, nanoGPT's and the book's): the projection weights `.../w` and
    LoRA adapters, not biases, LayerNorm gains or the embeddings; "matrices+embeddings" adds wte
    and wpe; "all" decays everything (llm.c's C reference does this).
    """
    choices = ("matrices", "matrices+embeddings", "all")
    if decay not in choices:
        raise ValueError(f"weight decay selection must be one of {choices}, got {decay!r}")

    def wants(name: str) -> bool:
        if decay == "all":
            return True
        if name in ("wte", "wpe"):
            return decay == "matrices+embeddings"
        return name.endswith(("/w", "/lora_a", "/lora_b"))

    return {n: wants(n) for n in names}


def adamw_init(params: dict[str, np.ndarray]) -> dict:
    """Zero moments and step 0."""
    return {
        "step": 0,
        "m": {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()},
        "v": {k: np.zeros_like(v, dtype=np.float32) for k, v in params.items()},
    }


def adamw_step(
    params: dict[str, np.ndarray],
    grads: dict[str, np.ndarray],
    state: dict,
    cfg: AdamWConfig,
    lr: float | None = None,
    decay: dict[str, bool] | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """One AdamW step. Returns (new params, new state); the inputs are not modified.

    `lr` overrides cfg.lr (the schedule's value for this step); `decay` defaults to every
    parameter (pass `decay_mask(...)` to exempt biases, LayerNorm and embeddings).
    """
    lr = cfg.lr if lr is None else lr
    t = state["step"] + 1
    b1, b2 = cfg.beta1, cfg.beta2
    bc1 = 1.0 - b1**t
    bc2_sqrt = math.sqrt(1.0 - b2**t)
    step_size = lr / bc1
    new_p, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        g = grads[name]
        if decay is None or decay[name]:
            p = p * np.float32(1.0 - lr * cfg.weight_decay)
        m = state["m"][name] * np.float32(b1) + g * np.float32(1.0 - b1)
        v = state["v"][name] * np.float32(b2) + (g * g) * np.float32(1.0 - b2)
        denom = np.sqrt(v) / np.float32(bc2_sqrt) + np.float32(cfg.eps)
        new_p[name] = p - np.float32(step_size) * (m / denom)
        new_m[name], new_v[name] = m, v
    return new_p, {"step": t, "m": new_m, "v": new_v}


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """sqrt of the sum of every gradient entry squared (summed in float64)."""
    return math.sqrt(
        sum(float(np.dot(g.ravel(), g.ravel().astype(np.float64))) for g in grads.values())
    )


def clip_by_global_norm(
    grads: dict[str, np.ndarray], max_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)), torch's clip_grad_norm_ rule.

    Returns (clipped grads, the norm before clipping). max_norm <= 0 disables clipping.
    """
    norm = global_norm(grads)
    if max_norm <= 0 or not math.isfinite(norm):
        return grads, norm
    coef = max_norm / (norm + 1e-6)
    if coef >= 1.0:
        return grads, norm
    return {k: g * np.float32(coef) for k, g in grads.items()}, norm


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Learning rate of step `step` (0-based): linear warmup over `warmup` steps from
    base_lr / warmup to base_lr, then cosine decay to min_ratio * base_lr at step total - 1
    (nanoGPT's schedule)."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total - warmup <= 1:
        return base_lr
    frac = min(max((step - warmup) / (total - 1 - warmup), 0.0), 1.0)
    min_lr = min_ratio * base_lr
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (base_lr - min_lr)
