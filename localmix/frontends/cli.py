"""The `localmix` command: thin glue over the functions of the package.

Every subcommand parses its flags, calls one function and prints the result. Errors a user
can cause are `LocalmixError`s, printed by `main` as one line on stderr with a non-zero exit
code (2 for bad input, 1 for I/O faults, 130 for Ctrl-C); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console

from localmix.errors import EXIT_INTERRUPTED, LocalmixError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run Mixtral-class mixture-of-experts models on your own desktop.")
err = Console(stderr=True, highlight=False)

from localmix.convert.mix import FILE_TYPES

# typer vendors click from 0.29 on; take its exception class from typer itself.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


@app.command()
def quantize(
    src: Path = typer.Argument(..., help="A downloaded Hugging Face checkpoint folder (config.json, *.safetensors, "
                               "tokenizer.model), or a GGUF file (F32/F16/BF16; a quantized one is requantized)."),
    out: Path = typer.Argument(..., help="The GGUF file to write."),
    type_: str = typer.Option("Q4_K_M", "--type", "-t", help=f"File type, as llama.cpp names them: {', '.join(FILE_TYPES)}."),
    imatrix: Path = typer.Option(None, "--imatrix", help="Importance matrix from llama.cpp's llama-imatrix (GGUF or legacy .dat)."),
    force: bool = typer.Option(False, "--force", "-f", help="Overwrite OUT if it exists."),
    fit: str = typer.Option(None, "--fit", help="Choose each tensor's type for the least KL divergence in a file of "
                            "this size, e.g. 20GiB (needs --text)."),
    fit_bpw: float = typer.Option(None, "--fit-bpw", min=1.0, help="As --fit, at this many bits per weight."),
    fit_gpu: str = typer.Option(None, "--fit-gpu", help="As --fit, for the largest file a GPU of this size holds "
                                "with --ctx tokens of KV cache, e.g. 24GiB."),
    ctx: int = typer.Option(8192, "--ctx", min=16, help="With --fit-gpu: the context to leave room for."),
    text: Path = typer.Option(None, "--text", help="With --fit: calibration text the sensitivities are measured on."),
    mix: Path = typer.Option(None, "--mix", help="Write with the per-tensor types of a mix saved by --save-mix."),
    save_mix: Path = typer.Option(None, "--save-mix", help="With --fit: save the chosen types as JSON."),
    measure_all: bool = typer.Option(False, "--measure-all", help="With --fit: run the forward for every tensor and "
                                     "type instead of one probe per tensor."),
):
    """Quantize a Hugging Face checkpoint to a GGUF file in one streaming pass (llama.cpp's K-quant mixes).

    With --fit SIZE (or --fit-bpw, --fit-gpu), each tensor's type is chosen for the least
    expected KL divergence within the budget, from sensitivities measured on --text."""
    from localmix.frontends.progress import ConvertProgress
    from localmix.units import human_bytes

    with ConvertProgress(err) as progress:
        result = _quantize(src, out, type_.upper(), force, imatrix, progress, fit, fit_bpw, fit_gpu, ctx, text, mix,
                           save_mix, measure_all)
    if err.is_terminal:
        err.print(f"wrote {result.path} ({result.file_type}, {result.n_tensors} tensors, {human_bytes(result.n_bytes)})")


def _quantize(src, out, file_type, force, imatrix, progress, fit, fit_bpw, fit_gpu, ctx, text, mix, save_mix,
              measure_all):
    from localmix.errors import InputError
    from localmix.frontends.fit import Budget, fit_quantize, render_mix

    budget = Budget(size=fit, bpw=fit_bpw, gpu=fit_gpu, ctx=ctx)
    if sum(x is not None for x in (fit, fit_bpw, fit_gpu)) > 1:
        raise InputError("give one of --fit, --fit-bpw and --fit-gpu")
    if not budget.given() and mix is None:
        if save_mix is not None or text is not None:
            raise InputError("--text and --save-mix go with --fit, --fit-bpw or --fit-gpu")
        from localmix.convert.pipeline import convert

        return convert(src, out, file_type, force=force, imatrix=imatrix, progress=progress,
                       warn=lambda text: err.print(f"localmix: warning: {text}", markup=False, soft_wrap=True))
    result, chosen, _ = fit_quantize(src, out, budget, text, file_type, imatrix, mix, save_mix, force,
                                     progress=progress, console=err)
    Console(highlight=False, stderr=True).print(render_mix(chosen))
    return result


@app.command()
def info(
    file: Path = typer.Argument(..., help="A GGUF file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Show what a GGUF file holds: architecture, sizes, tensor types, tokenizer, chat template."""
    from localmix.frontends.render import render
    from localmix.gguf.info import describe

    summary = describe(file)
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        Console(highlight=False).print(render(summary))


# Options that `run` and `chat` share.
TEMPERATURE = typer.Option(0.8, "--temperature", "--temp", min=0.0)
TOP_K = typer.Option(40, "--top-k", min=0)
TOP_P = typer.Option(0.95, "--top-p", min=0.0, max=1.0)
MIN_P = typer.Option(0.05, "--min-p", min=0.0, max=1.0)
REPEAT_PENALTY = typer.Option(1.1, "--repeat-penalty", min=0.0)
SEED = typer.Option(None, "--seed", help="Make sampling reproducible.")
CTX = typer.Option(None, "--ctx", min=16, help="Context length in tokens [default: the model's, capped by memory].")
FORCE_LOAD = typer.Option(False, "--force", help="Load even when the model and context look too big for memory.")
VRAM = typer.Option(None, "--vram", help="Plan for this much GPU memory, e.g. 20GiB [default: what the GPU reports free].")
RAM = typer.Option(None, "--ram", help="Plan for this much RAM [default: what is available now].")
N_CPU_MOE = typer.Option(None, "--n-cpu-moe", min=0, help="Keep the experts of the first N layers on the CPU "
                         "[default: as few as the GPU needs].")
GPU_LAYERS = typer.Option(None, "--gpu-layers", "-ngl", min=0, help="llama.cpp's n_gpu_layers [default: the plan's].")
ENGINE = typer.Option("llama.cpp", "--engine", help="llama.cpp, or native: localmix's own numpy forward (CPU).")
REPACK = typer.Option(None, "--repack/--no-repack", help="Let llama.cpp copy CPU weights into its repacked layouts: "
                      "faster products, but read in full at load and resident instead of mapped "
                      "[default: when RAM holds the file and the copy].")
SAFE = typer.Option(False, "--safe", help="Put Mistral's guardrail system prompt first, as its API's safe_prompt does.")


def _safe_system(system: str | None, safe: bool) -> str | None:
    if not safe:
        return system
    from localmix.frontends.server.mistral import SAFE_PROMPT

    return SAFE_PROMPT + ("\n\n" + system if system else "")


@app.command()
def run(
    model: str = typer.Argument(..., help="A GGUF file, or a model pulled by name (REPO:QUANT)."),
    prompt: list[str] = typer.Argument(None, help="The prompt; standard input, when piped, comes first."),
    system: str = typer.Option(None, "--system", help="A system prompt."),
    safe: bool = SAFE,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", min=1, help="Stop after this many tokens."),
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT_PENALTY, seed: int = SEED,
    stop: list[str] = typer.Option(None, "--stop", help="Stop before this text (repeatable)."),
    ctx: int = CTX,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token counts, timings, finish reason."),
    force: bool = FORCE_LOAD, vram: str = VRAM, ram: str = RAM, n_cpu_moe: int = N_CPU_MOE, gpu_layers: int = GPU_LAYERS,
    repack: bool | None = REPACK, engine: str = ENGINE,
    raw: bool = typer.Option(False, "--raw", help="No chat template: send BOS + the text for the model to continue "
                             "(base models; the default for files with no template and no Mistral markers)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log and a stats line on stderr."),
):
    """Answer one prompt and exit: only the reply goes to stdout, ready for a pipe."""
    from localmix.frontends.load import open_engine
    from localmix.frontends.oneshot import ask, read_prompt
    from localmix.runtime.planner import placement_line
    from localmix.runtime.stream import Sampling

    path = _model_path(model)
    text = read_prompt(prompt or [], sys.stdin)
    system = _safe_system(system, safe)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        seed=seed, max_tokens=max_tokens, stop=tuple(stop or ()))
    llm = open_engine(path, ctx=ctx, force=force, verbose=verbose, vram=vram, ram=ram, n_cpu_moe=n_cpu_moe,
                      gpu_layers=gpu_layers, repack=repack, engine=engine)
    if verbose:
        err.print(f"placement: {placement_line(llm.plan)}", style="dim")
    write = (lambda piece: None) if as_json else _stdout_writer()
    done = ask(llm, text, system, sampling, write, raw=raw)
    if as_json:
        print(json.dumps({"text": done.text, "finish_reason": done.reason, "prompt_tokens": done.prompt_tokens,
                          "completion_tokens": done.generated_tokens, "prompt_seconds": round(done.prompt_seconds, 4),
                          "generate_seconds": round(done.generate_seconds, 4),
                          "prompt_tokens_per_second": round(done.prompt_tps, 2),
                          "tokens_per_second": round(done.generate_tps, 2)}, ensure_ascii=False))
    elif done.text and not done.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if verbose:
        from localmix.frontends.render import stats_line

        err.print(stats_line(done), style="dim")


