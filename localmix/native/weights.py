"""A GGUF's weights as views of its memory map, and the hyperparameters the forward needs.

`load_weights(path)` checks the file (`gguf.check`), maps it (`gguf.GGUFReader`) and hands
each tensor out as a `Tensor`: a numpy view of the mapped bytes, never a copy, with its GGML
type and logical shape. What a view holds is what `kernels.matmul.matmul` takes:
    F32 / F16    float32 / float16 (rows, cols)
    BF16         uint16 bit patterns (rows, cols)
    quantized    uint8 (rows, row_bytes), the blocks of each row as stored
Stacked expert tensors `blk.N.ffn_{gate,up,down}_exps.weight` have one more leading axis,
(E, rows, ...), so `t.data[e]` is a view of expert e and touches only its pages.
`release(w, *views)` hands the pages a pass has read back to the kernel (they stay in the page
cache and come back on the next touch), for passes over a file larger than memory should hold.

`checkpoint_weights(source)` gives the same face to a Hugging Face checkpoint folder (a
convert.sources.HFSource), so a pass reads its safetensors as they are: each shard is mapped
once and each tensor is a view of it in the stored type (BF16 bits, F16, F32), as the float
GGUF the converter would write holds it, without writing that file. Only what the converter
changes is held in memory: the Q/K rows reordered for llama.cpp's RoPE (a copy in the stored
type), the norms and the router in float32. A stacked expert tensor is an `Experts`, whose
`data[e]` is a view of expert e's own tensor in the checkpoint.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QType

from localmix.errors import InputError
from localmix.gguf.check import GGUFSummary, check_gguf
from localmix.gguf.read import field_value


@dataclass(frozen=True)
class Tensor:
    name: str
    data: np.ndarray          # a view of the memory map (see the module docstring)
    qtype: QType
    shape: tuple[int, ...]    # logical, numpy order: (rows, cols) or (E, rows, cols)


@dataclass(frozen=True)
class HParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int                # RoPE dimensions (llama.rope.dimension_count)
    rope_base: float
    norm_eps: float
    n_expert: int             # 0: a dense model
    n_expert_used: int
    n_vocab: int
    context_length: int


@dataclass
class Layer:
    attn_norm: Tensor
    attn_q: Tensor
    attn_k: Tensor
    attn_v: Tensor
    attn_output: Tensor
    ffn_norm: Tensor
    # Mixtral: the router and the stacked experts; Mistral: one SwiGLU MLP
    ffn_gate_inp: Tensor | None = None
    ffn_gate_exps: Tensor | None = None
    ffn_up_exps: Tensor | None = None
    ffn_down_exps: Tensor | None = None
    ffn_gate: Tensor | None = None
    ffn_up: Tensor | None = None
    ffn_down: Tensor | None = None


_REQUIRED = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"}


@dataclass
class Weights:
    hp: HParams
    token_embd: Tensor
    layers: list[Layer]
    output_norm: Tensor
    output: Tensor
    reader: object = field(repr=False, default=None)  # keeps the mapping alive as long as the views
    maps: list = field(repr=False, default_factory=list)  # the mapped files the views are of, when not a reader's

    def tensors(self):
        """Every weight, in file order of layers."""
        yield self.token_embd
        for layer in self.layers:
            yield from (t for t in vars(layer).values() if t is not None)
        yield self.output_norm
        yield self.output


try:
    from numpy.lib.array_utils import byte_bounds
except ImportError:  # numpy < 2
    from numpy import byte_bounds

MADV_DONTNEED = 4  # Linux's value
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def release(w: Weights, *views: np.ndarray) -> None:
    """madvise(MADV_DONTNEED) over each view of `w`'s file mappings: the process's resident size
    drops by those pages; the file's data stay in the page cache and a later read faults them
    back in. A view of anything else (a tensor swapped for its quantized copy) is left alone:
    dropping anonymous pages would zero them. Linux only; elsewhere nothing happens."""
    maps = ([w.reader.data] if w.reader is not None else []) + list(w.maps)
    if _LIBC is None or not maps:
        return
    bounds = [byte_bounds(np.asarray(m)) for m in maps]
    page = mmap.PAGESIZE
    for v in views:
        if isinstance(v, Experts):
            release(w, *v.parts)
            continue
        if not isinstance(v, np.ndarray) or not v.size:
            continue
        lo, hi = byte_bounds(v)
        for lo_map, hi_map in bounds:
            if lo_map <= lo and hi <= hi_map:
                lo, hi = lo // page * page, min(-(-hi // page) * page, -(-hi_map // page) * page)
                _LIBC.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), ctypes.c_int(MADV_DONTNEED))
                break


def _view(t) -> Tensor:
    """The reader's tensor as a `Tensor`: BF16's bytes seen as uint16, everything else as read."""
    qtype = QType(t.tensor_type)
    shape = tuple(int(n) for n in reversed(t.shape))
    data = t.data
    if qtype == QType.BF16:
        data = data.view(np.uint16)
    if len(shape) == 1:
        data = data.reshape(shape)
    return Tensor(t.name, data, qtype, shape)


def hparams(path: Path, s: GGUFSummary) -> HParams:
    """The hyperparameters, from the `llama.*` metadata as `gguf.check` reads them."""
    reader = s.reader
    if s.architecture != "llama":
        raise InputError(f"{path} is a {s.architecture!r} model; the native engine runs llama-architecture "
                         "models (Llama, Mistral, Mixtral): run it with --engine llama.cpp")

    def kv(key, default=None):
        return field_value(reader, f"llama.{key}", default)

    return HParams(
        n_layer=s.n_layer, n_embd=s.n_embd, n_ff=s.n_ff, n_head=s.n_head, n_head_kv=s.n_head_kv,
        head_dim=s.head_dim, n_rot=int(kv("rope.dimension_count", s.head_dim)),
        rope_base=float(kv("rope.freq_base", 10000.0)),
        norm_eps=float(kv("attention.layer_norm_rms_epsilon", 1e-5)),
        n_expert=s.n_expert, n_expert_used=s.n_expert_used, n_vocab=s.n_vocab,
        context_length=s.context_length or 4096)


def load_weights(path: str | Path) -> Weights:
    """Map the GGUF at `path`; every tensor is a view of the mapping."""
    path = Path(path)
    summary = check_gguf(path)  # layout and meaning checked; its reader is bounds-checked and reads arrays in bulk
    reader = summary.reader
    hp = hparams(path, summary)
    by_name = {t.name: _view(t) for t in reader.tensors}

    def take(name: str, required: bool = True) -> Tensor | None:
        if name not in by_name:
            if required:
                raise InputError(f"{path} has no tensor {name}: is it a Mistral/Mixtral GGUF?")
            return None
        return by_name[name]

    layers = []
    for i in range(hp.n_layer):
        layer = Layer(**{f: take(f"blk.{i}.{f}.weight", required=f in _REQUIRED) for f in Layer.__dataclass_fields__})
        moe = (layer.ffn_gate_inp, layer.ffn_gate_exps, layer.ffn_up_exps, layer.ffn_down_exps)
        dense = (layer.ffn_gate, layer.ffn_up, layer.ffn_down)
        if not (all(t is not None for t in moe) if hp.n_expert else all(t is not None for t in dense)):
            raise InputError(f"{path}: layer {i} lacks its {'experts' if hp.n_expert else 'feed-forward'} tensors")
        layers.append(layer)
    # tied embeddings: llama.cpp reads the head from token_embd when there is no output.weight
    output = take("output.weight", required=False) or by_name["token_embd.weight"]
    return Weights(hp, take("token_embd.weight"), layers, take("output_norm.weight"), output, reader)



class Experts:
    """A stacked expert tensor whose experts are stored apart (a checkpoint's one tensor per
    expert): `data[e]` is expert e's (rows, cols) view, as a stacked array's would be."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts

    def __getitem__(self, e: int) -> np.ndarray:
        return self.parts[e]

    def __len__(self) -> int:
        return len(self.parts)


