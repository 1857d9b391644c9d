"""Synthetic full-size models: a GGUF with real shapes, the real tokenizer and random weights.

`synth("mixtral-8x7b", "Q3_K_M", out)` writes the file localmix's quantizer would write for
Mixtral 8x7B (same tensors, types by llama.cpp's mixes, same metadata keys and vocabulary),
with each quantized block made of random quant codes and a sane scale instead of quantized
weights. Nothing is quantized, so it takes as long as writing the bytes; memory and speed can
then be measured at real scale without downloading 90 GB. The text it generates is noise.

A block's scales are float16 fields at fixed offsets (ggml's block structs); everything else
is integer codes, valid whatever their bits. The scales are set so the weights come out with a
standard deviation near SIGMA, like a trained model's, and the norms are ones.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import gguf
import numpy as np

from . import kernels
from .config import ModelConfig
from .convert import ConvertResult, Progress
from .errors import InputError
from .gguf_file import GGUFFileWriter
from .kernels import QType
from .presets import config_tensors, preset_config
from .quant_mix import FILE_TYPES

SIGMA = 0.02
CHUNK_BYTES = 64 << 20

# type: [(byte offset of a float16 field in the block, its value / SIGMA)]; derived from how
# each type decodes (e.g. Q4_K: w = d * scale * q - dmin * min, q in 0..15, 6-bit scales)
SCALES = {
    QType.Q4_0: [(0, 1 / 4.6)],
    QType.Q4_1: [(0, 1 / 4.6), (2, -8 / 4.6)],
    QType.Q5_0: [(0, 1 / 9.2)],
    QType.Q5_1: [(0, 1 / 9.2), (2, -16 / 9.2)],
    QType.Q8_0: [(0, 1 / 74)],
    QType.Q2_K: [(80, 1 / 8.3), (82, 1.5 / 8.3)],
    QType.Q3_K: [(108, 1 / 37)],
    QType.Q4_K: [(0, 1 / 143), (2, 7.5 / 143)],
    QType.Q5_K: [(0, 1 / 285), (2, 15.5 / 285)],
    QType.Q6_K: [(208, 1 / 1369)],
}


def random_rows(qtype: QType, n_rows: int, n_cols: int, rng: np.random.Generator, norm: bool = False) -> np.ndarray:
    """`n_rows` rows of random weights stored as `qtype`: (n_rows, row bytes) uint8, or floats."""
    if qtype in kernels.FLOATS:
        x = np.ones((n_rows, n_cols), np.float32) if norm else (rng.standard_normal((n_rows, n_cols), np.float32) * SIGMA)
        return kernels.quantize(x, qtype)
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * n_cols // block_elems
    raw = rng.bit_generator.random_raw(-(-n_blocks * block_bytes // 8)).view(np.uint8)[: n_blocks * block_bytes]
    blocks = raw.reshape(n_blocks, block_bytes)
    for offset, value in SCALES[qtype]:
        blocks[:, offset:offset + 2] = np.frombuffer(np.float16(value * SIGMA).tobytes(), np.uint8)
    return blocks.reshape(n_rows, -1)


def synth(model: str | ModelConfig, file_type: str, out: str | Path, seed: int = 0, n_layers: int | None = None,
          force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """Write a synthetic GGUF of the preset `model` (or a config) at `file_type` to `out`.

    `n_layers` keeps only the first layers (a mid-size model with full widths)."""
    if file_type not in FILE_TYPES:
        raise InputError(f"unknown type {file_type!r}; choose one of {', '.join(FILE_TYPES)}")
    cfg = preset_config(model) if isinstance(model, str) else model
    if n_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=n_layers)
    tensors = config_tensors(cfg, file_type)
    rng = np.random.default_rng(seed)
    name = (f"{model} (synthetic)" if isinstance(model, str) else "synthetic") + (f", {n_layers} layers" if n_layers else "")

    from .sources import add_model_metadata
    from .tiny import write_tokenizer_files

    with GGUFFileWriter(out, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA], force=force) as w, \
            tempfile.TemporaryDirectory() as tok_dir:
        for t in tensors:
            w.header.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.n_bytes, raw_dtype=t.qtype)
        write_tokenizer_files(Path(tok_dir))
        (Path(tok_dir) / "config.json").write_text(json.dumps(cfg.raw))  # special token ids
        add_model_metadata(w.header, cfg, Path(tok_dir), FILE_TYPES[file_type][0], name=name)
        total = sum(t.n_bytes for t in tensors)
        if progress:
            progress.start(len(tensors), total)
        w.begin_data()
        for t in tensors:
            n_cols, n_rows = t.shape[-1], int(np.prod(t.shape[:-1]))
            step = max(1, CHUNK_BYTES // kernels.row_nbytes(t.qtype, n_cols))
            for start in range(0, n_rows, step):
                rows = random_rows(t.qtype, min(step, n_rows - start), n_cols, rng, norm=t.name.endswith("norm.weight"))
                n = w.write(rows)
                if progress:
                    progress.advance(t.name, n, False)
            w.end_tensor()
            if progress:
                progress.advance(t.name, 0, True)
    n_params = sum(int(np.prod(t.shape)) for t in tensors)
    return ConvertResult(Path(out), file_type, len(tensors), total, n_params)
