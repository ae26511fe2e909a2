"""A minimal GPT-2 in eager PyTorch: the "torch eager" baseline of the generate and finetune
suites. Imported only when torch is installed.

Shape legend: B = batch, T = new tokens, P = tokens already cached, C = n_embd, NH = n_head,
hs = head size, V = n_vocab, r = LoRA rank.

It is what a careful PyTorch user writes without custom kernels: torch.nn.functional's
layer_norm, gelu(approximate="tanh") and scaled_dot_product_attention, a preallocated KV cache,
autograd for the backward, torch.optim.AdamW. LoRA adapters (A (Cin, r), B (r, Cout)) sit on
the same projections as ref/lora.py's ALL_TARGETS, so the two LoRA steps do the same work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ref.config import GPT2Config

LORA_PROJECTIONS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def to_torch(params: dict, device: str = "cpu", copy: bool = False) -> dict:
    """Nested numpy params -> the same nesting of tensors (shared memory unless `copy`)."""
    if isinstance(params, dict):
        return {k: to_torch(v, device, copy) for k, v in params.items()}
    if isinstance(params, list):
        return [to_torch(v, device, copy) for v in params]
    t = torch.from_numpy(params).to(device)
    return t.clone() if copy and device == "cpu" else t


def new_cache(cfg: GPT2Config, B: int, capacity: int, device: str = "cpu") -> list:
    """[k, v], each (L, B, NH, capacity, hs)."""
    shape = (cfg.n_layer, B, cfg.n_head, capacity, cfg.head_size)
    return [torch.zeros(shape, device=device), torch.zeros(shape, device=device)]


def _linear(x, p):
    out = x @ p["w"] + p["b"]  # (..., Cout)
    if "lora" in p:
        out = out + (x @ p["lora"]["a"]) @ p["lora"]["b"] * p["lora"]["scale"]
    return out


def forward(
    p: dict,
    ids: torch.Tensor,
    cfg: GPT2Config,
    cache: list | None = None,
    P: int = 0,
    last_only: bool = False,
) -> torch.Tensor:
    """ids (B, T) -> logits (B, T, V) (B, 1, V with last_only). With a cache, either a prefill
    (P = 0) or one decode step (T = 1) after P cached tokens."""
    B, T = ids.shape
    C, NH = cfg.n_embd, cfg.n_head
    hs = C // NH
    assert cache is None or P == 0 or T == 1, "cached calls are a prefill or one token"
    pos = torch.arange(P, P + T, device=ids.device)  # (T,)
    x = p["wte"][ids] + p["wpe"][pos]  # (B, T, C)
    for layer, blk in enumerate(p["blocks"]):
        h = F.layer_norm(x, (C,), blk["ln_1"]["g"], blk["ln_1"]["b"], cfg.eps)  # (B, T, C)
        qkv = _linear(h, blk["attn"]["c_attn"])  # (B, T, 3C)
        q, k, v = qkv.view(B, T, 3, NH, hs).permute(2, 0, 3, 1, 4)  # each (B, NH, T, hs)
        if cache is not None:
            kc, vc = cache[0][layer], cache[1][layer]  # (B, NH, capacity, hs)
            kc[:, :, P : P + T] = k
            vc[:, :, P : P + T] = v
            k, v = kc[:, :, : P + T], vc[:, :, : P + T]  # (B, NH, P+T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, NH, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = x + _linear(y, blk["attn"]["c_proj"])  # (B, T, C)
        h = F.layer_norm(x, (C,), blk["ln_2"]["g"], blk["ln_2"]["b"], cfg.eps)  # (B, T, C)
        h = F.gelu(_linear(h, blk["mlp"]["c_fc"]), approximate="tanh")  # (B, T, 4C)
        x = x + _linear(h, blk["mlp"]["c_proj"])  # (B, T, C)
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    x = F.layer_norm(x, (C,), p["ln_f"]["g"], p["ln_f"]["b"], cfg.eps)  # (B, T, C)
    return x @ p["wte"].T  # (B, T, V)


def _leaves(tree) -> list[torch.Tensor]:
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _leaves(v)]
    if isinstance(tree, list):
        return [t for v in tree for t in _leaves(v)]
    return [tree] if isinstance(tree, torch.Tensor) else []


def trainer(p: dict, cfg: GPT2Config, lora_rank: int | None, seed: int = 0):
    """A function doing one training step (forward, cross-entropy, backward, clip to norm 1,
    AdamW) on (ids, targets) (B, T); `p` gets adapters when `lora_rank` is set."""
    gen = torch.Generator().manual_seed(seed)
    if lora_rank is None:
        params = _leaves(p)
    else:
        params = []
        for blk in p["blocks"]:
            for mod, proj in LORA_PROJECTIONS:
                lin = blk[mod][proj]
                cin, cout = lin["w"].shape
                a = (torch.rand(cin, lora_rank, generator=gen) * 2 - 1) / cin**0.5  # (Cin, r)
                lin["lora"] = {
                    "a": a.to(lin["w"].device),
                    "b": torch.zeros(lora_rank, cout, device=lin["w"].device),
                    "scale": 1.0,
                }
                params += [lin["lora"]["a"], lin["lora"]["b"]]
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def step(ids: torch.Tensor, targets: torch.Tensor) -> float:
        logits = forward(p, ids, cfg)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step
