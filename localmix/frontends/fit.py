"""The body of `localmix quantize --fit SIZE` (and --fit-bpw, --fit-gpu, --mix): measure each
tensor's sensitivity with the native forward, solve the budget, write the file.

The layers stay apart: the sensitivity pass (localmix.native.sensitivity) runs the forward
over the source's own weights (a float GGUF mapped as it is, or a checkpoint folder's
safetensors mapped in place: nothing is converted to disk first), the solver (convert/fit.py)
is plain arithmetic over the measured curves, and pipeline.convert writes the plain
{tensor: type} table it returns.

Without --imatrix the importance matrix is the one the sensitivity pass collects over the
calibration windows: the candidates are measured with it and the file is written with it, so
the i-quants that need one (IQ3_XXS) are candidates like any other. --save-imatrix keeps it;
--save-mix keeps it beside the mix (MIX.imatrix.gguf) unless --save-imatrix or --imatrix names
one, and the mix names the importance matrix OUT was written with, which --mix uses again.

Before measuring, a budget below the smallest file the model makes (every tensor at its
smallest candidate) or a disk without room for OUT is refused; after the reference pass, one
line says what the pass needs: the temporary disk (a vocabulary-only GGUF and the importance
matrix beside OUT) and an estimate of the time.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from localmix import kernels
from localmix.convert.fit import Curve, candidate_types, fit_tensors, load_mix, mix_imatrix, mix_table, save_mix, solve
from localmix.convert.pipeline import ConvertResult, convert, pick_types
from localmix.convert.sources import open_source
from localmix.errors import InputError
from localmix.runtime.devices import parse_size
from localmix.units import human_bytes

ALIGNMENT = 32   # GGUF's default data alignment


@dataclass
class Budget:
    """One of: a file size, bits per weight, or a GPU's memory with a context to leave room for."""
    size: str | None = None
    bpw: float | None = None
    gpu: str | None = None
    ctx: int = 8192

    def given(self) -> bool:
        return (self.size, self.bpw, self.gpu) != (None, None, None)


def _metadata_bytes(path: Path) -> int:
    """Bytes of a GGUF that are not tensor data (header, metadata, tokenizer, tensor table)."""
    from localmix.gguf.check import check_gguf

    s = check_gguf(path)
    return path.stat().st_size - sum(t.n_bytes for t in s.tensors)


def _dims_of_gguf(path: Path):
    from localmix.gguf.check import check_gguf
    from localmix.runtime.planner import ModelDims

    s = check_gguf(path)
    return ModelDims(s.n_layer or 0, s.n_embd or 0, s.n_head or 0, s.n_head_kv or 0, s.head_dim or 0, s.n_vocab,
                     s.n_ff or 0, s.n_expert_used)


def _dims_of_config(cfg):
    from localmix.runtime.planner import ModelDims

    return ModelDims(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts_per_tok if cfg.is_moe else 0)


@dataclass
class Shape:
    """What the budget arithmetic needs of the model and OUT."""
    fixed: int       # bytes of the tensors the fit leaves at the file type's choice
    smallest: int    # bytes of the fitted tensors, each at its smallest candidate
    n_params: int
    meta: int        # bytes of OUT that are not tensor data (at most)
    dims: object     # runtime.planner.ModelDims, for --fit-gpu


def _shape(source, file_type: str, meta: int, dims) -> Shape:
    fitted = dict(fit_tensors([(t.name, t.shape) for t in source.tensors]))
    kept = pick_types(source.tensors, file_type, source.model)
    fixed = sum(kernels.tensor_nbytes(kept[t.name], t.shape) for t in source.tensors if t.name not in fitted)
    smallest = 0
    for name, shape in fitted.items():
        types = candidate_types(shape[-1])
        if not types:
            raise InputError(f"no candidate type fits {name}'s rows of {shape[-1]}")
        smallest += min(kernels.tensor_nbytes(q, shape) for q in types)
    n_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in source.tensors)
    return Shape(fixed, smallest, n_params, meta, dims)


def _limit(budget: Budget, s: Shape) -> int:
    """Bytes left for the fitted tensors: the budget less what stays unquantized and the metadata."""
    if budget.bpw is not None:
        return int(budget.bpw * s.n_params / 8) - s.fixed
    if budget.size is not None:
        return parse_size(budget.size) - s.fixed - s.meta
    from localmix.runtime.planner import weights_budget

    return weights_budget(s.dims, budget.ctx, parse_size(budget.gpu)) - s.fixed - s.meta


