"""The 2-bit i-quant IQ2_S (2.5625 bits per weight), a port of ggml-quants.c's quantize_row_iq2_s_impl.

A super-block of 256 values is 16 sub-blocks of 16, each two groups of 8 magnitudes stored as
one point of IQ2_S's 1024-point grid (iqgrid.iq2s_tables: coordinates 1, 3, 5; a 10-bit index,
its low byte in qs and its top 2 bits in qh), 8 sign bits per group (no parity rule, unlike
IQ2_XXS/IQ3_XXS), and a 4-bit scale 2l + 1 per sub-block against an FP16 super-scale (d / 8 when
read back). Each sub-block's scale is searched over 19 tries, and the groups that fall off the
grid go to their nearest grid point (weighted). Without an importance matrix each element
weighs sigma2 / 4 + x^2 (unlike IQ3's x^2). llama.cpp refuses whole IQ2_S files without an
imatrix (llama-quant.cpp's tensor_requires_imatrix; convert/mix.py does the same), but
`ggml_quantize_chunk` quantizes rows either way (ggml_quantize_requires_imatrix leaves IQ2_S
out), and so does this kernel.

The row kernel has the signature `(x, qw, out)` of iquants.py's.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import QK_K, F, I, jit, layout, nearest_int, put_f16, u8
from .iqgrid import iq2s_tables

FLT_MAX = np.finfo(np.float32).max
GROUP_MAX_EPS_IQ2_S = F(1e-8)
K_MAX_Q = 3  # levels 0..2 per coordinate: the grid's 1, 3, 5
GRID_1024, KMAP_1024, NEIGHBOURS_1024 = iq2s_tables()

# ggml-common.h's block_iq2_s: qs holds the grid indices' low bytes (32), then the signs (32)
IQ2_S_D, IQ2_S_QS, IQ2_S_QH, IQ2_S_SC, IQ2_S_BYTES = layout(T.IQ2_S, ("d", 2), ("qs", 64), ("qh", 8), ("scales", 8))
IQ2_S_SIGNS = IQ2_S_QS + QK_K // 8


@jit
def _best_neighbour(at, xval, waux, k8, scale, L):
    """iq2_find_best_neighbour: of the grid points listed at NEIGHBOURS_1024[at], the one nearest
    to xval[k8:k8+8] / scale (weighted by waux); its levels into L[k8:k8+8]; returns its index."""
    best_d2 = FLT_MAX
    grid_index = -1
    for j in range(1, I(NEIGHBOURS_1024[at]) + 1):
        g = I(NEIGHBOURS_1024[at + j])
        d2 = F(0.0)
        for i in range(8):
            diff = scale * F(GRID_1024[g, i]) - xval[k8 + i]
            d2 += waux[k8 + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    for i in range(8):
        L[k8 + i] = (I(GRID_1024[grid_index, i]) - 1) // 2
    return grid_index


@jit
def _code(L, k8):
    """The grid code of the levels L[k8:k8+8]: 2 bits each, the first in the low bits."""
    u = 0
    for i in range(8):
        u |= I(L[k8 + i]) << (2 * i)
    return u


@jit
def _levels(iscale, xval, L, k8):
    """The levels nearest to xval[k8:k8+8] * iscale into L; returns their grid code."""
    for i in range(8):
        L[k8 + i] = max(0, min(K_MAX_Q - 1, nearest_int(F(0.5) * (iscale * xval[k8 + i] - F(1.0)))))
    return _code(L, k8)


@jit
def _sumqx(weight, xval, L):
    sumqx = F(0.0)
    sumq2 = F(0.0)
    for i in range(16):
        w = weight[i]
        q = F(2 * I(L[i]) + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@jit
def _search(vmax, weight, waux, xval, L, Laux, on_grid, on_grid_aux):
    """A sub-block of 16's scale and grid levels L: 19 scales tried (the best wins), then the
    groups found off the grid re-placed at the best scale."""
    best = F(0.0)
    scale = vmax / F(2 * K_MAX_Q - 1)
    on_grid[0] = True
    on_grid[1] = True
    for step in range(-9, 10):
        iscale = (F(2 * K_MAX_Q - 1) + F(step) * F(0.1)) / vmax
        this_scale = F(1.0) / iscale
        for k in range(2):
            grid_index = KMAP_1024[_levels(iscale, xval, Laux, 8 * k)]
            on_grid_aux[k] = grid_index >= 0
            if grid_index < 0:
                _best_neighbour(-grid_index - 1, xval, waux, 8 * k, this_scale, Laux)
        sumqx, sumq2 = _sumqx(weight, xval, Laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(16):
                L[i] = Laux[i]
            on_grid[0] = on_grid_aux[0]
            on_grid[1] = on_grid_aux[1]
    if (not on_grid[0] or not on_grid[1]) and scale > 0:
        iscale = F(1.0) / scale
        for k in range(2):
            if on_grid[k]:
                continue
            grid_index = KMAP_1024[_levels(iscale, xval, L, 8 * k)]
            if grid_index < 0:
                _best_neighbour(-grid_index - 1, xval, waux, 8 * k, scale, L)
        sumqx, sumq2 = _sumqx(weight, xval, L)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@jit
def quantize_row_iq2_s(x, qw, out):
    weight = np.empty(16, dtype=np.float32)
    waux = np.empty(16, dtype=np.float32)
    xval = np.empty(16, dtype=np.float32)
    L = np.zeros(16, dtype=np.int8)
    Laux = np.zeros(16, dtype=np.int8)
    on_grid = np.zeros(2, dtype=np.bool_)
    on_grid_aux = np.zeros(2, dtype=np.bool_)
    scales = np.empty(QK_K // 16, dtype=np.float32)
    signs = np.zeros(2, dtype=np.int64)
    has_qw = qw.shape[0] > 0
    for ibl in range(x.shape[0] // QK_K):
        xs = x[ibl * QK_K:(ibl + 1) * QK_K]
        o = ibl * IQ2_S_BYTES
        for j in range(IQ2_S_BYTES):
            out[o + j] = 0
        sumx2 = F(0.0)
        for i in range(QK_K):
            sumx2 += xs[i] * xs[i]
        sigma2 = F(2.0) * sumx2 / F(QK_K)
        max_scale = F(0.0)
        for ib in range(QK_K // 16):
            xb = xs[16 * ib:]
            for i in range(16):
                if has_qw:
                    weight[i] = qw[ibl * QK_K + 16 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
                else:
                    weight[i] = F(0.25) * sigma2 + xb[i] * xb[i]
            for i in range(16):
                waux[i] = np.sqrt(weight[i])
            for k in range(2):
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= 0:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        s |= 1 << i
                signs[k] = s
            vmax = xval[0]
            for i in range(1, 16):
                vmax = vmax if vmax > xval[i] else xval[i]  # C's MAX(max, xval[i])
            for i in range(16):
                L[i] = 0
            if vmax < GROUP_MAX_EPS_IQ2_S:
                scales[ib] = F(0.0)
                continue
            scale = _search(vmax, weight, waux, xval, L, Laux, on_grid, on_grid_aux)
            if scale < 0:  # "should never happen": flip the scale and the signs
                scale = -scale
                signs[0] = ~signs[0] & 0xFF
                signs[1] = ~signs[1] & 0xFF
            for k in range(2):
                grid_index = I(KMAP_1024[_code(L, 8 * k)])  # on the grid by construction
                i8 = 2 * ib + k
                out[o + IQ2_S_QS + i8] = grid_index & 255
                out[o + IQ2_S_QH + i8 // 4] = u8(I(out[o + IQ2_S_QH + i8 // 4]) | ((grid_index >> 8) << (2 * (i8 % 4))))
                out[o + IQ2_S_SIGNS + i8] = signs[k]
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = max_scale / F(31.0)
        put_f16(out, o + IQ2_S_D, d * F(0.9875))
        iscale = F(1.0) / d
        for ib in range(QK_K // 16):
            l = max(0, min(15, nearest_int(F(0.5) * (iscale * scales[ib] - F(1.0)))))
            if ib % 2 == 0:
                out[o + IQ2_S_SC + ib // 2] = l
            else:
                out[o + IQ2_S_SC + ib // 2] = u8(I(out[o + IQ2_S_SC + ib // 2]) | (l << 4))


@njit(cache=True, parallel=True, error_model="numpy")
def rows_iq2_s(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_iq2_s(x[r], qw, out[r])


KERNELS = {T.IQ2_S: (quantize_row_iq2_s, rows_iq2_s)}  # type: (row kernel, parallel driver over rows)
