"""The plain reference for the fast products in dot.py: ggml's per-block integer dot, in numpy.

A quantized row, block by block, is written as integers and a few floats, read from the
bytes the way ggml-quants.c's dequantize_row_* reads them (the K-quant scales through C's
32-bit kmask shuffles, as ggml_vec_dot_*_q8_K_generic does):

    value[i] = d * sc[s] * q[i] - dmin * mn[s]      i in sub-block s of the block

(legacy blocks are one sub-block with sc = 1; Q4_1/Q5_1's `+ m` is dmin = -m, mn = 1; the
i-quants' q is a signed level read through a table: IQ4's non-linear levels, IQ3's grid
points with their signs, and an IQ3 block scale 2 l + 1 comes with d / 4 (IQ3_XXS); IQ2_S's
sub-blocks are 16 values, two grid points of 8, scale 2 l + 1 with d / 8). The
activations are quantized like the fast path's (Q8_K: one float scale per 256, Q8_0: per 32)
and each block's product is the integer dot of the quants, scaled: what
ggml_vec_dot_q4_K_q8_K and its siblings compute, without any of their SIMD. For Q4_1/Q5_1 the
min meets the activation block's sum as ggml's Q8_1 keeps it, a half float of amax / 127 * sum.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from .iqgrid import KSIGNS, iq2s_grid, iq3_grid
from .iquants import KVALUES_IQ4NL

IQUANTS = {T.IQ4_NL, T.IQ4_XS, T.IQ3_XXS, T.IQ3_S, T.IQ2_S}
KMASK1, KMASK2, KMASK3 = np.uint32(0x3F3F3F3F), np.uint32(0x0F0F0F0F), np.uint32(0x03030303)


def quantize_activations(x: np.ndarray, block: int, span: int):
    """x float32 (T, K) -> (xq int (T, K), xd float32 (T, K // block), xs int (T, K // span)):
    x ~ xd * xq per block, |xq| <= 127 (Q8_K for block 256, Q8_0 for 32); xs: xq summed per span."""
    n_t, k = x.shape
    xb = np.asarray(x, dtype=np.float32).reshape(n_t, k // block, block)
    amax = np.abs(xb).max(axis=-1)
    ok = (amax > 0) & np.isfinite(amax)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(ok, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        if block == 256:  # Q8_K's float scale 1 / iscale; Q8_0's half-float amax / 127
            xd = np.where(ok, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
        else:
            xd = np.where(ok, amax / np.float32(127.0), np.float32(0.0)).astype(np.float16).astype(np.float32)
        xq = np.where(ok[..., None], np.rint(xb * iscale[..., None]), 0).astype(np.int64)
    xq = xq.reshape(n_t, k)
    return xq, xd, xq.reshape(n_t, k // span, span).sum(axis=-1)


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) little-endian half bytes -> float32 (...)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _words(b: np.ndarray) -> list[np.ndarray]:
    """(..., 4n) bytes -> n little-endian uint32 (...) arrays."""
    w = np.ascontiguousarray(b).view("<u4")
    return [w[..., i] for i in range(w.shape[-1])]


def _bytes(*words: np.ndarray) -> np.ndarray:
    """uint32 arrays -> their bytes, (..., 4 * len(words))."""
    return np.stack(words, axis=-1).astype("<u4").view(np.uint8)


def _k_scales_mins(s: np.ndarray):
    """Q4_K/Q5_K: 12 bytes -> 8 6-bit scales and 8 mins (the utmp shuffle of ggml_vec_dot_q4_K_q8_K)."""
    u0, u1, u2 = _words(s)
    u3 = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4)
    uaux = u1 & KMASK1
    u1 = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)
    u2 = uaux
    u0 = u0 & KMASK1
    return _bytes(u0, u1).astype(np.int64), _bytes(u2, u3).astype(np.int64)


def _split(w: np.ndarray, qtype: T, *fields: int) -> list[np.ndarray]:
    """(N, row bytes) -> each field of every block, (N, blocks, field bytes), in C order."""
    nbytes = GGML_QUANT_SIZES[qtype][1]
    assert sum(fields) == nbytes, f"{qtype.name}: fields {fields} are not its {nbytes}-byte block"
    blocks = np.asarray(w).view(np.uint8).reshape(w.shape[0], -1, nbytes)
    at = np.cumsum((0, *fields))
    return [blocks[..., a:b] for a, b in zip(at[:-1], at[1:])]


def _iquant(w: np.ndarray, qtype: T):
    """The i-quants' blocks, as `decompose` returns them."""
    kv = KVALUES_IQ4NL.astype(np.int64)
    if qtype == T.IQ4_NL:
        d, qs = _split(w, qtype, 2, 16)
        q = kv[np.concatenate([qs & 15, qs >> 4], axis=-1)][:, :, None, :]
        ones = np.ones(q.shape[:3], dtype=np.int64)
        return q, ones, 0 * ones, _f16(d), 0 * _f16(d)
    if qtype == T.IQ4_XS:
        d, sh, sl, qs = _split(w, qtype, 2, 2, 4, 128)
        ib = np.arange(8)
        h = np.ascontiguousarray(sh).view("<u2")[..., 0].astype(np.int64)  # (n, b)
        ls = ((sl[..., ib // 2].astype(np.int64) >> (4 * (ib % 2))) & 15) | (((h[..., None] >> (2 * ib)) & 3) << 4)
        qs = qs.reshape(*qs.shape[:2], 8, 16)
        q = kv[np.concatenate([qs & 15, qs >> 4], axis=-1)]  # sub-block ib: low nibbles, then high
        return q, ls - 32, np.zeros_like(ls), _f16(d), 0 * _f16(d)
    if qtype == T.IQ2_S:
        d, qs, sg, qh, scales = _split(w, qtype, 2, 32, 32, 8, 8)
        i8 = np.arange(32)  # group of 8: sub-block i8 // 2
        high = (qh[..., i8 // 4].astype(np.int64) >> (2 * (i8 % 4))) & 3
        points = iq2s_grid()[qs.astype(np.int64) | (high << 8)]  # (n, b, 32, 8)
        bits = (sg[..., None].astype(np.int64) >> np.arange(8)) & 1
        q = (points * (1 - 2 * bits)).reshape(*qs.shape[:2], 16, 16)
        ib = np.arange(16)
        sc = 2 * ((scales[..., ib // 2].astype(np.int64) >> (4 * (ib % 2))) & 15) + 1
        d = _f16(d) * np.float32(0.125)
        return q, sc, np.zeros_like(sc), d, 0 * d
    grid = iq3_grid(qtype)
    if qtype == T.IQ3_XXS:
        d, qs, ss = _split(w, qtype, 2, 64, 32)
        aux = np.ascontiguousarray(ss).view("<u4").astype(np.int64)  # (n, b, 8): 4 x 7 sign bits, the scale on top
        sc = 2 * (aux >> 28) + 1
        signs = KSIGNS[(aux[..., None] >> (7 * np.arange(4))) & 127]  # (n, b, 8, 4): 8 signs per group of 8
        points = grid[qs.reshape(*qs.shape[:2], 8, 8)]  # (n, b, 8, 8, 4)
        d = _f16(d) * np.float32(0.25)
    else:
        d, qs, qh, sg, scales = _split(w, qtype, 2, 64, 8, 32, 4)
        ib = np.arange(8)
        sc = 2 * ((scales[..., ib // 2].astype(np.int64) >> (4 * (ib % 2))) & 15) + 1
        high = (qh[..., None].astype(np.int64) >> np.arange(8)) & 1  # (n, b, 8, 8): bit 8 of each grid index
        points = grid[qs.reshape(*qs.shape[:2], 8, 8).astype(np.int64) | (high << 8)]
        signs = sg.reshape(*sg.shape[:2], 8, 4)
        d = _f16(d)
    bits = (signs[..., None].astype(np.int64) >> np.arange(8)) & 1  # (n, b, 8, 4, 8): element 8l + j
    q = points.reshape(*points.shape[:3], 32) * (1 - 2 * bits.reshape(*bits.shape[:3], 32))
    return q, sc, np.zeros_like(sc), d, 0 * d


def decompose(w: np.ndarray, qtype: T):
    """The rows' blocks as (q (N, B, S, L) int, sc (N, B, S) int, mn (N, B, S) int, d (N, B), dmin (N, B)):
    element l of sub-block s of block b is d * sc * q - dmin * mn."""
    if qtype in IQUANTS:
        return _iquant(w, qtype)
    j4 = np.arange(4).reshape(4, 1, 1)  # the four 2-bit planes of Q2_K/Q3_K, over (j, h, l)
    if qtype == T.Q2_K:
        sc, qs, d, dmin = _split(w, qtype, 16, 64, 2, 2)
        q = (qs.reshape(*qs.shape[:2], 2, 1, 2, 16) >> (2 * j4)) & 3  # (n, j, h, l): element 128n + 32j + 16h + l
        return q.reshape(*qs.shape[:2], 16, 16), sc & 15, sc >> 4, _f16(d), _f16(dmin)
    if qtype == T.Q3_K:
        hm, qs, s, d = _split(w, qtype, 32, 64, 12, 2)
        a0, a1, tmp = _words(s)
        sc = _bytes((a0 & KMASK2) | (((tmp >> 0) & KMASK3) << 4), (a1 & KMASK2) | (((tmp >> 2) & KMASK3) << 4),
                    ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK3) << 4), ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK3) << 4))
        q = (qs.reshape(*qs.shape[:2], 2, 1, 2, 16) >> (2 * j4)) & 3
        n2 = np.arange(2).reshape(2, 1, 1, 1)
        hbit = (hm.reshape(*hm.shape[:2], 1, 1, 2, 16) >> (4 * n2 + j4)) & 1  # (n, j, h, l); clear: q - 4
        q = q.astype(np.int64) - 4 * (1 - hbit)
        return q.reshape(*qs.shape[:2], 16, 16), sc.astype(np.int64) - 32, np.zeros_like(sc), _f16(d), 0 * _f16(d)
    if qtype in (T.Q4_K, T.Q5_K):
        if qtype == T.Q4_K:
            d, dmin, s, qs = _split(w, qtype, 2, 2, 12, 128)
        else:
            d, dmin, s, qh, qs = _split(w, qtype, 2, 2, 12, 32, 128)
        qs = qs.reshape(*qs.shape[:2], 4, 1, 32)
        q = np.concatenate([qs & 15, qs >> 4], axis=-2).reshape(*qs.shape[:2], 8, 32)  # low nibbles, then high
        if qtype == T.Q5_K:
            q = q | (((qh[:, :, None, :] >> np.arange(8).reshape(8, 1)) & 1) << 4)  # sub-block j: bit j of qh
        sc, mn = _k_scales_mins(s)
        return q, sc, mn, _f16(d), _f16(dmin)
    if qtype == T.Q6_K:
        ql, qh, sc, d = _split(w, qtype, 128, 64, 16, 2)
        ql = ql.reshape(*ql.shape[:2], 2, 1, 2, 32)  # (n, -, 32-byte half, l)
        lo = np.concatenate([ql & 15, ql >> 4], axis=-3)  # (n, j // 2, j % 2, l)
        hi = (qh.reshape(*qh.shape[:2], 2, 1, 32) >> (2 * np.arange(4).reshape(4, 1))) & 3  # (n, j, l)
        q = (lo.reshape(hi.shape) | (hi << 4)).astype(np.int64) - 32
        return q.reshape(*ql.shape[:2], 16, 16), sc.view(np.int8).astype(np.int64), np.zeros_like(sc), _f16(d), 0 * _f16(d)
    # legacy: one 32-element sub-block per block, sc = 1
    if qtype == T.Q8_0:
        d, qs = _split(w, qtype, 2, 32)
        q, dmin, mn = qs.view(np.int8), 0 * _f16(d), 0
    elif qtype in (T.Q4_0, T.Q4_1):
        d, m, qs = _split(w, qtype, 2, 0, 16) if qtype == T.Q4_0 else _split(w, qtype, 2, 2, 16)
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
        q, dmin, mn = (q - 8, 0 * _f16(d), 0) if qtype == T.Q4_0 else (q, -_f16(m), 1)
    elif qtype in (T.Q5_0, T.Q5_1):
        d, m, qh, qs = _split(w, qtype, 2, 0, 4, 16) if qtype == T.Q5_0 else _split(w, qtype, 2, 2, 4, 16)
        q = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.int64)
        q = q | (((_words(qh)[0][..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int64)
        q, dmin, mn = (q - 16, 0 * _f16(d), 0) if qtype == T.Q5_0 else (q, -_f16(m), 1)
    else:
        raise ValueError(f"no integer dot product for {qtype.name}")
    ones = np.ones(q.shape[:2] + (1,), dtype=np.int64)
    return q.astype(np.int64)[:, :, None, :], ones, mn * ones, _f16(d), dmin


def dequantize(w: np.ndarray, qtype: T) -> np.ndarray:
    """float32 (N, K) from the decomposition: to check it against gguf's own dequantize."""
    q, sc, mn, d, dmin = decompose(w, qtype)
    v = d[..., None, None] * (sc[..., None] * q).astype(np.float32) - (dmin[..., None] * mn)[..., None]
    return v.reshape(q.shape[0], -1).astype(np.float32)


def matmul(x: np.ndarray, w: np.ndarray, qtype: T) -> np.ndarray:
    """x float32 (T, K) times the quantized rows w (N, row bytes): (T, N), block by block in integers."""
    q, sc, mn, d, dmin = decompose(w, qtype)
    n, nb, ns, sub = q.shape
    block = ns * sub
    xq, xd, xs = quantize_activations(x, block, sub)
    xq = xq.reshape(-1, nb, ns, sub)
    xs = xs.reshape(-1, nb, ns)
    isum = np.einsum("nbsl,tbsl->tnbs", q, xq)  # each sub-block's integer dot
    sumi = (isum * sc).sum(axis=-1)  # (T, N, B): with the sub-block scales
    summ = np.einsum("nbs,tbs->tnb", np.broadcast_to(mn, sc.shape), xs)  # the mins, through the activation sums
    if qtype in (T.Q4_1, T.Q5_1):  # Q8_1: the activation block sums kept as half floats
        amax = np.abs(np.asarray(x, dtype=np.float32).reshape(x.shape[0], nb, block)).max(axis=-1)
        s16 = (amax / np.float32(127.0) * summ.astype(np.float32)[:, 0]).astype(np.float16).astype(np.float32)
        per_block = xd[:, None, :] * d * sumi - dmin * s16[:, None, :]
    else:
        per_block = xd[:, None, :] * (d * sumi - dmin * summ)
    return per_block.sum(axis=-1).astype(np.float32)