def tensor_budget(budget: Budget, source, float_path: Path, file_type: str) -> int:
    """Bytes left for the fitted tensors of `source`, whose float GGUF is `float_path`."""
    meta = _metadata_bytes(float_path) + ALIGNMENT * len(source.tensors)  # each tensor padded to the alignment
    return _limit(budget, _shape(source, file_type, meta, _dims_of_gguf(float_path)))


def _check_budget(budget: Budget, s: Shape) -> int:
    """The bytes left for the fitted tensors, refused when even the smallest candidates exceed them."""
    limit = _limit(budget, s)
    if s.smallest <= limit:
        return limit
    smallest = s.fixed + s.smallest + s.meta
    if budget.bpw is not None:
        floor = 8 * (s.fixed + s.smallest) / s.n_params
        raise InputError(f"--fit-bpw {budget.bpw:g} is below the smallest this model makes: {floor:.2f} bits per "
                         f"weight, a file of {human_bytes(smallest)} (every tensor at its smallest candidate type)")
    what = f"--fit {budget.size}" if budget.size is not None else f"--fit-gpu {budget.gpu} at {budget.ctx} tokens"
    raise InputError(f"{what} is below the smallest file this model makes: {human_bytes(smallest)} "
                     "(every tensor at its smallest candidate type)")


def _write_header(source, path: Path, file_type: str, types: dict | None) -> int:
    """Write the metadata (and, with `types`, the tensor table) of OUT as convert writes them,
    without tensor data; returns the file's size. Without the table, llama.cpp reads it as a
    vocabulary."""
    import gguf

    from localmix.convert.mix import FILE_TYPES

    h = gguf.GGUFWriter(path=None, arch="llama")
    for t in source.tensors if types else ():
        h.add_tensor_info(t.name, t.shape, np.dtype(np.float32), kernels.tensor_nbytes(types[t.name], t.shape),
                          raw_dtype=types[t.name])
    source.add_metadata(h, FILE_TYPES[file_type][0])
    h.write_header_to_file(path=path)
    h.write_kv_data_to_file()
    h.write_ti_data_to_file()
    h.close()
    return path.stat().st_size


@dataclass
class Pass:
    """What the sensitivity pass reads: the weights, a GGUF with the vocabulary, and OUT's shape."""
    weights: object        # native.weights.Weights
    vocab_path: Path
    shape: Shape
    temp_bytes: int        # written to the temporary folder so far


def _open_pass(src: Path, source, tmp: Path, file_type: str) -> Pass:
    """The source's own weights, mapped as they are; for a checkpoint folder, its vocabulary as a
    GGUF of metadata only in `tmp`, and OUT's header written there once to learn its size."""
    from localmix.native.weights import checkpoint_weights, load_weights

    if src.is_file():
        meta = _metadata_bytes(src) + ALIGNMENT * len(source.tensors)
        return Pass(load_weights(src), src, _shape(source, file_type, meta, _dims_of_gguf(src)), 0)
    header = tmp / "header.gguf"
    meta = _write_header(source, header, file_type, pick_types(source.tensors, file_type, source.model))
    header.unlink()
    vocab = tmp / "vocab.gguf"
    size = _write_header(source, vocab, file_type, None)
    shape = _shape(source, file_type, meta + ALIGNMENT * (len(source.tensors) + 1), _dims_of_config(source.config))
    return Pass(checkpoint_weights(source), vocab, shape, size)


def _imatrix_bytes(source) -> int:
    """The size of the importance matrix file the pass collects (sums and counts, float32)."""
    return sum(4 * ((t.shape[0] if len(t.shape) == 3 else 1) * (t.shape[-1] + 1)) + 256
               for t in source.tensors if t.name.startswith("blk.") and len(t.shape) > 1) + (64 << 10)


def _human_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