@app.command()
def chat(
    model: str = typer.Argument(..., help="A GGUF file, or a model pulled by name (REPO:QUANT)."),
    system: str = typer.Option(None, "--system", help="A system prompt (/system changes it)."),
    safe: bool = SAFE,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Stop a reply after this many tokens."),
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT_PENALTY, seed: int = SEED,
    stop: list[str] = typer.Option(None, "--stop", help="Stop a reply before this text (repeatable)."),
    ctx: int = CTX,
    raw: bool = typer.Option(False, "--raw", help="Stream plain text instead of rendering Markdown."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history file."),
    force: bool = FORCE_LOAD, vram: str = VRAM, ram: str = RAM, n_cpu_moe: int = N_CPU_MOE, gpu_layers: int = GPU_LAYERS,
    repack: bool | None = REPACK, engine: str = ENGINE,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log."),
):
    """Chat in the terminal: replies stream as Markdown, Ctrl-C stops one; /help lists the commands.

    Input history is kept in $XDG_DATA_HOME/localmix/chat_history (~/.local/share/...).
    """
    from localmix.runtime.stream import Sampling

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        seed=seed, max_tokens=max_tokens, stop=tuple(stop or ()))
    _chat(_model_path(model), ctx, sampling, system=_safe_system(system, safe), raw=raw, history=not no_history, force=force,
          verbose=verbose, vram=vram, ram=ram, n_cpu_moe=n_cpu_moe, gpu_layers=gpu_layers, repack=repack, engine=engine)


