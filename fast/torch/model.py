"""GPT-2 in torch, taking its ops from a backend: "torch" (torch's own kernels, CPU or GPU) or
"triton" (our kernels, `fast/triton/*.py`). The same forward as `ref/model.py`, on tensors.

Shape legend: B = batch, T = new tokens this call, P = tokens already in the cache,
C = n_embd, NH = n_head, hs = C // NH, V = n_vocab, L = n_layer.

Params are the nested dict of `ref/model.py` with torch tensors for leaves (`to_torch` makes
it from the numpy one, which every loader returns). The backend gives the differentiable
`layernorm`, `bias_gelu`, `attention` and `crossentropy`; the embedding and the linear layers
are torch ops in both backends (a gather and a cuBLAS matmul). Autograd differentiates
through either backend, so `gpt2_loss(...).backward()` trains the model (fast/torch/train.py).
Dropout (`ref.model.Dropout`: embd, attn, resid), while training only (a generator `gen` is
given), sits where the reference puts it and draws its masks, and LoRA's, from `gen` in the
reference's order (see ref/model.py), each `torch.rand(shape, generator=gen) >= p`; rates of 0
draw nothing.
The cache's bookkeeping, the tokens' positions and the padding masks are the reference's
(`ref.model.KVCache`, `plan_step`): small host arrays, copied to the device per call.

`TorchModel` is the model interface of `ref.model.Model` (cfg, new_cache, forward -> numpy
float32 logits), so generation, evaluation and the trainers' samples run on it. Device: CUDA
when available, else CPU; the triton backend on CPU only under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import numpy as np
import torch

from fast import TORCH_BACKENDS, get_backend
from fast.torch.backend import dropout as drop
from ref.config import GPT2Config
from ref.model import NO_DROPOUT, Dropout, KVCache, as_ids, check_ids, commit_step, plan_step


def to_torch(params: dict, device, dtype: torch.dtype = torch.float32) -> dict:
    """The nested numpy params as tensors on `device` (same structure and keys; Python numbers,
    such as a LoRA adapter's scale and dropout, stay numbers)."""
    if isinstance(params, dict):
        return {k: to_torch(v, device, dtype) for k, v in params.items()}
    if isinstance(params, list):
        return [to_torch(v, device, dtype) for v in params]
    if isinstance(params, (int, float)):
        return params
    if isinstance(params, torch.Tensor):  # shares storage where device and dtype match
        return params.detach().to(device, dtype)
    return torch.tensor(np.asarray(params), dtype=dtype, device=device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchKVCache(KVCache):
    """`ref.model.KVCache` with k and v (L, B, NH, capacity, hs) as tensors on `device`."""

    def __init__(self, cfg: GPT2Config, batch: int, capacity: int | None, device, dtype):
        self.device, self.torch_dtype = torch.device(device), dtype
        super().__init__(cfg, batch, capacity)
        self.kv_dtype = str(dtype).removeprefix("torch.")  # the model's dtype, not KV_DTYPES'

    def _zeros(self, shape: tuple) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.torch_dtype, device=self.device)

    def _take(self, kv: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(rows, dtype=torch.int64, device=kv.device)
        return kv[:, idx].contiguous()  # (L, len(rows), NH, capacity, hs)


def linear(
    x: torch.Tensor, p: dict, bias: bool = True, gen: torch.Generator | None = None
) -> torch.Tensor:
    """x @ w (+ b), plus scale * (drop(x) @ A) @ B where `p` carries a LoRA adapter
    (ref/lora.py); dropout (inverted) only when a generator `gen` is given (training)."""
    y = x @ p["w"]
    lora = p.get("lora")
    if lora is not None:
        xd, rate = x, lora["dropout"]
        if rate > 0 and gen is not None:
            keep = torch.rand(x.shape, generator=gen, device=x.device) >= rate  # (..., Cin)
            xd = x * keep.to(x.dtype) * (1.0 / (1.0 - rate))
        y = y + lora["scale"] * ((xd @ lora["a"]) @ lora["b"])  # (..., r) then (..., Cout)
    return y + p["b"] if bias else y


def attention_block(
    x, c_attn, c_proj, *, n_head, ops, kv, key_mask, gen=None, dropout: Dropout = NO_DROPOUT
):
    """Causal self-attention over the new tokens and the cached ones; x (B, T, C). With `gen`:
    dropout.attn on the attention probabilities, dropout.resid on the output."""
    B, T, C = x.shape
    hs = C // n_head
    qkv = linear(x, c_attn, gen=gen)  # (B, T, 3C)
    qkv = qkv.view(B, T, 3, n_head, hs).permute(2, 0, 3, 1, 4)  # (3, B, NH, T, hs)
    q, k, v = qkv[0], qkv[1], qkv[2]  # each (B, NH, T, hs), views of qkv
    if kv is not None:
        k_cache, v_cache, P = kv
        k_cache[:, :, P : P + T] = k
        v_cache[:, :, P : P + T] = v
        k, v = k_cache[:, :, : P + T], v_cache[:, :, : P + T]  # (B, NH, P+T, hs)
    if gen is not None and dropout.attn > 0.0:
        y = ops.attention(q, k, v, key_mask, dropout.attn, gen)  # (B, NH, T, hs)
    else:
        y = ops.attention(q, k, v, key_mask)  # (B, NH, T, hs)
    y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return drop(linear(y, c_proj, gen=gen), dropout.resid, gen)  # (B, T, C)


def mlp_block(x, c_fc, c_proj, *, ops, gen=None, dropout: Dropout = NO_DROPOUT):
    """x (B, T, C) -> (B, T, C); the c_fc bias is fused into the GELU; with `gen`,
    dropout.resid on the output."""
    h = ops.bias_gelu(linear(x, c_fc, bias=False, gen=gen), c_fc["b"])  # (B, T, 4C)
    return drop(linear(h, c_proj, gen=gen), dropout.resid, gen)  # (B, T, C)


def transformer_block(
    x, ln_1, attn, ln_2, mlp, *, n_head, eps, ops, kv, key_mask, gen=None,
    dropout: Dropout = NO_DROPOUT,
):  # fmt: skip
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""
    h = ops.layernorm(x, ln_1["g"], ln_1["b"], eps)  # (B, T, C)
    x = x + attention_block(
        h, **attn, n_head=n_head, ops=ops, kv=kv, key_mask=key_mask, gen=gen, dropout=dropout
    )  # (B, T, C)
    h = ops.layernorm(x, ln_2["g"], ln_2["b"], eps)  # (B, T, C)
    return x + mlp_block(h, **mlp, ops=ops, gen=gen, dropout=dropout)  # (B, T, C)


def gpt2_forward(
    params: dict,
    ids: torch.Tensor,
    cfg: GPT2Config,
    ops,
    *,
    cache: TorchKVCache | None = None,
    mask: np.ndarray | None = None,
    last_only: bool = False,
    gen: torch.Generator | None = None,
    dropout: Dropout | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) for ids (B, T) int64, continuing from `cache` (updated in place).

    mask (B, T) bool (numpy): False on left padding. last_only: logits of the last position
    only. gen: drives LoRA's dropout and the model's (`dropout`, None: none) while training;
    None means no dropout at all, whatever the rates.
    """
    dropout = NO_DROPOUT if dropout is None else dropout
    B, T = ids.shape
    step = plan_step(cfg, B, T, mask, cache)  # positions and masks, on the host
    pos = torch.as_tensor(step.pos, device=ids.device)  # (B, T)
    key_mask = None
    if step.key_mask is not None:
        key_mask = torch.as_tensor(step.key_mask, device=ids.device)  # (B, P+T)

    x = drop(params["wte"][ids] + params["wpe"][pos], dropout.embd, gen)  # (B, T, C)
    for layer, block in enumerate(params["blocks"]):
        kv = None if cache is None else (cache.k[layer], cache.v[layer], step.P)
        x = transformer_block(
            x, **block, n_head=cfg.n_head, eps=cfg.eps, ops=ops, kv=kv, key_mask=key_mask,
            gen=gen, dropout=dropout,
        )  # fmt: skip
    commit_step(cache, step)
    if last_only:
        x = x[:, -1:]  # (B, 1, C)
    x = ops.layernorm(x, params["ln_f"]["g"], params["ln_f"]["b"], cfg.eps)  # (B, T, C)
    head = params.get("lm_head", params["wte"])  # (V, C): tied to the token embedding, or not
    return x @ head.T  # (B, T, V)


def gpt2_loss(
    params: dict, ids: torch.Tensor, targets: torch.Tensor, cfg: GPT2Config, ops,
    ignore_index: int = -100, gen: torch.Generator | None = None,
    dropout: Dropout | None = None,
) -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy over the targets (B, T) that are not ignore_index; () float32.
    gen, dropout: as gpt2_forward's (training)."""
    logits = gpt2_forward(params, ids, cfg, ops, gen=gen, dropout=dropout)  # (B, T, V)
    V = logits.shape[-1]
    # the logits are a temporary here: the loss may write its gradient over them
    return ops.crossentropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index, inplace=True)


class TorchModel:
    """GPT-2 on a torch backend ("torch" or "triton") with the model interface of
    `ref.model.Model`: numpy in, numpy float32 logits out. `params` are numpy arrays or
    tensors (a trainer's, whose storage is shared, not copied, where device and dtype match)."""

    def __init__(
        self,
        cfg: GPT2Config,
        params: dict,
        backend: str = "torch",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if backend not in TORCH_BACKENDS:
            raise ValueError(
                f"TorchModel: backend must be one of {TORCH_BACKENDS}, got {backend!r}"
            )
        self.cfg = cfg
        self.backend = backend
        self.ops = get_backend(backend)
        self.device = default_device() if device is None else torch.device(device)
        if backend == "triton":
            self.ops.check_device(self.device)
        self.dtype = dtype
        self.params = to_torch(params, self.device, dtype)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"TorchModel({c.n_params() / 1e6:.1f}M parameters: n_layer={c.n_layer}, "
            f"n_head={c.n_head}, n_embd={c.n_embd}, n_ctx={c.n_ctx}; backend {self.backend}, "
            f"{self.device}, {str(self.dtype).removeprefix('torch.')})"
        )

    def new_cache(self, batch: int, capacity: int | None = None) -> TorchKVCache:
        return TorchKVCache(self.cfg, batch, capacity, self.device, self.dtype)

    def forward(
        self,
        ids: np.ndarray,
        cache: TorchKVCache | None = None,
        mask: np.ndarray | None = None,
        last_only: bool = False,
    ) -> np.ndarray:
        """ids (B, T) int (or (T,), one row) -> logits (B, T, V) float32 numpy (B, 1, V
        with last_only)."""
        ids = as_ids(ids)
        check_ids(ids, self.cfg.n_vocab)  # on CUDA a bad id would be a device-side assert
        ids_t = torch.as_tensor(ids, device=self.device)
        with torch.no_grad():
            logits = gpt2_forward(
                self.params, ids_t, self.cfg, self.ops, cache=cache, mask=mask,
                last_only=last_only,
            )  # fmt: skip
        return logits.to("cpu", torch.float32).numpy()
