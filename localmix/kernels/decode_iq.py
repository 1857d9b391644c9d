"""The decode products of the i-quants: one activation row (T = 1) times an IQ4_NL, IQ4_XS,
IQ3_XXS, IQ3_S or IQ2_S tensor, from its bytes.

As decode.py does for the K-quants (the same activation quants, the same integers as dot.py's
prefill kernels, so `dot_ref.matmul` is the plain reading of all three): each stored level is
read through its table (IQ4's non-linear levels KV, the IQ3 and IQ2_S grids), signed by its
stored sign bit, and meets the activation quant in an int32 sum; one sum per sub-block is
scaled by its 4- or 6-bit scale, the block by its FP16 super-scale. IQ4_NL goes with Q8_0
activations (32-value blocks), the others with Q8_K (256). The drivers prefetch as decode.py's.

`matvec(kind, w, xq, xd, xs, out)`, as decode.matvec.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .decode import ahead, f16
from .dot import (
    GRID_2S,
    GRID_S,
    GRID_XXS,
    I32,
    I64,
    IQ2_S,
    IQ3_S,
    IQ3_XXS,
    IQ4_NL,
    IQ4_XS,
    IQUANTS,
    KSIGNS,
    KV,
    QK,
    ROWS_PER_TASK,
    F,
    inline,
    parallel,
)
from .iq2 import IQ2_S_D, IQ2_S_QH, IQ2_S_QS, IQ2_S_SC, IQ2_S_SIGNS
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
)

TYPES = frozenset(IQUANTS)


@inline
def _iq4_nl(w, r, b, xq, xd):
    """d * sum KV[u] xq over the 32 nibbles u (low nibbles elements 0-15, high 16-31)."""
    x0 = b * QK
    s = I32(0)
    for l in range(16):
        v = w[r, b, IQ4_NL_QS + l]
        s = I32(s + I32(KV[v & 15]) * I32(xq[x0 + l]) + I32(KV[v >> 4]) * I32(xq[x0 + 16 + l]))
    return xd[b] * f16(w, r, b, IQ4_NL_D) * F(s)


@inline
def _iq4_xs(w, r, b, xq, xd):
    """Sub-block ib of 32: KV levels as IQ4_NL's, times its 6-bit scale minus 32."""
    h = I32(w[r, b, IQ4_XS_SH]) | (I32(w[r, b, IQ4_XS_SH + 1]) << 8)
    sumi = I32(0)
    for ib in range(8):
        ls = ((I32(w[r, b, IQ4_XS_SL + ib // 2]) >> (4 * (ib % 2))) & 15) | (((h >> (2 * ib)) & 3) << 4)
        x0 = b * 256 + 32 * ib
        s = I32(0)
        for j in range(16):
            v = w[r, b, IQ4_XS_QS + 16 * ib + j]
            s = I32(s + I32(KV[v & 15]) * I32(xq[x0 + j]) + I32(KV[v >> 4]) * I32(xq[x0 + 16 + j]))
        sumi = I32(sumi + (ls - 32) * s)
    return xd[b] * f16(w, r, b, IQ4_XS_D) * F(sumi)


@inline
def _iq3_xxs(w, r, b, xq, xd):
    """Sub-block ib: eight grid points, their signs from 4 x 7 bits, the scale 2l + 1 (d / 4)."""
    sumi = I32(0)
    for ib in range(8):
        at = IQ3_XXS_SS + 4 * ib
        aux = I64(w[r, b, at]) | (I64(w[r, b, at + 1]) << 8) | (I64(w[r, b, at + 2]) << 16) | (I64(w[r, b, at + 3]) << 24)
        s = I32(0)
        for l in range(4):
            signs = KSIGNS[(aux >> (7 * l)) & 127]
            for h in range(2):
                g = w[r, b, IQ3_XXS_QS + 8 * ib + 2 * l + h]
                x0 = b * 256 + 32 * ib + 8 * l + 4 * h
                for j in range(4):
                    p = I32(GRID_XXS[g, j]) * I32(xq[x0 + j])
                    s = I32(s - p) if (signs >> (4 * h + j)) & 1 else I32(s + p)
        sumi = I32(sumi + I32(2 * (aux >> 28) + 1) * s)
    return xd[b] * (f16(w, r, b, IQ3_XXS_D) * F(0.25)) * F(sumi)


@inline
def _iq3_s(w, r, b, xq, xd):
    """Sub-block ib: eight 9-bit grid points (qs and bit k of qh[ib]), 32 sign bits, scale 2l + 1."""
    sumi = I32(0)
    for ib in range(8):
        qh = I64(w[r, b, IQ3_S_QH + ib])
        s = I32(0)
        for k in range(8):
            g = I64(w[r, b, IQ3_S_QS + 8 * ib + k]) | (((qh >> k) & 1) << 8)
            sg = w[r, b, IQ3_S_SIGNS + 4 * ib + k // 2] >> (4 * (k % 2))
            x0 = b * 256 + 32 * ib + 4 * k
            for j in range(4):
                p = I32(GRID_S[g, j]) * I32(xq[x0 + j])
                s = I32(s - p) if (sg >> j) & 1 else I32(s + p)
        sc = 2 * ((I32(w[r, b, IQ3_S_SC + ib // 2]) >> (4 * (ib % 2))) & 15) + 1
        sumi = I32(sumi + sc * s)
    return xd[b] * f16(w, r, b, IQ3_S_D) * F(sumi)


@inline
def _iq2_s(w, r, b, xq, xd):
    """Sub-block ib of 16: two 10-bit grid points (qs[2ib + k], two bits of qh on top), 8 sign
    bits each (signs[2ib + k]), the scale 2l + 1 (d / 8)."""
    sumi = I32(0)
    for ib in range(16):
        s = I32(0)
        for k in range(2):
            i8 = 2 * ib + k
            g = I64(w[r, b, IQ2_S_QS + i8]) | (((I64(w[r, b, IQ2_S_QH + i8 // 4]) >> (2 * (i8 % 4))) & 3) << 8)
            sg = w[r, b, IQ2_S_SIGNS + i8]
            x0 = b * 256 + 16 * ib + 8 * k
            for j in range(8):
                p = I32(GRID_2S[g, j]) * I32(xq[x0 + j])
                s = I32(s - p) if (sg >> j) & 1 else I32(s + p)
        sc = 2 * ((I32(w[r, b, IQ2_S_SC + ib // 2]) >> (4 * (ib % 2))) & 15) + 1
        sumi = I32(sumi + sc * s)
    return xd[b] * (f16(w, r, b, IQ2_S_D) * F(0.125)) * F(sumi)


# One driver per type, written out as decode.py's are (numba caches no closures).




@parallel
def _iq4_nl_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _iq4_nl(w, r, b, xq, xd)
            out[r] = acc


@parallel
def _iq4_xs_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _iq4_xs(w, r, b, xq, xd)
            out[r] = acc


@parallel
def _iq3_xxs_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _iq3_xxs(w, r, b, xq, xd)
            out[r] = acc


@parallel
def _iq3_s_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _iq3_s(w, r, b, xq, xd)
            out[r] = acc


@parallel
def _iq2_s_rows(w, xq, xd, xs, out):
    n, nb = w.shape[0], w.shape[1]
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for r in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = F(0.0)
            for b in range(nb):
                ahead(w, r, b, nb)
                acc += _iq2_s(w, r, b, xq, xd)
            out[r] = acc


_ROWS = {IQ4_NL: _iq4_nl_rows, IQ4_XS: _iq4_xs_rows, IQ3_XXS: _iq3_xxs_rows, IQ3_S: _iq3_s_rows, IQ2_S: _iq2_s_rows}


def matvec(kind: int, w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out (N,) = the i-quant rows w, as blocks (N, K // block, block bytes), times one row of
    activation quants (xq (K,), xd (K // block,), xs (K // span,): xs unused, the i-quants have no min)."""
    _ROWS[kind](w, xq, xd, xs, out)
