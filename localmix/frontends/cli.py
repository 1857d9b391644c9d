"""The `localmix` command: thin glue over the functions of the package.

Every subcommand parses its flags, calls one function and prints the result. Errors a user
can cause are `LocalmixError`s, printed by `main` as one line on stderr with a non-zero exit
code (2 for bad input, 1 for I/O faults, 130 for Ctrl-C); anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import threading
from pathlib import Path

import typer
from rich.console import Console

from localmix.errors import EXIT_INTERRUPTED, LocalmixError
from localmix.frontends import cli_files
from localmix.frontends.cli_files import err, model_path
from localmix.frontends.options import LOAD, SAMPLING, Load, options
from localmix.runtime.stream import Sampling

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Run Mixtral-class mixture-of-experts models on your own desktop.")

# typer vendors click from 0.29 on; take its exception class from typer itself.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


app.command()(cli_files.quantize)


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


MODEL = typer.Argument(..., help="A GGUF file, or a model pulled by name (REPO:QUANT).")
SAFE = typer.Option(False, "--safe", help="Put Mistral's guardrail system prompt first, as its API's safe_prompt does.")


@app.command()
@options(load=LOAD.but(help_verbose="Show llama.cpp's log and a stats line on stderr."),
         sampling=SAMPLING.but(max_tokens=512, help_max_tokens="Stop after this many tokens.",
                               help_stop="Stop before this text (repeatable)."))
def run(
    model: str = MODEL,
    prompt: list[str] = typer.Argument(None, help="The prompt; standard input, when piped, comes first."),
    system: str = typer.Option(None, "--system", help="A system prompt."),
    safe: bool = SAFE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token counts, timings, finish reason."),
    raw: bool = typer.Option(False, "--raw", help="No chat template: send BOS + the text for the model to continue "
                             "(base models; the default for files with no template and no Mistral markers)."),
    load: Load = None, sampling: Sampling = None,
):
    """Answer one prompt and exit: only the reply goes to stdout, ready for a pipe."""
    from localmix.frontends.oneshot import answer, read_prompt
    from localmix.frontends.server.mistral import safe_system

    path = model_path(model)
    system = safe_system(system) if safe else system
    answer(path, read_prompt(prompt or [], sys.stdin), system, sampling, load, err, as_json, raw)


@app.command()
@options(load=LOAD, sampling=SAMPLING)
def chat(
    model: str = MODEL,
    system: str = typer.Option(None, "--system", help="A system prompt (/system changes it)."),
    safe: bool = SAFE,
    raw: bool = typer.Option(False, "--raw", help="Stream plain text instead of rendering Markdown."),
    no_history: bool = typer.Option(False, "--no-history", help="Do not read or write the input history file."),
    load: Load = None, sampling: Sampling = None,
):
    """Chat in the terminal: replies stream as Markdown, Ctrl-C stops one; /help lists the commands.

    Input history is kept in $XDG_DATA_HOME/localmix/chat_history (~/.local/share/...).
    """
    from localmix.frontends.chat import chat as run_chat
    from localmix.frontends.server.mistral import safe_system

    run_chat(model_path(model), load, sampling, safe_system(system) if safe else system, raw, history=not no_history)


@app.command()
@options(load=LOAD.without("engine"),
         sampling=SAMPLING.without("stop").but(help_max_tokens="Default reply length limit."))
def serve(
    model: str = MODEL,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs --api-key."),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    parallel: int = typer.Option(None, "--parallel", "-np", min=1, max=64, help="Sequences decoded together in one "
                                 "batch \\[default: as many as memory leaves room for, up to 4]."),
    api_key: str = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' \\[env LOCALMIX_API_KEY]."),
    cors: list[str] = typer.Option(None, "--cors", help="Allow browser pages of this origin (repeatable) \\[default: none]."),
    allow_host: list[str] = typer.Option(None, "--allow-host", help="Accept this Host header too (repeatable)."),
    max_body: int = typer.Option(4 << 20, "--max-body", min=1024, help="Largest request body, in bytes."),
    queue: int = typer.Option(16, "--queue", min=0, help="Requests that may wait for a slot; more get 503."),
    cache_ram: str = typer.Option("1GiB", "--cache-ram", help="RAM for the KV cells of earlier requests that no "
                                  "slot holds any more, reused by a prompt that starts with them (0: none)."),
    alias: str = typer.Option(None, "--alias", help="The model's name in the API \\[default: the file's stem]."),
    webui: bool = typer.Option(True, "--webui/--no-webui", help="Serve the chat page at /."),
    load: Load = None, sampling: Sampling = None,
):
    """Serve the model over HTTP to OpenAI, ollama and Mistral clients (requests batched together)."""
    from localmix.frontends.server.common import Options
    from localmix.frontends.server.run import serve as run_server

    path = model_path(model)
    options = Options(model_name=alias or path.stem, api_key=api_key, cors=tuple(cors or ()), max_body=max_body,
                      sampling=sampling, webui=webui)
    run_server(path, options, host=host, port=port, parallel=parallel, queue=queue, cache_ram=cache_ram, load=load,
               allow_hosts=tuple(allow_host or ()), announce=lambda line: print(line, file=sys.stderr, flush=True))


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
    from localmix.frontends.hub import list_models
    from localmix.frontends.render import models_table

    models = list_models()
    if as_json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "size": m.size, "path": str(m.path)} for m in models], indent=2))
    else:
        Console(highlight=False).print(models_table(models))


@app.command()
def rm(spec: str = typer.Argument(..., help="REPO or REPO:QUANT_OR_FILE, as `localmix ls` shows it.")):
    """Delete a model from the local cache."""
    from localmix.frontends.hub import remove
    from localmix.units import human_bytes

    freed = remove(spec)
    err.print(f"removed {spec}, freed {human_bytes(freed)}")


@app.command()
@options(load=LOAD.only("ctx", "vram", "ram", "n_cpu_moe", "rpc", "flash_attn").but(
    ctx=8192, help_ctx="Context length to plan for.", help_ram="RAM to plan for \\[default: what is available now].",
    help_vram="GPU memory to plan for, e.g. 24GiB \\[default: what llama.cpp's devices report].",
    help_n_cpu_moe="Keep the experts of the first N layers on the CPU.",
    help_rpc="Plan a split across this machine and `localmix worker`s at HOST:PORT\\[,HOST:PORT...] (asks them "
             "their memory; loads nothing).",
    help_flash_attn="Flash attention as run will have it: on, off, or auto (on for the CPU; on a GPU the plan "
    "counts the attention scores, as if off)."))
def plan(
    model: str = typer.Argument(..., help="A GGUF file, a pulled name, or a preset and type such as mixtral-8x7b:Q4_K_M "
                                "(presets: mixtral-8x7b, mixtral-8x22b, mistral-7b)."),
    metal: bool = typer.Option(False, "--metal", help="With --vram: the budget is a Mac's Metal working set."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    load: Load = None,
):
    """Where each tensor goes: the GPU while it fits, the experts of the first layers on the CPU
    (with --rpc: the layers split across this machine and the workers)."""
    from localmix.convert.presets import PRESETS
    from localmix.errors import InputError
    from localmix.frontends.load import split_file_plan
    from localmix.frontends.render import plan_table
    from localmix.runtime.devices import machine
    from localmix.runtime.planner import describe, file_plan, preset_plan

    name, _, file_type = model.partition(":")
    if load.rpc:
        from localmix.runtime.planner import split_preset_plan

        p = split_preset_plan(name, (file_type or "Q4_K_M").upper(), load.ctx, load.ram, load.rpc) \
            if name in PRESETS else split_file_plan(model_path(model), load.ctx, load.ram, load.rpc)
        if as_json:
            print(json.dumps(describe(p), indent=2))
        else:
            Console(highlight=False).print(plan_table(p))
        if not p.fits:
            raise InputError(f"the split does not fit: {p.advice}")
        return
    device, budget, ram_bytes = machine(load.vram, load.ram, metal)
    if name in PRESETS:
        p = preset_plan(name, (file_type or "Q4_K_M").upper(), load.ctx, budget, ram_bytes, device=device,
                        n_cpu_moe=load.n_cpu_moe, flash_attn=load.flash_attn)
    else:
        p = file_plan(model_path(model), load.ctx, budget, ram_bytes, device=device, n_cpu_moe=load.n_cpu_moe,
                      flash_attn=load.flash_attn)
    if as_json:
        print(json.dumps(describe(p), indent=2))
    else:
        Console(highlight=False).print(plan_table(p))


@app.command()
def worker(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; other than loopback needs "
                             "--unauthenticated-network."),
    port: int = typer.Option(50052, "--port", min=1, max=65535),
    threads: int = typer.Option(None, "--threads", "-t", min=1, help="CPU threads \\[default: all this process may use]."),
    cache: Path = typer.Option(None, "--cache", help="Keep large tensors in this folder by hash, so that the next "
                               "load does not send them again."),
    unauthenticated_network: bool = typer.Option(False, "--unauthenticated-network", help="Listen on a non-loopback "
                                                 "--host although the RPC protocol has no password or encryption."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show llama.cpp's RPC server log."),
):
    """Lend this machine's memory and compute to `run`, `chat` or `serve --rpc` on another machine."""
    from localmix.frontends.worker import serve_worker

    code = serve_worker(host, port, threads, cache, unauthenticated_network, verbose)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # llama.cpp's server thread has no stop: end the process around it


