"""The decode products: one activation row (T = 1) times a K-quant or legacy tensor, from its bytes.

The same integers as dot.py's kernels (the activations quantized to Q8_K or Q8_0 by
`dot.quantize_activations`, the same block decomposition, so `dot_ref.matmul` is the plain
reading of both), arranged for one row the way ggml_vec_dot_q4_K_q8_K and its siblings
arrange it: no scratch. Each sub-block's raw quants meet the activations in one integer
reduction that LLVM turns into vpmaddwd lanes,

    sum_s sc_s * sum_{i in s} q_i * xq_i        (q_i the stored unsigned quant)

and the offsets that make q signed (Q3_K's -4, Q6_K's -32, Q4_0's -8, ...) or the mins of
Q2_K/Q4_K/Q5_K come from the activation sums xs, as llama.cpp's `q8sums` do. Each reduction
is written `s = I32(s + I32(a) * I32(b))`: numba types integer arithmetic as int64, and the
explicit truncation every step is what lets LLVM keep the lanes 16 and 32 bits wide.

Rows are shared among the threads in chunks (prange). `matvec(kind, w, xq, xd, xs, out)`:
w the tensor's blocks (N, blocks per row, block bytes), xq/xd/xs one row's activation quants,
out float32 (N,). The i-quants' bodies and drivers are decode_iq.py's, built on `ahead` (the
prefetch) and `f16` from here.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding, ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .dot import (
    FP16,
    I32,
    I64,
    KQUANTS,
    LEGACY,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_K,
    Q6_K,
    Q8_0,
    QK,
    ROWS_PER_TASK,
    F,
    inline,
    parallel,
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

TYPES = frozenset(KQUANTS | LEGACY)  # the i-quants' decode products are decode_iq.py's
AHEAD = 2048  # bytes: how far ahead of the block being read the next are asked for
# the intrinsic's name mangles its pointer type: opaque `ptr` from LLVM 15, `i8*` before (numba 0.60)
_PREFETCH = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, offset):
    """Ask the cache for the line holding byte `offset` of C-contiguous `arr` (llvm.prefetch:
    read, keep). A hint: it never faults, so offsets past the end are harmless."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p = ir.IntType(8).as_pointer()
        at = builder.gep(builder.bitcast(data, i8p), [context.cast(builder, args[1], signature.args[1], types.intp)])
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            _PREFETCH)
        builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.void(arr, offset), codegen


@inline
def ahead(w, r, b, nb):
    """Prefetch the bytes AHEAD past block b of row r. The hardware prefetcher stops at each
    4 KiB page of the mapping; asking ahead took Q4_K from 8.7 to 13.5 GB/s from memory, about
    what a plain sum of the bytes reaches on this machine."""
    size = w.shape[2]
    at = (r * nb + b) * size + AHEAD
    for o in range(0, size, 64):
        _prefetch(w, at + o)


@inline
def f16(w, r, b, at):
    """The half float at byte `at` of block b of row r, through ggml's table."""
    return FP16[I64(w[r, b, at]) | (I64(w[r, b, at + 1]) << 8)]


# ---------------------------------------------------------------- K-quants: one super-block, sum_i q_i * xq_i * (its scales)

@inline
def _scale_min_k4(w, r, b, at, j):
    """Q4_K/Q5_K sub-block j's 6-bit scale and min from the 12 bytes at `at` (get_scale_min_k4)."""
    if j < 4:
        return I32(w[r, b, at + j] & 63), I32(w[r, b, at + j + 4] & 63)
    return (I32((w[r, b, at + j + 4] & 15) | ((w[r, b, at + j - 4] >> 6) << 4)),
            I32((w[r, b, at + j + 4] >> 4) | ((w[r, b, at + j] >> 6) << 4)))


