"""What a conversion reads: a Hugging Face checkpoint folder, or a float GGUF file.

Both present the same face to pipeline.py: the GGUF tensors to write (name, numpy-order
shape, where each part's bytes are stored, the type it has now), the model's shape for
the quantization rules, and a function that writes the file's metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from localmix.convert.checkpoint import Checkpoint
from localmix.convert.config import ModelConfig
from localmix.convert.mapped import StoredTensor
from localmix.convert.mix import ModelShape
from localmix.convert.names import plan_tensors
from localmix.convert.vocab import add_tokenizer
from localmix.errors import InputError
from localmix.kernels import QType


@dataclass
class SourceTensor:
    name: str
    shape: tuple[int, ...]                  # numpy order: (n_expert, rows, cols) for stacked experts
    parts: list[StoredTensor]               # one per expert for stacked tensors, else one
    stored_type: QType                      # what a tensor that is not quantized stays
    transform: Callable[[np.ndarray], np.ndarray] | None = None


class HFSource:
    """A downloaded Hugging Face checkpoint (config.json, safetensors, tokenizer.model)."""

    def __init__(self, path: Path):
        if not path.is_dir():
            raise InputError(f"{path} is not a folder: give the folder of a downloaded Hugging Face checkpoint")
        self.path = path
        self.config = cfg = ModelConfig.load(path)
        ckpt = Checkpoint(path)
        plan = plan_tensors(cfg, {name: ckpt.shape(name) for name in ckpt.tensors})
        # llama.cpp's converter keeps what it does not quantize (norms, router) in float32
        self.tensors = [SourceTensor(t.name, t.shape, [ckpt.stored(s) for s in t.sources], QType.F32, t.transform)
                        for t in plan]
        self.model = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                                cfg.num_local_experts if cfg.is_moe else 0)

    def add_metadata(self, h: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        add_model_metadata(h, self.config, self.path, file_type)


def add_model_metadata(h: gguf.GGUFWriter, cfg: ModelConfig, src: Path, file_type: gguf.LlamaFileType,
                       name: str | None = None) -> None:
    """general.*, llama.* and tokenizer.* keys, as llama.cpp's converter writes them, for the
    model `cfg` whose tokenizer files (and model card, if any) are in the folder `src`."""
    total, shared, expert, n_expert = h.get_total_parameter_count()
    meta = gguf.Metadata.load(None, src, None, total)  # model card (README.md) fields, if any
    if meta.name is None:
        meta.name = name or src.resolve().name
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
    h.add_file_type(file_type)
    h.add_vocab_size(cfg.vocab_size)
    h.add_rope_dimension_count(cfg.head_dim)
    h.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(h, src, cfg.vocab_size)


class GGUFSource:
    """A GGUF file, e.g. one written by `--type F32`, or a downloaded quantized one.

    Float tensors (F32, F16, BF16) are read as they are; quantized ones (any type gguf-py
    dequantizes) are dequantized row by row, as llama_model_quantize does with
    `allow_requantize` (`requantizes` says so: the caller warns). Its metadata is copied as
    llama.cpp's quantizer copies it: every key as it is, with general.file_type and
    general.quantization_version set anew."""

    def __init__(self, path: Path):
        from localmix.gguf.check import check_gguf

        self.path = path
        self.reader = r = check_gguf(path).reader
        self.arch = self._value("general.architecture")
        if self.arch != "llama":
            raise InputError(f"{path} holds a {self.arch!r} model; localmix quantizes llama-architecture GGUFs (Mixtral, Mistral)")
        self.tensors = []
        self.requantizes = False
        for t in r.tensors:
            kind = t.tensor_type.name
            shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
            if kind not in ("F32", "F16", "BF16"):
                if not _dequantizable(t.tensor_type):
                    raise InputError(f"{path}: tensor {t.name} is {kind}, which localmix cannot dequantize; "
                                     "quantize from an F32/F16/BF16 GGUF or the Hugging Face checkpoint instead")
                self.requantizes = True
            whole = StoredTensor(path, int(t.data_offset), kind, shape)
            parts = [whole.part(e) for e in range(shape[0])] if len(shape) == 3 else [whole]
            self.tensors.append(SourceTensor(t.name, shape, parts, t.tensor_type))
        get = lambda key, default=0: self._value(f"llama.{key}", default)  # noqa: E731
        self.model = ModelShape(get("block_count"), get("attention.head_count"),
                                get("attention.head_count_kv", get("attention.head_count")), get("expert_count"))

    def _value(self, key: str, default=None):
        from localmix.gguf.read import field_value

        return field_value(self.reader, key, default)

    def add_metadata(self, h: gguf.GGUFWriter, file_type: gguf.LlamaFileType) -> None:
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue  # the header's own fields; the writer adds the architecture itself
            if key == "general.file_type":
                h.add_file_type(file_type)
                continue
            if key == "general.quantization_version":
                h.add_quantization_version(gguf.GGML_QUANT_VERSION)
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            h.add_key_value(key, self._value(key), vtype, sub_type=sub_type)
        if "general.file_type" not in self.reader.fields:
            h.add_file_type(file_type)


def _dequantizable(qtype: QType) -> bool:
    """Whether gguf-py has a dequantizer for `qtype` (tried on one block of zeros)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, nbytes), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def open_source(path: str | Path) -> HFSource | GGUFSource:
    path = Path(path)
    if path.is_file():
        return GGUFSource(path)
    return HFSource(path)
