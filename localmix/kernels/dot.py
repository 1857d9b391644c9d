"""The fast quantized products behind `matmul`: integer dot products over the stored blocks.

As llama.cpp does it (ggml_vec_dot_q4_K_q8_K and friends): the activations are quantized
once per call, to 8-bit integers with one float scale per 256 values (Q8_K) for the K-quants
or per 32 (Q8_0) for the legacy types, and every weight block meets them in an int16 x int16
-> int32 dot product that LLVM turns into vpmaddwd. The activations' integers are kept as
int16 (not int8) so the loop needs no sign extension: a third fewer instructions.

One weight block at a time, each row of the tensor:
  1. unpack: the block's quants into int16 `q`, already multiplied by their sub-block scale
     (every type fits: at most 63 * 31 for Q5_K), and the sub-block mins into int32 `m`,
     one per 16 values; the block's float super-scales are returned, (d, dmin).
  2. dot, for each of the T activation rows: d * sum(q * xq) - dmin * sum(m * xsum16), times
     the activation block's scale. The block is unpacked once for all T rows (prefill).
The K-quant value of element i is d * sc * q_i - dmin * mn; Q3_K and Q6_K have no min and
keep q signed. A legacy block is d * q_i (+ m for Q4_1/Q5_1, met by the activation block sum).
The i-quants have no min either: q_i is read through a table (IQ4's non-linear levels, IQ3's
and IQ2_S's grid points, signed), IQ4_NL goes with the legacy types (Q8_0 activations, as ggml's
ggml_vec_dot_iq4_nl_q8_0), IQ4_XS, IQ3_XXS, IQ3_S and IQ2_S with the K-quants (Q8_K).
Rows are shared among the threads in chunks (prange).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import fp32_to_fp16, nearest_int
from .iq2 import IQ2_S_D, IQ2_S_QH, IQ2_S_QS, IQ2_S_SC, IQ2_S_SIGNS
from .iqgrid import KSIGNS, iq2s_grid, iq3_grid
from .iquants import (
    IQ3_S_D,
    IQ3_S_QH,
    IQ3_S_QS,
    IQ3_S_SC,
    IQ3_S_SIGNS,
    IQ3_XXS_D,
    IQ3_XXS_QS,
    IQ3_XXS_SS,
    IQ4_NL_D,
    IQ4_NL_QS,
    IQ4_XS_D,
    IQ4_XS_QS,
    IQ4_XS_SH,
    IQ4_XS_SL,
    KVALUES_IQ4NL,
)
from .kquants import (
    Q2_D,
    Q2_DMIN,
    Q2_QS,
    Q2_SC,
    Q3_D,
    Q3_HM,
    Q3_QS,
    Q3_SC,
    Q4_D,
    Q4_DMIN,
    Q4_QS,
    Q4_SC,
    Q5_D,
    Q5_DMIN,
    Q5_QH,
    Q5_QS,
    Q5_SC,
    Q6_D,
    Q6_QH,
    Q6_QL,
    Q6_SC,
)
from .legacy import (
    Q4_0_D,
    Q4_0_QS,
    Q4_1_D,
    Q4_1_M,
    Q4_1_QS,
    Q5_0_D,
    Q5_0_QH,
    Q5_0_QS,
    Q5_1_D,
    Q5_1_M,
    Q5_1_QH,
    Q5_1_QS,
    Q8_0_D,
    Q8_0_QS,
)

F, I16, I32, I64 = np.float32, np.int16, np.int32, np.int64
QK_K, QK = 256, 32  # elements per K-quant super-block, per legacy block
KQUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
LEGACY = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0}
IQUANTS = {T.IQ4_NL, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_S}
SUPER = KQUANTS | {T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_S}  # 256-value blocks: Q8_K activations, kquant_matmul
SMALL = LEGACY | {T.IQ4_NL}  # 32-value blocks: Q8_0 activations, legacy_matmul
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = (int(t) for t in (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (int(t) for t in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0))
IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S, IQ2_S = (int(t) for t in (T.IQ4_NL, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_S))
KV = KVALUES_IQ4NL.astype(np.int16)
GRID_XXS = iq3_grid(T.IQ3_XXS).astype(np.int16)
GRID_S = iq3_grid(T.IQ3_S).astype(np.int16)
GRID_2S = iq2s_grid().astype(np.int16)
GROUP = 8  # legacy blocks unpacked at a time
ROWS_PER_TASK = 16  # rows of a tensor per prange task: scratch is allocated once per task

# GGML_FP16_TO_FP32 as a table, as ggml keeps one (ggml_table_f32_f16): 256 KiB, exact
FP16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

exact = njit(cache=True, error_model="numpy")  # the activation quantizer: the same floats as the numpy reference
inline = njit(cache=True, error_model="numpy", fastmath=True, inline="always")
parallel = njit(cache=True, error_model="numpy", fastmath=True, parallel=True)


@inline
def _f16(w, at):
    return FP16[I64(w[at]) | (I64(w[at + 1]) << 8)]


# ---------------------------------------------------------------- activations

@exact
def quantize_activations(x, block, span):
    """x float32 (T, K) -> (xq int16 (T, K) in [-127, 127], xd float32 (T, K // block),
    xs int32 (T, K // span)): x ~ xd * xq blockwise (Q8_K for block 256, Q8_0 for 32), xs the
    sums of xq over spans (Q8_K's bsums for span 16; Q8_1's block sums for span 32). The
    scales are ggml's to the bit (quantize_row_q8_K: 1 / (127 / amax) in float32;
    quantize_row_q8_0: amax / 127 rounded to float16): a scale one ulp off is enough to flip a
    rounding somewhere downstream and part a greedy continuation from llama.cpp's."""
    n_t, k = x.shape
    xq = np.zeros((n_t, k), dtype=np.int16)
    xd = np.zeros((n_t, k // block), dtype=np.float32)
    xs = np.zeros((n_t, k // span), dtype=np.int32)
    for t in range(n_t):
        for b in range(k // block):
            amax = F(0.0)
            for i in range(b * block, (b + 1) * block):
                amax = max(amax, abs(x[t, i]))
            if amax > 0 and amax < np.inf:  # all-zero (or non-finite) blocks stay zero
                iscale = F(127.0) / amax
                if block == QK_K:  # Q8_K keeps 1 / iscale as a float
                    xd[t, b] = F(1.0) / iscale
                else:  # Q8_0 keeps amax / 127 as a half float
                    xd[t, b] = FP16[fp32_to_fp16(amax / F(127.0))]
                for i in range(b * block, (b + 1) * block):
                    xq[t, i] = nearest_int(x[t, i] * iscale)
        for i in range(k):
            xs[t, i // span] += xq[t, i]
    return xq, xd, xs


# ---------------------------------------------------------------- K-quants: unpack one super-block at w[o:]

# Each loop over a block's bytes writes every value that byte holds, with constant shifts,
# so LLVM keeps the lanes 8 or 16 bits wide (a shift by a variable amount makes them 64).

@inline
def _q2_K(w, q, m):
    for i in range(16):  # sub-block i = 8n + 2j + h: scale in the low nibble, min in the high one
        m[i] = I32(w[Q2_SC + i] >> 4)
    for n in range(2):
        for h in range(2):
            at = Q2_SC + 8 * n + h  # scales of sub-blocks 8n + 2j + h
            s0, s1, s2, s3 = I16(w[at] & 15), I16(w[at + 2] & 15), I16(w[at + 4] & 15), I16(w[at + 6] & 15)
            for l in range(16):  # the four 2-bit planes of byte 32n + 16h + l: elements 128n + 32j + 16h + l
                v = w[Q2_QS + 32 * n + 16 * h + l]
                at = 128 * n + 16 * h + l
                q[at] = I16(v & 3) * s0
                q[at + 32] = I16((v >> 2) & 3) * s1
                q[at + 64] = I16((v >> 4) & 3) * s2
                q[at + 96] = I16(v >> 6) * s3
    return _f16(w, Q2_D), _f16(w, Q2_DMIN)


@inline
def _q3_K_scale(w, i):
    """Sub-block i's 6-bit scale, signed: low 4 bits in bytes 0-7, high 2 bits in bytes 8-11."""
    lo = (I64(w[Q3_SC + i]) & 15) if i < 8 else (I64(w[Q3_SC + i - 8]) >> 4)
    hi = (I64(w[Q3_SC + 8 + i % 4]) >> (2 * (i // 4))) & 3
    return I16(lo | (hi << 4)) - I16(32)


@inline
def _q3_K(w, q, m):
    for n in range(2):
        for h in range(2):
            i = 8 * n + h
            s0, s1, s2, s3 = _q3_K_scale(w, i), _q3_K_scale(w, i + 2), _q3_K_scale(w, i + 4), _q3_K_scale(w, i + 6)
            for l in range(16):  # as Q2_K, and hmask bit 4n + j of byte 16h + l: clear means -4
                v = w[Q3_QS + 32 * n + 16 * h + l]
                hb = w[Q3_HM + 16 * h + l] >> 4 if n == 1 else w[Q3_HM + 16 * h + l]
                at = 128 * n + 16 * h + l
                q[at] = (I16(v & 3) - I16(4) + I16((hb << 2) & 4)) * s0
                q[at + 32] = (I16((v >> 2) & 3) - I16(4) + I16((hb << 1) & 4)) * s1
                q[at + 64] = (I16((v >> 4) & 3) - I16(4) + I16(hb & 4)) * s2
                q[at + 96] = (I16(v >> 6) - I16(4) + I16((hb >> 1) & 4)) * s3
    return _f16(w, Q3_D), F(0.0)


@inline
def _scale_min_k4(w, at, j):
    """Sub-block j's 6-bit scale and min from the 12 packed bytes at w[at:] (get_scale_min_k4)."""
    if j < 4:
        return I16(w[at + j] & 63), I32(w[at + j + 4] & 63)
    return (I16((w[at + j + 4] & 15) | ((w[at + j - 4] >> 6) << 4)),
            I32((w[at + j + 4] >> 4) | ((w[at + j] >> 6) << 4)))


@inline
def _q4_K(w, q, m, five):
    """Q4_K, or Q5_K when `five`: sub-blocks 2j and 2j+1 share 32 bytes, low nibbles then high;
    Q5_K's fifth bits are bits 2j and 2j+1 of qh[l]."""
    sc_at, qs_at = (Q5_SC, Q5_QS) if five else (Q4_SC, Q4_QS)
    for j in range(4):
        s_lo, m_lo = _scale_min_k4(w, sc_at, 2 * j)
        s_hi, m_hi = _scale_min_k4(w, sc_at, 2 * j + 1)
        m[4 * j] = m_lo
        m[4 * j + 1] = m_lo
        m[4 * j + 2] = m_hi
        m[4 * j + 3] = m_hi
        bit = 1 << (2 * j)
        for l in range(32):
            v = w[qs_at + 32 * j + l]
            lo = I16(v & 15)
            hi = I16(v >> 4)
            if five:
                lo += I16(16) if w[Q5_QH + l] & bit else I16(0)
                hi += I16(16) if w[Q5_QH + l] & (bit << 1) else I16(0)
            q[64 * j + l] = lo * s_lo
            q[64 * j + 32 + l] = hi * s_hi
    if five:
        return _f16(w, Q5_D), _f16(w, Q5_DMIN)
    return _f16(w, Q4_D), _f16(w, Q4_DMIN)


@inline
def _q6_K(w, q, m):
    for n in range(2):
        for h in range(2):
            sc = w[Q6_SC + 8 * n + h:Q6_SC + 8 * n + h + 7:2].view(np.int8)
            s0, s1, s2, s3 = I16(sc[0]), I16(sc[1]), I16(sc[2]), I16(sc[3])
            for l in range(16 * h, 16 * h + 16):  # ql bytes l and l + 32 (both nibbles), qh byte l (four 2-bit planes)
                a = w[Q6_QL + 64 * n + l]
                b = w[Q6_QL + 64 * n + 32 + l]
                hb = w[Q6_QH + 32 * n + l]
                at = 128 * n + l
                q[at] = (I16((a & 15) | ((hb & 3) << 4)) - I16(32)) * s0
                q[at + 32] = (I16((b & 15) | (((hb >> 2) & 3) << 4)) - I16(32)) * s1
                q[at + 64] = (I16((a >> 4) | (((hb >> 4) & 3) << 4)) - I16(32)) * s2
                q[at + 96] = (I16((b >> 4) | ((hb >> 6) << 4)) - I16(32)) * s3
    return _f16(w, Q6_D), F(0.0)


@inline
def _iq4_xs(w, q):
    """Sub-block ib: 16 bytes, low nibbles then high, each an index into KV; a 6-bit scale
    (low 4 bits in scales_l, high 2 in scales_h), minus 32."""
    h = I64(w[IQ4_XS_SH]) | (I64(w[IQ4_XS_SH + 1]) << 8)
    for ib in range(8):
        ls = I16(((I64(w[IQ4_XS_SL + ib // 2]) >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4)) - I16(32)
        for j in range(16):
            v = w[IQ4_XS_QS + 16 * ib + j]
            q[32 * ib + j] = KV[v & 15] * ls
            q[32 * ib + 16 + j] = KV[v >> 4] * ls
    return _f16(w, IQ4_XS_D), F(0.0)


@inline
def _iq3_xxs(w, q):
    """Sub-block ib: eight grid points (bytes 8ib..8ib+7), then a 32-bit word of 4 x 7 sign
    bits (KSIGNS adds the eighth) and the 4-bit scale l on top: 2l + 1, with d / 4."""
    for ib in range(8):
        at = IQ3_XXS_SS + 4 * ib
        aux = I64(w[at]) | (I64(w[at + 1]) << 8) | (I64(w[at + 2]) << 16) | (I64(w[at + 3]) << 24)
        sc = I16(2 * (aux >> 28) + 1)
        for l in range(4):
            signs = KSIGNS[(aux >> (7 * l)) & 127]
            for h in range(2):
                g = w[IQ3_XXS_QS + 8 * ib + 2 * l + h]
                for j in range(4):
                    v = GRID_XXS[g, j] * sc
                    q[32 * ib + 8 * l + 4 * h + j] = -v if (signs >> (4 * h + j)) & 1 else v
    return _f16(w, IQ3_XXS_D) * F(0.25), F(0.0)


@inline
def _iq3_s(w, q):
    """Sub-block ib: eight 9-bit grid points (a byte of qs, bit k of qh[ib]), 32 sign bits,
    the 4-bit scale l (nibbles of scales): 2l + 1."""
    for ib in range(8):
        sc = I16(2 * ((I64(w[IQ3_S_SC + ib // 2]) >> (4 * (ib % 2))) & 15) + 1)
        qh = I64(w[IQ3_S_QH + ib])
        for k in range(8):
            g = I64(w[IQ3_S_QS + 8 * ib + k]) | (((qh >> k) & 1) << 8)
            sg = w[IQ3_S_SIGNS + 4 * ib + k // 2]
            for j in range(4):
                v = GRID_S[g, j] * sc
                q[32 * ib + 4 * k + j] = -v if (sg >> (4 * (k % 2) + j)) & 1 else v
    return _f16(w, IQ3_S_D), F(0.0)


@inline
def _iq2_s(w, q):
    """Sub-block ib of 16: two grid points, the low bytes of their 10-bit indices at qs[2ib + k]
    and the top 2 bits in qh, 8 sign bits each at signs[2ib + k]; the 4-bit scale l (nibbles of
    scales): 2l + 1, with d / 8."""
    for ib in range(16):
        sc = I16(2 * ((I64(w[IQ2_S_SC + ib // 2]) >> (4 * (ib % 2))) & 15) + 1)
        for k in range(2):
            i8 = 2 * ib + k
            g = I64(w[IQ2_S_QS + i8]) | (((I64(w[IQ2_S_QH + i8 // 4]) >> (2 * (i8 % 4))) & 3) << 8)
            sg = w[IQ2_S_SIGNS + i8]
            for j in range(8):
                v = GRID_2S[g, j] * sc
                q[16 * ib + 8 * k + j] = -v if (sg >> j) & 1 else v
    return _f16(w, IQ2_S_D) * F(0.125), F(0.0)


@inline
def _unpack_k(kind, w, q, m):
    if kind == IQ2_S:
        return _iq2_s(w, q)
    if kind == IQ4_XS:
        return _iq4_xs(w, q)
    if kind == IQ3_XXS:
        return _iq3_xxs(w, q)
    if kind == IQ3_S:
        return _iq3_s(w, q)
    if kind == Q2_K:
        return _q2_K(w, q, m)
    if kind == Q3_K:
        return _q3_K(w, q, m)
    if kind == Q4_K or kind == Q5_K:
        return _q4_K(w, q, m, kind == Q5_K)
    return _q6_K(w, q, m)


@parallel
def kquant_matmul(kind, w, xq, xd, xs, out):
    """out (T, N) = the K-quant (or IQ4_XS/IQ3/IQ2_S) rows w, as blocks (N, K // 256, block bytes),
    times the Q8_K activations (xq, xd, xs)."""
    n_t, k = xq.shape
    n = w.shape[0]
    has_min = kind == Q2_K or kind == Q4_K or kind == Q5_K
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        q = np.empty(QK_K, dtype=np.int16)
        m = np.zeros(16, dtype=np.int32)
        acc = np.empty(n_t, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for b in range(k // QK_K):
                d, dmin = _unpack_k(kind, w[r, b], q, m)
                for t in range(n_t):
                    s = I32(0)
                    for i in range(QK_K):
                        s = I32(s + I32(q[i]) * I32(xq[t, b * QK_K + i]))
                    v = d * F(s)
                    if has_min:
                        s = I32(0)
                        for i in range(16):
                            s = I32(s + m[i] * xs[t, b * 16 + i])
                        v -= dmin * F(s)
                    acc[t] += xd[t, b] * v
            for t in range(n_t):
                out[t, r] = acc[t]


# ---------------------------------------------------------------- legacy: unpack one block at w[o:]

@inline
def _qh(w, at):
    return I64(w[at]) | (I64(w[at + 1]) << 8) | (I64(w[at + 2]) << 16) | (I64(w[at + 3]) << 24)


@inline
def _unpack_legacy(kind, w, q):
    """The block's quants into q; returns (d, m): the value of quant q_i is d * q_i + m."""
    if kind == IQ4_NL:
        for l in range(16):  # low nibbles are elements 0-15, high nibbles 16-31; indices into KV
            v = w[IQ4_NL_QS + l]
            q[l] = KV[v & 15]
            q[l + 16] = KV[v >> 4]
        return _f16(w, IQ4_NL_D), F(0.0)
    if kind == Q8_0:
        for l in range(QK):
            q[l] = I16(np.int8(w[Q8_0_QS + l]))
        return _f16(w, Q8_0_D), F(0.0)
    if kind == Q4_0 or kind == Q4_1:
        at = (Q4_0_QS if kind == Q4_0 else Q4_1_QS)
        off = I16(8) if kind == Q4_0 else I16(0)
        for l in range(16):  # low nibbles are elements 0-15, high nibbles 16-31
            q[l] = I16(w[at + l] & 15) - off
            q[l + 16] = I16(w[at + l] >> 4) - off
        if kind == Q4_0:
            return _f16(w, Q4_0_D), F(0.0)
        return _f16(w, Q4_1_D), _f16(w, Q4_1_M)
    at = (Q5_0_QS if kind == Q5_0 else Q5_1_QS)
    qh = _qh(w, (Q5_0_QH if kind == Q5_0 else Q5_1_QH))  # bit i: element i's fifth bit
    off = I16(16) if kind == Q5_0 else I16(0)
    for l in range(16):
        q[l] = I16((w[at + l] & 15) | (((qh >> l) & 1) << 4)) - off
        q[l + 16] = I16((w[at + l] >> 4) | (((qh >> (l + 16)) & 1) << 4)) - off
    if kind == Q5_0:
        return _f16(w, Q5_0_D), F(0.0)
    return _f16(w, Q5_1_D), _f16(w, Q5_1_M)


@parallel
def legacy_matmul(kind, w, xq, xd, xs, out):
    """out (T, N) = the legacy (or IQ4_NL) rows w, as blocks (N, K // 32, block bytes), times
    the Q8_0 activations (xq, xd, xs)."""
    n_t, k = xq.shape
    n = w.shape[0]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        q = np.empty(GROUP * QK, dtype=np.int16)
        d = np.empty(GROUP, dtype=np.float32)
        mn = np.empty(GROUP, dtype=np.float32)
        acc = np.empty(n_t, dtype=np.float32)
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for b0 in range(0, k // QK, GROUP):  # GROUP blocks unpacked at a time, then their dots
                nb = min(GROUP, k // QK - b0)
                for j in range(nb):
                    d[j], mn[j] = _unpack_legacy(kind, w[r, b0 + j], q[j * QK:(j + 1) * QK])
                for t in range(n_t):
                    v = F(0.0)
                    for j in range(nb):
                        s = I32(0)
                        for i in range(QK):
                            s = I32(s + I32(q[j * QK + i]) * I32(xq[t, (b0 + j) * QK + i]))
                        v += xd[t, b0 + j] * (d[j] * F(s) + mn[j] * F(xs[t, b0 + j]))
                    acc[t] += v
            for t in range(n_t):
                out[t, r] = acc[t]
