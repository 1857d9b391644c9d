"""llama.cpp's own quantizer, called through ctypes: the oracle the kernel tests compare against.

`ggml_quantize_chunk` lives in the `libggml-base` that llama-cpp-python ships. Its enum values
are gguf's `GGMLQuantizationType` values, so a `QType` passes straight through.
"""

from __future__ import annotations

import ctypes
import glob
import os
from functools import cache

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):  # struct ggml_type_traits in ggml.h
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT),
                ("from_float_ref", ctypes.c_void_p)]


@cache
def _lib() -> ctypes.CDLL:
    import llama_cpp

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    path = sorted(glob.glob(os.path.join(lib_dir, "libggml-base.*")))[0]
    lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_fp32_to_fp16_row.restype = None
    lib.ggml_fp32_to_fp16_row.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Rows of float32 -> uint8 (rows, row bytes), exactly as `ggml_quantize_chunk` writes them (one thread)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.reshape(-1, x.shape[-1]).shape
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, n // elems * nbytes), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    assert qw is None or qw.shape == (n,)
    lib = _lib()
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, n,
                                      None if qw is None else qw.ctypes.data)
    assert written == out.nbytes
    return out.reshape(*x.shape[:-1], out.shape[-1])


def ggml_dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n: int) -> np.ndarray:
    """Rows of a tensor's bytes -> float32 (rows, n), through ggml's own `to_float` for the type."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.reshape(-1, data.shape[-1]).shape[0]
    out = np.zeros((rows, n), dtype=np.float32)
    _lib().ggml_get_type_traits(int(qtype)).contents.to_float(data.ctypes.data, out.ctypes.data, rows * n)
    return out


def ggml_fp32_to_fp16(x: np.ndarray) -> np.ndarray:
    """float32 values -> the uint16 bits of ggml's FP16 conversion (GGML_FP32_TO_FP16)."""
    x = np.ascontiguousarray(x, dtype=np.float32).ravel()
    out = np.zeros(x.size, dtype=np.uint16)
    _lib().ggml_fp32_to_fp16_row(x.ctypes.data, out.ctypes.data, x.size)
    return out