# the stored dtypes of a checkpoint: GGML type and the numpy type of a view of its bits
_STORED = {"BF16": (QType.BF16, np.uint16), "F16": (QType.F16, np.float16), "F32": (QType.F32, np.float32)}


def checkpoint_hparams(cfg) -> HParams:
    """The hyperparameters of a convert.config.ModelConfig, as the converter writes them."""
    return HParams(
        n_layer=cfg.num_hidden_layers, n_embd=cfg.hidden_size, n_ff=cfg.intermediate_size,
        n_head=cfg.num_attention_heads, n_head_kv=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        n_rot=cfg.head_dim, rope_base=float(cfg.rope_theta), norm_eps=float(cfg.rms_norm_eps),
        n_expert=cfg.num_local_experts if cfg.is_moe else 0, n_expert_used=cfg.num_experts_per_tok if cfg.is_moe else 0,
        n_vocab=cfg.vocab_size, context_length=cfg.max_position_embeddings)


def checkpoint_weights(source) -> Weights:
    """The weights of a Hugging Face checkpoint (convert.sources.HFSource) as views of its
    mapped safetensors shards (see the module docstring)."""
    maps: dict[Path, np.memmap] = {}

    def view(part) -> np.ndarray:
        if part.path not in maps:
            maps[part.path] = np.memmap(part.path, mode="r", dtype=np.uint8)
        bits = _STORED[part.dtype][1]
        n = int(np.prod(part.shape, dtype=np.int64)) * np.dtype(bits).itemsize
        return maps[part.path][part.offset:part.offset + n].view(bits).reshape(part.shape)

    by_name = {}
    for t in source.tensors:
        if len(t.shape) <= 1 or t.name.endswith("_norm.weight") or ".ffn_gate_inp." in t.name:
            # what the converter keeps in float32: small, held in memory
            by_name[t.name] = Tensor(t.name, np.asarray(t.parts[0].load(), np.float32).reshape(t.shape), QType.F32,
                                     t.shape)
            continue
        qtype = _STORED[t.parts[0].dtype][0]
        if len(t.shape) == 3:
            data = Experts([view(p) for p in t.parts])
        elif t.transform is not None:
            data = np.ascontiguousarray(t.transform(view(t.parts[0])))  # Q/K rows reordered: a copy
        else:
            data = view(t.parts[0])
        by_name[t.name] = Tensor(t.name, data, qtype, t.shape)
    hp = checkpoint_hparams(source.config)
    layers = [Layer(**{f: by_name.get(f"blk.{i}.{f}.weight") for f in Layer.__dataclass_fields__})
              for i in range(hp.n_layer)]
    output = by_name.get("output.weight") or by_name["token_embd.weight"]
    return Weights(hp, by_name["token_embd.weight"], layers, by_name["output_norm.weight"], output,
                   maps=list(maps.values()))
