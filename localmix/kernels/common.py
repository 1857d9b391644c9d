"""What every quantizer shares: float32 bit tricks, FP16 fields, and ggml's scale searches.

Each function mirrors one of ggml-quants.c line for line, so that the bytes come out the same:
every float operation is float32 and happens in C's order (sequential sums, no fused
multiply-add), and every integer stored into a byte wraps as a C cast would. A C pointer
argument becomes an array slice; a NULL weight pointer becomes an empty array.

The functions are compiled with numba; `plain()` gives back the same source as plain Python
over numpy scalars, the reference the tests compare the compiled code against. Both readings
agree only if nothing is promoted to float64, hence the `F(...)` around every constant and
integer that meets a float (numba turns `float32 * int` into float64; numpy keeps float32),
and `I(...)` where C computes in int.
"""

from __future__ import annotations

import types

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

F = np.float32
I = np.int64  # numba's int() of a uint8 stays uint8, and uint64 | int64 is float64: use I() for C's int
QK_K = 256  # elements in a K-quant super-block
GROUP_MAX_EPS = F(1e-15)
NO_WEIGHTS = np.zeros(0, dtype=np.float32)  # stands for C's NULL `quant_weights`

jit = njit(cache=True, error_model="numpy")  # float division by zero gives inf or nan, as in C


def layout(qtype: GGMLQuantizationType, *fields: tuple[str, int]) -> tuple[int, ...]:
    """A block's layout, written as its (name, bytes) fields in C order -> each field's byte
    offset, then the block's size (checked against gguf's GGML_QUANT_SIZES)."""
    offsets, at = [], 0
    for _, size in fields:
        offsets.append(at)
        at += size
    assert at == GGML_QUANT_SIZES[qtype][1], f"{qtype.name} block is {GGML_QUANT_SIZES[qtype][1]} bytes, not {at}"
    return (*offsets, at)


def plain(*modules: types.ModuleType) -> dict[str, dict]:
    """The modules' numba kernels as plain Python: {module name: namespace}.

    Each compiled function is swapped for its Python source function, rebound to a copy of
    its module's globals in which every other kernel is swapped too, so a plain kernel calls
    only plain kernels. The live modules are not touched.
    """
    spaces = {m.__name__: dict(vars(m)) for m in modules}
    for space in spaces.values():
        for name, obj in space.items():
            if hasattr(obj, "py_func"):
                f = obj.py_func
                space[name] = types.FunctionType(f.__code__, spaces[f.__module__], f.__name__, f.__defaults__,
                                                 f.__closure__)
    return spaces


# ---------------------------------------------------------------- bits and bytes

@jit
def f32_bits(f):
    return I(F(f).view(np.uint32))


@jit
def bits_f32(i):
    return np.uint32(i & 0xFFFFFFFF).view(np.float32)


@jit
def u8(v):
    """C's (uint8_t) of an int."""
    return v & 0xFF


@jit
def i8(v):
    """C's (int8_t) of an int."""
    return ((v + 128) & 0xFF) - 128


@jit
def f32_to_int(f):
    """C's (int) of a float on x86 (cvttss2si): truncation; NaN and out of range give INT_MIN."""
    if not (F(-2147483648.0) <= f < F(2147483648.0)):
        return -2147483648
    return I(f)


@jit
def roundf(f):
    """C's roundf: halves away from zero (the float64 sum below is exact for any float32)."""
    a = np.floor(np.float64(abs(f)) + 0.5)
    return F(-a) if f < 0 else F(a)


@jit
def nearest_int(fval):
    """ggml's nearest_int: round half to even through the float32 magic number 1.5 * 2^23."""
    val = F(fval) + F(12582912.0)
    return (f32_bits(val) & 0x007FFFFF) - 0x00400000


_TWO_P112, _TWO_M110, _TWO_M112 = F(2.0**112), F(2.0**-110), F(2.0**-112)


@jit
def fp32_to_fp16(f):
    """GGML_FP32_TO_FP16: the bits of the nearest IEEE half (ties to even)."""
    base = (abs(f) * _TWO_P112) * _TWO_M110
    w = f32_bits(f)
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = bits_f32((bias >> 1) + 0x07800000) + base
    bits = f32_bits(base)
    exp_bits = (bits >> 13) & 0x00007C00
    mantissa_bits = bits & 0x00000FFF
    nonsign = exp_bits + mantissa_bits
    return (sign >> 16) | (0x7E00 if shl1_w > 0xFF000000 else nonsign)


