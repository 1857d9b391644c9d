"""llama.cpp's own quantizer, `llama_model_quantize`, called through llama-cpp-python."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from conftest import THREADS
from gguf import LlamaFileType

from localmix.convert.mix import FILE_TYPES


def llama_model_quantize(src: Path, out: Path, file_type: str, imatrix: dict[str, np.ndarray] | None = None,
                         nthread: int = THREADS, allow_requantize: bool = False, tensor_types: dict[str, int] | None = None) -> None:
    """`tensor_types` {tensor name: GGML type} are llama-quantize's --tensor-type overrides
    (`tt_overrides`: regular expressions, here each anchored to one whole name)."""
    import re

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.allow_requantize = allow_requantize
    # localmix's --type names, and llama.cpp's other file types by name (Q4_0, Q4_1, Q5_0, Q5_1)
    params.ftype = int(FILE_TYPES[file_type][0] if file_type in FILE_TYPES else LlamaFileType[f"MOSTLY_{file_type}"])
    keep = []  # every ctypes object must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(data)
            entries[i].name = name.encode()
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = data.size
        entries[len(imatrix)].name = None
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(entries)
    if tensor_types:
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (name, qtype) in enumerate(sorted(tensor_types.items())):
            pattern = f"^{re.escape(name)}$".encode()
            keep.append(pattern)
            overrides[i].pattern = pattern
            overrides[i].type = int(qtype)
        overrides[len(tensor_types)].pattern = None
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(overrides)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"