app.command()(cli_files.experts)
app.command()(cli_files.imatrix)
app.command(name="eval")(cli_files.eval_cmd)
app.command()(cli_files.synth)


@app.command()
def demo(
    directory: Path = typer.Option(None, "--dir", help="Where to put the demo checkpoint and GGUF \\[default: ~/.cache/localmix/demo]."),
    tokens: int = typer.Option(24, "--tokens", min=1, help="How many tokens to generate (per reply in the chat)."),
):
    """Build a tiny random Mixtral checkpoint, convert it to GGUF and chat with it through llama.cpp.

    The weights are random, so the generated text is random by design: the demo shows the
    whole path working, offline, in seconds. For a real model, download one (e.g.
    `hf download mistralai/Mixtral-8x7B-Instruct-v0.1 --local-dir mixtral`) and run
    `localmix quantize mixtral mixtral-Q4_K_M.gguf --type Q4_K_M`.
    """
    from localmix.frontends.chat import chat as run_chat
    from localmix.frontends.demo import demo as run_demo

    run_demo(directory, tokens, Console(highlight=False), err,
             chat=lambda path, ctx, sampling: run_chat(path, Load(ctx=ctx), sampling))


class _Terminated(BaseException):
    """SIGTERM (`kill`, a service manager): unwinds like Ctrl-C, so a file being written is removed."""


