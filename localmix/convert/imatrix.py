"""Importance matrices: read (and write) the files llama.cpp's `llama-imatrix` produces.

An importance matrix holds, for each weight matrix, the mean of the squared activations that
met each input column: columns that matter more are quantized more carefully. Stacked
expert tensors have one vector per expert (`n_expert * n_per_row` values).

Two formats, as llama.cpp's quantizer reads them (common/imatrix-loader.cpp and
tools/quantize/quantize.cpp):
- GGUF (current): tensors `NAME.in_sum2` (sums of squared activations, per expert) and
  `NAME.counts` (how many activations per expert), plus `imatrix.datasets`,
  `imatrix.chunk_count`, `imatrix.chunk_size`. Values are `in_sum2 / count`, or 1 where an
  expert saw no tokens.
- legacy `.dat`: int32 entry count, then per entry: int32 name length, name, int32 ncall,
  int32 nval, nval float32 sums; optionally int32 chunk count, int32 length, dataset name.
  Values are `sums / ncall` (the sums as stored when ncall is 0).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from localmix.errors import InputError

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"


def load_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """{tensor name: float32 importance vector} from a GGUF or legacy imatrix file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"imatrix file {path} not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    entries = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
    for name, values in entries.items():
        if not np.isfinite(values).all():
            raise InputError(f"imatrix {path} has a non-finite value for {name}")
    return entries


def _load_gguf(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType

    from localmix.gguf.read import open_gguf

    reader = open_gguf(path)  # bounds-checked: a damaged file is one line
    if not all(k in reader.fields for k in (KV_DATASETS, KV_CHUNK_COUNT, KV_CHUNK_SIZE)):
        raise InputError(f"{path} lacks the imatrix metadata ({KV_DATASETS}, ...): is it an imatrix file?")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        for suffix in (".in_sum2", ".counts"):
            if t.name.endswith(suffix):
                if t.tensor_type != GGMLQuantizationType.F32:
                    raise InputError(f"{path}: {t.name} must be F32")
                parts.setdefault(t.name[: -len(suffix)], {})[suffix] = np.asarray(t.data, dtype=np.float32).ravel()
    if not parts:
        raise InputError(f"{path} holds no imatrix entries")
    entries = {}
    for name, p in parts.items():
        if len(p) != 2:
            raise InputError(f"{path}: mismatched sums and counts for {name}")
        entries[name] = mean_squares(p[".in_sum2"], p[".counts"])
    return entries


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    pos = 0

    def read(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise InputError(f"{path} is truncated or is not an imatrix file")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = read("<i")
    if n_entries < 1:
        raise InputError(f"{path} holds no imatrix entries (or is not an imatrix file)")
    entries = {}
    for _ in range(n_entries):
        (length,) = read("<i")
        if not 0 < length < 4096:
            raise InputError(f"{path} is not an imatrix file")
        name = data[pos:pos + length].decode("utf-8", errors="replace")
        pos += length
        ncall, nval = read("<ii")
        if nval < 1:
            raise InputError(f"{path}: entry {name} has no values")
        sums = np.array(read(f"<{nval}f"), dtype=np.float32)
        entries[name] = sums / np.float32(ncall) if ncall > 0 else sums
    return entries


def save_imatrix(path: str | Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                 datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """Write the GGUF imatrix format. `sums[name]` is (n_expert, n_per_row) or (n_per_row,)
    float32 sums of squared activations; `counts[name]` has n_expert (or 1) token counts."""
    import gguf

    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    w.add_array(KV_DATASETS, datasets)
    w.add_uint32(KV_CHUNK_COUNT, chunk_count)
    w.add_uint32(KV_CHUNK_SIZE, chunk_size)
    for name in sorted(sums):
        s = np.asarray(sums[name], dtype=np.float32)
        w.add_tensor(f"{name}.in_sum2", s.reshape(-1, s.shape[-1]))
        w.add_tensor(f"{name}.counts", np.asarray(counts[name], dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tensor_importance(imatrix: dict[str, np.ndarray] | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The (n_expert or 1, n_per_row) importance for one tensor, as llama.cpp's quantizer
    looks it up: none when absent; a size mismatch is an error except for the embeddings."""
    if imatrix is None or name not in imatrix:
        return None
    values = imatrix[name]
    n_expert = shape[0] if len(shape) == 3 else 1
    if values.size != n_expert * shape[-1]:
        if name == "token_embd.weight":
            return None
        raise InputError(f"imatrix has {values.size} values for {name}, the tensor needs {n_expert * shape[-1]}: "
                         "was it computed for another model?")
    return values.reshape(n_expert, shape[-1])


def mean_squares(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The importance vector llama.cpp's quantizer reads from an imatrix entry: per expert (a row
    of `sums` per count), the float32 sums of squares over the float32 count, or 1s where no
    token reached the expert."""
    counts = np.rint(counts).astype(np.int64)
    per = np.asarray(sums).reshape(len(counts), -1)
    values = np.ones_like(per)
    for j, c in enumerate(counts):
        if c > 0:
            values[j] = per[j] / np.float32(c)
    return values.ravel()
