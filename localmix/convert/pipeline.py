"""Hugging Face checkpoint (or float GGUF) -> GGUF of any type, streamed tensor by tensor.

The data flow, top to bottom:
    folder or file -> source: tensors, model shape, metadata   (sources.py)
    file type + names/shapes -> the type of every tensor      (mix.py, or the converter's rules here)
    --imatrix FILE -> importance per column (per expert)      (imatrix.py)
    each chunk of rows -> kernels.quantize -> appended         (localmix.kernels, gguf/write.py)

F32/F16/BF16/Q8_0 files are what llama.cpp's `convert_hf_to_gguf.py` writes; K-quant and
i-quant files are what its `llama_model_quantize` makes of the F32 file, tensor for tensor and byte for
byte, in one pass. Peak memory is a chunk of rows, never a stacked expert tensor nor the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import gguf
import numpy as np

from localmix import kernels
from localmix.convert.fit import check_mix
from localmix.convert.imatrix import load_imatrix, tensor_importance
from localmix.convert.mix import CONVERTER_TYPES, FILE_TYPES, choose_types, require_imatrix
from localmix.convert.sources import SourceTensor, open_source
from localmix.errors import InputError
from localmix.gguf.write import GGUFFileWriter
from localmix.kernels import QType

CHUNK_ELEMENTS = 1 << 24  # rows are converted in chunks of about this many weights


class Progress(Protocol):
    def start(self, n_tensors: int, n_bytes: int) -> None: ...
    def advance(self, tensor: str, n_bytes: int, tensor_done: bool) -> None: ...


@dataclass
class ConvertResult:
    path: Path
    file_type: str
    n_tensors: int
    n_bytes: int
    n_params: int


def tensor_type(name: str, shape: tuple[int, ...], file_type: str) -> QType:
    """The GGML type of one tensor in a float or Q8_0 file, by llama.cpp's converter's rules."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return QType.F32  # norms, biases and the router stay float32
    qtype = FILE_TYPES[file_type][1]
    if shape[-1] % kernels.block_size(qtype):
        return QType.F16  # llama.cpp's converter falls back to F16 for rows that do not fit
    return qtype


def pick_types(tensors: list[SourceTensor], file_type: str, model, has_imatrix: bool = False) -> dict[str, QType]:
    if file_type in CONVERTER_TYPES:
        return {t.name: tensor_type(t.name, t.shape, file_type) for t in tensors}
    return choose_types([(t.name, t.shape, t.stored_type) for t in tensors], file_type, model, has_imatrix)


def _rows(t: SourceTensor):
    """(expert index, float rows) of the tensor in file order, a chunk at a time."""
    for e, part in enumerate(t.parts):
        if t.transform is not None:  # Q/K permutation needs the whole (small) matrix
            yield e, t.transform(part.load())
        else:
            for x in part.chunks(CHUNK_ELEMENTS):
                yield e, x


REQUANTIZE_WARNING = ("{src} is already quantized: requantizing loses more than quantizing from the original "
                      "weights (the Hugging Face checkpoint or an F32/F16/BF16 GGUF)")


def convert(src: str | Path, out: str | Path, file_type: str = "Q4_K_M", force: bool = False,
            imatrix: str | Path | None = None, progress: Progress | None = None,
            warn: Callable[[str], None] | None = None, types: dict[str, QType] | None = None) -> ConvertResult:
    """Convert `src` (a Hugging Face checkpoint folder, or a GGUF file) to the GGUF file `out`
    of `file_type`, optionally guided by an importance matrix file. A quantized GGUF source
    is requantized as llama_model_quantize does with allow_requantize (dequantized, then
    quantized again; a tensor whose type stays is copied), after one call of `warn`. `types`,
    a {tensor name: type} table (a fitted mix, fit.py), overrides the file type's choice for
    the tensors it names; general.file_type stays `file_type`'s, as llama.cpp's quantizer
    keeps its ftype under tensor-type overrides."""
    if file_type not in FILE_TYPES:
        raise InputError(f"unknown type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    source = open_source(src)
    importance = load_imatrix(imatrix) if imatrix is not None else None
    chosen = pick_types(source.tensors, file_type, source.model, importance is not None)
    if types:
        check_mix(types, [(t.name, t.shape) for t in source.tensors])
        chosen.update(types)
    types = chosen
    require_imatrix(types, file_type, None if importance is None else set(importance))
    if getattr(source, "requantizes", False) and warn is not None:
        warn(REQUANTIZE_WARNING.format(src=src))

    with GGUFFileWriter(out, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], force=force) as w:
        h = w.header
        for t in source.tensors:
            h.add_tensor_info(t.name, t.shape, np.dtype(np.float32), kernels.tensor_nbytes(types[t.name], t.shape),
                              raw_dtype=types[t.name])
        source.add_metadata(h, FILE_TYPES[file_type][0])
        total = sum(kernels.tensor_nbytes(types[t.name], t.shape) for t in source.tensors)
        if progress:
            progress.start(len(source.tensors), total)
        w.begin_data()
        for t in source.tensors:
            qtype = types[t.name]
            if qtype == t.stored_type and all(getattr(p, "quantized", False) for p in t.parts):
                for part in t.parts:  # the type stays: llama.cpp copies the bytes
                    n = w.write(np.asarray(part.raw(0, part.shape[0] if len(part.shape) > 1 else 1)))
                    if progress:
                        progress.advance(t.name, n, False)
                w.end_tensor()
                if progress:
                    progress.advance(t.name, 0, True)
                continue
            weights = None
            if importance is not None and qtype in kernels.KERNELS:  # the types an imatrix guides
                weights = tensor_importance(importance, t.name, t.shape)
            for e, x in _rows(t):
                if not np.isfinite(x).all():
                    raise InputError(f"tensor {t.name} has NaN or Inf weights: the checkpoint is corrupt")
                data = kernels.quantize(x, qtype) if weights is None else kernels.quantize(x, qtype, weights[e])
                n = w.write(data)
                if progress:
                    progress.advance(t.name, n, False)
            w.end_tensor()
            if progress:
                progress.advance(t.name, 0, True)
    n_params = sum(int(np.prod(t.shape)) for t in source.tensors)
    return ConvertResult(Path(out), file_type, len(source.tensors), total, n_params)
