"""ggml's scale searches run on 16 sub-blocks at once: the fast path's inner loops.

A K-quant super-block's sub-blocks (and a row's legacy blocks) each run the same search with
their own numbers. Here lane j of every loop is sub-block j, and the innermost loop runs over
the lanes, which LLVM turns into SIMD instructions. Each lane's sums still accumulate one
element after another, in C's order, so every float comes out as in common.py's plain ports
(make_qkx2_quants, make_qkx3_quants, make_qx_quants with rmse_type 1, make_q3_quants); what
C does with an `if` per sub-block becomes a per-lane select.

Everything lives in one float32 scratch buffer `S` (see `scratch`) at fixed offsets: the
lanes' inputs transposed (element i of lane j at i*NL + j), the levels, and one NL-vector per
per-lane quantity. One buffer keeps LLVM's alias checks cheap, which is what lets it vectorize.
Levels are kept as float32 (exact small integers) so the loops never leave 32-bit floats:
`nint` is nearest_int's magic-number trick, read back as a float.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import GROUP_MAX_EPS, F, jit

# The searches are inlined (numba IR) into each caller, which passes the element count as a
# constant: LLVM then unrolls the loop over elements, sees every offset into S as a constant
# and keeps the lanes' sums in registers. Called with a run-time count they are ~3x slower.
jit_inline = njit(cache=True, error_model="numpy", inline="always")

NL = 16  # lanes: sub-blocks searched side by side
NE = 32  # most elements per lane
X = 0  # the lanes' values, transposed: S[X + i*NL + j] is element i of lane j
W = X + NE * NL  # their weights
LA = W + NE * NL  # levels of the step being tried (Laux)
LB = LA + NE * NL  # levels of the best step so far (L): the result
WX = LB + NE * NL  # weight times value (make_qx_quants)
_V = WX + NE * NL  # per-lane vectors from here, NL floats each
FMIN, FMAX, SUMW, SUMX, ISCALE, SCALE, BEST, SKIP, SL, SL2, SXL, TSCALE, TMIN, CERR, TAKE, CHANGED = (
    _V + k * NL for k in range(16))
SIZE = _V + 16 * NL
OUT_SCALE, OUT_MIN = SCALE, FMIN  # where the searches leave their results (the min as C's -min for qkx)


def scratch() -> np.ndarray:
    return np.zeros(SIZE, dtype=np.float32)


@jit
def nint(v):
    """nearest_int(v), exactly, as a float32: the mantissa bits of v + 1.5*2^23 minus 2^22, done in float."""
    bits = (F(v + F(12582912.0)).view(np.uint32) & np.uint32(0x007FFFFF)) | np.uint32(0x4B000000)
    return np.uint32(bits).view(np.float32) - F(12582912.0)


@jit_inline
def qkx_search(S, n, nmax, rmin, rdelta, nstep, use_mad, qkx3):
    """make_qkx2_quants (qkx3 False) or make_qkx3_quants on every lane: values in X, weights in W.

    Leaves each lane's levels in LB, its scale in S[SCALE + j] and -min in S[FMIN + j] (C's
    `*the_min`).
    """
    fnmax = F(nmax)
    for j in range(NL):
        x0 = S[X + j]
        w0 = S[W + j]
        S[FMIN + j] = x0
        S[FMAX + j] = x0
        S[SUMW + j] = w0
        S[SUMX + j] = w0 * x0
    for i in range(1, n):
        for j in range(NL):
            xi = S[X + i * NL + j]
            w = S[W + i * NL + j]
            fmin = S[FMIN + j]
            fmax = S[FMAX + j]
            S[FMIN + j] = xi if xi < fmin else fmin
            S[FMAX + j] = xi if xi > fmax else fmax
            S[SUMW + j] += w
            S[SUMX + j] += w * xi
    for j in range(NL):
        fmin = S[FMIN + j]
        fmin = F(0.0) if fmin > 0 else fmin
        fmax = S[FMAX + j]
        S[FMIN + j] = fmin
        flat = fmax <= fmin if qkx3 else fmax == fmin
        S[SKIP + j] = F(1.0) if flat else F(0.0)
        iscale = fnmax / (fmax - fmin)
        S[ISCALE + j] = iscale
        S[SCALE + j] = F(1.0) / iscale
        S[BEST + j] = F(0.0)
    for i in range(n):
        for j in range(NL):
            xi = S[X + i * NL + j]
            fmin = S[FMIN + j]
            l = nint(S[ISCALE + j] * (xi - fmin))
            l = fnmax if l > fnmax else l
            l = F(0.0) if l < 0 else l
            S[LB + i * NL + j] = l
            diff = S[SCALE + j] * l + fmin - xi
            diff = abs(diff) if use_mad else diff * diff
            S[BEST + j] += S[W + i * NL + j] * diff
    for step in range(nstep + 1 if nstep >= 1 else 0):
        num = rmin + rdelta * F(step) + fnmax
        for j in range(NL):
            S[ISCALE + j] = num / (S[FMAX + j] - S[FMIN + j])
            S[SL + j] = F(0.0)
            S[SL2 + j] = F(0.0)
            S[SXL + j] = F(0.0)
        for i in range(n):
            for j in range(NL):
                xi = S[X + i * NL + j]
                l = nint(S[ISCALE + j] * (xi - S[FMIN + j]))
                l = fnmax if l > fnmax else l
                l = F(0.0) if l < 0 else l
                S[LA + i * NL + j] = l
                wl = S[W + i * NL + j] * l
                S[SL + j] += wl
                S[SL2 + j] += wl * l
                S[SXL + j] += wl * xi
        for j in range(NL):
            sum_w = S[SUMW + j]
            sum_x = S[SUMX + j]
            sum_l = S[SL + j]
            sum_l2 = S[SL2 + j]
            sum_xl = S[SXL + j]
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            S[TMIN + j] = F(0.0) if pos else this_min
            S[TSCALE + j] = sum_xl / sum_l2 if pos else this_scale
            S[TAKE + j] = F(1.0) if D > 0 and S[SKIP + j] == 0 else F(0.0)
            S[CERR + j] = F(0.0)
        for i in range(n):
            for j in range(NL):
                diff = S[TSCALE + j] * S[LA + i * NL + j] + S[TMIN + j] - S[X + i * NL + j]
                diff = abs(diff) if use_mad else diff * diff
                S[CERR + j] += S[W + i * NL + j] * diff
        taken = False
        for j in range(NL):
            take = S[TAKE + j] != 0 and S[CERR + j] < S[BEST + j]
            S[TAKE + j] = F(1.0) if take else F(0.0)
            S[BEST + j] = S[CERR + j] if take else S[BEST + j]
            S[SCALE + j] = S[TSCALE + j] if take else S[SCALE + j]
            S[FMIN + j] = S[TMIN + j] if take else S[FMIN + j]
            taken |= take
        if taken:
            for i in range(n):
                for j in range(NL):
                    S[LB + i * NL + j] = S[LA + i * NL + j] if S[TAKE + j] != 0 else S[LB + i * NL + j]
    for j in range(NL):  # flat lanes: no levels, no scale; and C returns -min
        flat = S[SKIP + j] != 0
        S[SCALE + j] = F(0.0) if flat else S[SCALE + j]
        S[FMIN + j] = -S[FMIN + j]
    for i in range(n):
        for j in range(NL):
            S[LB + i * NL + j] = F(0.0) if S[SKIP + j] != 0 else S[LB + i * NL + j]


@jit_inline
def qx_search(S, n, nmax, has_w):
    """make_qx_quants(n, nmax, x, L, 1, qw) on every lane: values in X, weights in W (x^2 unless has_w).

    Leaves each lane's levels (L, already + nmax) in LB and its scale in S[SCALE + j].
    """
    fnmax = F(nmax)
    lo = F(-nmax)
    hi = F(nmax - 1)
    for j in range(NL):
        S[FMAX + j] = F(0.0)  # C's max
        S[FMIN + j] = F(0.0)  # C's amax
    for i in range(n):
        for j in range(NL):
            xi = S[X + i * NL + j]
            ax = abs(xi)
            bigger = ax > S[FMIN + j]
            S[FMIN + j] = ax if bigger else S[FMIN + j]
            S[FMAX + j] = xi if bigger else S[FMAX + j]
            w = S[W + i * NL + j] if has_w else xi * xi
            S[W + i * NL + j] = w
            S[WX + i * NL + j] = w * xi
    for j in range(NL):
        S[SKIP + j] = F(1.0) if S[FMIN + j] < GROUP_MAX_EPS else F(0.0)
        S[ISCALE + j] = F(-nmax) / S[FMAX + j]
        S[SL + j] = F(0.0)
        S[SL2 + j] = F(0.0)
    for i in range(n):
        for j in range(NL):
            l = nint(S[ISCALE + j] * S[X + i * NL + j])
            l = hi if l > hi else l
            l = lo if l < lo else l
            S[LB + i * NL + j] = l + fnmax
            S[SL + j] += S[WX + i * NL + j] * l  # sumlx += w*x[i]*l
            S[SL2 + j] += S[W + i * NL + j] * l * l
    for j in range(NL):
        sumlx = S[SL + j]
        suml2 = S[SL2 + j]
        scale = sumlx / suml2 if suml2 != 0 else F(0.0)
        S[SCALE + j] = scale
        S[BEST + j] = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = -(fnmax + F(0.1) * F(step))
        for j in range(NL):
            S[ISCALE + j] = num / S[FMAX + j]
            S[SL + j] = F(0.0)
            S[SL2 + j] = F(0.0)
        for i in range(n):
            for j in range(NL):
                l = nint(S[ISCALE + j] * S[X + i * NL + j])
                l = hi if l > hi else l
                l = lo if l < lo else l
                S[LA + i * NL + j] = l + fnmax
                S[SL + j] += S[WX + i * NL + j] * l
                S[SL2 + j] += S[W + i * NL + j] * l * l
        taken = False
        for j in range(NL):
            sumlx = S[SL + j]
            suml2 = S[SL2 + j]
            take = suml2 > 0 and sumlx * sumlx > S[BEST + j] * suml2
            scale = sumlx / suml2
            S[TAKE + j] = F(1.0) if take else F(0.0)
            S[SCALE + j] = scale if take else S[SCALE + j]
            S[BEST + j] = scale * sumlx if take else S[BEST + j]
            taken |= take
        if taken:
            for i in range(n):
                for j in range(NL):
                    S[LB + i * NL + j] = S[LA + i * NL + j] if S[TAKE + j] != 0 else S[LB + i * NL + j]
    for j in range(NL):  # all-zero lanes
        S[SCALE + j] = F(0.0) if S[SKIP + j] != 0 else S[SCALE + j]
    for i in range(n):
        for j in range(NL):
            S[LB + i * NL + j] = F(0.0) if S[SKIP + j] != 0 else S[LB + i * NL + j]


@jit_inline
def q3_search(S, n, nmax):
    """make_q3_quants(n, nmax, x, L, True) on every lane: values in X (weights x^2 into W).

    Leaves each lane's levels (L, already + nmax) in LB and its scale in S[SCALE + j]. A lane
    stops refining once a pass changes nothing, as C's loop breaks; TAKE holds who goes on.
    """
    fnmax = F(nmax)
    lo = F(-nmax)
    hi = F(nmax - 1)
    for j in range(NL):
        S[FMAX + j] = F(0.0)  # C's max
        S[FMIN + j] = F(0.0)  # C's amax
    for i in range(n):
        for j in range(NL):
            xi = S[X + i * NL + j]
            ax = abs(xi)
            bigger = ax > S[FMIN + j]
            S[FMIN + j] = ax if bigger else S[FMIN + j]
            S[FMAX + j] = xi if bigger else S[FMAX + j]
            w = xi * xi
            S[W + i * NL + j] = w
            S[WX + i * NL + j] = w * xi
    for j in range(NL):
        skip = S[FMIN + j] < GROUP_MAX_EPS
        S[SKIP + j] = F(1.0) if skip else F(0.0)
        S[TAKE + j] = F(0.0) if skip else F(1.0)
        S[ISCALE + j] = F(-nmax) / S[FMAX + j]
        S[SL + j] = F(0.0)
        S[SL2 + j] = F(0.0)
    for i in range(n):
        for j in range(NL):
            l = nint(S[ISCALE + j] * S[X + i * NL + j])
            l = hi if l > hi else l
            l = lo if l < lo else l
            S[LB + i * NL + j] = l
            S[SL + j] += S[WX + i * NL + j] * l  # sumlx += w*x[i]*l
            S[SL2 + j] += S[W + i * NL + j] * l * l
    for _ in range(5):
        for j in range(NL):
            S[CHANGED + j] = F(0.0)
        for i in range(n):
            for j in range(NL):
                w = S[W + i * NL + j]
                wx = S[WX + i * NL + j]
                l = S[LB + i * NL + j]
                sumlx = S[SL + j]
                suml2 = S[SL2 + j]
                slx = sumlx - wx * l
                sl2 = suml2 - w * l * l
                new_l = nint(S[X + i * NL + j] * sl2 / slx)
                new_l = hi if new_l > hi else new_l
                new_l = lo if new_l < lo else new_l
                slx_new = slx + wx * new_l
                sl2_new = sl2 + w * new_l * new_l
                take = (S[TAKE + j] != 0 and slx > 0 and new_l != l and sl2_new > 0
                        and slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
                S[LB + i * NL + j] = new_l if take else l
                S[SL + j] = slx_new if take else sumlx
                S[SL2 + j] = sl2_new if take else suml2
                S[CHANGED + j] += F(1.0) if take else F(0.0)
        going = False
        for j in range(NL):
            go = S[TAKE + j] != 0 and S[CHANGED + j] > 0
            S[TAKE + j] = F(1.0) if go else F(0.0)
            going |= go
        if not going:
            break
    for j in range(NL):
        suml2 = S[SL2 + j]
        scale = S[SL + j] / suml2 if suml2 > 0 else F(0.0)
        S[SCALE + j] = F(0.0) if S[SKIP + j] != 0 else scale
    for i in range(n):
        for j in range(NL):
            S[LB + i * NL + j] = F(0.0) if S[SKIP + j] != 0 else S[LB + i * NL + j] + fnmax
