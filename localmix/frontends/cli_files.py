"""The `localmix` commands that write or measure model files: quantize, imatrix, eval, synth,
experts. Thin glue like cli.py, which registers them on its app."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from localmix.convert.filetypes import NAMES as FILE_TYPES
from localmix.errors import InputError
from localmix.frontends.options import LOAD

err = Console(stderr=True, highlight=False)


def model_path(name: str) -> Path:
    """A path as given, or a model pulled earlier, found in the local Hugging Face cache."""
    path = Path(name).expanduser()
    if path.exists():  # a file: no need to import the hub's client (a third of a second)
        return path
    from localmix.frontends.hub import resolve

    return resolve(name)


def quantize(
    src: Path = typer.Argument(..., help="A downloaded Hugging Face checkpoint folder (config.json, *.safetensors, "
                               "tokenizer.model), or a GGUF file (F32/F16/BF16; a quantized one is requantized)."),
    out: Path = typer.Argument(..., help="The GGUF file to write."),
    type_: str = typer.Option("Q4_K_M", "--type", "-t", help=f"File type, as llama.cpp names them: {', '.join(FILE_TYPES)}."),
    imatrix: Path = typer.Option(None, "--imatrix", help="Importance matrix from llama.cpp's llama-imatrix (GGUF or "
                                 "legacy .dat). With --fit: used instead of the one --fit collects from --text."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
    fit: str = typer.Option(None, "--fit", help="Choose each tensor's type for the least KL divergence in a file of "
                            "this size, e.g. 20GiB (needs --text)."),
    fit_bpw: float = typer.Option(None, "--fit-bpw", min=1.0, help="As --fit, at this many bits per weight."),
    fit_gpu: str = typer.Option(None, "--fit-gpu", help="As --fit, for the largest file a GPU of this size holds "
                                "with --ctx tokens of KV cache, e.g. 24GiB."),
    ctx: int = typer.Option(8192, "--ctx", min=16, help="With --fit-gpu: the context to leave room for."),
    text: Path = typer.Option(None, "--text", help="With --fit: calibration text the sensitivities are measured on."),
    mix: Path = typer.Option(None, "--mix", help="Write with the per-tensor types of a mix saved by --save-mix."),
    save_mix: Path = typer.Option(None, "--save-mix", help="With --fit: save the chosen types as JSON, and the "
                                  "importance matrix --fit collected beside it (MIX.imatrix.gguf), which --mix uses."),
    save_imatrix: Path = typer.Option(None, "--save-imatrix", help="With --fit: save the importance matrix --fit "
                                      "collected from --text and wrote OUT with (llama.cpp's GGUF imatrix format)."),
    measure_all: bool = typer.Option(False, "--measure-all", help="With --fit: run the forward for every tensor and "
                                     "type instead of one probe per tensor."),
):
    """Quantize a Hugging Face checkpoint to a GGUF file in one streaming pass (llama.cpp's K-quant mixes).

    With --fit SIZE (or --fit-bpw, --fit-gpu), each tensor's type is chosen for the least
    expected KL divergence within the budget, from sensitivities measured on --text; the
    importance matrix collected on the same text guides the quantization (unless --imatrix)."""
    from localmix.frontends.fit import Budget
    from localmix.frontends.progress import ConvertProgress
    from localmix.frontends.quantize import quantize as write
    from localmix.units import human_bytes

    with ConvertProgress(err) as progress:
        result = write(src, out, type_.upper(), Budget(size=fit, bpw=fit_bpw, gpu=fit_gpu, ctx=ctx), force=force,
                       imatrix=imatrix, text=text, mix=mix, save_mix=save_mix, save_imatrix=save_imatrix,
                       measure_all=measure_all, progress=progress, console=err)
    if err.is_terminal:
        err.print(f"wrote {result.path} ({result.file_type}, {result.n_tensors} tensors, {human_bytes(result.n_bytes)})")


def experts(
    model: str = typer.Argument(..., help="A Mixtral GGUF file, or a model pulled by name."),
    prompt: list[str] = typer.Argument(None, help="The text; standard input, when piped, comes first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: every token's experts and weights per layer, "
                                 "counts per layer and expert, each expert's share of tokens."),
):
    """Which experts the router picks for each token, per layer: a heat map of expert use.

    The text is tokenized as it is (BOS first, no chat template) and run through localmix's
    native forward."""
    from localmix.frontends.oneshot import read_prompt
    from localmix.native.experts import render, route_text

    routing = route_text(model_path(model), read_prompt(prompt or [], sys.stdin))
    if as_json:
        print(json.dumps(routing.to_json(), ensure_ascii=False))
    else:
        Console(highlight=False).print(render(routing, title=f"{len(routing.tokens)} tokens"))


def imatrix(
    model: str = typer.Argument(..., help="A GGUF file (F32, F16, BF16 or Q8_0 gives the best statistics)."),
    text: Path = typer.Option(..., "--text", help="A text file to run through the model, e.g. a calibration set."),
    out: Path = typer.Option(..., "--output", "-o", help="The imatrix GGUF to write."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Tokens per chunk, as llama-imatrix's -c."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output if it exists."),
):
    """Compute an importance matrix, as llama.cpp's llama-imatrix does, for `quantize --imatrix`."""
    from localmix.native.stats import imatrix_from_text, write_imatrix

    if not text.is_file():
        raise InputError(f"{text} not found")
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    progress = (lambda done, total: err.print(f"chunk {done}/{total}", end="\r")) if err.is_terminal else None
    data = imatrix_from_text(model_path(model), text.read_text(encoding="utf-8", errors="replace"), ctx, progress)
    write_imatrix(out, data, dataset=text.name, force=force)
    err.print(f"wrote {out}: {len(data['sums'])} tensors, {data['chunk_count']} chunks of {ctx} tokens")


def eval_cmd(
    model: str = typer.Argument(None, help="The GGUF to measure (a file or a pulled name); leave out to only "
                                "--save-reference."),
    reference: Path = typer.Option(..., "--reference", help="The reference: a GGUF (F32/F16/Q8_0, say), or a file "
                                   "written by --save-reference or llama-perplexity's --kl-divergence-base."),
    text: Path = typer.Option(None, "--text", help="The text to score (needed unless --reference is a saved file)."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Tokens per window; the second half of each is scored."),
    save_reference: Path = typer.Option(None, "--save-reference", help="Keep the reference's log-probabilities in "
                                        "this file (llama-perplexity's format) to compare more models later."),
    engine: str = typer.Option("llama.cpp", "--engine", help=LOAD.flags["engine"].help),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """How much a model loses against a reference: llama-perplexity --kl-divergence's report.

    Perplexity of both, mean KL divergence with its standard error, KLD percentiles, how often
    both put the same token first, and the change in the next token's probability, over
    non-overlapping windows of the text, scoring the second half of each."""
    from localmix.frontends.evaluate import render, run_eval

    path = model_path(model) if model else None
    stats = run_eval(path, reference, text, ctx, engine=engine, save_to=save_reference, console=err)
    if stats is None:
        err.print(f"wrote {save_reference}")
    elif as_json:
        print(json.dumps({"model": str(path), "reference": str(reference), **stats.to_json()}))
    else:
        Console(highlight=False).print(render(stats, str(path), str(reference)))


def synth(
    preset: str = typer.Option(..., "--preset", help="mixtral-8x7b, mixtral-8x22b or mistral-7b."),
    type_: str = typer.Option("Q4_K_M", "--type", "-t", help=f"File type: {', '.join(FILE_TYPES)}."),
    out: Path = typer.Option(..., "--output", "-o", help="The GGUF file to write."),
    layers: int = typer.Option(None, "--layers", min=1, help="Only the first N layers (full widths, a mid-size model)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite the output if it exists."),
):
    """Write a synthetic model: real shapes, tokenizer and metadata, random quantized weights.

    For measuring memory and speed at full size without downloading the real weights; it
    generates noise. The file has the size llama.cpp's file of the same model and type has."""
    from localmix.fixtures.synth import synth as write_synth
    from localmix.frontends.progress import ConvertProgress
    from localmix.units import human_bytes

    with ConvertProgress(err) as progress:
        r = write_synth(preset, type_.upper(), out, seed=seed, n_layers=layers, force=force, progress=progress)
    err.print(f"wrote {r.path} ({r.file_type}, {r.n_tensors} tensors, {human_bytes(r.n_bytes)}, random weights)")
