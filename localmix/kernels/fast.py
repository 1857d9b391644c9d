"""The fast path: the quantizers with their scale searches run 16 sub-blocks at once.

`quantize` runs these; `quantize_ref` runs the plain ports in kquants.py and legacy.py. They
write the same bytes: the searches (batched.py) keep C's float arithmetic lane by lane, and
everything around them (quantizing the scales, requantizing, packing) is the plain port's own
code, called here. Q8_0 and the legacy types without an importance matrix (closed forms, no search) use the
plain port as is.

Each super-block's (or a row's legacy blocks') values and weights are laid out transposed in
the scratch buffer, one lane per sub-block; Q4_K and Q5_K fill the 16 lanes from two
super-blocks (the second one's lanes repeat the first on the last, odd, super-block of a row,
and are thrown away), the legacy types from 16 blocks.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from . import kquants as K
from . import legacy as G
from .batched import FMIN, LB, NL, SCALE, SIZE, W, X, nint, q3_search, qkx_search, qx_search
from .common import QK_K, F, I, jit, put_f16, u8


@jit
def _scratch():
    return np.zeros(SIZE, dtype=np.float32)


@jit
def _sum_lanes(S, at, n, sums):
    """sums[j] = the lane's n values from `at` added in order (C's sequential sums)."""
    for j in range(NL):
        sums[j] = F(0.0)
    for i in range(n):
        for j in range(NL):
            sums[j] += S[at + i * NL + j]


# ---------------------------------------------------------------- Q2_K

@jit
def quantize_row_q2_K_fast(x, qw, out):
    S = _scratch()
    L = np.empty(QK_K, dtype=np.uint8)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    mins = np.empty(QK_K // 16, dtype=np.float32)
    sw = np.empty(QK_K // 16, dtype=np.float32)
    has_qw = qw.shape[0] > 0
    for b in range(x.shape[0] // QK_K):
        xs = x[b * QK_K:(b + 1) * QK_K]
        if has_qw:  # quantize_row_q2_K_impl
            sigma2 = K.sum_squares(xs) / F(QK_K)
            for j in range(NL):
                for i in range(16):
                    v = xs[16 * j + i]
                    S[X + i * NL + j] = v
                    S[W + i * NL + j] = qw[b * QK_K + 16 * j + i] * np.sqrt(sigma2 + v * v)
            _sum_lanes(S, W, 16, sw)
            qkx_search(S, 16, 3, F(-0.9), F(0.05), 36, False, True)
        else:  # quantize_row_q2_K_ref
            for j in range(NL):
                for i in range(16):
                    v = xs[16 * j + i]
                    S[X + i * NL + j] = v
                    S[W + i * NL + j] = abs(v)
            qkx_search(S, 16, 3, F(-0.5), F(0.1), 15, True, False)
        for j in range(NL):
            scales[j] = S[SCALE + j]
            mins[j] = S[FMIN + j]
            for i in range(16):
                L[16 * j + i] = np.uint8(S[LB + i * NL + j])
        K.q2_K_store(xs, has_qw, scales, mins, sw, L, out, b * K.Q2_BYTES)


# ---------------------------------------------------------------- Q3_K

@jit
def quantize_row_q3_K_fast(x, qw, out):
    S = _scratch()
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    sw = np.empty(QK_K // 16, dtype=np.float32)
    has_qw = qw.shape[0] > 0
    for b in range(x.shape[0] // QK_K):
        xs = x[b * QK_K:(b + 1) * QK_K]
        if has_qw:  # quantize_row_q3_K_impl
            sigma2 = F(2.0) * K.sum_squares(xs) / F(QK_K)
            for j in range(NL):
                for i in range(16):
                    v = xs[16 * j + i]
                    S[X + i * NL + j] = v
                    S[W + i * NL + j] = qw[b * QK_K + 16 * j + i] * np.sqrt(sigma2 + v * v)
            _sum_lanes(S, W, 16, sw)
            qx_search(S, 16, 4, True)
        else:  # quantize_row_q3_K_ref
            for j in range(NL):
                for i in range(16):
                    S[X + i * NL + j] = xs[16 * j + i]
            q3_search(S, 16, 4)
        for j in range(NL):
            scales[j] = S[SCALE + j]
            for i in range(16):
                L[16 * j + i] = np.int8(S[LB + i * NL + j])
        o = b * K.Q3_BYTES
        _q3_K_finish_fast(xs, L, out, o, K.q3_K_scales(has_qw, scales, sw, out, o))


@jit
def _q3_K_finish_fast(x, L, out, o, dd):
    """kquants._q3_K_finish without branches per element (levels are 0..7: bit 2 is the high bit)."""
    for j in range(QK_K // 16):
        if j < 8:
            sc = I(out[o + K.Q3_SC + j]) & 0xF
        else:
            sc = I(out[o + K.Q3_SC + j - 8]) >> 4
        sc = (sc | (((I(out[o + K.Q3_SC + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = dd * F(sc)
        if d == 0:
            continue
        for ii in range(16):
            l = nint(x[16 * j + ii] / d)
            l = F(3.0) if l > F(3.0) else l
            l = F(-4.0) if l < F(-4.0) else l
            L[16 * j + ii] = np.int8(l + F(4.0))
    for m in range(QK_K // 8):
        hm = 0
        for k in range(8):  # element 32*k + m: bit k of hmask[m]
            l = I(L[32 * k + m])
            hm |= (l >> 2) << k
            L[32 * k + m] = np.int8(l & 3)
        out[o + K.Q3_HM + m] = hm
    K.pack_2bit(out, o + K.Q3_QS, L)


# ---------------------------------------------------------------- Q4_K and Q5_K

@jit
def _qk_row_fast(x, qw, out, nbytes, at_d, at_dmin, at_sc, nmax):
    """Q4_K (nmax 15) or Q5_K (nmax 31) rows, two super-blocks per search."""
    S = _scratch()
    nb = x.shape[0] // QK_K
    L = np.empty(QK_K, dtype=np.uint8)
    scales = np.empty(QK_K // 32, dtype=np.float32)
    mins = np.empty(QK_K // 32, dtype=np.float32)
    sw = np.empty(QK_K // 32, dtype=np.float32)
    lane_sums = np.empty(NL, dtype=np.float32)
    has_qw = qw.shape[0] > 0
    for p in range(0, nb, 2):
        for h in range(2):
            b = min(p + h, nb - 1)
            xs = x[b * QK_K:(b + 1) * QK_K]
            sigma2 = F(2.0) * K.sum_squares(xs) / F(QK_K) if has_qw else F(0.0)
            for jj in range(QK_K // 32):
                j = 8 * h + jj
                for i in range(32):
                    v = xs[32 * jj + i]
                    S[X + i * NL + j] = v
                    if has_qw:  # quantize_row_q{4,5}_K_impl
                        S[W + i * NL + j] = qw[b * QK_K + 32 * jj + i] * np.sqrt(sigma2 + v * v)
        if has_qw:
            _sum_lanes(S, W, 32, lane_sums)
            qkx_search(S, 32, nmax, F(-0.9), F(0.05), 36, False, True)
        else:  # quantize_row_q{4,5}_K_ref
            for j in range(NL):
                lane_sums[j] = F(0.0)
            for i in range(32):
                for j in range(NL):
                    v = S[X + i * NL + j]
                    lane_sums[j] += v * v
            for j in range(NL):
                lane_sums[j] = np.sqrt(lane_sums[j] / F(32.0))  # av_x
            for i in range(32):
                for j in range(NL):
                    S[W + i * NL + j] = lane_sums[j] + abs(S[X + i * NL + j])
            if nmax == 15:
                qkx_search(S, 32, 15, F(-1.0), F(0.1), 20, False, False)
            else:
                qkx_search(S, 32, 31, F(-0.5), F(0.1), 15, False, False)
        for h in range(2):
            b = p + h
            if b >= nb:
                break
            for jj in range(QK_K // 32):
                j = 8 * h + jj
                scales[jj] = S[SCALE + j]
                mins[jj] = S[FMIN + j]
                sw[jj] = lane_sums[j]
                for i in range(32):
                    L[32 * jj + i] = np.uint8(S[LB + i * NL + j])
            o = b * nbytes
            K.qk_store(x[b * QK_K:(b + 1) * QK_K], has_qw, scales, mins, sw, out, o, at_d, at_dmin, at_sc, nmax, L)
            if nmax == 15:
                K.q4_K_pack(L, out, o)
            else:
                _q5_K_pack_fast(L, out, o)


@jit
def _q5_K_pack_fast(L, out, o):
    """kquants._q5_K_pack without branches (levels are 0..31: bit 4 is the high bit)."""
    for j in range(32):
        qh = 0
        for k in range(QK_K // 64):
            l1 = I(L[64 * k + j])
            l2 = I(L[64 * k + j + 32])
            qh |= ((l1 >> 4) << (2 * k)) | ((l2 >> 4) << (2 * k + 1))
            out[o + K.Q5_QS + 32 * k + j] = u8((l1 & 0xF) | ((l2 & 0xF) << 4))
        out[o + K.Q5_QH + j] = qh


@jit
def quantize_row_q4_K_fast(x, qw, out):
    _qk_row_fast(x, qw, out, K.Q4_BYTES, K.Q4_D, K.Q4_DMIN, K.Q4_SC, 15)


@jit
def quantize_row_q5_K_fast(x, qw, out):
    _qk_row_fast(x, qw, out, K.Q5_BYTES, K.Q5_D, K.Q5_DMIN, K.Q5_SC, 31)


# ---------------------------------------------------------------- Q6_K

@jit
def quantize_row_q6_K_fast(x, qw, out):
    S = _scratch()
    L = np.empty(QK_K, dtype=np.int8)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    has_qw = qw.shape[0] > 0  # _impl's weights are the importance itself; _ref's are x^2
    for b in range(x.shape[0] // QK_K):
        xs = x[b * QK_K:(b + 1) * QK_K]
        for j in range(NL):
            for i in range(16):
                S[X + i * NL + j] = xs[16 * j + i]
                if has_qw:
                    S[W + i * NL + j] = qw[b * QK_K + 16 * j + i]
        qx_search(S, 16, 32, has_qw)
        for j in range(NL):
            scales[j] = S[SCALE + j]
            for i in range(16):
                L[16 * j + i] = np.int8(S[LB + i * NL + j])
        K.q6_K_store(xs, scales, L, out, b * K.Q6_BYTES)


# ---------------------------------------------------------------- legacy types with an importance matrix

@jit
def _legacy_fill(S, x, qw, sigma2, g, nb):
    """Blocks g..g+15 of the row into the lanes (the row's last block again past its end), weighted as _impl does."""
    for j in range(NL):
        b = min(g + j, nb - 1)
        for i in range(G.QK):
            v = x[G.QK * b + i]
            S[X + i * NL + j] = v
            S[W + i * NL + j] = qw[G.QK * b + i] * np.sqrt(sigma2 + v * v)


@jit
def _legacy_levels(S, j, L):
    for i in range(G.QK):
        L[i] = np.int64(S[LB + i * NL + j])


@jit
def _q4_0_q5_0_fast(x, qw, out, nmax):
    """quantize_row_q4_0_impl (nmax 8) or quantize_row_q5_0_impl (nmax 16)."""
    S = _scratch()
    nb = x.shape[0] // G.QK
    L = np.empty(G.QK, dtype=np.int64)
    sigma2 = G.row_sigma2(x)
    for g in range(0, nb, NL):
        _legacy_fill(S, x, qw, sigma2, g, nb)
        qx_search(S, G.QK, nmax, True)
        for j in range(min(NL, nb - g)):
            _legacy_levels(S, j, L)
            if nmax == 8:
                o = (g + j) * G.Q4_0_BYTES
                put_f16(out, o + G.Q4_0_D, S[SCALE + j])
                G.put_nibbles(out, o + G.Q4_0_QS, L)
            else:
                o = (g + j) * G.Q5_0_BYTES
                put_f16(out, o + G.Q5_0_D, S[SCALE + j])
                G.put_5bit(out, o + G.Q5_0_QH, o + G.Q5_0_QS, L)


@jit
def _q4_1_q5_1_fast(x, qw, out, nmax):
    """quantize_row_q4_1_impl (nmax 15) or quantize_row_q5_1_impl (nmax 31)."""
    S = _scratch()
    nb = x.shape[0] // G.QK
    L = np.empty(G.QK, dtype=np.int64)
    sigma2 = G.row_sigma2(x)
    for g in range(0, nb, NL):
        _legacy_fill(S, x, qw, sigma2, g, nb)
        qkx_search(S, G.QK, nmax, F(-0.9), F(0.05), 36, False, True)
        for j in range(min(NL, nb - g)):
            _legacy_levels(S, j, L)
            if nmax == 15:
                o = (g + j) * G.Q4_1_BYTES
                put_f16(out, o + G.Q4_1_D, S[SCALE + j])
                put_f16(out, o + G.Q4_1_M, -S[FMIN + j])
                G.put_nibbles(out, o + G.Q4_1_QS, L)
            else:
                o = (g + j) * G.Q5_1_BYTES
                put_f16(out, o + G.Q5_1_D, S[SCALE + j])
                put_f16(out, o + G.Q5_1_M, -S[FMIN + j])
                G.put_5bit(out, o + G.Q5_1_QH, o + G.Q5_1_QS, L)


@jit
def quantize_row_q4_0_fast(x, qw, out):
    if qw.shape[0] > 0:
        _q4_0_q5_0_fast(x, qw, out, 8)
    else:
        G.quantize_row_q4_0(x, qw, out)


@jit
def quantize_row_q5_0_fast(x, qw, out):
    if qw.shape[0] > 0:
        _q4_0_q5_0_fast(x, qw, out, 16)
    else:
        G.quantize_row_q5_0(x, qw, out)


@jit
def quantize_row_q4_1_fast(x, qw, out):
    if qw.shape[0] > 0:
        _q4_1_q5_1_fast(x, qw, out, 15)
    else:
        G.quantize_row_q4_1(x, qw, out)


@jit
def quantize_row_q5_1_fast(x, qw, out):
    if qw.shape[0] > 0:
        _q4_1_q5_1_fast(x, qw, out, 31)
    else:
        G.quantize_row_q5_1(x, qw, out)


# One parallel driver per format: rows are independent, so prange shares them out.

@njit(cache=True, parallel=True, error_model="numpy")
def rows_q2_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q2_K_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q3_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q3_K_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_K_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_K_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q6_K(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q6_K_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_0_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_0(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_0_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q4_1(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q4_1_fast(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_q5_1(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_q5_1_fast(x[r], qw, out[r])


DRIVERS = {  # type: parallel driver over rows of the fast kernels
    T.Q2_K: rows_q2_K,
    T.Q3_K: rows_q3_K,
    T.Q4_K: rows_q4_K,
    T.Q5_K: rows_q5_K,
    T.Q6_K: rows_q6_K,
    T.Q4_0: rows_q4_0,
    T.Q5_0: rows_q5_0,
    T.Q4_1: rows_q4_1,
    T.Q5_1: rows_q5_1,
}
