"""Weight-only storage formats for inference: 16-bit floats and int8 blocks, in numpy.

The spec computes in float32. These formats store a weight in fewer bytes and are turned back
into float32 to compute: a batch-1 decode step reads every weight once, so its speed is bound
by the bytes it reads (fast/numba/quant.py has the kernels; this file is what they are tested
against). Accumulation and the KV cache stay float32; activations too, except for int8, which
rounds them to q8_0 blocks of their own (below).

Layout: a quantized weight is stored as (N, K) = (outputs, reduction), row-major, so the blocks
of the int8 format run along the reduction, as llama.cpp's q8_0 does (and as GGUF stores a
matrix: ne[0] = K is the contiguous axis). A model's (Cin, Cout) matrices are transposed into
it once, at load time; the tied LM head (wte, (V, C)) already is.

Formats (bytes per weight):
    float16   IEEE half, numpy's float16                                          2
    bfloat16  the top 16 bits of the float32, rounded to nearest even; uint16    2
    int8      q8_0: blocks of QK = 32 along K, w[n, k] = d[n, k // QK] * qs[n, k],
              qs int8 in [-127, 127], d = max|w| over the block / 127 in float16  34 / 32

q8_0 error bound, per element of a block with absmax a and stored scale d: rounding w / d to
an integer costs at most d / 2. d is a / 127 rounded to float16: within a relative 2^-11 of it
where that is a normal float16 (a >= 127 * 2^-14, about 0.0078), within 2^-25 absolutely below
(float16's subnormal step is 2^-24), so the largest element may need a little more than 127
steps and be clipped to 127, costing up to 127 |a / 127 - d| more:
    |w - dequant(w)| <= d / 2 + max(a * 2^-11, 127 * 2^-25)
(tests/test_quant.py holds it). A block of zeros has d = 0 and dequantizes to zeros exactly;
so does a block whose a / 127 rounds to a float16 zero (a <= 127 * 2^-25, the bound's second
term). Subnormal scales lose relative precision, as in llama.cpp; a block with
a > 127 * 65504 cannot be stored and is refused. K not a multiple of 32: the last block is
short (its scale covers the elements it has). Dequantization is exact in float32: qs has 8
bits and d 11 significant bits, so qs * d fits float32's 24.

float16 stores |w| <= 65504 (larger is refused, not turned into inf); bfloat16 has float32's
range, and rounds to 8 significant bits (relative error <= 2^-8, half a unit of the last
place); float16 to 11 (2^-11) in its normal range (|w| >= 2^-14), and to within 2^-25
absolutely below it.

int8 x int8: the int8 linear layer also rounds its input x to q8_0 blocks, per row, as
llama.cpp's q8_0 matmul does (`q8_0_activations`; NaN or Inf in a row makes that row NaN):
out = dequant(q8_0(x)) @ dequant(W).T. Each term is then an integer (two quants) times two
float16 scales, so a kernel can sum a block's 32 products exactly in integers and scale once
(fast/numba/quant.py: 64 multiply-adds per AVX-512 VNNI instruction against 16 float32 ones).
The cost is x's rounding, at most d_x / 2 per element, as for the weights; the accuracy is
measured on a trained model in tests/test_numba_quant.py.

A quantized model (`quantize_params`): the params tree of ref/model.py with every linear
weight `w` (Cin, Cout) replaced by a QWeight of w.T, (N, K) = (Cout, Cin), and the tied LM
head as a QWeight of wte (V, C) under the new key params["lm_head"]; biases, LayerNorms, wte
and wpe stay float32 arrays. wte stays because the embedding is a gather of B * T rows (a
decode step reads one row of it, not the matrix) and keeping it float32 leaves the embedding
op, and the first activations, exactly those of the float32 model; the head is the one read
of the whole matrix, so that is the one stored small. `params["blocks"][i]["attn"]["c_attn"]
["w"]` is then a QWeight; ref.lora.lora_linear_forward sends it to the backend's
`qlinear_forward(x, q, b)` (ref/model.py sends lm_head there too), and the reference backend's
is `qlinear_forward` below. Inference only: the backward of a QWeight is refused by name. A
reader of another format (GGUF) builds the same tree from its own tensors: QWeight("int8",
qs, d) from a q8_0 matrix, QWeight("float16" | "float32", data) from f16 / f32 ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # elements per q8_0 block (llama.cpp's QK8_0)
_F16_MAX = 65504.0  # float16's largest finite value
_Q8_MAX = 127.0 * _F16_MAX  # absmax / 127 must fit float16
DTYPES = ("float32", "bfloat16", "float16", "int8")
BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 34 / 32}


# ---------------------------------------------------------------------------------------------
# bfloat16: float32 with the low 16 bits of the significand dropped (rounded to nearest even)


def bf16_from_f32(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest, ties to even; NaN stays a NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))  # nearest even
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: keep a quiet NaN
        out[nan] = (bits[nan] >> 16).astype(np.uint16) | np.uint16(0x0040)
    return out


def f32_from_bf16(b: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------
# q8_0 blocks


def n_blocks(K: int) -> int:
    return -(-K // QK)


def q8_0_from_f32(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w (N, K) float32 -> (qs int8 (N, K), d float16 (N, ceil(K / 32))).

    d = absmax / 127 per block, rounded to float16; qs = round(w / d) with the float16 d, so
    dequantization uses the scale that is stored. Non-finite inputs are refused: a block's
    scale would be inf or NaN and take the block's 31 other weights with it.
    """
    w = np.asarray(w, np.float32)
    if w.ndim != 2:
        raise ValueError(f"q8_0 quantizes a matrix (N, K), got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("q8_0 cannot store NaN or Inf weights")
    if w.size and np.abs(w).max() > _Q8_MAX:
        raise ValueError(f"q8_0 cannot store weights beyond +-{_Q8_MAX:.4g} (its float16 scale)")
    N, K = w.shape
    nb = n_blocks(K)
    padded = np.zeros((N, nb * QK), np.float32)  # (N, nb*QK), the short block padded with 0
    padded[:, :K] = w
    blocks = padded.reshape(N, nb, QK)  # (N, nb, QK)
    d = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float16)  # (N, nb)
    d32 = d.astype(np.float32)[:, :, None]  # (N, nb, 1)
    inv = np.divide(1.0, d32, out=np.zeros_like(d32), where=d32 != 0)
    qs = np.clip(np.rint(blocks * inv), -127, 127).astype(np.int8)  # (N, nb, QK)
    return np.ascontiguousarray(qs.reshape(N, nb * QK)[:, :K]), d


