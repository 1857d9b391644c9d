"""Float rows of a tensor stored in a file, read through short-lived memory maps.

Both sources of a conversion (safetensors shards, GGUF files) store plain F32/F16/BF16
arrays at known offsets. Reading a tensor a chunk of rows at a time, each chunk through its
own mapping that is dropped after use, keeps resident memory bounded by one chunk however
large the tensor or the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


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
    dtype: str             # a key of STORED_DTYPES
    shape: tuple[int, ...]  # numpy order

    def _rows(self, first: int, count: int) -> np.ndarray:
        bits, to_float = STORED_DTYPES[self.dtype]
        shape = self.shape or (1,)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(bits).itemsize
        raw = np.memmap(self.path, mode="r", dtype=bits, shape=(count, *shape[1:]), offset=self.offset + first * row_bytes)
        return to_float(raw)

    def load(self) -> np.ndarray:
        """The whole tensor as float32 (float16 stays float16)."""
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
        bits = np.dtype(STORED_DTYPES[self.dtype][0]).itemsize
        size = int(np.prod(self.shape[1:], dtype=np.int64)) * bits
        return StoredTensor(self.path, self.offset + i * size, self.dtype, self.shape[1:])
