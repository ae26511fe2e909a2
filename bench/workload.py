"""How much work each measured thing does: FLOPs and bytes of the ops and of the model, the
decode bandwidth ceiling, and random weights at the real shapes.

Shape legend: B = batch, T = tokens this call, Tq / Tk = query / key length, N = rows (B * T),
C = n_embd, NH = n_head, hs = head size, L = n_layer, V = n_vocab.

Conventions, used everywhere in the reports:
- a FLOP is a multiply or an add (a multiply-add is 2);
- attention FLOPs count only the (query, key) pairs the causal mask lets through ("useful"
  FLOPs): an implementation that computes the full Tq x Tk square and masks it does more;
- bytes are the compulsory traffic: each input read once, each output written once (float32),
  what an op would move if its working set never fit in cache.
"""

from __future__ import annotations

import numpy as np

from ref.config import GPT2Config
from weights.layout import expected_shapes, nest

F32 = 4  # bytes
ELT = {"float32": 4, "bfloat16": 2, "float16": 2}  # bytes per element of each dtype


def random_params(cfg: GPT2Config, rng: np.random.Generator) -> dict:
    """Nested params at the real shapes: N(0, 0.02) weights, LayerNorm g = 1 and b = 0.

    Speed does not depend on the values; these keep activations finite through every layer.
    """
    flat = {}
    for name, shape in expected_shapes(cfg).items():
        leaf = name.rsplit("/", 1)[-1]
        if len(shape) == 1:
            fill = 1.0 if leaf == "g" else 0.0
            flat[name] = np.full(shape, fill, np.float32)
        else:
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= 0.02
            flat[name] = a
    return nest(flat, cfg)


# ---------------------------------------------------------------------------------------------
# ops: {"flops", "read_bytes", "write_bytes"} per call


def causal_pairs(Tq: int, Tk: int) -> int:
    """Visible (query, key) pairs: query i sees Tk - Tq + i + 1 keys."""
    return Tq * (Tk - Tq) + Tq * (Tq + 1) // 2


def op_work(op: str, direction: str, shape: dict) -> dict:
    """Work of one call of `op` ("forward", "backward" or "forward+backward", the two in one
    timed call) at `shape` (the ops suite's params)."""
    if direction == "forward+backward":
        f, b = op_work(op, "forward", shape), op_work(op, "backward", shape)
        return {k: f[k] + b[k] for k in f}
    if op == "layernorm":
        n = shape["N"] * shape["C"]
        # forward reads x and writes out; backward reads dout and x (or xhat), writes dx
        return _work(8 * n, n * F32 if direction == "forward" else 2 * n * F32, n * F32)
    if op in ("gelu", "bias_gelu"):
        n = shape["N"] * shape["H"]
        flops = 10 * n if direction == "forward" else 20 * n  # a tanh counted as one FLOP
        return _work(flops, n * F32 if direction == "forward" else 2 * n * F32, n * F32)
    if op == "attention":
        B, NH, Tq, Tk, hs = shape["B"], shape["NH"], shape["Tq"], shape["Tk"], shape["hs"]
        elt = ELT[shape.get("dtype", "float32")]  # the GPU cases also time bfloat16
        pairs = B * NH * causal_pairs(Tq, Tk)
        qo = B * NH * Tq * hs * elt  # bytes of q (or out)
        kv = B * NH * Tk * hs * elt  # bytes of k (or v)
        if direction == "forward":  # s = q k^T and out = att v: 2 FLOPs x hs per pair each
            return _work(4 * pairs * hs, qo + 2 * kv, qo)
        # dv, datt, dq, dk: four matmuls over the pairs; reads q, k, v, out, dout
        return _work(8 * pairs * hs, 3 * qo + 2 * kv, qo + 2 * kv)
    if op == "linear":
        N, C, H = shape["N"], shape["C"], shape["H"]
        if direction == "forward":  # out = x @ w + b
            return _work(2 * N * C * H, (N * C + C * H + H) * F32, N * H * F32)
        # dx = dout w^T, dw = x^T dout, db = sum(dout): reads dout, x, w; writes dx, dw, db
        return _work(4 * N * C * H, (N * H + N * C + C * H) * F32, (N * C + C * H + H) * F32)
    if op == "embedding":
        N, C, V, n_ctx = shape["N"], shape["C"], shape["V"], shape["n_ctx"]
        if direction == "forward":  # two rows gathered per token, one row written
            return _work(N * C, 2 * N * C * F32, N * C * F32)
        # dwte and dwpe are written whole (zeros where no token read the row)
        return _work(2 * N * C, N * C * F32, (V + n_ctx) * C * F32)
    if op == "crossentropy":
        n = shape["N"] * shape["V"]
        if direction == "forward":  # max, exp, sum: the logits read once
            return _work(4 * n, n * F32, 0)
        return _work(4 * n, n * F32, n * F32)
    raise ValueError(f"no work model for op {op!r}")


