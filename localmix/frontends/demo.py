"""`localmix demo`: the whole path on a model made on the spot, offline, in seconds: a tiny
random Mixtral checkpoint in the Hugging Face layout, converted to a Q4_K_M GGUF, described,
then run through llama.cpp (a chat on a terminal, one reply in a pipe). Random weights, so
random text, by design."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console

from localmix.convert.pipeline import convert
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.frontends.load import open_engine
from localmix.frontends.oneshot import ask, write_stdout
from localmix.frontends.progress import ConvertProgress
from localmix.frontends.render import render
from localmix.gguf.info import describe
from localmix.paths import cache_dir
from localmix.runtime.stream import Sampling

PROMPT = "Tell me about mixtures of experts."


def demo(directory: Path | None, tokens: int, out: Console, err: Console, chat) -> None:
    """Build, convert, describe and run the demo model in `directory` (default: the cache);
    `chat(path, ctx, sampling)` starts the terminal chat when stdin is a terminal."""
    directory = directory or cache_dir() / "demo"
    src = make_tiny_checkpoint(directory / "tiny-mixtral")
    out.print(f"[bold]1.[/] wrote a tiny random Mixtral checkpoint (Hugging Face layout) to {src}")
    gguf_path = directory / "tiny-mixtral-Q4_K_M.gguf"
    with ConvertProgress(err) as progress:
        convert(src, gguf_path, "Q4_K_M", force=True, progress=progress)
    out.print(f"[bold]2.[/] converted it to {gguf_path}:")
    out.print(render(describe(gguf_path)))
    if sys.stdin.isatty():
        out.print("[bold]3.[/] chat with it through llama.cpp (random weights, so random replies by design):")
        chat(gguf_path, 2048, Sampling(max_tokens=tokens))
    else:
        out.print("[bold]3.[/] llama.cpp runs it (random weights, so random text by design):")
        engine = open_engine(gguf_path, ctx=256)
        ask(engine, PROMPT, None, Sampling(temperature=0.0, max_tokens=tokens), write_stdout)
        sys.stdout.write("\n")

