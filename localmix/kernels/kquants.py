"""The K-quants: Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, in 256-element super-blocks.

A super-block holds 16 (or 8) sub-blocks; each gets its own scale (and min), and those are
quantized again against one FP16 super-scale. Without an importance matrix ggml runs
quantize_row_*_ref; with one it runs quantize_row_*_impl, which weights each element by its
importance times sqrt(sigma2 + x^2) and quantizes the sub-block scales with make_qp_quants.

Every row kernel has the signature `(x, qw, out)`: one float32 row, its importance weights
(an empty array for none) and the row's bytes to fill.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import (
    GROUP_MAX_EPS,
    QK_K,
    F,
    I,
    i8,
    jit,
    layout,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    put_f16,
    u8,
)

# Block layouts, as in ggml-common.h: each field's byte offset, then the block's size.
Q2_SC, Q2_QS, Q2_D, Q2_DMIN, Q2_BYTES = layout(T.Q2_K, ("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2))
Q3_HM, Q3_QS, Q3_SC, Q3_D, Q3_BYTES = layout(T.Q3_K, ("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2))
Q4_D, Q4_DMIN, Q4_SC, Q4_QS, Q4_BYTES = layout(T.Q4_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128))
Q5_D, Q5_DMIN, Q5_SC, Q5_QH, Q5_QS, Q5_BYTES = layout(T.Q5_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32),
                                                      ("qs", 128))
Q6_QL, Q6_QH, Q6_SC, Q6_D, Q6_BYTES = layout(T.Q6_K, ("ql", 128), ("qh", 64), ("scales", 16), ("d", 2))


@jit
def sum_squares(x):
    s = F(0.0)
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s


@jit
def pack_2bit(out, at, L):
    """Four 2-bit levels per byte, 32 bytes per 128 elements (Q2_K, Q3_K)."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            out[at + j // 4 + l] = u8(I(L[j + l]) | (I(L[j + l + 32]) << 2) | (I(L[j + l + 64]) << 4)
                                      | (I(L[j + l + 96]) << 6))


# ---------------------------------------------------------------- Q2_K