@inline
def _q4_K(w, r, b, xq, xd, xs, five):
    """Q4_K, or Q5_K when `five`: 32 bytes hold sub-blocks 2j (low nibbles) and 2j + 1 (high);
    Q5_K's fifth bits are bits 2j and 2j + 1 of qh[l]."""
    sc_at, qs_at = (Q5_SC, Q5_QS) if five else (Q4_SC, Q4_QS)
    sumi, summ = I32(0), I32(0)
    for j in range(4):
        s_lo, m_lo = _scale_min_k4(w, r, b, sc_at, 2 * j)
        s_hi, m_hi = _scale_min_k4(w, r, b, sc_at, 2 * j + 1)
        x0 = b * 256 + 64 * j
        lo, hi = I32(0), I32(0)
        for l in range(32):
            v = w[r, b, qs_at + 32 * j + l]
            if five:
                h = w[r, b, Q5_QH + l] >> (2 * j)
                lo = I32(lo + I32((v & 15) | ((h & 1) << 4)) * I32(xq[x0 + l]))
                hi = I32(hi + I32((v >> 4) | ((h & 2) << 3)) * I32(xq[x0 + 32 + l]))
            else:
                lo = I32(lo + I32(v & 15) * I32(xq[x0 + l]))
                hi = I32(hi + I32(v >> 4) * I32(xq[x0 + 32 + l]))
        s = b * 16 + 4 * j  # the activation sums of the 16-value spans
        sumi = I32(sumi + lo * s_lo + hi * s_hi)
        summ = I32(summ + m_lo * (xs[s] + xs[s + 1]) + m_hi * (xs[s + 2] + xs[s + 3]))
    if five:
        return xd[b] * (f16(w, r, b, Q5_D) * F(sumi) - f16(w, r, b, Q5_DMIN) * F(summ))
    return xd[b] * (f16(w, r, b, Q4_D) * F(sumi) - f16(w, r, b, Q4_DMIN) * F(summ))


@inline
def _q6_K(w, r, b, xq, xd, xs):
    """Elements 128n + 32k + l (k = 0..3): 4 bits from ql (bytes l, l + 32; low then high
    nibbles) and 2 from qh[l] (bits 2k), minus 32; sub-block 8n + 2k + (l >= 16)."""
    sumi = I32(0)
    for n in range(2):
        for h in range(2):
            s = 8 * n + h
            s0, s1, s2, s3 = (I32(np.int8(w[r, b, Q6_SC + s])), I32(np.int8(w[r, b, Q6_SC + s + 2])),
                              I32(np.int8(w[r, b, Q6_SC + s + 4])), I32(np.int8(w[r, b, Q6_SC + s + 6])))
            x0 = b * 256 + 128 * n
            a0, a1, a2, a3 = I32(0), I32(0), I32(0), I32(0)
            for l in range(16 * h, 16 * h + 16):
                lo = w[r, b, Q6_QL + 64 * n + l]
                hi = w[r, b, Q6_QL + 64 * n + 32 + l]
                qh = w[r, b, Q6_QH + 32 * n + l]
                a0 = I32(a0 + I32((lo & 15) | ((qh & 3) << 4)) * I32(xq[x0 + l]))
                a1 = I32(a1 + I32((hi & 15) | ((qh & 12) << 2)) * I32(xq[x0 + 32 + l]))
                a2 = I32(a2 + I32((lo >> 4) | (qh & 48)) * I32(xq[x0 + 64 + l]))
                a3 = I32(a3 + I32((hi >> 4) | ((qh >> 2) & 48)) * I32(xq[x0 + 96 + l]))
            t = b * 16 + s
            sumi = I32(sumi + s0 * (a0 - 32 * xs[t]) + s1 * (a1 - 32 * xs[t + 2])
                       + s2 * (a2 - 32 * xs[t + 4]) + s3 * (a3 - 32 * xs[t + 6]))
    return xd[b] * f16(w, r, b, Q6_D) * F(sumi)


