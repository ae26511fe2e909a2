"""LoRA: low-rank adapters on the attention and MLP projections (Hu et al. 2021).

Shape legend: N = rows (B * T), Cin / Cout = the projection's input / output width, r = rank.

A projection `out = x @ w + b` with an adapter becomes
    out = x @ w + b + scale * (drop(x) @ A) @ B,   scale = alpha / r
with A (Cin, r) drawn at random and B (r, Cout) zero, so at init the model is unchanged
(the paper's choice; PEFT's too). Only A and B train; w and b stay frozen. Merging folds the
update into the weight: w' = w + scale * A @ B.

In the nested params an adapter sits beside the weight it adapts:
    blocks[i]["attn"]["c_attn"] = {"w": ..., "b": ..., "lora": {"a", "b", "scale", "dropout"}}
`lora_linear_forward` / `lora_linear_backward` are the model's linear layer with or without an
adapter (ref/model.py calls them for every projection); with train="lora" the backward returns
gradients for the adapter ("lora_a", "lora_b") only and skips the frozen weight's.

Targets are named as in the model's tape: c_attn, c_proj (the attention's output projection),
c_fc, mlp_c_proj. "attn_c_proj" is accepted for c_proj.
"""

from __future__ import annotations

import math

import numpy as np

from ref.quant import QWeight

# target name -> (sub-module of a block, projection)
TARGETS = {
    "c_attn": ("attn", "c_attn"),
    "c_proj": ("attn", "c_proj"),
    "attn_c_proj": ("attn", "c_proj"),
    "c_fc": ("mlp", "c_fc"),
    "mlp_c_proj": ("mlp", "c_proj"),
}
ALL_TARGETS = ["c_attn", "c_proj", "c_fc", "mlp_c_proj"]


def parse_targets(spec: str | list[str]) -> list[str]:
    """'c_attn,c_proj' -> ['c_attn', 'c_proj']; raises ValueError naming an unknown target."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("--lora-targets is empty; choose from " + ", ".join(TARGETS))
    out: list[str] = []
    for n in names:
        if n not in TARGETS:
            raise ValueError(
                f"--lora-targets: unknown projection {n!r}; choose from {', '.join(TARGETS)}"
            )
        canon = "c_proj" if n == "attn_c_proj" else n
        if canon not in out:
            out.append(canon)
    return out


def lora_forward(
    x: np.ndarray, lora: dict, rng: np.random.Generator | None
) -> tuple[np.ndarray, tuple]:
    """x (..., Cin) -> delta (..., Cout) = scale * (drop(x) @ A) @ B.

    Dropout (inverted, as in PEFT: kept entries are scaled by 1 / (1 - p)) runs only when an
    `rng` is given, i.e. while training; evaluation and generation pass none.
    """
    a, b, scale, p = lora["a"], lora["b"], lora["scale"], lora.get("dropout", 0.0)
    keep = None
    if rng is not None and p > 0.0:
        keep = (rng.random(x.shape, dtype=np.float32) >= p).astype(np.float32)  # (..., Cin)
        keep *= np.float32(1.0 / (1.0 - p))
        x = x * keep  # (..., Cin)
    h = x @ a  # (..., r)
    delta = (h @ b) * np.float32(scale)  # (..., Cout)
    return delta, (x, h, a, b, np.float32(scale), keep)


def lora_backward(ddelta: np.ndarray, cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of delta = scale * (xd @ A) @ B, xd = x * keep:
    dB = scale * h^T ddelta;  dh = scale * ddelta B^T;  dA = xd^T dh;  dx = (dh A^T) * keep.
    """
    xd, h, a, b, scale, keep = cache
    r = a.shape[1]
    dd = ddelta.reshape(-1, ddelta.shape[-1]) * scale  # (N, Cout)
    db = h.reshape(-1, r).T @ dd  # (r, Cout)
    dh = dd @ b.T  # (N, r)
    da = xd.reshape(-1, xd.shape[-1]).T @ dh  # (Cin, r)
    dx = (dh @ a.T).reshape(xd.shape)  # (..., Cin)
    if keep is not None:
        dx = dx * keep
    return dx, da, db


def lora_linear_forward(
    x: np.ndarray, p: dict, ops, rng: np.random.Generator | None = None, bias: bool = True
) -> tuple[np.ndarray, tuple]:
    """out = x @ w (+ b) (+ scale * (drop(x) @ A) @ B where `p` carries an adapter).

    x (..., Cin), p {"w": (Cin, Cout), "b": (Cout,), "lora"?} -> out (..., Cout). `ops` gives
    linear_forward (the backend's); bias=False leaves b to the caller (the MLP fuses it into
    its GELU). `rng` drives the adapter's dropout while training. A QWeight `w` (ref/quant.py:
    (Cout, Cin), a quantized model) goes through the backend's `qlinear_forward` instead.
    """
    b = p["b"] if bias else None
    if isinstance(p["w"], QWeight):  # a quantized model (ref/quant.py): inference only
        out, linear_cache = ops.qlinear_forward(x, p["w"], b), None  # (..., Cout)
    else:
        out, linear_cache = ops.linear_forward(x, p["w"], b)  # (..., Cout)
    lora_cache = None
    if "lora" in p:
        delta, lora_cache = lora_forward(x, p["lora"], rng)  # (..., Cout)
        out = out + delta
    return out, (linear_cache, lora_cache)