def _terminated(signum, frame):
    raise _Terminated


def _one_line_paragraphs(typer_app: typer.Typer) -> None:
    """Each command's help from its docstring with every paragraph joined into one line, for
    rich to wrap at the terminal's width (typer keeps the source's line breaks, so a 100-column
    docstring breaks mid-sentence in an 80-column terminal)."""
    for info in typer_app.registered_commands:
        doc = info.help or inspect.getdoc(info.callback) or ""
        info.help = "\n\n".join(" ".join(paragraph.split()) for paragraph in doc.split("\n\n"))


class _WithoutMistralTokenizers:
    """gguf.vocab imports mistral_common's tokenizers when they are installed (the test extra
    brings them) for a vocabulary class localmix never uses: a third of a second on every command
    that opens a GGUF. While gguf.vocab runs, the `localmix` program refuses any mistral_common
    import, and gguf goes on as it does where mistral_common is not installed; afterwards (the
    demo's tokenizer files) mistral_common imports as usual. Only the program: a process that
    calls `main` keeps gguf's import as it is. A meta path finder (importlib.abc's base class
    is not needed, and importing it costs what this saves)."""

    def find_spec(self, name, path=None, target=None):
        vocab = sys.modules.get("gguf.vocab")
        if (name == "mistral_common" or name.startswith("mistral_common.")) and vocab is not None \
                and getattr(vocab.__spec__, "_initializing", False):
            raise ModuleNotFoundError(f"{name} is not loaded by the localmix command", name=name)
        return None


def program() -> None:
    """The `localmix` program (the console script, `python -m localmix`): `main` on sys.argv."""
    sys.meta_path.insert(0, _WithoutMistralTokenizers())
    main()


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


_one_line_paragraphs(app)  # last: every command is registered above
