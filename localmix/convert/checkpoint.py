"""Read a Hugging Face safetensors checkpoint one tensor at a time, memory-mapped.

`Checkpoint(dir)` validates the whole checkpoint up front (every shard listed in the index
exists, every header parses, every shard is as long as its header says) so that a broken
download fails before anything is written. `stored(name)` says where a tensor's bytes are, to be
read a chunk of rows at a time (mapped.py), so memory stays bounded by one chunk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors
from gguf.utility import LocalTensor, SafetensorsLocal

from localmix.convert.mapped import STORED_DTYPES, StoredTensor
from localmix.errors import InputError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


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

    def stored(self, name: str) -> StoredTensor:
        t = self.tensors[name]
        if t.dtype not in STORED_DTYPES:
            raise InputError(f"tensor {name} has dtype {t.dtype}; localmix reads F32, F16 and BF16 weights")
        return StoredTensor(t.data_range.filename, t.data_range.offset, t.dtype, tuple(t.shape))

    def load(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (float16 stays float16)."""
        return self.stored(name).load()
