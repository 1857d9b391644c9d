"""The body of `localmix eval`: open each model in the engine asked for, run the reference pass
(or read a saved one), then the model pass, with a progress bar; render llama-perplexity's
report as a table or JSON.

The reference is run first and closed before the model is loaded, its log-probabilities going
through a file (`--save-reference`, or a temporary one), so the two models are never in memory
together. This module knows both engines; runtime/evaluate.py knows neither.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from localmix.errors import InputError, OutputError
from localmix.gguf.check import check_gguf
from localmix.runtime.evaluate import LlamaScorer, compare, is_reference_file, read_reference, save_reference
from localmix.runtime.kld import KLDStats, summarize

ENGINES = ("llama.cpp", "native")


class NativeScorer:
    """localmix's own forward (localmix.native) as eval's scorer."""

    def __init__(self, path: Path, n_ctx: int):
        from localmix.native.engine import NativeEngine

        self.engine = NativeEngine(path, n_ctx=n_ctx)
        self.n_vocab = self.engine.weights.hp.n_vocab
        self.add_bos = self.engine.vocab.add_bos
        self.bos = self.engine.vocab.token_bos()

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text, add_bos=True, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        return self.engine.logits(tokens)

    def close(self) -> None:
        self.engine = None


def open_scorer(path: Path, n_ctx: int, engine: str):
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose llama.cpp or native")
    check_gguf(path)
    return NativeScorer(path, n_ctx) if engine == "native" else LlamaScorer(path, n_ctx)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory, not a text file") from None


class _Bar:
    """Windows done per pass, with an ETA; nothing in a pipe."""

    def __init__(self, console: Console):
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("windows"), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal)
        self.tasks = {}

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def pass_(self, name: str):
        def update(done: int, total: int) -> None:
            if name not in self.tasks:
                self.tasks[name] = self.bar.add_task(name, total=total)
            self.bar.update(self.tasks[name], completed=done)
        return update


def run_eval(model: Path | None, reference: Path, text: Path | None, ctx: int, engine: str = "llama.cpp",
             save_to: Path | None = None, console: Console | None = None) -> KLDStats | None:
    """Measure `model` against `reference` (a GGUF, or a saved reference file). Returns the
    report, or None when only a reference file was to be written (no model)."""
    console = console or Console(stderr=True)
    if model is None and save_to is None:
        raise InputError("give a MODEL to measure, or --save-reference FILE to only run the reference")
    if not reference.exists():
        raise InputError(f"{reference} not found")
    if save_to is not None and save_to.parent and not save_to.parent.is_dir():
        raise OutputError(f"cannot write {save_to}: no such directory {save_to.parent}")
    with _Bar(console) as bar, tempfile.TemporaryDirectory(prefix="localmix-eval-") as tmp:
        if is_reference_file(reference):
            if save_to is not None:
                raise InputError(f"{reference} is already a reference file; --save-reference needs a model as --reference")
            ref_file = reference
        else:
            if text is None:
                raise InputError("--text FILE is needed to run the reference model (or give a saved reference file)")
            body = _read_text(text)
            ref_file = save_to or Path(tmp) / "reference.kld"
            scorer = open_scorer(reference, ctx, engine)
            try:
                save_reference(scorer, body, ctx, ref_file, bar.pass_("reference"))
            finally:
                scorer.close()
                del scorer
                gc.collect()
        if model is None:
            return None
        ref = read_reference(ref_file)
        scorer = open_scorer(model, ref.n_ctx, engine)
        try:
            return summarize(compare(scorer, ref_file, bar.pass_("model")))
        finally:
            scorer.close()


def render(stats: KLDStats, model: str, reference: str) -> Table:
    """llama-perplexity's final report as a two-column table."""
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_column(style="dim")
    t.add_row("model", model, "")
    t.add_row("reference", reference, "")
    t.add_row("scored tokens", str(stats.n_positions), "")
    t.add_row("PPL(model)", f"{stats.ppl:.4f}", f"± {stats.ppl_err:.4f}")
    t.add_row("PPL(reference)", f"{stats.ppl_base:.4f}", f"± {stats.ppl_base_err:.4f}")
    t.add_row("ln(PPL ratio)", f"{stats.ln_ppl_ratio:.6f}", f"± {stats.ln_ppl_ratio_err:.6f}")
    t.add_row("mean KLD", f"{stats.kld_mean:.6f}", f"± {stats.kld_err:.6f}")
    for key, label in (("max", "max KLD"), ("p99.9", "99.9% KLD"), ("p99", "99% KLD"), ("p95", "95% KLD"),
                       ("p90", "90% KLD"), ("median", "median KLD")):
        t.add_row(label, f"{stats.kld[key]:.6f}", "")
    t.add_row("same top p", f"{100 * stats.same_top:.3f} %", f"± {100 * stats.same_top_err:.3f} %")
    t.add_row("mean Δp", f"{100 * stats.p_diff_mean:.3f} %", f"± {100 * stats.p_diff_err:.3f} %")
    t.add_row("RMS Δp", f"{100 * stats.p_diff_rms:.3f} %", f"± {100 * stats.p_diff_rms_err:.3f} %")
    t.add_row("max |Δp|", f"{100 * stats.p_diff_max:.3f} %", "")
    return t
