"""`matmul` from the stored bytes: the fast kernels (dot.py) against the plain integer reading
(dot_ref.py) and against dequantize-then-multiply (`matmul_ref`).

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
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from localmix import kernels
from localmix.kernels import QType, dot_ref
from localmix.kernels.matmul import matmul, matmul_ref

QUANTIZED = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
             QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
             QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S]
CASES = [(t, k) for t in QUANTIZED for k in (256, 4096)] + [(QType.Q4_K, 14336)]
FLOAT_SLACK = 1e-5


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


@pytest.mark.parametrize("qtype,k", CASES, ids=[f"{t.name}-{k}" for t, k in CASES])
def test_matmul_quantized(qtype, k):
    rng = np.random.default_rng(k + int(qtype))
    w = kernels.quantize(weight_rows(k, rng), qtype)
    w_float = kernels.dequantize(w, qtype).reshape(-1, k)
    assert np.array_equal(dot_ref.dequantize(w, qtype), w_float)  # the decomposition reads the bytes as gguf does
    block = GGML_QUANT_SIZES[qtype][0]  # the activations' block: Q8_K for 256, Q8_0 for 32
    for t in (1, 3, 17, 30):  # 30: past PREFILL_BLAS_T, where the 32-value types take BLAS
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


@pytest.mark.parametrize("qtype", [QType.F32, QType.F16, QType.BF16])
def test_matmul_float(qtype):
    rng = np.random.default_rng(3)
    w = kernels.quantize(rng.standard_normal((37, 4096)).astype(np.float32), qtype)  # BF16: raw bytes, as GGUFReader gives
    w_float = matmul_ref(np.eye(4096, dtype=np.float32), w, qtype).T
    if qtype == QType.BF16:
        assert w.dtype == np.uint8 and w.shape == (37, 8192)
        assert np.array_equal(matmul(np.eye(4096, dtype=np.float32)[:5], w.view(np.uint16), qtype), w_float[:, :5].T)
    for t in (1, 17):
        x = activations(t, 4096, rng)
        exact = x.astype(np.float64) @ w_float.astype(np.float64).T
        scale = np.abs(x.astype(np.float64)) @ np.abs(w_float.astype(np.float64)).T
        assert np.all(np.abs(matmul(x, w, qtype) - exact) <= FLOAT_SLACK * scale)


def test_block_sizes_from_gguf():
    """Every type the kernels read has the block size the data in gguf says."""
    for qtype in QUANTIZED:
        small = qtype.name.startswith("Q") and not qtype.name.endswith("_K") or qtype == QType.IQ4_NL
        assert GGML_QUANT_SIZES[qtype][0] == (32 if small else 256)