@jit
def fp16_to_fp32(h):
    """GGML_FP16_TO_FP32: exact."""
    w = (h & 0xFFFF) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normalized = bits_f32((two_w >> 4) + (0xE0 << 23)) * _TWO_M112
    denormalized = bits_f32((two_w >> 17) | (126 << 23)) - F(0.5)
    result = sign | (f32_bits(denormalized) if two_w < (1 << 27) else f32_bits(normalized))
    return bits_f32(result)


@jit
def put_f16(out, at, f):
    """Store f as a little-endian half at out[at:at+2]; return the float32 the half holds."""
    h = fp32_to_fp16(F(f))
    out[at] = h & 0xFF
    out[at + 1] = h >> 8
    return fp16_to_fp32(h)


# ---------------------------------------------------------------- ggml's scale searches

@jit
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """Symmetric scale for x, levels L in [0, 2*nmax); qw empty means C's NULL."""
    has_qw = qw.shape[0] > 0
    fmax = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(-nmax) / fmax
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return F(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(x[i], qw, i, has_qw, rmse_type)
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != 0 else F(0.0)
    if return_early:
        return F(0.5) * (scale + F(1.0) / iscale) if suml2 > 0 else F(1.0) / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / fmax
        sumlx = F(0.0)
        suml2 = F(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(x[i], qw, i, has_qw, rmse_type)
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@jit
def _qx_weight(xi, qw, i, has_qw, rmse_type):
    if has_qw:
        return qw[i]
    if rmse_type == 1:
        return xi * xi
    if rmse_type == 2:
        return F(1.0)
    if rmse_type == 3:
        return abs(xi)
    return np.sqrt(abs(xi))


@jit
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Symmetric scale for x with x^2 weights and a coordinate-descent refinement; L in [0, 2*nmax)."""
    fmax = F(0.0)
    amax = F(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            fmax = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(-nmax) / fmax
    if do_rmse:
        sumlx = F(0.0)
        suml2 = F(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            sumlx += w * x[i] * F(l)
            suml2 += w * F(l) * F(l)
        for _ in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                slx = sumlx - w * x[i] * F(L[i])
                if slx > 0:
                    sl2 = suml2 - w * F(L[i]) * F(L[i])
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        slx += w * x[i] * F(new_l)
                        sl2 += w * F(new_l) * F(new_l)
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > 0 else F(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return F(1.0) / iscale


@jit
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Scale and min for x = scale*L - the_min, L in [0, nmax]; returns (scale, the_min)."""
    fmin = x[0]
    fmax = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < fmin:
            fmin = x[i]
        if x[i] > fmax:
            fmax = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if fmin > 0:
        fmin = F(0.0)
    if fmax == fmin:
        for i in range(n):
            L[i] = 0
        return F(0.0), -fmin
    return _qkx_search(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, fmin, fmax, sum_w, sum_x)


@jit
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants with ggml's qkx3 prologue (`max <= min`); weights always given here."""
    fmin = x[0]
    fmax = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < fmin:
            fmin = x[i]
        if x[i] > fmax:
            fmax = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if fmin > 0:
        fmin = F(0.0)
    if fmax <= fmin:
        for i in range(n):
            L[i] = 0
        return F(0.0), -fmin
    return _qkx_search(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, fmin, fmax, sum_w, sum_x)


@jit
def _qkx_search(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad, fmin, fmax, sum_w, sum_x):
    """The common body of make_qkx2_quants and make_qkx3_quants: try nstep+1 scales, keep the best."""
    iscale = F(nmax) / (fmax - fmin)
    scale = F(1.0) / iscale
    best_error = F(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - fmin))
        L[i] = max(0, min(nmax, l))
        diff = scale * F(L[i]) + fmin - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -fmin
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F(step) + F(nmax)) / (fmax - fmin)
        sum_l = F(0.0)
        sum_l2 = F(0.0)
        sum_xl = F(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - fmin))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i]
            fl = F(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0.0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                fmin = this_min
    return scale, -fmin


@jit
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Scale for non-negative x (the sub-block scales), levels L in [0, nmax] stored as bytes."""
    fmax = F(0.0)
    for i in range(n):
        fmax = fmax if fmax > x[i] else x[i]  # C's MAX(max, x[i])
    if fmax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return F(0.0)
    iscale = F(nmax) / fmax
    for i in range(n):
        L[i] = u8(nearest_int(iscale * x[i]))
    scale = F(1.0) / iscale
    best_mse = F(0.0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse += quant_weights[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (F(0.1) * F(step) + F(nmax)) / fmax
        scale_is = F(1.0) / iscale_is
        mse = F(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F(0.0)
    suml2 = F(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = u8(l)
        w = quant_weights[i]
        sumlx += w * x[i] * F(l)
        suml2 += w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w * x[i] * F(new_l)
                    sl2 += w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = u8(new_l)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F(0.0)
