"""One-shot prompts for shell pipes: `cat notes.txt | localmix run model.gguf "Summarise this"`.

`read_prompt` joins standard input (when it is not a terminal) and the prompt arguments,
stdin first; `ask` builds the prompt in the model's own chat format (or raw), streams the
reply through a writer and returns the final `Done` event. The CLI adds the flags, the JSON
form and the quiet handling of a closed pipe.
"""

from __future__ import annotations

from typing import Callable, TextIO

from localmix.errors import InputError
from localmix.runtime.llama import LlamaCppEngine
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


def conversation_tokens(engine: LlamaCppEngine, messages: list[dict], raw: bool = False) -> list[int]:
    """The prompt tokens of a conversation, in the model's own format (runtime.prompt)."""
    return chat_tokens(engine.vocab, engine.metadata, messages, raw=raw)


def ask(engine: LlamaCppEngine, prompt: str, system: str | None, sampling: Sampling,
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
