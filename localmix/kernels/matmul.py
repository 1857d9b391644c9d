"""Products of activations with GGML tensors, read straight from the tensor's bytes.

`matmul(x, w, qtype)`: x is float32 (T, K); w is a tensor's rows as stored in the GGUF, a
(N, row_nbytes(qtype, K)) uint8 view of the memory map for quantized types (read-only is
fine, and so is w[e] of a stacked (E, N, row_nbytes) expert tensor), or for the float types
what gguf.GGUFReader gives: float32 (N, K), float16 (N, K), BF16 as its raw bytes, uint8
(N, 2K) (uint16 (N, K) works too); the result is float32 (T, N), x @ W.T.

The quantized types run the integer kernels of dot.py (activations quantized to Q8_K or
Q8_0 first, as llama.cpp does: that costs a little accuracy, see tests/test_matmul.py).
Prefill (T > 1) unpacks each weight block once for all T rows (dot.py); decode (T = 1) meets
each sub-block's quants with the activation straight from the bytes (decode.py; the i-quants'
decode_iq.py). For the
legacy types and IQ4_NL, whose prefill kernel is still slow (see the benchmark), from PREFILL_BLAS_T
activation rows on, dequantize + numpy BLAS on the quantized activations is faster (quantized
all the same, so that the result does not depend on the batch size).

`matmul_ref` is the plain reference: dequantize the rows, multiply in float32;
`dot_ref.matmul` is the plain reading of the integer kernels.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QType

from . import decode, decode_iq, dot

FLOAT_TILE = 1024  # rows of a float16/BF16 tensor converted to float32 at a time
PREFILL_BLAS_T = 24  # legacy types: T from which dequantize + BLAS wins (bench_kernels.py, 2 threads)


def dequantize_rows(w: np.ndarray, qtype: QType) -> np.ndarray:
    """The rows of `w` as float32 (N, K)."""
    if qtype == QType.F32:
        return np.asarray(w, dtype=np.float32)
    if qtype == QType.BF16:
        return _bf16(w)
    return np.asarray(quants.dequantize(np.asarray(w), qtype), dtype=np.float32)


def matmul_ref(x: np.ndarray, w: np.ndarray, qtype: QType) -> np.ndarray:
    """x @ W.T with W dequantized first: the plain reading."""
    x = np.asarray(x, dtype=np.float32)
    return x @ dequantize_rows(w, qtype).T


def matmul(x: np.ndarray, w: np.ndarray, qtype: QType) -> np.ndarray:
    """x @ W.T from the stored bytes: float32 (T, N)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    assert x.ndim == 2, f"activations of shape {x.shape}, not (T, K)"
    if qtype == QType.F32:
        return x @ np.asarray(w, dtype=np.float32).T
    if qtype in (QType.F16, QType.BF16):
        convert = _bf16 if qtype == QType.BF16 else (lambda rows: rows.astype(np.float32))
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        for r in range(0, w.shape[0], FLOAT_TILE):
            out[:, r:r + FLOAT_TILE] = x @ convert(w[r:r + FLOAT_TILE]).T
        return out
    block, nbytes = GGML_QUANT_SIZES[qtype]
    n, k = w.shape[0], x.shape[1]
    w = np.asarray(w)  # a np.memmap is an ndarray for numba: same bytes, no copy
    assert w.dtype == np.uint8 and w.ndim == 2 and w.shape[1] == k // block * nbytes and k % block == 0, (
        f"{qtype.name} rows of shape {w.shape} {w.dtype} for activations of width {k}")
    if qtype in dot.SMALL and x.shape[0] >= PREFILL_BLAS_T:  # BLAS on the quantized activations
        xq, xd, xs = dot.quantize_activations(x, dot.QK, dot.QK)
        out = matmul_ref((xq.reshape(x.shape[0], -1, dot.QK) * xd[..., None]).reshape(x.shape), w, qtype)
        return out + _q8_1_sum_rounding(x, xd, xs, w, qtype)
    w = np.ascontiguousarray(w).reshape(n, k // block, nbytes)  # the blocks; no copy for rows as stored
    if qtype not in decode.TYPES and qtype not in decode_iq.TYPES:
        return matmul_ref(x, w, qtype)
    kquant = qtype in dot.SUPER
    xq, xd, xs = dot.quantize_activations(x, *((dot.QK_K, 16) if kquant else (dot.QK, dot.QK)))
    out = np.empty((x.shape[0], n), dtype=np.float32)
    if x.shape[0] == 1:
        (decode_iq if qtype in decode_iq.TYPES else decode).matvec(int(qtype), w, xq[0], xd[0], xs[0], out[0])
    else:
        (dot.kquant_matmul if kquant else dot.legacy_matmul)(int(qtype), w, xq, xd, xs, out)
    return out + _q8_1_sum_rounding(x, xd, xs, w, qtype) if qtype in _WITH_MIN else out


_WITH_MIN = (QType.Q4_1, QType.Q5_1)  # blocks d * q + m, met by Q8_1 activations


def _q8_1_sum_rounding(x: np.ndarray, xd: np.ndarray, xs: np.ndarray, w: np.ndarray, qtype: QType):
    """What ggml's Q8_1 activations add for Q4_1/Q5_1: a block's min m meets the activation
    block's sum s, which ggml keeps as a half float, fp16(amax / 127 * sum q) (quantize_row_q8_1),
    where the kernels use the exact xd * sum q. The difference, sum over blocks of m * (s - xd *
    sum q), is added here; on random tiny models it is what parts native logits from llama.cpp's."""
    if qtype not in _WITH_MIN:
        return np.float32(0.0)
    n_t, k = x.shape
    amax = np.abs(x.reshape(n_t, -1, dot.QK)).max(-1)
    s16 = (amax / np.float32(127.0) * xs.astype(np.float32)).astype(np.float16).astype(np.float32)
    blocks = np.ascontiguousarray(w).reshape(w.shape[0], k // dot.QK, -1)
    m = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, B): each block's min
    return (s16 - xd * xs.astype(np.float32)) @ m.T


def _bf16(w: np.ndarray) -> np.ndarray:
    """BF16 rows, as uint8 (N, 2K) raw bytes or uint16 (N, K) -> float32 (N, K)."""
    bits = np.ascontiguousarray(w).view(np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32)