def fit_quantize(src: Path, out: Path, budget: Budget, text: Path | None, file_type: str = "Q4_K_M",
                 imatrix: Path | None = None, mix_file: Path | None = None, save_to: Path | None = None,
                 force: bool = False, n_ctx: int = 128, n_windows: int = 2, measure_all: bool = False,
                 progress=None, console: Console | None = None,
                 save_imatrix: Path | None = None) -> tuple[ConvertResult, dict, list[Curve]]:
    """Fit (or read with `mix_file`) a mix and write `out` with it. Returns (the conversion's
    result, the mix, the measured curves or [])."""
    console = console or Console(stderr=True)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    if mix_file is not None:
        mix = load_mix(mix_file)
        imatrix = imatrix if imatrix is not None else mix_imatrix(mix_file)
        return convert(src, out, file_type, force=force, imatrix=imatrix, progress=progress, types=mix), mix, []
    if text is None:
        raise InputError("--fit needs calibration text: --text FILE")
    if not text.is_file():
        raise InputError(f"{text} not found")
    if imatrix is not None and save_imatrix is not None:
        raise InputError("--save-imatrix keeps the importance matrix --fit collects; with --imatrix it collects none")
    keep = save_imatrix  # where the collected importance matrix stays: --save-imatrix, or beside the mix
    if keep is None and save_to is not None and imatrix is None:
        keep = save_to.with_suffix(".imatrix.gguf")
    if keep is not None and keep.exists() and not force:
        raise InputError(f"{keep} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise InputError(f"cannot write {out}: directory {out.parent} does not exist")
    from localmix.convert.imatrix import load_imatrix
    from localmix.native.sensitivity import fit_sensitivity
    from localmix.native.stats import write_imatrix
    from localmix.runtime.vocab import open_vocab

    importance = load_imatrix(imatrix) if imatrix is not None else None
    source = open_source(src)
    with tempfile.TemporaryDirectory(prefix=".localmix-fit-", dir=out.parent) as tmp:
        p = _open_pass(src, source, Path(tmp), file_type)
        limit = _check_budget(budget, p.shape)
        temp = p.temp_bytes + (_imatrix_bytes(source) if imatrix is None and keep is None else 0)
        need = p.shape.fixed + p.shape.meta + limit + temp
        free = shutil.disk_usage(out.parent).free
        if need > free:
            raise InputError(f"--fit needs about {human_bytes(need)} free in {out.parent} (OUT and "
                             f"{human_bytes(temp)} of temporary files); {human_bytes(free)} are free")
        vocab = open_vocab(p.vocab_path)
        tokens = vocab.tokenize(text.read_text(encoding="utf-8", errors="replace").encode("utf-8"), add_bos=True,
                                special=False)
        bos = vocab.token_bos() if tokens and tokens[0] == vocab.token_bos() else None
        n_tensors = len(fit_tensors([(t.name, t.shape) for t in source.tensors]))

        def ready(seconds: float) -> None:
            disk = f"{human_bytes(temp)} of temporary files beside OUT" if temp else "no temporary files"
            console.print(f"--fit: measuring {n_tensors} tensors on {min(n_windows, len(tokens) // n_ctx)} windows "
                          f"of {n_ctx} tokens, about {_human_seconds(seconds)} more; {disk} (the weights are read "
                          "in place)", markup=False, highlight=False, soft_wrap=True)

        report = None
        if console.is_terminal:
            report = lambda i, n, name: console.print(f"sensitivity {i}/{n} {name}", end="\r")  # noqa: E731
        measured = fit_sensitivity(p.weights, tokens, bos, n_ctx, n_windows, measure_all, importance,
                                   collect=imatrix is None, progress=report, ready=ready)
        curves = measured.curves
        mix = solve(curves, limit)
        if imatrix is None:
            imatrix = keep or Path(tmp) / "imatrix.gguf"
            write_imatrix(imatrix, measured.imatrix, dataset=text.name, force=True)
        if save_to is not None:
            info = {"source": str(src), "budget": _describe(budget),
                    "expected_kld": sum(c.loss[c.types.index(mix[c.name])] for c in curves)}
            info["imatrix"] = _relative(imatrix, save_to.parent)  # the one OUT is written with
            save_mix(save_to, mix, info)
        result = convert(src, out, file_type, force=force, imatrix=imatrix, progress=progress, types=mix)
    return result, mix, curves


def _relative(path: Path, folder: Path) -> str:
    """`path` as a mix file in `folder` names it: relative to the folder when inside it."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path.resolve())


def _describe(b: Budget) -> str:
    if b.bpw is not None:
        return f"{b.bpw} bits per weight"
    return b.size if b.size is not None else f"GPU {b.gpu} at {b.ctx} tokens"


def render_mix(mix: dict) -> Table:
    """The mix as a table: a row per layer (then token_embd, output), a column per tensor kind."""
    kinds, rows = mix_table(mix)
    t = Table(box=None, pad_edge=False)
    t.add_column("layer", no_wrap=True)
    for k in kinds:  # attn_q -> q, ffn_down_exps -> down
        t.add_column(k.removeprefix("attn_").removeprefix("ffn_").removesuffix("_exps"), no_wrap=True)
    for row, types in rows:
        t.add_row(row, *types)
    return t