@app.command()
def serve(
    model: str = typer.Argument(..., help="A GGUF file, or a model pulled by name (REPO:QUANT)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs --api-key."),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    parallel: int = typer.Option(1, "--parallel", "-np", min=1, max=64, help="Sequences decoded together in one batch."),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' [env LOCALMIX_API_KEY]."),
    cors: list[str] = typer.Option(None, "--cors", help="Allow browser pages of this origin (repeatable) [default: none]."),
    allow_host: list[str] = typer.Option(None, "--allow-host", help="Accept this Host header too (repeatable)."),
    max_body: int = typer.Option(4 << 20, "--max-body", min=1024, help="Largest request body, in bytes."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a slot; more get 503."),
    alias: str = typer.Option(None, "--alias", help="The model's name in the API [default: the file's stem]."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", min=1, help="Default reply length limit."),
    temperature: float = TEMPERATURE, top_k: int = TOP_K, top_p: float = TOP_P, min_p: float = MIN_P,
    repeat_penalty: float = REPEAT_PENALTY, seed: int = SEED,
    ctx: int = CTX, force: bool = FORCE_LOAD, vram: str = VRAM, ram: str = RAM, n_cpu_moe: int = N_CPU_MOE,
    gpu_layers: int = GPU_LAYERS, repack: bool | None = REPACK,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's log."),
):
    """Serve the model over HTTP to OpenAI, ollama and Mistral clients (requests batched together)."""
    from localmix.frontends.server.common import Options
    from localmix.frontends.server.run import serve as run_server
    from localmix.runtime.stream import Sampling

    path = _model_path(model)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                        seed=seed, max_tokens=max_tokens)
    options = Options(model_name=alias or path.stem, api_key=api_key, cors=tuple(cors or ()), max_body=max_body,
                      sampling=sampling)
    run_server(path, options, host=host, port=port, parallel=parallel, queue=queue, ctx=ctx,
               allow_hosts=tuple(allow_host or ()), announce=lambda line: print(line, file=sys.stderr, flush=True),
               load_options=dict(force=force, verbose=verbose, vram=vram, ram=ram, n_cpu_moe=n_cpu_moe,
                                 gpu_layers=gpu_layers, repack=repack))


def _chat(model: Path, ctx: int | None, sampling, system: str | None = None, raw: bool = False, history: bool = True,
          **load) -> None:
    from localmix.frontends.chat import ChatSession, engine_reply, history_path, start
    from localmix.frontends.load import open_engine
    from localmix.runtime.planner import placement_line

    engine = open_engine(model, ctx=ctx, **load)
    reply, count_tokens = engine_reply(engine)
    session = ChatSession(reply, sampling=sampling, system=system, n_ctx=engine.n_ctx, count_tokens=count_tokens,
                          model=str(model), memory=placement_line(engine.plan))
    start(session, raw=raw, history=history_path() if history else None)


def _model_path(name: str) -> Path:
    """A path as given, or a model pulled earlier, found in the local Hugging Face cache."""
    from localmix.frontends.hub import resolve

    return resolve(name)


@app.command()
def pull(spec: str = typer.Argument(..., help="REPO[:QUANT_OR_FILE], e.g. TheBloke/Mixtral-8x7B-Instruct-v0.1-GGUF:Q4_K_M, "
                                    "or a checkpoint repo such as mistralai/Mixtral-8x7B-Instruct-v0.1.")):
    """Download a GGUF (all its parts) or a safetensors checkpoint into the Hugging Face cache (resumable)."""
    from localmix.frontends.hub import pull as pull_model

    path = pull_model(spec, progress=err.is_terminal)
    print(path)


@app.command(name="ls")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """List the models in the local cache."""
    from rich.table import Table

    from localmix.frontends.hub import list_models
    from localmix.units import human_bytes

    models = list_models()
    if as_json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "size": m.size, "path": str(m.path)} for m in models], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("name", "kind", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for m in models:
        table.add_row(m.name, m.kind, human_bytes(m.size))
    Console(highlight=False).print(table if models else "no models yet: `localmix pull REPO:QUANT` downloads one")


@app.command()
def rm(spec: str = typer.Argument(..., help="REPO or REPO:QUANT_OR_FILE, as `localmix ls` shows it.")):
    """Delete a model from the local cache."""
    from localmix.frontends.hub import remove
    from localmix.units import human_bytes

    freed = remove(spec)
    err.print(f"removed {spec}, freed {human_bytes(freed)}")


@app.command()
def plan(
    model: str = typer.Argument(..., help="A GGUF file, a pulled name, or a preset and type such as mixtral-8x7b:Q4_K_M "
                                "(presets: mixtral-8x7b, mixtral-8x22b, mistral-7b)."),
    ctx: int = typer.Option(8192, "--ctx", min=16, help="Context length to plan for."),
    vram: str = typer.Option(None, "--vram", help="GPU memory to plan for, e.g. 24GiB [default: what llama.cpp's devices report]."),
    ram: str = typer.Option(None, "--ram", help="RAM to plan for [default: what is available now]."),
    metal: bool = typer.Option(False, "--metal", help="With --vram: the budget is a Mac's Metal working set."),
    n_cpu_moe: int = typer.Option(None, "--n-cpu-moe", min=0, help="Keep the experts of the first N layers on the CPU."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """Where each tensor goes: the GPU while it fits, the experts of the first layers on the CPU."""
    from rich.table import Table

    from localmix.convert.presets import PRESETS
    from localmix.runtime.devices import machine
    from localmix.runtime.planner import describe, file_plan, preset_plan
    from localmix.units import human_bytes

    device, budget, ram_bytes = machine(vram, ram, metal)
    name, _, file_type = model.partition(":")
    if name in PRESETS:
        p = preset_plan(name, (file_type or "Q4_K_M").upper(), ctx, budget, ram_bytes, device=device, n_cpu_moe=n_cpu_moe)
    else:
        p = file_plan(_model_path(model), ctx, budget, ram_bytes, device=device, n_cpu_moe=n_cpu_moe)
    if as_json:
        print(json.dumps(describe(p), indent=2))
        return
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    where = {"gpu": "GPU", "metal": "Metal (unified memory)", "cpu": "CPU only, weights mapped from the file"}[p.device]
    t.add_row("device", where + (f", budget {human_bytes(p.gpu_budget)}" if p.gpu_budget else ""))
    t.add_row("context", f"{p.n_ctx} tokens: KV cache {human_bytes(p.kv_bytes)}, compute buffers {human_bytes(p.compute_bytes)}")
    t.add_row("weights", human_bytes(p.weights_bytes))
    if p.gpu_budget is not None:
        t.add_row("on the GPU", f"{human_bytes(p.gpu_bytes)} (spare beyond a 512 MiB reserve: {human_bytes(max(p.headroom, 0))}), "
                  f"n_gpu_layers {p.n_gpu_layers}")
    layers = p.cpu_expert_layers
    t.add_row("on the CPU", human_bytes(p.cpu_bytes) + (f": experts of layers {layers[0]}-{layers[-1]} "
                                                         f"(--n-cpu-moe {len(layers)})" if layers else ""))
    t.add_row("RAM", (human_bytes(p.ram_budget) if p.ram_budget else "unknown")
              + ("; CPU weights repacked for speed" if p.repack and p.cpu_bytes else ""))
    t.add_row("verdict", "fits" if p.fits else f"[yellow]{p.advice}[/]")
    Console(highlight=False).print(t)


@app.command()
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

    routing = route_text(_model_path(model), read_prompt(prompt or [], sys.stdin))
    if as_json:
        print(json.dumps(routing.to_json(), ensure_ascii=False))
    else:
        Console(highlight=False).print(render(routing, title=f"{len(routing.tokens)} tokens"))


@app.command()
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
        from localmix.errors import InputError
        raise InputError(f"{text} not found")
    if out.exists() and not force:
        from localmix.errors import InputError
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    progress = (lambda done, total: err.print(f"chunk {done}/{total}", end="\r")) if err.is_terminal else None
    data = imatrix_from_text(_model_path(model), text.read_text(encoding="utf-8", errors="replace"), ctx, progress)
    write_imatrix(out, data, dataset=text.name, force=force)
    err.print(f"wrote {out}: {len(data['sums'])} tensors, {data['chunk_count']} chunks of {ctx} tokens")


@app.command(name="eval")
def eval_cmd(
    model: str = typer.Argument(None, help="The GGUF to measure (a file or a pulled name); leave out to only "
                                "--save-reference."),
    reference: Path = typer.Option(..., "--reference", help="The reference: a GGUF (F32/F16/Q8_0, say), or a file "
                                   "written by --save-reference or llama-perplexity's --kl-divergence-base."),
    text: Path = typer.Option(None, "--text", help="The text to score (needed unless --reference is a saved file)."),
    ctx: int = typer.Option(512, "--ctx", min=16, help="Tokens per window; the second half of each is scored."),
    save_reference: Path = typer.Option(None, "--save-reference", help="Keep the reference's log-probabilities in "
                                        "this file (llama-perplexity's format) to compare more models later."),
    engine: str = ENGINE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """How much a model loses against a reference: llama-perplexity --kl-divergence's report.

    Perplexity of both, mean KL divergence with its standard error, KLD percentiles, how often
    both put the same token first, and the change in the next token's probability, over
    non-overlapping windows of the text, scoring the second half of each."""
    from localmix.frontends.evaluate import render, run_eval

    path = _model_path(model) if model else None
    stats = run_eval(path, reference, text, ctx, engine=engine, save_to=save_reference, console=err)
    if stats is None:
        err.print(f"wrote {save_reference}")
    elif as_json:
        print(json.dumps({"model": str(path), "reference": str(reference), **stats.to_json()}))
    else:
        Console(highlight=False).print(render(stats, str(path), str(reference)))


@app.command()
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


def _stdout_writer():
    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()
    return write


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmix"


@app.command()
def demo(
    directory: Path = typer.Option(None, "--dir", help="Where to put the demo checkpoint and GGUF [default: ~/.cache/localmix/demo]."),
    tokens: int = typer.Option(24, "--tokens", min=1, help="How many tokens to generate (per reply in the chat)."),
):
    """Build a tiny random Mixtral checkpoint, convert it to GGUF and chat with it through llama.cpp.

    The weights are random, so the generated text is random by design: the demo shows the
    whole path working, offline, in seconds. For a real model, download one (e.g.
    `hf download mistralai/Mixtral-8x7B-Instruct-v0.1 --local-dir mixtral`) and run
    `localmix quantize mixtral mixtral-Q4_K_M.gguf --type Q4_K_M`.
    """
    from localmix.convert.pipeline import convert
    from localmix.fixtures.tiny import make_tiny_checkpoint
    from localmix.frontends.progress import ConvertProgress
    from localmix.frontends.render import render
    from localmix.gguf.info import describe

    out = Console(highlight=False)
    directory = directory or _cache_dir() / "demo"
    src = make_tiny_checkpoint(directory / "tiny-mixtral")
    out.print(f"[bold]1.[/] wrote a tiny random Mixtral checkpoint (Hugging Face layout) to {src}")
    gguf_path = directory / "tiny-mixtral-Q4_K_M.gguf"
    with ConvertProgress(err) as progress:
        convert(src, gguf_path, "Q4_K_M", force=True, progress=progress)
    out.print(f"[bold]2.[/] converted it to {gguf_path}:")
    out.print(render(describe(gguf_path)))
    if sys.stdin.isatty():
        from localmix.runtime.stream import Sampling

        out.print("[bold]3.[/] chat with it through llama.cpp (random weights, so random replies by design):")
        _chat(gguf_path, 2048, Sampling(max_tokens=tokens))
    else:
        out.print("[bold]3.[/] llama.cpp runs it (random weights, so random text by design):")
        _generate(gguf_path, "Tell me about mixtures of experts.", tokens)


def _generate(model: Path, prompt: str, max_tokens: int) -> None:
    """One reply from the demo model, through the same engine and chat template as `run`."""
    from localmix.frontends.load import open_engine
    from localmix.frontends.oneshot import ask
    from localmix.runtime.stream import Sampling

    engine = open_engine(model, ctx=256)
    ask(engine, prompt, None, Sampling(temperature=0.0, max_tokens=max_tokens), _stdout_writer())
    sys.stdout.write("\n")


class _Terminated(BaseException):
    """SIGTERM (`kill`, a service manager): unwinds like Ctrl-C, so a file being written is removed."""


def _terminated(signum, frame):
    raise _Terminated


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning user errors into one line and an exit code."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)  # `serve` installs its own when it starts
    try:
        code = app(args=argv, prog_name="localmix", standalone_mode=False)
    except BrokenPipeError:
        # the reader went away (`| head -c 20`): stop quietly, and keep Python's final
        # flush of stdout from failing again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except LocalmixError as e:
        err.print(f"localmix: error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except _Terminated:
        err.print("localmix: terminated", markup=False)
        sys.exit(128 + signal.SIGTERM)
    except (KeyboardInterrupt, typer.Abort):
        code = EXIT_INTERRUPTED
    # typer turns Ctrl-C into an exit code of 130 (older versions raise Abort instead)
    if code == EXIT_INTERRUPTED:
        err.print("localmix: interrupted", markup=False)
    sys.exit(code if isinstance(code, int) else 0)
