"""The engine contract: what `run`, `chat`, `serve` and `eval` rely on, whichever engine runs
the file (llama.cpp's, runtime/llama.py, or localmix's own, native/engine.py).

An engine is built whole by its constructor (the file opened, the context sized, the placement
plan given) and then only used: nothing is attached to it afterwards. `generate` streams a reply
as `Piece` events and one `Done` (stream.py); `vocab` is llama.cpp's vocabulary of the file
(vocab.py), from which prompts are built (prompt.py); `metadata` the file's scalar keys as text.
tests/test_engines.py holds both engines to this protocol.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from localmix.runtime.planner import Plan
from localmix.runtime.stream import Done, Piece, Sampling
from localmix.runtime.vocab import Vocab


@runtime_checkable
class Engine(Protocol):
    path: Path                  # the GGUF file
    n_ctx: int                  # tokens the context holds
    metadata: dict[str, str]    # the file's scalar metadata, as text (chat template, name, ...)
    vocab: Vocab                # llama.cpp's vocabulary of the file
    plan: Plan | None           # where the tensors were placed (None: not planned, e.g. a test's engine)

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """The tokens of `text`; `special` parses control tokens' text ([INST], <|im_end|>)."""
        ...

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`, control tokens left out."""
        ...

    def generate(self, tokens: list[int], sampling: Sampling | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Done]:
        """Evaluate the prompt `tokens` (what the cache already holds of them is reused) and
        stream the reply: a `Piece` per token, then one `Done`. Setting `cancel` stops it
        between tokens; a prompt that fills the context raises `ContextOverflow`."""
        ...
