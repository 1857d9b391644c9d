"""Numeric kernels: float32 rows -> the bytes of a GGML tensor type, and back.

Each type is a pair of pure functions over rows whose length is a multiple of the type's
block size. The bottom stage: of localmix it imports only paths.py (where numba keeps its cache).

The quantized types are this project's own kernels, ports of llama.cpp's ggml-quants.c that
write the bytes `ggml_quantize_chunk` writes, with or without an importance matrix:
  common.py   float32 bit tricks, FP16 fields, ggml's scale searches (make_*_quants)
  legacy.py   Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
  kquants.py  Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
  iquants.py  IQ4_NL, IQ4_XS, IQ3_XXS, IQ3_S (their grids: iqgrid.py)
  iq2.py      IQ2_S (its grid: iqgrid.py)
  batched.py  the scale searches run on 16 sub-blocks at once (SIMD lanes), bit for bit the same
  fast.py     the quantizers around the batched searches: what `quantize` runs
`quantize` runs the fast kernels compiled by numba, in parallel over rows (for the i-quants and
Q8_0, the plain ports compiled as they are); `quantize_ref` runs
the plain ports (the straight reading of the C) as plain Python, one row at a time (slow: for
tests). The float types, and every dequantization, come from the `gguf` package (llama.cpp's
own gguf-py).

The native engine's products of activations with a tensor, straight from its bytes:
  matmul.py     what the forward calls: the product for any type, prefill or decode
  dot.py        the fast quantized products: integer dot products over the stored blocks
  dot_ref.py    their plain reference: ggml's per-block integer dot, in numpy
  decode.py     one activation row (T = 1) times a K-quant or legacy tensor
  decode_iq.py  the same for the i-quants
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from localmix.paths import cache_dir


def _cache_dir() -> str:
    """Where numba caches the compiled kernels: a folder named by a digest of every kernel
    source. numba checks only the timestamp of the file that defines a cached function, so
    code it inlined from another file could otherwise outlive an edit or an upgrade."""
    digest = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(f.read_bytes())
    return str(cache_dir() / "numba" / digest.hexdigest()[:16])


if not os.environ.get("NUMBA_CACHE_DIR"):  # the user's own choice wins
    numba.config.CACHE_DIR = _cache_dir()

from . import common, fast, iq2, iquants, kquants, legacy

QType = GGMLQuantizationType

# type: (plain row kernel, the reference; parallel driver over rows of the fast kernel, what `quantize` runs)
KERNELS = {t: (row, fast.DRIVERS.get(t, rows)) for t, (row, rows) in {**legacy.KERNELS, **kquants.KERNELS, **iquants.KERNELS, **iq2.KERNELS}.items()}
FLOATS = frozenset({QType.F32, QType.F16, QType.BF16})
QUANTIZABLE: frozenset[QType] = FLOATS | frozenset(KERNELS)


def block_size(qtype: QType) -> int:
    """Elements per block: a row's length must be a multiple of it."""
    return GGML_QUANT_SIZES[qtype][0]


def row_nbytes(qtype: QType, n: int) -> int:
    """Bytes of one row of `n` elements."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    assert n % elems == 0, f"row of {n} is not a multiple of {qtype.name}'s block of {elems}"
    return n // elems * nbytes


def tensor_nbytes(qtype: QType, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_nbytes(qtype, shape[-1])


def quantize(x: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 (or float16) -> the tensor's bytes, shape (..., row_nbytes) (float arrays for F32/F16).

    `imatrix` is the importance of each of a row's n columns (llama.cpp's imatrix), or None;
    the bytes equal `ggml_quantize_chunk`'s for the same rows and importance.
    """
    if qtype in FLOATS:
        return quants.quantize(x, qtype)
    rows, qw, out = _prepare(x, qtype, imatrix)
    KERNELS[qtype][1](rows, qw, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def quantize_ref(x: np.ndarray, qtype: QType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """`quantize` through the plain-Python reading of the same kernels, one row at a time (slow)."""
    if qtype in FLOATS:
        return quants.quantize(x, qtype)
    rows, qw, out = _prepare(x, qtype, imatrix)
    row_kernel = KERNELS[qtype][0]
    plain_kernel = _plain()[row_kernel.py_func.__module__][row_kernel.__name__]
    with np.errstate(all="ignore"):  # float32 overflow to inf is part of the arithmetic, as in C
        for r in range(rows.shape[0]):
            plain_kernel(rows[r], qw, out[r])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def dequantize(data: np.ndarray, qtype: QType) -> np.ndarray:
    """The tensor's bytes -> float32 rows."""
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32)


def quantization_error(x: np.ndarray, data: np.ndarray, qtype: QType) -> float:
    """How far the quantized `data` is from `x`: RMS of the round-trip error over RMS of x."""
    x = np.asarray(x, dtype=np.float64)
    err = dequantize(data, qtype).reshape(x.shape) - x
    return float(np.sqrt(np.sum(err * err) / max(np.sum(x * x), np.finfo(np.float64).tiny)))


def _prepare(x: np.ndarray, qtype: QType, imatrix: np.ndarray | None):
    """(rows as contiguous float32 (R, n), importance or the empty NULL stand-in, output (R, row bytes))."""
    if qtype not in KERNELS:
        raise ValueError(f"cannot quantize to {qtype.name}")
    n = x.shape[-1]
    rows = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1, n))
    out = np.empty((rows.shape[0], row_nbytes(qtype, n)), dtype=np.uint8)
    if imatrix is None or qtype == QType.Q8_0:  # Q8_0 has no importance-aware variant in ggml
        return rows, common.NO_WEIGHTS, out
    qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    assert qw.shape == (n,), f"importance of shape {qw.shape} for rows of {n}"
    return rows, qw, out


@cache
def _plain() -> dict[str, dict]:
    return common.plain(common, legacy, kquants, iquants, iq2)
