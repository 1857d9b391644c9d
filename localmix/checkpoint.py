"""Read a Hugging Face safetensors checkpoint one tensor at a time, memory-mapped.

`Checkpoint(dir)` validates the whole checkpoint up front (every shard listed in the index
exists, every header parses, every shard is as long as its header says) so that a broken
download fails before anything is written. `load(name)` maps just that tensor's bytes and
returns it as float32 (or float16), so memory is bounded by one tensor; dropping the array
unmaps it again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import safetensors
from gguf.utility import LocalTensor, SafetensorsLocal

from .errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


# safetensors dtype -> (numpy dtype of the stored bits, converter to a float array)
def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    x = bits.astype(np.uint32)
    x <<= np.uint32(16)
    return x.view(np.float32)


_DTYPES = {
    "BF16": (np.uint16, _bf16_to_f32),
    "F16": (np.float16, np.array),   # float16 stays float16, as in llama.cpp's converter
    "F32": (np.float32, np.array),
}


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.tensors: dict[str, LocalTensor] = {}
        for shard in self._shard_names():
            for name, t in self._open_shard(shard).items():
                if name in self.tensors:
                    raise InputError(f"tensor {name} appears in two shards of {self.dir}")
                self.tensors[name] = t

    def _shard_names(self) -> list[str]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
                raise InputError(f"{index} is not a valid safetensors index: {e!r}") from None
            self.weight_map = weight_map
            return sorted(set(weight_map.values()))
        if (self.dir / SINGLE_FILE).is_file():
            self.weight_map = None
            return [SINGLE_FILE]
        raise InputError(f"no {INDEX_FILE} or {SINGLE_FILE} in {self.dir}: only safetensors checkpoints are supported")

    def _open_shard(self, shard: str) -> dict[str, LocalTensor]:
        path = self.dir / shard
        if not path.is_file():
            raise InputError(f"shard {shard} listed in {INDEX_FILE} is missing from {self.dir}; re-download it")
        # The safetensors library checks the header and that the file covers every tensor.
        try:
            with safetensors.safe_open(str(path), framework="numpy"):
                pass
        except (safetensors.SafetensorError, OSError, ValueError) as e:
            raise InputError(f"{path} is truncated or corrupt ({e}); re-download it") from None
        tensors = dict(SafetensorsLocal(path).tensors)
        if self.weight_map is not None:
            listed = {n for n, s in self.weight_map.items() if s == shard}
            if listed - set(tensors):
                missing = sorted(listed - set(tensors))[0]
                raise InputError(f"{path} lacks tensor {missing} that {INDEX_FILE} places there; re-download it")
        return tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def nbytes(self, name: str) -> int:
        return self.tensors[name].data_range.size

    def _map(self, name: str, first_row: int = 0, n_rows: int | None = None) -> tuple[np.ndarray, Callable]:
        t = self.tensors[name]
        if t.dtype not in _DTYPES:
            raise InputError(f"tensor {name} has dtype {t.dtype}; localmix reads F32, F16 and BF16 weights")
        dtype, to_float = _DTYPES[t.dtype]
        shape = tuple(t.shape) or (1,)
        row = int(np.prod(shape[1:], dtype=np.int64))
        n_rows = shape[0] - first_row if n_rows is None else n_rows
        itemsize = np.dtype(dtype).itemsize
        raw = np.memmap(t.data_range.filename, mode="r", dtype=dtype, shape=(n_rows, *shape[1:]),
                        offset=t.data_range.offset + first_row * row * itemsize)
        return raw, to_float

    def load(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (float16 stays float16)."""
        raw, to_float = self._map(name)
        return to_float(raw).reshape(self.shape(name))

    def chunks(self, name: str, max_elements: int):
        """The tensor as float arrays of whole rows, about `max_elements` at a time. Each chunk
        is mapped on its own and unmapped after, so memory stays bounded by one chunk."""
        shape = self.shape(name)
        if len(shape) < 2:
            yield self.load(name)
            return
        rows = max(1, max_elements // int(np.prod(shape[1:])))
        for r in range(0, shape[0], rows):
            raw, to_float = self._map(name, r, min(rows, shape[0] - r))
            yield to_float(raw)
            del raw
