"""Hugging Face checkpoint -> GGUF, streamed tensor by tensor.

The data flow, top to bottom:
    config.json  -> ModelConfig            (config.py)
    *.safetensors -> Checkpoint            (checkpoint.py, memory-mapped, validated)
    names/shapes -> plan of GGUF tensors   (tensor_names.py, one renaming table)
    metadata + tokenizer -> GGUF header    (this file, vocab.py)
    each source tensor -> kernels.quantize -> appended to the file (gguf_file.py)

The output is what llama.cpp's `convert_hf_to_gguf.py` writes for Mixtral and Mistral:
same tensor names, shapes, types and data, same metadata keys and values. Peak memory is one
source tensor (in float32), never a stacked expert tensor nor the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np

from . import kernels
from .checkpoint import Checkpoint
from .config import ModelConfig
from .errors import InputError
from .gguf_file import GGUFFileWriter
from .kernels import QType
from .tensor_names import OutTensor, plan_tensors
from .vocab import add_tokenizer

# --type name -> (general.file_type, the type of the quantizable tensors)
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, QType]] = {
    "F32": (gguf.LlamaFileType.ALL_F32, QType.F32),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, QType.F16),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, QType.BF16),
    "Q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, QType.Q8_0),
}

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
    """The GGML type of one tensor, by llama.cpp's converter's rules."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name:
        return QType.F32  # norms, biases and the router stay float32
    qtype = FILE_TYPES[file_type][1]
    if shape[-1] % kernels.block_size(qtype):
        return QType.F16  # llama.cpp's converter falls back to F16 for rows that do not fit
    return qtype


def add_metadata(h: gguf.GGUFWriter, cfg: ModelConfig, src: Path, file_type: str) -> None:
    """general.* and llama.* keys, as llama.cpp's converter writes them."""
    total, shared, expert, n_expert = h.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, None, total)  # model card (README.md) fields, if any
    if meta.name is None:
        meta.name = src.resolve().name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    h.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(h)

    h.add_block_count(cfg.num_hidden_layers)
    h.add_context_length(cfg.max_position_embeddings)
    h.add_embedding_length(cfg.hidden_size)
    h.add_feed_forward_length(cfg.intermediate_size)
    h.add_head_count(cfg.num_attention_heads)
    h.add_head_count_kv(cfg.num_key_value_heads)
    h.add_rope_freq_base(cfg.rope_theta)
    h.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.is_moe:
        h.add_expert_count(cfg.num_local_experts)
        h.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.explicit_head_dim is not None:
        h.add_key_length(cfg.head_dim)
        h.add_value_length(cfg.head_dim)
    h.add_file_type(FILE_TYPES[file_type][0])
    h.add_vocab_size(cfg.vocab_size)
    h.add_rope_dimension_count(cfg.head_dim)
    h.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _source_chunks(ckpt: Checkpoint, t: OutTensor):
    """Float rows of the GGUF tensor, in file order: expert by expert, a chunk of rows at a time."""
    for src in t.sources:
        if t.transform is not None:  # Q/K permutation needs the whole (small) matrix
            yield t.transform(ckpt.load(src))
        else:
            yield from ckpt.chunks(src, CHUNK_ELEMENTS)


def convert(src: str | Path, out: str | Path, file_type: str = "F16", force: bool = False,
            progress: Progress | None = None) -> ConvertResult:
    """Convert the Hugging Face checkpoint in folder `src` to the GGUF file `out`."""
    src, out = Path(src), Path(out)
    if file_type not in FILE_TYPES:
        raise InputError(f"unknown type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    if not src.is_dir():
        raise InputError(f"{src} is not a folder: give the folder of a downloaded Hugging Face checkpoint")
    cfg = ModelConfig.load(src)
    ckpt = Checkpoint(src)
    plan = plan_tensors(cfg, {name: ckpt.shape(name) for name in ckpt.tensors})
    types = [tensor_type(t.name, t.shape, file_type) for t in plan]

    with GGUFFileWriter(out, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], force=force) as w:
        h = w.header
        for t, qtype in zip(plan, types):
            h.add_tensor_info(t.name, t.shape, np.dtype(np.float32), kernels.tensor_nbytes(qtype, t.shape), raw_dtype=qtype)
        add_metadata(h, cfg, src, file_type)
        add_tokenizer(h, src, cfg.vocab_size)
        total = sum(kernels.tensor_nbytes(q, t.shape) for t, q in zip(plan, types))
        if progress:
            progress.start(len(plan), total)
        w.begin_data()
        for t, qtype in zip(plan, types):
            for x in _source_chunks(ckpt, t):
                n = w.write(kernels.quantize(x, qtype))
                if progress:
                    progress.advance(t.name, n, False)
            w.end_tensor()
            if progress:
                progress.advance(t.name, 0, True)
    return ConvertResult(out, file_type, len(plan), total, sum(t.n_elements for t in plan))
