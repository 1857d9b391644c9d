"""One-shot prompts for shell pipes: `cat notes.txt | localmix run model.gguf "Summarise this"`.

`read_prompt` joins standard input (when it is not a terminal) and the prompt arguments,
stdin first; `ask` builds the prompt in the model's own chat format (or raw), streams the
reply through a writer and returns the final `Done` event; `answer` is `localmix run`: the
model opened, the reply on stdout as it comes (or one JSON object), stats on stderr with
--verbose. The CLI adds the flags and the quiet handling of a closed pipe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from rich.console import Console

from localmix.errors import InputError
from localmix.frontends.load import open_engine
from localmix.frontends.options import Load
from localmix.frontends.render import stats_line
from localmix.runtime.engine import Engine
from localmix.runtime.planner import placement_line
from localmix.runtime.prompt import chat_tokens
from localmix.runtime.stream import Done, Piece, Sampling


def read_prompt(words: list[str], stdin: TextIO | None) -> str:
    parts = []
    if stdin is not None and not stdin.isatty():
        piped = stdin.read()
        if piped.strip():
            parts.append(piped.rstrip("\n"))
    if words:
        parts.append(" ".join(words))
    if not parts:
        raise InputError("no prompt: give it as arguments, on standard input, or both")
    return "\n\n".join(parts)


def conversation_tokens(engine: Engine, messages: list[dict], raw: bool = False) -> list[int]:
    """The prompt tokens of a conversation, in the model's own format (runtime.prompt)."""
    return chat_tokens(engine.vocab, engine.metadata, messages, raw=raw)


def ask(engine: Engine, prompt: str, system: str | None, sampling: Sampling,
        write: Callable[[str], None], raw: bool = False) -> Done:
    """One reply to `prompt`; with `raw`, no chat format: the prompt is text to continue."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    tokens = conversation_tokens(engine, messages, raw=raw)
    done = None
    for event in engine.generate(tokens, sampling):
        if isinstance(event, Piece):
            if event.text:
                write(event.text)
        else:
            done = event
    return done


def answer(path: Path, prompt: str, system: str | None, sampling: Sampling, load: Load, err: Console,
           as_json: bool = False, raw: bool = False) -> Done:
    """`localmix run`: open the model, write the reply to stdout as it comes (or, `as_json`, one
    JSON object at the end); with `load.verbose`, the placement and a stats line on `err`."""
    engine = open_engine(path, load)
    if load.verbose:
        err.print(f"placement: {placement_line(engine.plan)}", style="dim")
    done = ask(engine, prompt, system, sampling, (lambda piece: None) if as_json else write_stdout, raw=raw)
    if as_json:
        print(json.dumps(done_json(done), ensure_ascii=False))
    elif done.text and not done.text.endswith("\n"):
        sys.stdout.write("\n")
    sys.stdout.flush()
    if load.verbose:
        err.print(stats_line(done), style="dim")
    return done


def done_json(done: Done) -> dict:
    """`run --json`'s object: the text, token counts, timings and why it stopped."""
    return {"text": done.text, "finish_reason": done.reason, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.generated_tokens, "prompt_seconds": round(done.prompt_seconds, 4),
            "generate_seconds": round(done.generate_seconds, 4), "prompt_tokens_per_second": round(done.prompt_tps, 2),
            "tokens_per_second": round(done.generate_tps, 2)}


def write_stdout(piece: str) -> None:
    """Write a piece of a reply to stdout at once (a pipe sees it as it comes)."""
    sys.stdout.write(piece)
    sys.stdout.flush()
