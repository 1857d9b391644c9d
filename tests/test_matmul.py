"""`matmul` from the stored bytes: the fast kernels (dot.py) against the plain integer reading
(dot_ref.py), against dequantize-then-multiply (`matmul_ref`), and against llama.cpp's own CPU
kernels on this machine (ggml's `from_float` and `vec_dot` for the type, through ctypes).

Tolerances. The fast kernels and dot_ref compute the same integers (the same activation
quants, the same block decomposition); they differ only in float32 summation order, so they
agree to 1e-5 of sum_i |x_i w_i|. Against `matmul_ref` the activations' quantization is the
whole difference: rounding x to xd * q within a block of `block` values errs by at most
xd / 2 = amax_block / 254 per value, so |fast - ref| <= sum_b amax_b / 254 * sum_{i in b} |w_i|
(plus the same float slack), a bound each test computes and asserts. That worst case is
loose (errors of opposite signs cancel), so the tests also hold the error to 6 standard
deviations of its expected spread: each rounding error is uniform over a step of xd, variance
xd^2 / 12, so sd = sqrt(sum_i w_i^2 xd_b(i)^2 / 12), about 2^-7 of |x| |w| / sqrt(3) for
Gaussian x; a kernel that drops a single 32-value sub-block misses this one.

Against ggml's CPU kernels the activations are quantized alike (the same Q8_0, Q8_1 or Q8_K
blocks, to the bit), so float32 summation order is again the whole difference: the same 1e-5
slack, whichever SIMD path this CPU's llama.cpp takes (measured at most 0.14 of it on an AVX-512
EPYC). The float types are the exception: ggml converts the activations to the weight's type
first (vec_dot_type F16, BF16), which moves each by up to its unit roundoff (2^-11, 2^-8).
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import cache

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from localmix import kernels
from localmix.kernels import QType, dot, dot_ref, iq2, iquants, kquants, legacy
from localmix.kernels.matmul import PREFILL_BLAS_T, matmul, matmul_ref

QUANTIZED = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
             QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
             QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_S]
CASES = [(t, k) for t in QUANTIZED for k in (256, 4096)] + [(QType.Q4_K, 14336)]
FLOAT_SLACK = 1e-5
# activation rows: decode (1), prefill through the integer kernels (3, 17), and from
# PREFILL_BLAS_T on, the legacy types' dequantize + BLAS path (32)
BATCHES = (1, 3, 17, 32)


def weight_rows(k: int, rng) -> np.ndarray:
    """Rows of every kind: Gaussian, heavy-tailed with outliers, an all-zero block, constant."""
    gauss = rng.standard_normal((3, k)) * 0.02
    outlier = rng.standard_t(2, (2, k))
    outlier[:, rng.integers(0, k, 2)] = 50.0
    zero_block = rng.standard_normal((2, k))
    zero_block[:, :256] = 0.0
    const = np.full((1, k), -0.5)
    return np.concatenate([gauss, outlier, zero_block, const]).astype(np.float32)


def activations(t: int, k: int, rng) -> np.ndarray:
    x = rng.standard_normal((t, k)).astype(np.float32)
    x[:, rng.integers(0, k, 3)] *= 30.0  # outliers, as in real hidden states
    x[0, 256:512 if k > 256 else 256] = 0.0  # an all-zero block
    return x


def quantization_bound(x: np.ndarray, w_float: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) twice: the most that quantizing x blockwise to 127 levels can move x @ W.T, and
    6 standard deviations of that error when the roundings are independent. Q8_0 (block 32)
    stores its scale as a half float, as ggml does: that scales each block's product by up to
    2^-11 more, the same for all its values, so it adds to both bounds whole."""
    t, k = x.shape
    w = w_float.astype(np.float64).reshape(w_float.shape[0], k // block, block)
    step = np.abs(x.astype(np.float64)).reshape(t, k // block, block).max(axis=-1) / 127.0
    worst = step @ np.abs(w).sum(axis=-1).T / 2
    sd = np.sqrt(step**2 @ (w**2).sum(axis=-1).T / 12)
    half = 0.0
    if block == 32:
        half = 2.0**-11 * (np.abs(x.astype(np.float64)) + np.repeat(step, block, axis=-1) / 2) @ np.abs(w_float.astype(np.float64)).T
    return worst + half, 6 * sd + half


_FROM_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
_VEC_DOT = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


class _CpuTraits(ctypes.Structure):  # struct ggml_type_traits_cpu in ggml-cpu.h
    _fields_ = [("from_float", _FROM_FLOAT), ("vec_dot", _VEC_DOT), ("vec_dot_type", ctypes.c_int),
                ("nrows", ctypes.c_int64)]


@cache
def _ggml_cpu() -> ctypes.CDLL:
    """The libggml-cpu that llama-cpp-python ships, built for this CPU (scripts/setup)."""
    import llama_cpp

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(sorted(glob.glob(os.path.join(lib_dir, "libggml-cpu.*")))[0], mode=ctypes.RTLD_GLOBAL)
    lib.ggml_cpu_init.restype = None
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(_CpuTraits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    lib.ggml_cpu_init()  # its FP16 tables
    return lib


def ggml_cpu_matmul(x: np.ndarray, w: np.ndarray, qtype: QType) -> np.ndarray:
    """x @ W.T (T, N) as llama.cpp's CPU backend computes a product on this machine: each
    activation row converted to the type's vec_dot_type by that type's `from_float` (Q8_0, Q8_1,
    Q8_K, F16, BF16), then the type's `vec_dot` against each weight row (as stored, one per row of
    `w`). The repacked kernels llama.cpp takes for some types on some CPUs compute the same
    integers and differ from these only in float summation order."""
    lib = _ggml_cpu()
    traits = lib.ggml_get_type_traits_cpu(int(qtype)).contents
    to_dot = lib.ggml_get_type_traits_cpu(traits.vec_dot_type).contents.from_float
    block, nbytes = GGML_QUANT_SIZES[QType(traits.vec_dot_type)]
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = np.ascontiguousarray(w)
    t, k = x.shape
    xq = np.zeros((t, k // block * nbytes), dtype=np.uint8)
    out, s = np.zeros((t, w.shape[0]), dtype=np.float32), np.zeros(1, dtype=np.float32)
    for r in range(t):
        to_dot(x[r].ctypes.data, xq[r].ctypes.data, k)
        for n in range(w.shape[0]):
            traits.vec_dot(k, s.ctypes.data, 0, w[n].ctypes.data, 0, xq[r].ctypes.data, 0, 1)
            out[r, n] = s[0]
    return out


# how far ggml's conversion of the activations to the weight's type moves each: its unit roundoff
ACTIVATION_ROUNDING = {QType.F16: 2.0**-11, QType.BF16: 2.0**-8}


def ggml_bound(x: np.ndarray, w_float: np.ndarray, qtype: QType) -> np.ndarray:
    """(T, N): the most |matmul - ggml_cpu_matmul| may be: float32 summation order, and for the
    float types ggml's rounding of x to the weight's type (its unit roundoff times sum |x| |w|)."""
    scale = np.abs(x.astype(np.float64)) @ np.abs(w_float.astype(np.float64)).T
    return (FLOAT_SLACK + ACTIVATION_ROUNDING.get(qtype, 0.0)) * scale + 1e-30


@pytest.mark.parametrize("qtype,k", CASES, ids=[f"{t.name}-{k}" for t, k in CASES])
def test_matmul_quantized(qtype, k):
    rng = np.random.default_rng(k + int(qtype))
    w = kernels.quantize(weight_rows(k, rng), qtype)
    w_float = kernels.dequantize(w, qtype).reshape(-1, k)
    assert np.array_equal(dot_ref.dequantize(w, qtype), w_float)  # the decomposition reads the bytes as gguf does
    block = GGML_QUANT_SIZES[qtype][0]  # the activations' block: Q8_K for 256, Q8_0 for 32
    assert BATCHES[-1] >= PREFILL_BLAS_T > BATCHES[-2]
    for t in BATCHES:
        x = activations(t, k, rng)
        fast, plain, ref = matmul(x, w, qtype), dot_ref.matmul(x, w, qtype), matmul_ref(x, w, qtype)
        assert fast.shape == (t, w.shape[0]) and fast.dtype == np.float32
        slack = FLOAT_SLACK * (np.abs(x.astype(np.float64)) @ np.abs(w_float.astype(np.float64)).T) + 1e-30
        assert np.all(np.abs(fast - plain) <= slack), f"fast vs plain, T={t}: {np.max(np.abs(fast - plain) / slack):.3g}x"
        worst, typical = quantization_bound(x, w_float, block)
        for bound in (worst + slack, typical + slack):
            assert np.all(np.abs(fast - ref) <= bound), f"fast vs dequantized, T={t}: {np.max(np.abs(fast - ref) / bound):.3g}x"
            assert np.all(np.abs(plain - ref) <= bound)


def test_bound_is_tight_enough_to_fail():
    """A kernel that drops one 32-value sub-block's products is caught by the 6-sd bound."""
    rng = np.random.default_rng(1)
    w = kernels.quantize(weight_rows(4096, rng), QType.Q4_K)
    x = activations(3, 4096, rng)
    w_float = kernels.dequantize(w, QType.Q4_K).reshape(-1, 4096)
    broken = matmul(x, w, QType.Q4_K) - x[:, :32] @ w_float[:, :32].T
    _, typical = quantization_bound(x, w_float, 256)
    caught = np.abs(broken - matmul_ref(x, w, QType.Q4_K)) > typical
    assert caught.any()


FLOATS = [(QType.F32, 4096), (QType.F16, 4096), (QType.BF16, 4096)]


@pytest.mark.parametrize("qtype,k", CASES + FLOATS, ids=[f"{t.name}-{k}" for t, k in CASES + FLOATS])
def test_matmul_is_ggml_cpu_arithmetic(qtype, k):
    """The product llama.cpp computes on this CPU, from the same bytes and activations, to the
    float32 summation slack (plus ggml's rounding of the activations for F16 and BF16): the
    activations' quantization, the block decomposition and Q8_1's half-float block sums are
    ggml's, on whichever SIMD path (AVX2, AVX-512) this machine's llama.cpp was built for."""
    rng = np.random.default_rng(k + int(qtype) + 7)
    w = kernels.quantize(weight_rows(k, rng), qtype)
    w_float = kernels.dequantize(w, qtype).reshape(-1, k)
    for t in BATCHES:
        x = activations(t, k, rng)
        ours, theirs, bound = matmul(x, w, qtype), ggml_cpu_matmul(x, w, qtype), ggml_bound(x, w_float, qtype)
        assert np.all(np.abs(ours - theirs) <= bound), f"T={t}: {np.max(np.abs(ours - theirs) / bound):.3g}x the bound"


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q5_1], ids=["Q4_1", "Q5_1"])
def test_ggml_bound_catches_exact_block_sums(qtype):
    """Q8_1 keeps each activation block's sum as a half float, s = fp16(amax / 127 * sum q), and
    ggml's Q4_1/Q5_1 product meets each weight block's min m with that s. A product that used the
    exact xd * sum q instead (localmix's did once: Q4_1 logits 1.86 off llama.cpp's) is caught by
    the float32 bound above, at every batch size."""
    k = 4096
    rng = np.random.default_rng(11)
    w = kernels.quantize(weight_rows(k, rng), qtype)
    w_float = kernels.dequantize(w, qtype).reshape(-1, k)
    m_at = legacy.Q4_1_M if qtype == QType.Q4_1 else legacy.Q5_1_M
    m = w.reshape(w.shape[0], k // 32, -1)[:, :, m_at:m_at + 2].copy().view(np.float16)[..., 0].astype(np.float32)
    for t in BATCHES:
        x = activations(t, k, rng)
        _, xd, xs = dot.quantize_activations(x, dot.QK, dot.QK)
        amax = np.abs(x.reshape(t, -1, 32)).max(-1)
        s16 = (amax / np.float32(127.0) * xs).astype(np.float16).astype(np.float32)
        exact_sums = matmul(x, w, qtype) - (s16 - xd * xs) @ m.T
        assert np.any(np.abs(exact_sums - ggml_cpu_matmul(x, w, qtype)) > ggml_bound(x, w_float, qtype)), f"T={t}"


def test_read_only_memmap_slice(tmp_path):
    """w[e] of a read-only (E, N, row bytes) memory map: the way the engine passes experts."""
    rng = np.random.default_rng(2)
    for qtype in (QType.Q6_K, QType.Q8_0):
        experts = np.stack([kernels.quantize(weight_rows(512, rng), qtype) for _ in range(3)])
        path = tmp_path / f"{qtype.name}.bin"
        experts.tofile(path)
        mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=experts.shape)
        assert not mapped[1].flags.writeable
        x = activations(3, 512, rng)
        w_float = kernels.dequantize(experts[1], qtype).reshape(-1, 512)
        for t in (1, 3):
            # numba compiles read-only and writable arrays separately: the float sums may be
            # ordered differently, nothing more
            slack = FLOAT_SLACK * (np.abs(x[:t]) @ np.abs(w_float).T)
            assert np.all(np.abs(matmul(x[:t], mapped[1], qtype) - matmul(x[:t], experts[1].copy(), qtype)) <= slack)


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16], ids=["F32", "F16", "BF16"])
def test_matmul_float(qtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((37, 4096)).astype(np.float32)
    w = kernels.quantize(rows, qtype)  # BF16: raw bytes, as GGUFReader gives
    # the stored values, rounded by torch (round to nearest even), not by localmix or gguf
    dtype = {QType.F32: torch.float32, QType.F16: torch.float16, QType.BF16: torch.bfloat16}[qtype]
    w_float = torch.from_numpy(rows).to(dtype).float().numpy()
    if qtype == QType.BF16:
        assert w.dtype == np.uint8 and w.shape == (37, 8192)
        assert np.array_equal(matmul(np.eye(4096, dtype=np.float32)[:5], w.view(np.uint16), qtype), w_float[:, :5].T)
    assert np.array_equal(matmul(np.eye(4096, dtype=np.float32)[:7], w, qtype), w_float[:, :7].T)
    for t in (1, 17):
        x = activations(t, 4096, rng)
        exact = x.astype(np.float64) @ w_float.astype(np.float64).T
        scale = np.abs(x.astype(np.float64)) @ np.abs(w_float.astype(np.float64)).T
        assert np.all(np.abs(matmul(x, w, qtype) - exact) <= FLOAT_SLACK * scale)


# ggml-common.h, written out: weights per block, and each block_* struct's fields as
# (name, offset); the last entry is the struct's size
GGML_BLOCKS = {
    QType.Q4_0: (32, [("d", 0), ("qs", 2), ("", 18)]),
    QType.Q4_1: (32, [("d", 0), ("m", 2), ("qs", 4), ("", 20)]),
    QType.Q5_0: (32, [("d", 0), ("qh", 2), ("qs", 6), ("", 22)]),
    QType.Q5_1: (32, [("d", 0), ("m", 2), ("qh", 4), ("qs", 8), ("", 24)]),
    QType.Q8_0: (32, [("d", 0), ("qs", 2), ("", 34)]),
    QType.Q2_K: (256, [("scales", 0), ("qs", 16), ("d", 80), ("dmin", 82), ("", 84)]),
    QType.Q3_K: (256, [("hmask", 0), ("qs", 32), ("scales", 96), ("d", 108), ("", 110)]),
    QType.Q4_K: (256, [("d", 0), ("dmin", 2), ("scales", 4), ("qs", 16), ("", 144)]),
    QType.Q5_K: (256, [("d", 0), ("dmin", 2), ("scales", 4), ("qh", 16), ("qs", 48), ("", 176)]),
    QType.Q6_K: (256, [("ql", 0), ("qh", 128), ("scales", 192), ("d", 208), ("", 210)]),
    QType.IQ4_NL: (32, [("d", 0), ("qs", 2), ("", 18)]),
    QType.IQ4_XS: (256, [("d", 0), ("scales_h", 2), ("scales_l", 4), ("qs", 8), ("", 136)]),
    QType.IQ3_XXS: (256, [("d", 0), ("qs", 2), ("", 98)]),  # qs[3*QK_K/8]: grid indices, then scales and signs
    QType.IQ3_S: (256, [("d", 0), ("qs", 2), ("qh", 66), ("signs", 74), ("scales", 106), ("", 110)]),
    QType.IQ2_S: (256, [("d", 0), ("qs", 2), ("qh", 66), ("scales", 74), ("", 82)]),  # qs[QK_K/4]: indices, then signs
}
# localmix's own layout constants (kernels/legacy.py, kquants.py, iquants.py), in the same order
OUR_LAYOUTS = {
    QType.Q4_0: (legacy.Q4_0_D, legacy.Q4_0_QS, legacy.Q4_0_BYTES),
    QType.Q4_1: (legacy.Q4_1_D, legacy.Q4_1_M, legacy.Q4_1_QS, legacy.Q4_1_BYTES),
    QType.Q5_0: (legacy.Q5_0_D, legacy.Q5_0_QH, legacy.Q5_0_QS, legacy.Q5_0_BYTES),
    QType.Q5_1: (legacy.Q5_1_D, legacy.Q5_1_M, legacy.Q5_1_QH, legacy.Q5_1_QS, legacy.Q5_1_BYTES),
    QType.Q8_0: (legacy.Q8_0_D, legacy.Q8_0_QS, legacy.Q8_0_BYTES),
    QType.Q2_K: (kquants.Q2_SC, kquants.Q2_QS, kquants.Q2_D, kquants.Q2_DMIN, kquants.Q2_BYTES),
    QType.Q3_K: (kquants.Q3_HM, kquants.Q3_QS, kquants.Q3_SC, kquants.Q3_D, kquants.Q3_BYTES),
    QType.Q4_K: (kquants.Q4_D, kquants.Q4_DMIN, kquants.Q4_SC, kquants.Q4_QS, kquants.Q4_BYTES),
    QType.Q5_K: (kquants.Q5_D, kquants.Q5_DMIN, kquants.Q5_SC, kquants.Q5_QH, kquants.Q5_QS, kquants.Q5_BYTES),
    QType.Q6_K: (kquants.Q6_QL, kquants.Q6_QH, kquants.Q6_SC, kquants.Q6_D, kquants.Q6_BYTES),
    QType.IQ4_NL: (iquants.IQ4_NL_D, iquants.IQ4_NL_QS, iquants.IQ4_NL_BYTES),
    QType.IQ4_XS: (iquants.IQ4_XS_D, iquants.IQ4_XS_SH, iquants.IQ4_XS_SL, iquants.IQ4_XS_QS, iquants.IQ4_XS_BYTES),
    QType.IQ3_XXS: (iquants.IQ3_XXS_D, iquants.IQ3_XXS_QS, iquants.IQ3_XXS_BYTES),
    QType.IQ3_S: (iquants.IQ3_S_D, iquants.IQ3_S_QS, iquants.IQ3_S_QH, iquants.IQ3_S_SIGNS, iquants.IQ3_S_SC,
                  iquants.IQ3_S_BYTES),
    QType.IQ2_S: (iq2.IQ2_S_D, iq2.IQ2_S_QS, iq2.IQ2_S_QH, iq2.IQ2_S_SC, iq2.IQ2_S_BYTES),
}


@pytest.mark.parametrize("qtype", QUANTIZED, ids=[t.name for t in QUANTIZED])
def test_block_layouts_are_ggml_common_h(qtype):
    """The kernels' block sizes and field offsets are ggml's (ggml-common.h), and so are the
    row sizes the products and the writer use."""
    weights, fields = GGML_BLOCKS[qtype]
    assert OUR_LAYOUTS[qtype] == tuple(offset for _, offset in fields)
    assert (dot.QK_K if qtype in dot.SUPER else dot.QK) == weights
    assert qtype in (dot.SUPER if weights == 256 else dot.SMALL)
    assert kernels.block_size(qtype) == weights
    assert kernels.row_nbytes(qtype, 4096) == 4096 // weights * fields[-1][1]
    assert kernels.quantize(np.ones((2, 512), np.float32), qtype).shape == (2, 512 // weights * fields[-1][1])