@jit
def _q2_K_finish(x, L, out, o, dm, mm):
    """Requantize with the stored (rounded) scales and mins, then pack."""
    for j in range(QK_K // 16):
        sc = I(out[o + Q2_SC + j])
        d = dm * F(sc & 0xF)
        if d == 0:
            continue
        m = mm * F(sc >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    pack_2bit(out, o + Q2_QS, L)


@jit
def quantize_row_q2_K(x, qw, out):
    L = np.empty(QK_K, dtype=np.uint8)
    Laux = np.empty(16, dtype=np.uint8)
    weight = np.empty(16, dtype=np.float32)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    mins = np.empty(QK_K // 16, dtype=np.float32)
    sw = np.empty(QK_K // 16, dtype=np.float32)
    for i in range(x.shape[0] // QK_K):
        xs = x[i * QK_K:(i + 1) * QK_K]
        if qw.shape[0] > 0:  # quantize_row_q2_K_impl
            sigma2 = sum_squares(xs) / F(QK_K)
            for j in range(QK_K // 16):
                for l in range(16):
                    weight[l] = qw[i * QK_K + 16 * j + l] * np.sqrt(sigma2 + xs[16 * j + l] * xs[16 * j + l])
                sw[j] = F(0.0)
                for l in range(16):
                    sw[j] += weight[l]
                scales[j], mins[j] = make_qkx3_quants(16, 3, xs[16 * j:], weight, L[16 * j:], Laux, F(-0.9),
                                                      F(0.05), 36, False)
        else:  # quantize_row_q2_K_ref
            for j in range(QK_K // 16):
                for l in range(16):
                    weight[l] = abs(xs[16 * j + l])
                scales[j], mins[j] = make_qkx2_quants(16, 3, xs[16 * j:], weight, L[16 * j:], Laux, F(-0.5),
                                                      F(0.1), 15, True)
        q2_K_store(xs, qw.shape[0] > 0, scales, mins, sw, L, out, i * Q2_BYTES)


@jit
def q2_K_store(xs, has_qw, scales, mins, sw, L, out, o):
    """A super-block's sub-block scales and mins, quantized and stored; then its levels."""
    if has_qw:  # quantize_row_q2_K_impl
        Ls = np.empty(QK_K // 16, dtype=np.uint8)
        Lm = np.empty(QK_K // 16, dtype=np.uint8)
        dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
        mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
        dm = put_f16(out, o + Q2_D, dm)
        mm = put_f16(out, o + Q2_DMIN, mm)
        for j in range(QK_K // 16):
            out[o + Q2_SC + j] = u8(I(Ls[j]) | (I(Lm[j]) << 4))
    else:  # quantize_row_q2_K_ref
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(QK_K // 16):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            iscale = F(15.0) / max_scale
            for j in range(QK_K // 16):
                out[o + Q2_SC + j] = u8(nearest_int(iscale * scales[j]))
            dm = put_f16(out, o + Q2_D, max_scale / F(15.0))
        else:
            for j in range(QK_K // 16):
                out[o + Q2_SC + j] = 0
            dm = put_f16(out, o + Q2_D, F(0.0))
        if max_min > 0:
            iscale = F(15.0) / max_min
            for j in range(QK_K // 16):
                out[o + Q2_SC + j] = u8(I(out[o + Q2_SC + j]) | (nearest_int(iscale * mins[j]) << 4))
            mm = put_f16(out, o + Q2_DMIN, max_min / F(15.0))
        else:
            mm = put_f16(out, o + Q2_DMIN, F(0.0))
    _q2_K_finish(xs, L, out, o, dm, mm)


# ---------------------------------------------------------------- Q3_K

@jit
def _q3_K_put_scale(out, at, j, l):
    """Sub-block j's 6-bit scale: low 4 bits in bytes 0-7, high 2 bits in bytes 8-11."""
    if j < 8:
        out[at + j] = l & 0xF
    else:
        out[at + j - 8] = u8(I(out[at + j - 8]) | ((l & 0xF) << 4))
    l >>= 4
    out[at + j % 4 + 8] = u8(I(out[at + j % 4 + 8]) | (l << (2 * (j // 4))))


@jit
def _q3_K_finish(x, L, out, o, dd):
    """Requantize with the stored scales, split off the high bits into hmask, pack the rest."""
    for j in range(QK_K // 16):
        if j < 8:
            sc = I(out[o + Q3_SC + j]) & 0xF
        else:
            sc = I(out[o + Q3_SC + j - 8]) >> 4
        sc = (sc | (((I(out[o + Q3_SC + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = dd * F(sc)
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for j in range(QK_K // 8):
        out[o + Q3_HM + j] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            out[o + Q3_HM + m] = u8(I(out[o + Q3_HM + m]) | hm)
            L[j] -= 4
        m += 1
        if m == QK_K // 8:
            m = 0
            hm <<= 1
    pack_2bit(out, o + Q3_QS, L)


@jit
def quantize_row_q3_K(x, qw, out):
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    weight = np.empty(16, dtype=np.float32)
    sw = np.empty(QK_K // 16, dtype=np.float32)
    for i in range(x.shape[0] // QK_K):
        xs = x[i * QK_K:(i + 1) * QK_K]
        if qw.shape[0] > 0:  # quantize_row_q3_K_impl
            sigma2 = F(2.0) * sum_squares(xs) / F(QK_K)
            for j in range(QK_K // 16):
                for l in range(16):
                    weight[l] = qw[i * QK_K + 16 * j + l] * np.sqrt(sigma2 + xs[16 * j + l] * xs[16 * j + l])
                sumw = F(0.0)
                for l in range(16):
                    sumw += weight[l]
                sw[j] = sumw
                scales[j] = make_qx_quants(16, 4, xs[16 * j:], L[16 * j:], 1, weight)
        else:  # quantize_row_q3_K_ref
            for j in range(QK_K // 16):
                scales[j] = make_q3_quants(16, 4, xs[16 * j:], L[16 * j:], True)
        o = i * Q3_BYTES
        _q3_K_finish(xs, L, out, o, q3_K_scales(qw.shape[0] > 0, scales, sw, out, o))


@jit
def q3_K_scales(has_qw, scales, sw, out, o):
    """A super-block's sub-block scales, quantized and stored; returns the super-scale (as stored)."""
    for j in range(12):
        out[o + Q3_SC + j] = 0
    if has_qw:  # quantize_row_q3_K_impl
        Ls = np.empty(QK_K // 16, dtype=np.int8)
        d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw)
        for j in range(QK_K // 16):
            _q3_K_put_scale(out, o + Q3_SC, j, I(Ls[j]))
        dd = put_f16(out, o + Q3_D, d_block)
    else:  # quantize_row_q3_K_ref
        max_scale = F(0.0)
        amax = F(0.0)
        for j in range(QK_K // 16):
            scale = abs(scales[j])
            if scale > amax:
                amax = scale
                max_scale = scales[j]
        if max_scale != 0:
            iscale = F(-32.0) / max_scale
            for j in range(QK_K // 16):
                l = i8(nearest_int(iscale * scales[j]))
                _q3_K_put_scale(out, o + Q3_SC, j, max(-32, min(31, l)) + 32)
            dd = put_f16(out, o + Q3_D, F(1.0) / iscale)
        else:
            dd = put_f16(out, o + Q3_D, F(0.0))
    return dd


# ---------------------------------------------------------------- Q4_K and Q5_K

@jit
def _put_scale_min_k4(out, at, j, ls, lm):
    """Sub-block j's 6-bit scale and min, packed into 12 bytes (ggml's get_scale_min_k4 reads them)."""
    if j < 4:
        out[at + j] = u8(ls)
        out[at + j + 4] = u8(lm)
    else:
        out[at + j + 4] = u8((ls & 0xF) | ((lm & 0xF) << 4))
        out[at + j - 4] = u8(I(out[at + j - 4]) | ((ls >> 4) << 6))
        out[at + j] = u8(I(out[at + j]) | ((lm >> 4) << 6))


@jit
def _get_scale_min_k4(j, out, at):
    if j < 4:
        return I(out[at + j]) & 63, I(out[at + j + 4]) & 63
    return ((I(out[at + j + 4]) & 0xF) | ((I(out[at + j - 4]) >> 6) << 4),
            (I(out[at + j + 4]) >> 4) | ((I(out[at + j]) >> 6) << 4))


@jit
def _qk_scales(x, qw, out, o, at_d, at_dmin, at_sc, nmax, L):
    """Sub-block scales and mins of a Q4_K/Q5_K super-block, stored; then requantize L with them."""
    Laux = np.empty(32, dtype=np.uint8)
    weights = np.empty(32, dtype=np.float32)
    scales = np.empty(QK_K // 32, dtype=np.float32)
    mins = np.empty(QK_K // 32, dtype=np.float32)
    sw = np.empty(QK_K // 32, dtype=np.float32)
    if qw.shape[0] > 0:  # quantize_row_q{4,5}_K_impl
        sigma2 = F(2.0) * sum_squares(x) / F(QK_K)
        for j in range(QK_K // 32):
            for l in range(32):
                weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l])
            sumw = F(0.0)
            for l in range(32):
                sumw += weights[l]
            sw[j] = sumw
            scales[j], mins[j] = make_qkx3_quants(32, nmax, x[32 * j:], weights, L[32 * j:], Laux, F(-0.9), F(0.05),
                                                  36, False)
    else:  # quantize_row_q{4,5}_K_ref
        for j in range(QK_K // 32):
            sum_x2 = F(0.0)
            for l in range(32):
                sum_x2 += x[32 * j + l] * x[32 * j + l]
            av_x = np.sqrt(sum_x2 / F(32.0))
            for l in range(32):
                weights[l] = av_x + abs(x[32 * j + l])
            if nmax == 15:
                scales[j], mins[j] = make_qkx2_quants(32, 15, x[32 * j:], weights, L[32 * j:], Laux, F(-1.0),
                                                      F(0.1), 20, False)
            else:
                scales[j], mins[j] = make_qkx2_quants(32, 31, x[32 * j:], weights, L[32 * j:], Laux, F(-0.5),
                                                      F(0.1), 15, False)
    qk_store(x, qw.shape[0] > 0, scales, mins, sw, out, o, at_d, at_dmin, at_sc, nmax, L)


@jit
def qk_store(x, has_qw, scales, mins, sw, out, o, at_d, at_dmin, at_sc, nmax, L):
    """The sub-block scales and mins quantized and stored; then requantize L with them."""
    if has_qw:  # quantize_row_q{4,5}_K_impl
        Ls = np.empty(QK_K // 32, dtype=np.uint8)
        Lm = np.empty(QK_K // 32, dtype=np.uint8)
        d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw)
        m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw)
        for j in range(QK_K // 32):
            ls = I(Ls[j])
            lm = I(Lm[j])
            if nmax == 31:  # only the Q5_K version clamps
                ls = min(63, ls)
                lm = min(63, lm)
            _put_scale_min_k4(out, o + at_sc, j, ls, lm)
        dd = put_f16(out, o + at_d, d_block)
        dmin = put_f16(out, o + at_dmin, m_block)
    else:  # quantize_row_q{4,5}_K_ref
        max_scale = F(0.0)
        max_min = F(0.0)
        for j in range(QK_K // 32):
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63.0) / max_scale if max_scale > 0 else F(0.0)
        inv_min = F(63.0) / max_min if max_min > 0 else F(0.0)
        for j in range(QK_K // 32):
            ls = min(63, u8(nearest_int(inv_scale * scales[j])))
            lm = min(63, u8(nearest_int(inv_min * mins[j])))
            _put_scale_min_k4(out, o + at_sc, j, ls, lm)
        dd = put_f16(out, o + at_d, max_scale / F(63.0))
        dmin = put_f16(out, o + at_dmin, max_min / F(63.0))
    for j in range(QK_K // 32):
        sc, m = _get_scale_min_k4(j, out, o + at_sc)
        d = dd * F(sc)
        if d == 0:
            continue
        dm = dmin * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(nmax, l))


@jit
def quantize_row_q4_K(x, qw, out):
    L = np.empty(QK_K, dtype=np.uint8)
    for i in range(x.shape[0] // QK_K):
        o = i * Q4_BYTES
        xs = x[i * QK_K:(i + 1) * QK_K]
        _qk_scales(xs, qw[i * QK_K:(i + 1) * QK_K], out, o, Q4_D, Q4_DMIN, Q4_SC, 15, L)
        q4_K_pack(L, out, o)


@jit
def q4_K_pack(L, out, o):
    for j in range(0, QK_K, 64):
        for l in range(32):
            out[o + Q4_QS + j // 2 + l] = u8(I(L[j + l]) | (I(L[j + l + 32]) << 4))


@jit
def quantize_row_q5_K(x, qw, out):
    L = np.empty(QK_K, dtype=np.uint8)
    for i in range(x.shape[0] // QK_K):
        o = i * Q5_BYTES
        xs = x[i * QK_K:(i + 1) * QK_K]
        _qk_scales(xs, qw[i * QK_K:(i + 1) * QK_K], out, o, Q5_D, Q5_DMIN, Q5_SC, 31, L)
        _q5_K_pack(L, out, o)


@jit
def _q5_K_pack(L, out, o):
    for j in range(32):
        out[o + Q5_QH + j] = 0
    m1 = 1
    m2 = 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = I(L[n + j])
            if l1 > 15:
                l1 -= 16
                out[o + Q5_QH + j] |= m1
            l2 = I(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                out[o + Q5_QH + j] |= m2
            out[o + Q5_QS + n // 2 + j] = u8(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2


# ---------------------------------------------------------------- Q6_K

@jit
def quantize_row_q6_K(x, qw, out):
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    for i in range(x.shape[0] // QK_K):
        xs = x[i * QK_K:(i + 1) * QK_K]
        for ib in range(QK_K // 16):
            # _impl passes the importance itself as the weights; _ref passes NULL (weights x^2)
            qwb = qw[i * QK_K + 16 * ib:i * QK_K + 16 * (ib + 1)]
            scales[ib] = make_qx_quants(16, 32, xs[16 * ib:], L[16 * ib:], 1, qwb)
        q6_K_store(xs, scales, L, out, i * Q6_BYTES)


@jit
def q6_K_store(xs, scales, L, out, o):
    """A super-block's sub-block scales, quantized and stored; then its levels."""
    max_scale = F(0.0)
    max_abs_scale = F(0.0)
    for ib in range(QK_K // 16):
        scale = scales[ib]
        if abs(scale) > max_abs_scale:
            max_abs_scale = abs(scale)
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        for j in range(Q6_BYTES):
            out[o + j] = 0
        put_f16(out, o + Q6_D, F(0.0))
        return
    iscale = F(-128.0) / max_scale
    dd = put_f16(out, o + Q6_D, F(1.0) / iscale)
    for ib in range(QK_K // 16):
        out[o + Q6_SC + ib] = u8(min(127, nearest_int(iscale * scales[ib])))
    for j in range(QK_K // 16):
        d = dd * F(i8(I(out[o + Q6_SC + j])))
        if d == 0:
            continue
        for ii in range(16):
            l = nearest_int(xs[16 * j + ii] / d)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for j in range(0, QK_K, 128):
        ql = o + Q6_QL + j // 2
        qh = o + Q6_QH + j // 4
        for l in range(32):
            q1, q2, q3, q4 = I(L[j + l]), I(L[j + l + 32]), I(L[j + l + 64]), I(L[j + l + 96])
            out[ql + l] = u8((q1 & 0xF) | ((q3 & 0xF) << 4))
            out[ql + l + 32] = u8((q2 & 0xF) | ((q4 & 0xF) << 4))
            out[qh + l] = u8((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6))


# One parallel driver per format: rows are independent, so prange shares them out.

@njit(cache=True, parallel=True, error_model="numpy")
def rows_q2_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q2_K(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q3_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q3_K(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_K(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_K(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q6_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q6_K(x[r], qw, out[r])


KERNELS = {  # type: (row kernel, parallel driver over rows)
    T.Q2_K: (quantize_row_q2_K, rows_q2_K),
    T.Q3_K: (quantize_row_q3_K, rows_q3_K),
    T.Q4_K: (quantize_row_q4_K, rows_q4_K),
    T.Q5_K: (quantize_row_q5_K, rows_q5_K),
    T.Q6_K: (quantize_row_q6_K, rows_q6_K),
}