@inline
def _q3_K_scale(w, r, b, i):
    """Sub-block i's 6-bit scale, signed: low 4 bits in bytes 0-7, high 2 bits in bytes 8-11."""
    lo = (I32(w[r, b, Q3_SC + i]) & 15) if i < 8 else (I32(w[r, b, Q3_SC + i - 8]) >> 4)
    hi = (I32(w[r, b, Q3_SC + 8 + i % 4]) >> (2 * (i // 4))) & 3
    return (lo | (hi << 4)) - 32


@inline
def _q2_q3_K(w, r, b, xq, xd, xs, three):
    """Q2_K, or Q3_K when `three`. Elements 128n + 32k + 16h + l: bits 2k of qs[32n + 16h + l],
    sub-block 8n + 2k + h; Q3_K adds 4 when bit 4n + k of hmask[16h + l] is set, then takes 4."""
    sumi, summ = I32(0), I32(0)
    for n in range(2):
        for h in range(2):
            s = 8 * n + h
            x0 = b * 256 + 128 * n + 16 * h
            a0, a1, a2, a3 = I32(0), I32(0), I32(0), I32(0)
            for l in range(16):
                if three:
                    v = w[r, b, Q3_QS + 32 * n + 16 * h + l]
                    m = w[r, b, Q3_HM + 16 * h + l] >> (4 * n)
                    a0 = I32(a0 + I32((v & 3) | ((m & 1) << 2)) * I32(xq[x0 + l]))
                    a1 = I32(a1 + I32(((v >> 2) & 3) | ((m & 2) << 1)) * I32(xq[x0 + 32 + l]))
                    a2 = I32(a2 + I32(((v >> 4) & 3) | (m & 4)) * I32(xq[x0 + 64 + l]))
                    a3 = I32(a3 + I32((v >> 6) | ((m & 8) >> 1)) * I32(xq[x0 + 96 + l]))
                else:
                    v = w[r, b, Q2_QS + 32 * n + 16 * h + l]
                    a0 = I32(a0 + I32(v & 3) * I32(xq[x0 + l]))
                    a1 = I32(a1 + I32((v >> 2) & 3) * I32(xq[x0 + 32 + l]))
                    a2 = I32(a2 + I32((v >> 4) & 3) * I32(xq[x0 + 64 + l]))
                    a3 = I32(a3 + I32(v >> 6) * I32(xq[x0 + 96 + l]))
            t = b * 16 + s
            if three:
                sumi = I32(sumi + _q3_K_scale(w, r, b, s) * (a0 - 4 * xs[t])
                           + _q3_K_scale(w, r, b, s + 2) * (a1 - 4 * xs[t + 2])
                           + _q3_K_scale(w, r, b, s + 4) * (a2 - 4 * xs[t + 4])
                           + _q3_K_scale(w, r, b, s + 6) * (a3 - 4 * xs[t + 6]))
            else:
                c0, c1, c2, c3 = w[r, b, Q2_SC + s], w[r, b, Q2_SC + s + 2], w[r, b, Q2_SC + s + 4], w[r, b, Q2_SC + s + 6]
                sumi = I32(sumi + I32(c0 & 15) * a0 + I32(c1 & 15) * a1 + I32(c2 & 15) * a2 + I32(c3 & 15) * a3)
                summ = I32(summ + I32(c0 >> 4) * xs[t] + I32(c1 >> 4) * xs[t + 2]
                           + I32(c2 >> 4) * xs[t + 4] + I32(c3 >> 4) * xs[t + 6])
    if three:
        return xd[b] * f16(w, r, b, Q3_D) * F(sumi)
    return xd[b] * (f16(w, r, b, Q2_D) * F(sumi) - f16(w, r, b, Q2_DMIN) * F(summ))


# ---------------------------------------------------------------- legacy: one 32-value block

@inline
def _q8_0(w, r, b, xq, xd, qk):
    """d * sum q xq over the block's qk (32) signed quants; qk comes from the data: a loop of
    constant count is unrolled whole, and LLVM then vectorizes across blocks with gathers."""
    s = I32(0)
    for l in range(qk):
        s = I32(s + I32(np.int8(w[r, b, Q8_0_QS + l])) * I32(xq[b * QK + l]))
    return xd[b] * f16(w, r, b, Q8_0_D) * F(s)


@inline
def _legacy(kind, w, r, b, xq, xd, xs):
    """Q4_0/Q5_0: d * (sum u xq - offset * xs) for the unsigned quants u. Q4_1/Q5_1:
    d * sum u xq + m * xs."""
    x0 = b * QK
    s = I32(0)
    if kind == Q4_0 or kind == Q4_1:
        at = Q4_0_QS if kind == Q4_0 else Q4_1_QS
        for l in range(16):  # low nibbles are elements 0-15, high nibbles 16-31
            v = w[r, b, at + l]
            s = I32(s + I32(v & 15) * I32(xq[x0 + l]) + I32(v >> 4) * I32(xq[x0 + 16 + l]))
        if kind == Q4_0:
            return xd[b] * f16(w, r, b, Q4_0_D) * F(s - 8 * xs[b])
        return xd[b] * (f16(w, r, b, Q4_1_D) * F(s) + f16(w, r, b, Q4_1_M) * F(xs[b]))
    at, hat = (Q5_0_QS, Q5_0_QH) if kind == Q5_0 else (Q5_1_QS, Q5_1_QH)
    for l in range(16):  # the fifth bit of element i is bit i of qh
        v = w[r, b, at + l]
        h0 = (w[r, b, hat + l // 8] >> (l % 8)) & 1
        h1 = (w[r, b, hat + 2 + l // 8] >> (l % 8)) & 1
        s = I32(s + I32((v & 15) | (h0 << 4)) * I32(xq[x0 + l]) + I32((v >> 4) | (h1 << 4)) * I32(xq[x0 + 16 + l]))
    if kind == Q5_0:
        return xd[b] * f16(w, r, b, Q5_0_D) * F(s - 16 * xs[b])
    return xd[b] * (f16(w, r, b, Q5_1_D) * F(s) + f16(w, r, b, Q5_1_M) * F(xs[b]))


# One compiled driver per type (the rarer legacy types share one), each reading the tensor's
# shape once before its prange. Both measured, on Q4_K from memory (before prefetching): one
# driver holding every type's body ran at 4.5 GB/s against 8.8 for Q4_K's alone, and reading
# w.shape inside the parallel loop at 4.9 against 8.2, though each was as fast in cache.
# numba caches no closures, so the drivers are written out rather than made by a factory.

@parallel
def _q4_K_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q4_K(w, r, b, xq, xd, xs, False)
            out[r] = acc


@parallel
def _q5_K_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q4_K(w, r, b, xq, xd, xs, True)
            out[r] = acc


@parallel
def _q6_K_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q6_K(w, r, b, xq, xd, xs)
            out[r] = acc


@parallel
def _q3_K_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q2_q3_K(w, r, b, xq, xd, xs, True)
            out[r] = acc


@parallel
def _q2_K_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q2_q3_K(w, r, b, xq, xd, xs, False)
            out[r] = acc


@parallel
def _q8_0_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    qk = w.shape[2] - Q8_0_QS  # 32, unknown to the compiler (see _q8_0)
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _q8_0(w, r, b, xq, xd, qk)
            out[r] = acc


@parallel
def _legacy_rows(kind, w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _legacy(kind, w, r, b, xq, xd, xs)
            out[r] = acc


_ROWS = {Q2_K: _q2_K_rows, Q3_K: _q3_K_rows, Q4_K: _q4_K_rows, Q5_K: _q5_K_rows, Q6_K: _q6_K_rows,
         Q8_0: _q8_0_rows}


def matvec(kind: int, w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out (N,) = the rows w, as blocks (N, K // block, block bytes), times one row of
    activation quants (xq (K,), xd (K // block,), xs (K // span,))."""
    if kind in _ROWS:
        _ROWS[kind](w, xq, xd, xs, out)
    else:
        _legacy_rows(kind, w, xq, xd, xs, out)
