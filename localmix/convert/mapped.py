"""Float rows of a tensor stored in a file, read through short-lived memory maps.

Both sources of a conversion (safetensors shards, GGUF files) store plain F32/F16/BF16
arrays at known offsets; a downloaded GGUF may also hold quantized tensors (Q8_0, Q4_K, ...),
whose rows are dequantized by gguf-py (`gguf.quants.dequantize`) as they are read. Reading a
tensor a chunk of rows at a time, each chunk through its own mapping that is dropped after
use, keeps resident memory bounded by one chunk however large the tensor or the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    x = bits.astype(np.uint32)
    x <<= np.uint32(16)
    return x.view(np.float32)


# stored dtype -> (numpy dtype of the stored bits, converter to a float array)
STORED_DTYPES = {
    "BF16": (np.uint16, bf16_to_f32),
    "F16": (np.float16, np.array),   # float16 stays float16, as in llama.cpp's converter
    "F32": (np.float32, np.array),
}


@dataclass(frozen=True)
class StoredTensor:
    path: Path
    offset: int            # of the first byte, from the start of the file
    dtype: str             # a key of STORED_DTYPES, or a quantized GGML type's name ("Q8_0")
    shape: tuple[int, ...]  # numpy order

    @property
    def quantized(self) -> bool:
        return self.dtype not in STORED_DTYPES

    def _slice_bytes(self) -> int:
        """Bytes of one slice along the first axis (a row of a matrix, an expert of a stack)."""
        shape = self.shape or (1,)
        if not self.quantized:
            return int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(STORED_DTYPES[self.dtype][0]).itemsize
        block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[self.dtype]]
        inner = shape[1:] if len(shape) > 1 else shape
        return int(np.prod(inner[:-1], dtype=np.int64)) * (inner[-1] // block * nbytes)

    def raw(self, first: int, count: int) -> np.ndarray:
        """The stored bytes of `count` slices from `first`, as they are in the file."""
        size = self._slice_bytes()
        return np.memmap(self.path, mode="r", dtype=np.uint8, shape=(count * size,), offset=self.offset + first * size)

    def _rows(self, first: int, count: int) -> np.ndarray:
        shape = self.shape or (1,)
        if self.quantized:
            rows = np.asarray(self.raw(first, count)).reshape(count, -1)
            x = quants.dequantize(rows, GGMLQuantizationType[self.dtype]).astype(np.float32, copy=False)
            return x.reshape((count, *shape[1:]) if len(shape) > 1 else (count * shape[0],))
        bits, to_float = STORED_DTYPES[self.dtype]
        raw = np.memmap(self.path, mode="r", dtype=bits, shape=(count, *shape[1:]),
                        offset=self.offset + first * self._slice_bytes())
        return to_float(raw)

    def load(self) -> np.ndarray:
        """The whole tensor as float32 (float16 stays float16)."""
        if self.quantized and len(self.shape) < 2:
            return self._rows(0, 1).reshape(self.shape)
        return self._rows(0, (self.shape or (1,))[0]).reshape(self.shape)

    def chunks(self, max_elements: int):
        """Whole rows (along the first axis), about `max_elements` at a time."""
        if len(self.shape) < 2:
            yield self.load()
            return
        per_row = int(np.prod(self.shape[1:], dtype=np.int64))
        step = max(1, max_elements // per_row)
        for r in range(0, self.shape[0], step):
            yield self._rows(r, min(step, self.shape[0] - r))

    def part(self, i: int) -> "StoredTensor":
        """The i-th slice along the first axis (one expert of a stacked tensor)."""
        return StoredTensor(self.path, self.offset + i * self._slice_bytes(), self.dtype, self.shape[1:])
