"""The legacy 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Without an importance matrix ggml quantizes each block in closed form (quantize_row_*_ref);
with one it searches the scale (quantize_row_*_impl, which weights each element by its
importance times sqrt(sigma2 + x^2)). Q8_0 ignores the importance matrix, as ggml does.

Every row kernel has the signature `(x, qw, out)`: one float32 row, its importance weights
(an empty array for none) and the row's bytes to fill.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import F, I, f32_to_int, i8, jit, layout, make_qkx3_quants, make_qx_quants, put_f16, roundf, u8

QK = 32  # elements per block
FLT_MAX = np.finfo(np.float32).max

# Block layouts, as in ggml-common.h: each field's byte offset, then the block's size.
Q4_0_D, Q4_0_QS, Q4_0_BYTES = layout(T.Q4_0, ("d", 2), ("qs", 16))
Q4_1_D, Q4_1_M, Q4_1_QS, Q4_1_BYTES = layout(T.Q4_1, ("d", 2), ("m", 2), ("qs", 16))
Q5_0_D, Q5_0_QH, Q5_0_QS, Q5_0_BYTES = layout(T.Q5_0, ("d", 2), ("qh", 4), ("qs", 16))
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS, Q5_1_BYTES = layout(T.Q5_1, ("d", 2), ("m", 2), ("qh", 4), ("qs", 16))
Q8_0_D, Q8_0_QS, Q8_0_BYTES = layout(T.Q8_0, ("d", 2), ("qs", 32))


@jit
def _abs_max(xb):
    """The signed value of the (first) largest magnitude."""
    amax = F(0.0)
    vmax = F(0.0)
    for j in range(QK):
        if amax < abs(xb[j]):
            amax = abs(xb[j])
            vmax = xb[j]
    return vmax


@jit
def _min_max(xb):
    vmin = FLT_MAX
    vmax = -FLT_MAX
    for j in range(QK):
        if xb[j] < vmin:
            vmin = xb[j]
        if xb[j] > vmax:
            vmax = xb[j]
    return vmin, vmax


@jit
def row_sigma2(x):
    """Mean square of the whole row: the _impl functions' sigma2."""
    sum_x2 = F(0.0)
    for j in range(x.shape[0]):
        sum_x2 += x[j] * x[j]
    return sum_x2 / F(x.shape[0])


@jit
def _importance(xb, qwb, sigma2, weight):
    for j in range(QK):
        weight[j] = qwb[j] * np.sqrt(sigma2 + xb[j] * xb[j])


