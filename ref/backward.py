"""The whole model's backward pass: gradients of the loss for every parameter.

Shape legend: B = batch, T = time, C = n_embd, NH = n_head, hs = C // NH, V = n_vocab.

`ref.model.forward(..., tape=tape)` records every op's cache in `tape`; `model_backward` walks
the model in reverse and calls each op's `*_backward` from the same backend module `ops`, so a
backend that provides the forward ops (ref, numba) trains with its own kernels too.

Gradients come back flat, keyed by the canonical names of `weights.layout`
(`wte`, `h0/attn/c_attn/w`, ...), plus `h{i}/{attn|mlp}/{proj}/lora_a|lora_b` for adapters.
`train="all"` differentiates every parameter of the layout (full finetuning); `train="lora"`
only the adapters, and skips the work the frozen weights would need (their dw, db).
"""

from __future__ import annotations

import numpy as np

from ref import ops as ref_ops
from ref.config import GPT2Config
from ref.lora import lora_backward
from ref.model import forward

TRAIN_MODES = ("all", "lora")


def _linear_backward(dout, tape: dict, name: str, p: dict, prefix: str, grads: dict, ops, train):
    """Backward of `ref.model._linear`: out = x @ w + b (+ the LoRA update). Returns dx."""
    if train == "all":
        dx, dw, db = ops.linear_backward(dout, tape[name])
        grads[prefix + "/w"] = dw  # (Cin, Cout)
        grads[prefix + "/b"] = db  # (Cout,)
    else:
        dx = dout @ p["w"].T  # (..., Cin): the frozen weight needs only the input's gradient
    if name + "/lora" in tape:
        ldx, da, db_ = lora_backward(dout, tape[name + "/lora"])
        dx = dx + ldx
        if train == "lora":
            grads[prefix + "/lora_a"] = da  # (Cin, r)
            grads[prefix + "/lora_b"] = db_  # (r, Cout)
    return dx


def _layernorm_backward(dout, cache, prefix: str, grads: dict, ops, train):
    dx, dg, db = ops.layernorm_backward(dout, cache)
    if train == "all":
        grads[prefix + "/g"] = dg  # (C,)
        grads[prefix + "/b"] = db  # (C,)
    return dx


def model_backward(
    dlogits: np.ndarray,
    tape: dict,
    params: dict,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    train: str = "all",
) -> dict[str, np.ndarray]:
    """dlogits (B, T, V): the loss's gradient w.r.t. the logits of `forward(..., tape=tape)`.

    Returns {canonical name: gradient} for the parameters that `train` selects.
    """
    if train not in TRAIN_MODES:
        raise ValueError(f"train must be one of {TRAIN_MODES}, got {train!r}")
    B, T, V = dlogits.shape
    C, NH = cfg.n_embd, cfg.n_head
    hs = C // NH
    grads: dict[str, np.ndarray] = {}

    # logits = x_final @ wte.T  (the LM head tied to the token embedding)
    x_final = tape["x_final"]  # (B, T, C)
    dx = dlogits @ params["wte"]  # (B, T, C)
    if train == "all":
        dwte_head = dlogits.reshape(-1, V).T @ x_final.reshape(-1, C)  # (V, C)
    # x_final = layernorm(x, ln_f)
    dx = _layernorm_backward(dx, tape["ln_f"], "ln_f", grads, ops, train)  # (B, T, C)

    for i in reversed(range(cfg.n_layer)):
        bt, block, pre = tape["blocks"][i], params["blocks"][i], f"h{i}"
        attn, mlp = block["attn"], block["mlp"]
        # x_out = x_mid + c_proj(gelu(c_fc(ln_2(x_mid)))): the residual passes dx through
        dh = _linear_backward(
            dx, bt, "mlp_c_proj", mlp["c_proj"], f"{pre}/mlp/c_proj", grads, ops, train
        )  # (B, T, 4C)
        dh = ops.gelu_backward(dh, bt["gelu"])  # (B, T, 4C)
        dh = _linear_backward(dh, bt, "c_fc", mlp["c_fc"], f"{pre}/mlp/c_fc", grads, ops, train)
        dx = dx + _layernorm_backward(dh, bt["ln_2"], f"{pre}/ln_2", grads, ops, train)

        # x_mid = x_in + c_proj(attention(split(c_attn(ln_1(x_in)))))
        dy = _linear_backward(
            dx, bt, "c_proj", attn["c_proj"], f"{pre}/attn/c_proj", grads, ops, train
        )  # (B, T, C)
        dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # (B, NH, T, hs)
        dq, dk, dv = ops.attention_backward(dy, bt["attention"])  # each (B, NH, T, hs)
        dqkv = np.stack([dq, dk, dv])  # (3, B, NH, T, hs)
        dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * C)  # (B, T, 3C)
        dh = _linear_backward(
            dqkv, bt, "c_attn", attn["c_attn"], f"{pre}/attn/c_attn", grads, ops, train
        )  # (B, T, C)
        dx = dx + _layernorm_backward(dh, bt["ln_1"], f"{pre}/ln_1", grads, ops, train)

    if train == "all":
        # x = wte[ids] + wpe[pos]
        dwte, dwpe = ops.embedding_backward(dx, tape["embedding"])
        grads["wte"] = dwte + dwte_head  # (V, C)
        grads["wpe"] = dwpe  # (n_ctx, C)
    return grads


def loss_and_grads(
    params: dict,
    ids: np.ndarray,
    targets: np.ndarray,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    train: str = "all",
    rng: np.random.Generator | None = None,
    ignore_index: int = -100,
) -> tuple[float, dict[str, np.ndarray]]:
    """Mean cross-entropy of `targets` (B, T) given `ids` (B, T) and its gradients.

    Targets equal to `ignore_index` (padding, masked prompts) do not count. `rng` drives LoRA
    dropout.
    """
    B, T = ids.shape
    tape: dict = {}
    logits = forward(params, ids, cfg, ops=ops, tape=tape, rng=rng)  # (B, T, V)
    V = logits.shape[-1]
    loss, ce_cache = ops.crossentropy_forward(
        logits.reshape(B * T, V), targets.reshape(B * T), ignore_index
    )
    del logits  # the cross-entropy cache holds it; free the name early on big vocabularies
    dlogits = ops.crossentropy_backward(np.float32(1.0), ce_cache).reshape(B, T, V)
    del ce_cache
    grads = model_backward(dlogits, tape, params, cfg, ops=ops, train=train)
    return float(loss), grads


def loss_only(
    params: dict,
    ids: np.ndarray,
    targets: np.ndarray,
    cfg: GPT2Config,
    *,
    ops=ref_ops,
    ignore_index: int = -100,
) -> tuple[float, int]:
    """(mean cross-entropy, number of counted targets) without a tape: validation."""
    B, T = ids.shape
    logits = forward(params, ids, cfg, ops=ops)  # (B, T, V)
    tgt = targets.reshape(B * T)
    loss, _ = ops.crossentropy_forward(logits.reshape(B * T, -1), tgt, ignore_index)
    return float(loss), int((tgt != ignore_index).sum())