def lora_linear_backward(
    dout: np.ndarray, cache, p: dict, ops, train: str = "all"
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Backward of `lora_linear_forward`: (dx (..., Cin), the gradients of `p` by leaf name).

    train="all": {"w", "b"} (b only if the forward added it); the adapter, if any, passes its
    input gradient on but is frozen. train="lora": {"lora_a", "lora_b"} of the adapter; the
    frozen weight needs only dx = dout w^T, not its own dw and db.
    """
    linear_cache, lora_cache = cache
    if isinstance(p["w"], QWeight):
        raise ValueError(
            f"a {p['w'].dtype} QWeight is for inference only: train or finetune a float32 model"
        )
    grads: dict[str, np.ndarray] = {}
    if train == "all":
        dx, dw, db = ops.linear_backward(dout, linear_cache)
        grads["w"] = dw  # (Cin, Cout)
        if db is not None:
            grads["b"] = db  # (Cout,)
    else:
        dx = dout @ p["w"].T  # (..., Cin)
    if lora_cache is not None:
        ldx, da, db_ = lora_backward(dout, lora_cache)
        dx = dx + ldx
        if train == "lora":
            grads["lora_a"] = da  # (Cin, r)
            grads["lora_b"] = db_  # (r, Cout)
    return dx, grads


def copy_params(tree):
    """A copy of nested params with new dicts and lists and the same arrays: replacing a leaf
    of the copy leaves the original alone, and no weight is duplicated."""
    if isinstance(tree, dict):
        return {k: copy_params(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [copy_params(v) for v in tree]
    return tree


def _projections(params: dict, targets: list[str]):
    """Yield (layer, target, the projection's dict) for every adapted projection."""
    for i, block in enumerate(params["blocks"]):
        for t in targets:
            mod, proj = TARGETS[t]
            yield i, t, block[mod][proj]


def add_lora(
    params: dict,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> dict:
    """A copy of `params` (sharing the base arrays) with fresh adapters on `targets`.

    A is uniform in +-1/sqrt(Cin) (PEFT's kaiming_uniform(a=sqrt(5)) bound), B is zero.
    """
    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {dropout}")
    rng = np.random.default_rng(0) if rng is None else rng
    out = copy_params(params)
    for _, _, p in _projections(out, targets):
        cin, cout = p["w"].shape
        bound = 1.0 / math.sqrt(cin)
        p["lora"] = {
            "a": rng.uniform(-bound, bound, (cin, rank)).astype(np.float32),  # (Cin, r)
            "b": np.zeros((rank, cout), np.float32),  # (r, Cout)
            "scale": float(alpha) / rank,
            "dropout": float(dropout),
        }
    return out


def has_lora(params: dict) -> bool:
    return any("lora" in p for _, _, p in _projections(params, ALL_TARGETS))


def has_dropout(params: dict) -> bool:
    """Whether any adapter drops its input while training."""
    return any(
        p.get("lora", {}).get("dropout", 0.0) > 0 for _, _, p in _projections(params, ALL_TARGETS)
    )


def lora_targets(params: dict) -> list[str]:
    """The targets that carry adapters, in canonical order."""
    found = {t for _, t, p in _projections(params, ALL_TARGETS) if "lora" in p}
    return [t for t in ALL_TARGETS if t in found]


def adapter_tensors(params: dict) -> dict[str, np.ndarray]:
    """The adapters alone, flat: {'h0/attn/c_attn/lora_a': (Cin, r), '.../lora_b': (r, Cout)}."""
    flat = {}
    for i, t, p in _projections(params, ALL_TARGETS):
        if "lora" in p:
            mod, proj = TARGETS[t]
            flat[f"h{i}/{mod}/{proj}/lora_a"] = p["lora"]["a"]
            flat[f"h{i}/{mod}/{proj}/lora_b"] = p["lora"]["b"]
    return flat


def set_adapter_tensors(params: dict, flat: dict[str, np.ndarray]) -> None:
    """Put adapter arrays (as from `adapter_tensors`) into params that already carry adapters."""
    want = adapter_tensors(params)
    if set(want) != set(flat):
        missing = sorted(set(want) - set(flat))
        extra = sorted(set(flat) - set(want))
        raise ValueError(f"adapter tensors do not match: missing {missing[:3]}, extra {extra[:3]}")
    for i, t, p in _projections(params, ALL_TARGETS):
        if "lora" in p:
            mod, proj = TARGETS[t]
            for leaf in ("a", "b"):
                a = flat[f"h{i}/{mod}/{proj}/lora_{leaf}"]
                if a.shape != p["lora"][leaf].shape:
                    raise ValueError(
                        f"adapter h{i}/{mod}/{proj}/lora_{leaf} has shape {a.shape}, "
                        f"expected {p['lora'][leaf].shape}"
                    )
                p["lora"][leaf] = np.array(a, np.float32)


def merge_lora(params: dict) -> dict:
    """Params with every adapter folded into its weight (w + scale * A @ B) and removed."""
    out = copy_params(params)
    for _, _, p in _projections(out, ALL_TARGETS):
        lora = p.pop("lora", None)
        if lora is not None:
            p["w"] = p["w"] + np.float32(lora["scale"]) * (lora["a"] @ lora["b"])  # (Cin, Cout)
    return out
