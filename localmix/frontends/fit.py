"""The body of `localmix quantize --fit SIZE` (and --fit-bpw, --fit-gpu, --mix): measure each
tensor's sensitivity with the native forward, solve the budget, write the file.

The layers stay apart: the sensitivity pass (localmix.native.sensitivity) runs the forward
over a float GGUF (a checkpoint folder is first converted to a temporary F32 one), the solver
(convert/fit.py) is plain arithmetic over the measured curves, and pipeline.convert writes the
plain {tensor: type} table it returns.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from localmix import kernels
from localmix.convert.fit import Curve, fit_tensors, load_mix, mix_table, save_mix, solve
from localmix.convert.pipeline import ConvertResult, convert, pick_types
from localmix.convert.sources import open_source
from localmix.errors import InputError
from localmix.runtime.devices import parse_size

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


def _float_source(src: Path, tmp: Path) -> Path:
    """A float GGUF the native engine reads: `src` itself, or a temporary F32 conversion of a checkpoint."""
    if src.is_file():
        return src
    return convert(src, tmp / "source-F32.gguf", "F32").path


def _metadata_bytes(path: Path) -> int:
    """Bytes of a GGUF that are not tensor data (header, metadata, tokenizer, tensor table)."""
    from localmix.gguf.check import check_gguf

    s = check_gguf(path)
    return path.stat().st_size - sum(t.n_bytes for t in s.tensors)


def tensor_budget(budget: Budget, source, float_path: Path, file_type: str) -> int:
    """Bytes left for the fitted tensors: the budget less what stays unquantized and the metadata."""
    fitted = {name for name, _ in fit_tensors([(t.name, t.shape) for t in source.tensors])}
    kept = pick_types(source.tensors, file_type, source.model)
    fixed = sum(kernels.tensor_nbytes(kept[t.name], t.shape) for t in source.tensors if t.name not in fitted)
    n_params = sum(_n_params(t.shape) for t in source.tensors)
    if budget.bpw is not None:
        return int(budget.bpw * n_params / 8) - fixed
    meta = _metadata_bytes(float_path) + ALIGNMENT * len(source.tensors)  # each tensor padded to the alignment
    if budget.size is not None:
        return parse_size(budget.size) - fixed - meta
    from localmix.gguf.check import check_gguf
    from localmix.runtime.planner import ModelDims, weights_budget

    s = check_gguf(float_path)
    dims = ModelDims(s.n_layer or 0, s.n_embd or 0, s.n_head or 0, s.n_head_kv or 0, s.head_dim or 0, s.n_vocab,
                     s.n_ff or 0, s.n_expert_used)
    return weights_budget(dims, budget.ctx, parse_size(budget.gpu)) - fixed - meta


def _n_params(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def fit_quantize(src: Path, out: Path, budget: Budget, text: Path | None, file_type: str = "Q4_K_M",
                 imatrix: Path | None = None, mix_file: Path | None = None, save_to: Path | None = None,
                 force: bool = False, n_ctx: int = 128, n_windows: int = 2, measure_all: bool = False,
                 progress=None, console: Console | None = None) -> tuple[ConvertResult, dict, list[Curve]]:
    """Fit (or read with `mix_file`) a mix and write `out` with it. Returns (the conversion's
    result, the mix, the measured curves or [])."""
    from localmix.convert.imatrix import load_imatrix

    console = console or Console(stderr=True)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    curves: list[Curve] = []
    if mix_file is not None:
        mix = load_mix(mix_file)
    else:
        if text is None:
            raise InputError("--fit needs calibration text: --text FILE")
        if not text.is_file():
            raise InputError(f"{text} not found")
        importance = load_imatrix(imatrix) if imatrix is not None else None
        with tempfile.TemporaryDirectory(prefix="localmix-fit-", dir=out.parent) as tmp:
            float_path = _float_source(src, Path(tmp))
            source = open_source(src)
            limit = tensor_budget(budget, source, float_path, file_type)
            from localmix.native.sensitivity import sensitivity_curves

            report = None
            if console.is_terminal:
                report = lambda i, n, name: console.print(f"sensitivity {i}/{n} {name}", end="\r")  # noqa: E731
            curves = sensitivity_curves(float_path, text.read_text(encoding="utf-8", errors="replace"), n_ctx,
                                        n_windows, measure_all, importance, progress=report)
        mix = solve(curves, limit)
        if save_to is not None:
            save_mix(save_to, mix, {"source": str(src), "budget": _describe(budget),
                                    "expected_kld": sum(c.loss[c.types.index(mix[c.name])] for c in curves)})
    result = convert(src, out, file_type, force=force, imatrix=imatrix, progress=progress, types=mix)
    return result, mix, curves


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
