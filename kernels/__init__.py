"""Numeric kernels: float32 rows -> the bytes of a GGML tensor type, and back.

Imported as `localmix.kernels` (the folder sits at the top of the repository; a top-level
package named `kernels` would shadow Hugging Face's). Each type is a pair of pure functions
over rows whose length is a multiple of the type's block size.

The float types and Q8_0 come from the `gguf` package (llama.cpp's own gguf-py, the code its
converter uses, so our bytes are its bytes). The K-quants that gguf-py cannot produce land
here as this project's own kernels.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

QType = GGMLQuantizationType


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


def quantize(x: np.ndarray, qtype: QType) -> np.ndarray:
    """Rows of float32 (or float16) -> the tensor's bytes (float arrays for F32/F16)."""
    return quants.quantize(x, qtype)


def dequantize(data: np.ndarray, qtype: QType) -> np.ndarray:
    """The tensor's bytes -> float32 rows."""
    return np.asarray(quants.dequantize(data, qtype), dtype=np.float32)
