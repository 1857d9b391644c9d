"""The i-quants: IQ4_NL, IQ4_XS, IQ3_XXS and IQ3_S, ports of ggml-quants.c.

IQ4_NL and IQ4_XS store 4-bit indices into the non-linear levels KVALUES_IQ4NL, one scale per
32 values (IQ4_NL: an FP16 per block of 32; IQ4_XS: a 6-bit scale per 32 against an FP16
super-scale per 256); quantize_row_iq4_nl_impl searches each block's scale over 15 tries.
IQ3_XXS and IQ3_S store groups of four magnitudes as indices into a grid of allowed points
(iqgrid.py) with the signs apart, and a 4-bit scale per 32 (quantize_row_iq3_xxs_impl,
quantize_row_iq3_s_impl); a point off the grid goes to its best neighbour on it.
ggml_quantize_chunk runs the same code with and without an importance matrix (without one
each element weighs x^2), so these kernels have one path.

Every row kernel has the signature `(x, qw, out)`: one float32 row, its importance weights
(an empty array for none) and the row's bytes to fill.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .common import GROUP_MAX_EPS, QK_K, F, I, jit, layout, nearest_int, put_f16, u8
from .iqgrid import iq3_tables

FLT_MAX = np.finfo(np.float32).max
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
GROUP_MAX_EPS_IQ3_XXS = F(1e-8)
GRID_256, KMAP_256, NEIGHBOURS_256 = iq3_tables(256)
GRID_512, KMAP_512, NEIGHBOURS_512 = iq3_tables(512)

# Block layouts, as in ggml-common.h: each field's byte offset, then the block's size.
IQ4_NL_D, IQ4_NL_QS, IQ4_NL_BYTES = layout(T.IQ4_NL, ("d", 2), ("qs", 16))
IQ4_XS_D, IQ4_XS_SH, IQ4_XS_SL, IQ4_XS_QS, IQ4_XS_BYTES = layout(T.IQ4_XS, ("d", 2), ("scales_h", 2),
                                                                 ("scales_l", 4), ("qs", 128))
IQ3_XXS_D, IQ3_XXS_QS, IQ3_XXS_SS, IQ3_XXS_BYTES = layout(T.IQ3_XXS, ("d", 2), ("qs", 64), ("scales_and_signs", 32))
IQ3_S_D, IQ3_S_QS, IQ3_S_QH, IQ3_S_SIGNS, IQ3_S_SC, IQ3_S_BYTES = layout(T.IQ3_S, ("d", 2), ("qs", 64), ("qh", 8),
                                                                          ("signs", 32), ("scales", 4))


@jit
def best_index_int8(n, val, x):
    """The index of the level in sorted `val` nearest to x (ties to the upper one)."""
    if x <= F(val[0]):
        return 0
    if x >= F(val[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < F(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - F(val[mu - 1]) < F(val[mu]) - x else mu


# ---------------------------------------------------------------- IQ4_NL, IQ4_XS

@jit
def _iq4_search(xb, weight, L, at):
    """One block of 32's scale (quantize_row_iq4_nl_impl with ntry = 7); its levels into L[at:]."""
    amax = F(0.0)
    vmax = F(0.0)
    for j in range(32):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            vmax = xb[j]
    if amax < GROUP_MAX_EPS:
        return F(0.0)
    d = -vmax / F(KVALUES_IQ4NL[0])
    iscale = F(1.0) / d
    sumqx = F(0.0)
    sumq2 = F(0.0)
    for j in range(32):
        l = best_index_int8(16, KVALUES_IQ4NL, iscale * xb[j])
        L[at + j] = l
        q = F(KVALUES_IQ4NL[l])
        w = weight[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F(0.0)
    best = d * sumqx
    for itry in range(-7, 8):
        iscale = F(itry + I(KVALUES_IQ4NL[0])) / vmax
        sumqx = F(0.0)
        sumq2 = F(0.0)
        for j in range(32):
            q = F(KVALUES_IQ4NL[best_index_int8(16, KVALUES_IQ4NL, iscale * xb[j])])
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@jit
def _iq4_weights(xb, qw, at, has_qw, sigma2, weight):
    for j in range(32):
        weight[j] = qw[at + j] * np.sqrt(sigma2 + xb[j] * xb[j]) if has_qw else xb[j] * xb[j]


@jit
def _sigma2(xs, n):
    s = F(0.0)
    for j in range(n):
        s += xs[j] * xs[j]
    return s * (F(2.0) / F(n))


@jit
def _put_iq4_levels(out, at, L, n):
    for i in range(n // 32):
        for j in range(16):
            out[at + 16 * i + j] = u8(I(L[32 * i + j]) | (I(L[32 * i + 16 + j]) << 4))


@jit
def quantize_row_iq4_nl(x, qw, out):
    L = np.zeros(32, dtype=np.uint8)
    weight = np.empty(32, dtype=np.float32)
    has_qw = qw.shape[0] > 0
    for ib in range(x.shape[0] // 32):
        xb = x[ib * 32:(ib + 1) * 32]
        o = ib * IQ4_NL_BYTES
        _iq4_weights(xb, qw, ib * 32, has_qw, _sigma2(xb, 32), weight)
        scale = _iq4_search(xb, weight, L, 0)
        put_f16(out, o + IQ4_NL_D, scale)
        iscale = F(1.0) / scale if scale != 0 else F(0.0)
        for j in range(32):
            L[j] = best_index_int8(16, KVALUES_IQ4NL, iscale * xb[j])
        _put_iq4_levels(out, o + IQ4_NL_QS, L, 32)


@jit
def quantize_row_iq4_xs(x, qw, out):
    L = np.zeros(QK_K, dtype=np.uint8)
    weight = np.empty(32, dtype=np.float32)
    scales = np.empty(QK_K // 32, dtype=np.float32)
    has_qw = qw.shape[0] > 0
    for ibl in range(x.shape[0] // QK_K):
        xs = x[ibl * QK_K:(ibl + 1) * QK_K]
        o = ibl * IQ4_XS_BYTES
        sigma2 = _sigma2(xs, QK_K)
        max_scale = F(0.0)
        amax_scale = F(0.0)
        for ib in range(QK_K // 32):
            _iq4_weights(xs[32 * ib:], qw, ibl * QK_K + 32 * ib, has_qw, sigma2, weight)
            scales[ib] = _iq4_search(xs[32 * ib:], weight, L, 32 * ib)
            if abs(scales[ib]) > amax_scale:
                amax_scale = abs(scales[ib])
                max_scale = scales[ib]
        d = -max_scale / F(32.0)
        put_f16(out, o + IQ4_XS_D, d)  # the levels below are found with d itself, not its FP16
        iscale = F(1.0) / d if d != 0 else F(0.0)
        scales_h = 0
        for ib in range(QK_K // 32):
            l = max(-32, min(31, nearest_int(iscale * scales[ib])))
            dl = d * F(l)
            idl = F(1.0) / dl if dl != 0 else F(0.0)
            for j in range(32):
                L[32 * ib + j] = best_index_int8(16, KVALUES_IQ4NL, idl * xs[32 * ib + j])
            l += 32
            if ib % 2 == 0:
                out[o + IQ4_XS_SL + ib // 2] = l & 0xF
            else:
                out[o + IQ4_XS_SL + ib // 2] = u8(I(out[o + IQ4_XS_SL + ib // 2]) | ((l & 0xF) << 4))
            scales_h |= (l >> 4) << (2 * ib)
        out[o + IQ4_XS_SH] = scales_h & 0xFF
        out[o + IQ4_XS_SH + 1] = scales_h >> 8
        _put_iq4_levels(out, o + IQ4_XS_QS, L, QK_K)


# ---------------------------------------------------------------- IQ3_XXS, IQ3_S

@jit
def _best_neighbour(neighbours, at, grid, xval, waux, k4, scale, L):
    """iq3_find_best_neighbour: of the grid points listed at neighbours[at], the one nearest to
    xval[k4:k4+4] / scale (weighted); its levels into L[k4:k4+4]; returns its index."""
    best_d2 = FLT_MAX
    grid_index = -1
    for j in range(1, I(neighbours[at]) + 1):
        g = I(neighbours[at + j])
        d2 = F(0.0)
        for i in range(4):
            diff = scale * F(grid[g, i]) - xval[k4 + i]
            d2 += waux[k4 + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    for i in range(4):
        L[k4 + i] = (I(grid[grid_index, i]) - 1) // 2
    return grid_index


@jit
def _iq3_code(L, k4):
    u = 0
    for i in range(4):
        u |= I(L[k4 + i]) << (3 * i)
    return u


@jit
def _iq3_levels(iscale, xval, L, k4):
    """The four levels nearest to xval[k4:k4+4] * iscale into L; returns their grid code."""
    for i in range(4):
        L[k4 + i] = max(0, min(7, nearest_int(F(0.5) * (iscale * xval[k4 + i] - F(1.0)))))
    return _iq3_code(L, k4)


@jit
def _iq3_sumqx(weight, xval, L):
    sumqx = F(0.0)
    sumq2 = F(0.0)
    for i in range(32):
        w = weight[i]
        q = F(2 * I(L[i]) + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@jit
def _iq3_search(vmax, weight, waux, xval, L, Laux, on_grid, on_grid_aux, grid, kmap, neighbours, xxs):
    """A block of 32's scale and grid levels L: 2 * nis + 1 scales tried (the best wins), then the
    points off the grid re-placed at the best scale. The IQ3_XXS and IQ3_S variants differ
    in the number of tries, the starting flags and which points they re-place."""
    nis = 15 if xxs else 9
    best = F(0.0)
    scale = vmax / F(15.0)
    for k in range(8):
        on_grid[k] = xxs
    for step in range(-nis, nis + 1):
        iscale = (F(15.0) + F(step) * F(0.2)) / vmax
        this_scale = F(1.0) / iscale
        for k in range(8):
            grid_index = kmap[_iq3_levels(iscale, xval, Laux, 4 * k)]
            on_grid_aux[k] = grid_index >= 0
            if grid_index < 0:
                _best_neighbour(neighbours, -grid_index - 1, grid, xval, waux, 4 * k, this_scale, Laux)
        sumqx, sumq2 = _iq3_sumqx(weight, xval, Laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(32):
                L[i] = Laux[i]
            for k in range(8):
                on_grid[k] = on_grid_aux[k]
    n_not_on_grid = 0
    for k in range(8):
        if not on_grid[k]:
            n_not_on_grid += 1
    if n_not_on_grid > 0 and scale > 0:
        iscale = F(1.0) / scale
        for k in range(8):
            if xxs and on_grid[k]:
                continue
            grid_index = kmap[_iq3_levels(iscale, xval, L, 4 * k)]
            if grid_index < 0:
                grid_index = _best_neighbour(neighbours, -grid_index - 1, grid, xval, waux, 4 * k, scale, L)
            for i in range(4):
                L[4 * k + i] = (I(grid[grid_index, i]) - 1) // 2
        sumqx, sumq2 = _iq3_sumqx(weight, xval, L)
        if sumq2 > 0:
            scale = sumqx / sumq2
    return scale


@jit
def _iq3_prepare(xb, qw, at, has_qw, sigma2, weight, waux):
    for i in range(32):
        weight[i] = qw[at + i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw else xb[i] * xb[i]
    for i in range(32):
        waux[i] = np.sqrt(weight[i])


@jit
def _block_sigma2(xs):
    sumx2 = F(0.0)
    for i in range(QK_K):
        sumx2 += xs[i] * xs[i]
    return F(2.0) * sumx2 / F(QK_K)


@jit
def _xval_max(xval):
    vmax = xval[0]
    for i in range(1, 32):
        vmax = vmax if vmax > xval[i] else xval[i]  # C's MAX(max, xval[i])
    return vmax


@jit
def quantize_row_iq3_xxs(x, qw, out):
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int8)
    Laux = np.zeros(32, dtype=np.int8)
    on_grid = np.zeros(8, dtype=np.bool_)
    on_grid_aux = np.zeros(8, dtype=np.bool_)
    scales = np.empty(QK_K // 32, dtype=np.float32)
    signs_and_scales = np.zeros(QK_K // 32, dtype=np.int64)
    has_qw = qw.shape[0] > 0
    for ibl in range(x.shape[0] // QK_K):
        xs = x[ibl * QK_K:(ibl + 1) * QK_K]
        o = ibl * IQ3_XXS_BYTES
        for j in range(IQ3_XXS_BYTES):
            out[o + j] = 0
        sigma2 = _block_sigma2(xs)
        max_scale = F(0.0)
        for ib in range(QK_K // 32):
            xb = xs[32 * ib:]
            signs_and_scales[ib] = 0
            _iq3_prepare(xb, qw, ibl * QK_K + 32 * ib, has_qw, sigma2, weight, waux)
            signs = 0
            for k in range(4):  # an even number of signs per 8: an odd one flips the least important
                nflip = 0
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= 0:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        nflip += 1
                        s |= 1 << i
                if nflip % 2:
                    imin = 0
                    vmin = weight[8 * k] * xb[8 * k] * xb[8 * k]
                    for i in range(1, 8):
                        ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                        if ax < vmin:
                            vmin = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    s ^= 1 << imin
                signs |= (s & 127) << (7 * k)
            vmax = _xval_max(xval)
            if vmax < GROUP_MAX_EPS_IQ3_XXS:
                scales[ib] = F(0.0)
                continue
            for i in range(32):
                L[i] = 0
            scale = _iq3_search(vmax, weight, waux, xval, L, Laux, on_grid, on_grid_aux, GRID_256, KMAP_256,
                                NEIGHBOURS_256, True)
            if scale < 0:  # "should never happen": flip the scale and the signs
                scale = -scale
                signs = ~signs & 0x0FFFFFFF
            for k in range(8):
                out[o + IQ3_XXS_QS + 8 * ib + k] = KMAP_256[_iq3_code(L, 4 * k)]
            signs_and_scales[ib] = signs
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = max_scale / F(31.0)
        put_f16(out, o + IQ3_XXS_D, d * F(1.0125))
        iscale = F(1.0) / d
        for ib in range(QK_K // 32):
            l = max(0, min(15, nearest_int(F(0.5) * (iscale * scales[ib] - F(1.0)))))
            v = signs_and_scales[ib] | (l << 28)
            for b in range(4):
                out[o + IQ3_XXS_SS + 4 * ib + b] = (v >> (8 * b)) & 0xFF


@jit
def quantize_row_iq3_s(x, qw, out):
    weight = np.empty(32, dtype=np.float32)
    waux = np.empty(32, dtype=np.float32)
    xval = np.empty(32, dtype=np.float32)
    L = np.zeros(32, dtype=np.int8)
    Laux = np.zeros(32, dtype=np.int8)
    on_grid = np.zeros(8, dtype=np.bool_)
    on_grid_aux = np.zeros(8, dtype=np.bool_)
    scales = np.empty(QK_K // 32, dtype=np.float32)
    signs = np.empty(4, dtype=np.int64)
    has_qw = qw.shape[0] > 0
    for ibl in range(x.shape[0] // QK_K):
        xs = x[ibl * QK_K:(ibl + 1) * QK_K]
        o = ibl * IQ3_S_BYTES
        for j in range(IQ3_S_BYTES):
            out[o + j] = 0
        # where the next block's grid indices and signs go: as in ggml, a block of zeros
        # advances neither, so the blocks after it are stored one place early
        qs_at = o + IQ3_S_QS
        signs_at = o + IQ3_S_SIGNS
        sigma2 = _block_sigma2(xs)
        max_scale = F(0.0)
        for ib in range(QK_K // 32):
            xb = xs[32 * ib:]
            _iq3_prepare(xb, qw, ibl * QK_K + 32 * ib, has_qw, sigma2, weight, waux)
            for k in range(4):
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= 0:
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        s |= 1 << i
                signs[k] = s
            vmax = _xval_max(xval)
            for i in range(32):
                L[i] = 0
            if not vmax:
                scales[ib] = F(0.0)
                continue
            scale = _iq3_search(vmax, weight, waux, xval, L, Laux, on_grid, on_grid_aux, GRID_512, KMAP_512,
                                NEIGHBOURS_512, False)
            if scale < 0:  # "should never happen": flip the scale and the signs
                scale = -scale
                for k in range(4):
                    signs[k] = ~signs[k] & 0xFF
            for k in range(8):
                grid_index = I(KMAP_512[_iq3_code(L, 4 * k)])
                out[qs_at + k] = grid_index & 255
                out[o + IQ3_S_QH + ib] = u8(I(out[o + IQ3_S_QH + ib]) | ((grid_index >> 8) << k))
            qs_at += 8
            for k in range(4):
                out[signs_at + k] = signs[k]
            signs_at += 4
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = max_scale / F(31.0)
        put_f16(out, o + IQ3_S_D, d * F(1.033))
        iscale = F(1.0) / d
        for ib in range(0, QK_K // 32, 2):
            l1 = max(0, min(15, nearest_int(F(0.5) * (iscale * scales[ib] - F(1.0)))))
            l2 = max(0, min(15, nearest_int(F(0.5) * (iscale * scales[ib + 1] - F(1.0)))))
            out[o + IQ3_S_SC + ib // 2] = l1 | (l2 << 4)


# One parallel driver per format: rows are independent, so prange shares them out.

@njit(cache=True, parallel=True, error_model="numpy")
def rows_iq4_nl(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_iq4_nl(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_iq4_xs(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_iq4_xs(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_iq3_xxs(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_iq3_xxs(x[r], qw, out[r])


@njit(cache=True, parallel=True, error_model="numpy")
def rows_iq3_s(x, qw, out):
    for r in prange(x.shape[0]):
        quantize_row_iq3_s(x[r], qw, out[r])


KERNELS = {  # type: (row kernel, parallel driver over rows)
    T.IQ4_NL: (quantize_row_iq4_nl, rows_iq4_nl),
    T.IQ4_XS: (quantize_row_iq4_xs, rows_iq4_xs),
    T.IQ3_XXS: (quantize_row_iq3_xxs, rows_iq3_xxs),
    T.IQ3_S: (quantize_row_iq3_s, rows_iq3_s),
}