def _work(flops: int, read: int, write: int) -> dict:
    return {"flops": int(flops), "read_bytes": int(read), "write_bytes": int(write)}


def device_limits(limits: dict, device: str, dtype: str = "float32") -> dict:
    """The limits of `device` under the CPU names (copy_GBps, read_GBps, matmul_f32_GFLOPs);
    empty when they were not measured. On a GPU the matmul rate is that of `dtype` (bfloat16
    tensor cores for a bfloat16 op)."""
    if device == "cpu":
        return limits
    mm = {"float32": "f32", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    names = {
        "copy_GBps": "gpu_copy_GBps",
        "read_GBps": "gpu_read_GBps",
        "matmul_f32_GFLOPs": f"gpu_matmul_{mm}_GFLOPs",
    }
    if not all(g in limits for g in names.values()):
        return {}
    return {k: limits[g] for k, g in names.items()}


def roofline(work: dict, limits: dict) -> tuple[float | None, str | None]:
    """The least time the machine could take for `work`, and which limit sets it ((None,
    None) without limits).

    Traffic that writes goes at copy bandwidth; read-only traffic at streaming-read bandwidth.
    """
    if not limits:
        return None, None
    total = work["read_bytes"] + work["write_bytes"]
    bw = limits["copy_GBps"] if work["write_bytes"] else limits["read_GBps"]
    t_mem = total / (bw * 1e9)
    t_flop = work["flops"] / (limits["matmul_f32_GFLOPs"] * 1e9)
    if t_flop >= t_mem:
        return t_flop, "matmul_f32_GFLOPs"
    return t_mem, "copy_GBps" if work["write_bytes"] else "read_GBps"


# ---------------------------------------------------------------------------------------------
# the model


def linear_params(cfg: GPT2Config) -> int:
    """Weights of the matmuls in the blocks: c_attn 3C^2, c_proj C^2, c_fc 4C^2, proj 4C^2."""
    return 12 * cfg.n_layer * cfg.n_embd**2


def forward_flops(cfg: GPT2Config, B: int, T: int, P: int = 0, head_rows: int | None = None) -> int:
    """FLOPs of one forward over T new tokens after P cached ones (useful attention only).

    head_rows: positions that go through the LM head per sequence (T; 1 with last_only).
    """
    C, L, V = cfg.n_embd, cfg.n_layer, cfg.n_vocab
    head_rows = T if head_rows is None else head_rows
    dense = 2 * B * T * linear_params(cfg)
    attn = L * B * 4 * C * causal_pairs(T, P + T)  # all NH heads: NH * hs = C
    head = 2 * B * head_rows * C * V
    return dense + attn + head


def weight_bytes(cfg: GPT2Config, elt: int = F32) -> int:
    """Bytes of weights one decode step reads: everything but wpe, of which it reads a row.
    elt: bytes per element (4 for float32, 2 for bfloat16)."""
    return (cfg.n_params() - cfg.n_ctx * cfg.n_embd + cfg.n_embd) * elt


def kv_bytes(cfg: GPT2Config, B: int, ctx: int, elt: int = F32) -> int:
    """Bytes of keys and values a decode step reads at context `ctx` (keys it attends to)."""
    return 2 * cfg.n_layer * B * ctx * cfg.n_embd * elt


def decode_ceiling(cfg: GPT2Config, B: int, ctx: int, read_GBps: float, elt: int = F32) -> float:
    """tokens/s if a step took only the time to stream its weights and KV cache from memory."""
    return B * read_GBps * 1e9 / (weight_bytes(cfg, elt) + kv_bytes(cfg, B, ctx, elt))


def train_flops(cfg: GPT2Config, B: int, T: int, lora: bool) -> int:
    """A training step: forward over every position, then backward at 2x the forward (dx and
    dW), or about 1x with LoRA (dx only through the frozen weights; the adapters are tiny)."""
    fwd = forward_flops(cfg, B, T)
    return fwd * (2 if lora else 3)
