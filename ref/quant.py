"""Weight-only storage formats for inference: 16-bit floats and int8 blocks, in numpy.

The spec computes in float32. These formats store a weight in fewer bytes and are turned back
into float32 to compute: a batch-1 decode step reads every weight once, so its speed is bound
by the bytes it reads (fast/numba/quant.py has the kernels; this file is what they are tested
against). Activations, accumulation and the KV cache stay float32.

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
an integer costs at most d / 2; d is a / 127 rounded to float16 (relative error <= 2^-11), so
the largest element may need 127 * (1 + 2^-11) steps and be clipped to 127, costing up to
a * 2^-11 more: |w - dequant(w)| <= d / 2 + a * 2^-11 (tests/test_quant.py holds it). A block
of zeros has d = 0 and dequantizes to zeros exactly. Scales below float16's normal range
(a < 127 * 2^-14, about 0.0078) lose relative precision, as in llama.cpp; a block with
a > 127 * 65504 cannot be stored and is refused. K not a multiple of 32: the last block is
short (its scale covers the elements it has).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK = 32  # elements per q8_0 block (llama.cpp's QK8_0)
_Q8_MAX = 127.0 * 65504.0  # absmax / 127 must fit float16
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


def qlinear_forward(x: np.ndarray, q: QWeight, b: np.ndarray | None = None) -> np.ndarray:
    """The reference of a quantized linear layer: x (..., K) -> x @ dequantize(q).T + b,
    (..., N); float32 throughout (inference only: no cache, no backward)."""
    out = x.reshape(-1, x.shape[-1]) @ dequantize(q).T  # (rows, N)
    if b is not None:
        out += b
    return out.reshape(*x.shape[:-1], q.shape[0])