@jit
def put_nibbles(out, at, L):
    for j in range(QK // 2):
        out[at + j] = u8(I(L[j]) | (I(L[j + QK // 2]) << 4))


@jit
def put_5bit(out, at_qh, at_qs, L):
    """Low nibbles in qs, the fifth bits in the 32-bit little-endian qh."""
    qh = 0
    for j in range(QK // 2):
        l0 = I(L[j])
        l1 = I(L[j + QK // 2])
        out[at_qs + j] = (l0 & 0x0F) | ((l1 & 0x0F) << 4)
        qh |= ((l0 & 0x10) >> 4) << j
        qh |= ((l1 & 0x10) >> 4) << (j + QK // 2)
    for b in range(4):
        out[at_qh + b] = (qh >> (8 * b)) & 0xFF


@jit
def quantize_row_q4_0(x, qw, out):
    nb = x.shape[0] // QK
    L = np.empty(QK, dtype=np.int64)
    Li = np.empty(QK, dtype=np.int8)  # make_qx_quants' int8_t levels
    weight = np.empty(QK, dtype=np.float32)
    sigma2 = row_sigma2(x) if qw.shape[0] > 0 else F(0.0)
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * Q4_0_BYTES
        if qw.shape[0] > 0:  # quantize_row_q4_0_impl
            _importance(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
            put_f16(out, o + Q4_0_D, make_qx_quants(QK, 8, xb, Li, 1, weight))
            for j in range(QK):
                L[j] = Li[j]
        else:  # quantize_row_q4_0_ref
            vmax = _abs_max(xb)
            d = vmax / F(-8.0)
            iscale = F(1.0) / d if d != 0 else F(0.0)
            put_f16(out, o + Q4_0_D, d)
            for j in range(QK):
                L[j] = u8(min(15, i8(f32_to_int(xb[j] * iscale + F(8.5)))))
        put_nibbles(out, o + Q4_0_QS, L)


@jit
def quantize_row_q4_1(x, qw, out):
    nb = x.shape[0] // QK
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    sigma2 = row_sigma2(x) if qw.shape[0] > 0 else F(0.0)
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * Q4_1_BYTES
        if qw.shape[0] > 0:  # quantize_row_q4_1_impl
            _importance(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
            d, the_min = make_qkx3_quants(QK, 15, xb, weight, L, Laux, F(-0.9), F(0.05), 36, False)
            put_f16(out, o + Q4_1_D, d)
            put_f16(out, o + Q4_1_M, -the_min)
        else:  # quantize_row_q4_1_ref
            vmin, vmax = _min_max(xb)
            d = (vmax - vmin) / F(15.0)
            iscale = F(1.0) / d if d != 0 else F(0.0)
            put_f16(out, o + Q4_1_D, d)
            put_f16(out, o + Q4_1_M, vmin)
            for j in range(QK):
                L[j] = u8(min(15, i8(f32_to_int((xb[j] - vmin) * iscale + F(0.5)))))
        put_nibbles(out, o + Q4_1_QS, L)


@jit
def quantize_row_q5_0(x, qw, out):
    nb = x.shape[0] // QK
    L = np.empty(QK, dtype=np.int64)
    Li = np.empty(QK, dtype=np.int8)  # make_qx_quants' int8_t levels
    weight = np.empty(QK, dtype=np.float32)
    sigma2 = row_sigma2(x) if qw.shape[0] > 0 else F(0.0)
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * Q5_0_BYTES
        if qw.shape[0] > 0:  # quantize_row_q5_0_impl
            _importance(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
            put_f16(out, o + Q5_0_D, make_qx_quants(QK, 16, xb, Li, 1, weight))
            for j in range(QK):
                L[j] = Li[j]
        else:  # quantize_row_q5_0_ref
            vmax = _abs_max(xb)
            d = vmax / F(-16.0)
            iscale = F(1.0) / d if d != 0 else F(0.0)
            put_f16(out, o + Q5_0_D, d)
            for j in range(QK):
                L[j] = u8(min(31, i8(f32_to_int(xb[j] * iscale + F(16.5)))))
        put_5bit(out, o + Q5_0_QH, o + Q5_0_QS, L)


@jit
def quantize_row_q5_1(x, qw, out):
    nb = x.shape[0] // QK
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    weight = np.empty(QK, dtype=np.float32)
    sigma2 = row_sigma2(x) if qw.shape[0] > 0 else F(0.0)
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * Q5_1_BYTES
        if qw.shape[0] > 0:  # quantize_row_q5_1_impl
            _importance(xb, qw[ib * QK:(ib + 1) * QK], sigma2, weight)
            d, the_min = make_qkx3_quants(QK, 31, xb, weight, L, Laux, F(-0.9), F(0.05), 36, False)
            put_f16(out, o + Q5_1_D, d)
            put_f16(out, o + Q5_1_M, -the_min)
        else:  # quantize_row_q5_1_ref
            vmin, vmax = _min_max(xb)
            d = (vmax - vmin) / F(31.0)
            iscale = F(1.0) / d if d != 0 else F(0.0)
            put_f16(out, o + Q5_1_D, d)
            put_f16(out, o + Q5_1_M, vmin)
            for j in range(QK):
                L[j] = u8(f32_to_int((xb[j] - vmin) * iscale + F(0.5)))
        put_5bit(out, o + Q5_1_QH, o + Q5_1_QS, L)


@jit
def quantize_row_q8_0(x, qw, out):
    nb = x.shape[0] // QK
    for ib in range(nb):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * Q8_0_BYTES
        amax = F(0.0)
        for j in range(QK):
            amax = amax if amax > abs(xb[j]) else abs(xb[j])  # C's MAX(amax, fabsf(v))
        d = amax / F(127.0)
        iscale = F(1.0) / d if d != 0 else F(0.0)
        put_f16(out, o + Q8_0_D, d)
        for j in range(QK):
            out[o + Q8_0_QS + j] = u8(f32_to_int(roundf(xb[j] * iscale)))


# One parallel driver per format: rows are independent, so prange shares them out.

@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_0(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_1(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_1(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_0(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_1(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_1(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q8_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q8_0(x[r], qw, out[r])


KERNELS = {  # type: (row kernel, parallel driver over rows)
    T.Q4_0: (quantize_row_q4_0, rows_q4_0),
    T.Q4_1: (quantize_row_q4_1, rows_q4_1),
    T.Q5_0: (quantize_row_q5_0, rows_q5_0),
    T.Q5_1: (quantize_row_q5_1, rows_q5_1),
    T.Q8_0: (quantize_row_q8_0, rows_q8_0),
}
