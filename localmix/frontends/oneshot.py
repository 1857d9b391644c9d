"""One-shot prompts for shell pipes: `cat notes.txt | localmix run model.gguf "Summarise this"`.

`read_prompt` joins standard input (when it is not a terminal) and the prompt arguments,
stdin first; `ask` renders the conversation with the model's chat template, streams the
reply through a writer and returns the final `Done` event. The CLI adds the flags, the JSON
form and the quiet handling of a closed pipe.
"""

from __future__ import annotations

from typing import Callable, TextIO

from localmix.errors import InputError
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.stream import Done, Piece, Sampling
from localmix.runtime.template import conversation_tokens as render_tokens
from localmix.runtime.template import template_from_metadata


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


def conversation_tokens(engine: LlamaCppEngine, messages: list[dict]) -> list[int]:
    """The prompt tokens of a conversation, through the model's own chat template."""
    v = engine.vocab
    return render_tokens(messages, template_from_metadata(engine.metadata), v.tokenize, v.token_bos(), v.token_eos())


def ask(engine: LlamaCppEngine, prompt: str, system: str | None, sampling: Sampling,
        write: Callable[[str], None]) -> Done:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    tokens = conversation_tokens(engine, messages)
    done = None
    for event in engine.generate(tokens, sampling):
        if isinstance(event, Piece):
            if event.text:
                write(event.text)
        else:
            done = event
    return done