def f32_from_q8_0(qs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(qs int8 (N, K), d float16 (N, nb)) -> w (N, K) float32."""
    N, K = qs.shape
    scale = np.repeat(d.astype(np.float32), QK, axis=1)[:, :K]  # (N, K)
    return qs.astype(np.float32) * scale


# ---------------------------------------------------------------------------------------------
# a stored weight


@dataclass(frozen=True)
class QWeight:
    """A weight (N, K) = (outputs, reduction) in one of DTYPES.

    float32/float16: `data` (N, K) of that dtype; bfloat16: `data` (N, K) uint16 bits;
    int8: `data` = qs int8 (N, K) and `scale` = d float16 (N, ceil(K / 32)).
    """

    dtype: str
    data: np.ndarray
    scale: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (0 if self.scale is None else self.scale.nbytes)


def quantize(w: np.ndarray, dtype: str) -> QWeight:
    """w (N, K) float32 -> QWeight in `dtype` (one of DTYPES)."""
    w = np.ascontiguousarray(w, np.float32)
    if dtype == "float32":
        return QWeight("float32", w)
    if dtype == "float16":
        if w.size and not (np.abs(w[np.isfinite(w)]) <= _F16_MAX).all():
            raise ValueError(f"float16 cannot store weights beyond +-{_F16_MAX:g}")
        return QWeight("float16", w.astype(np.float16))
    if dtype == "bfloat16":
        return QWeight("bfloat16", bf16_from_f32(w))
    if dtype == "int8":
        qs, d = q8_0_from_f32(w)
        return QWeight("int8", qs, d)
    raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def dequantize(q: QWeight) -> np.ndarray:
    """QWeight -> w (N, K) float32."""
    if q.dtype == "float32":
        return q.data
    if q.dtype == "float16":
        return q.data.astype(np.float32)
    if q.dtype == "bfloat16":
        return f32_from_bf16(q.data)
    if q.dtype == "int8":
        return f32_from_q8_0(q.data, q.scale)
    raise ValueError(f"unknown stored dtype {q.dtype!r}")


def q8_0_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activations x (M, K) float32 -> q8_0 blocks of each row, (qs int8 (M, K), d float16
    (M, nb)), as q8_0_from_f32 makes a weight's. A row holding NaN or Inf, or a value a float16
    scale cannot cover (|x| > 127 * 65504), gets quants 0 and scales NaN: every output of its row
    is NaN, as a NaN in x gives in float32 (there Inf gives +-Inf or NaN)."""
    x = np.asarray(x, np.float32)
    bad = ~(np.abs(x) <= _Q8_MAX).all(axis=1)  # (M,) NaN fails the comparison
    qs, d = q8_0_from_f32(np.where(bad[:, None], np.float32(0), x))
    d[bad] = np.nan
    return qs, d


def qlinear_forward(x: np.ndarray, q: QWeight, b: np.ndarray | None = None) -> np.ndarray:
    """The reference of a quantized linear layer: x (..., K) -> x @ dequantize(q).T + b,
    (..., N); float32 throughout (inference only: no cache, no backward). int8 rounds x to
    q8_0 blocks first (q8_0_activations), as llama.cpp's q8_0 product does: the product of the
    two dequantized operands, whose every term is an integer times two float16 scales."""
    x2 = x.reshape(-1, x.shape[-1])  # (rows, K)
    if q.dtype == "int8":
        x2 = f32_from_q8_0(*q8_0_activations(x2))
    out = x2 @ dequantize(q).T  # (rows, N)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], q.shape[0])


# ---------------------------------------------------------------------------------------------
# a quantized model: the params tree with QWeights (see the module docstring)

PROJECTIONS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def quantize_params(params: dict, dtype: str) -> dict:
    """A new params tree for inference in `dtype`: every block's projection weight (Cin, Cout)
    becomes quantize(w.T, dtype), (Cout, Cin), and params["lm_head"] = quantize(wte, dtype),
    (V, C). Everything else (biases, LayerNorms, wte, wpe, LoRA adapters) is shared, not
    copied. dtype "float32" gives QWeight("float32") leaves: the row-invariant kernels of the
    numba backend in float32 (the server's batch invariance)."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if is_quantized(params):
        raise ValueError("params are already quantized (their lm_head is a QWeight)")
    out = {k: v for k, v in params.items() if k != "blocks"}
    out["blocks"] = []
    for i, block in enumerate(params["blocks"]):
        new = {k: dict(v) for k, v in block.items()}  # new dicts, the same arrays
        for mod, proj in PROJECTIONS:
            p = dict(block[mod][proj])
            try:
                p["w"] = quantize(np.asarray(p["w"], np.float32).T, dtype)  # (Cout, Cin)
            except ValueError as e:
                raise ValueError(f"h{i}/{mod}/{proj}/w: {e}") from None
            new[mod][proj] = p
        out["blocks"].append(new)
    try:
        # the head: wte (tied), or the untied model's own lm_head
        out["lm_head"] = quantize(params.get("lm_head", params["wte"]), dtype)  # (V, C)
    except ValueError as e:
        raise ValueError(
            f"{'lm_head' if 'lm_head' in params else 'wte'} (the LM head): {e}"
        ) from None
    return out


def is_quantized(params: dict) -> bool:
    return isinstance(params.get("lm_head"), QWeight)  # a float32 one is an untied head


def params_dtype(params: dict) -> str:
    """The stored dtype of a params tree: its LM head's, or "float32" for a plain tree."""
    return params["lm_head"].dtype if is_quantized(params) else "float32"


def quantized_nbytes(params: dict) -> int:
    """Bytes of the QWeights of a quantized tree: what a decode step reads of its weights."""
    total = params["lm_head"].nbytes
    for block in params["blocks"]:
        for mod, proj in PROJECTIONS:
            total += block[mod][proj]["w"].nbytes
    return total
