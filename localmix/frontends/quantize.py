"""The body of `localmix quantize`: a file of one of llama.cpp's mixes in one streaming pass
(convert/pipeline.py), or, with a budget or a saved mix, each tensor's type fitted (fit.py)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from localmix.errors import InputError
from localmix.frontends.fit import Budget


def quantize(src: Path, out: Path, file_type: str, budget: Budget, *, force: bool = False, imatrix: Path | None = None,
             text: Path | None = None, mix: Path | None = None, save_mix: Path | None = None,
             save_imatrix: Path | None = None, measure_all: bool = False, progress=None, console: Console):
    """Write OUT from SRC and return the ConvertResult; warnings and the fitted mix's table go
    to `console` (stderr)."""
    if sum(x is not None for x in (budget.size, budget.bpw, budget.gpu)) > 1:
        raise InputError("give one of --fit, --fit-bpw and --fit-gpu")
    if not budget.given() and mix is None:
        if save_mix is not None or text is not None or save_imatrix is not None:
            raise InputError("--text, --save-mix and --save-imatrix go with --fit, --fit-bpw or --fit-gpu")
        from localmix.convert.pipeline import convert

        return convert(src, out, file_type, force=force, imatrix=imatrix, progress=progress,
                       warn=lambda line: console.print(f"localmix: warning: {line}", markup=False, soft_wrap=True))
    from localmix.frontends.fit import fit_quantize, render_mix

    if mix is not None and save_imatrix is not None:
        raise InputError("--save-imatrix goes with --fit, --fit-bpw or --fit-gpu, not --mix")
    result, chosen, _ = fit_quantize(src, out, budget, text, file_type, imatrix, mix, save_mix, force,
                                     measure_all=measure_all, progress=progress, console=console,
                                     save_imatrix=save_imatrix)
    console.print(render_mix(chosen))
    return result
