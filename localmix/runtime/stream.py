"""The engine interface: stream a reply as small events, the same for every engine.

`Engine.generate(tokens, sampling)` is a generator of `Piece` events (a token and the text it
completes) ending with one `Done` (why it stopped, token counts, timings); the caller may stop
between tokens by setting the `cancel` event it passed. Front ends (chat, run) see only this
interface, so the engine behind it can change: llama.cpp (llama.py) or the native engine
(localmix.native), both turning sampled tokens into events through `reply_events`.

What llama-cpp-python leaves to us: incremental UTF-8 (a character may span tokens), stop
strings (text that could still become a stop string is held back), the first reply token's
SentencePiece space, a context-length check, and timings.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Container, Iterator

from localmix.errors import InputError


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    seed: int | None = None
    max_tokens: int = 1024
    stop: tuple[str, ...] = ()


@dataclass
class Piece:
    """One generated token and the text it completes (empty while a character or a possible
    stop string is still incomplete)."""
    token: int
    text: str


@dataclass
class Done:
    reason: str                 # "eos" (an end-of-generation token), "stop" (a stop string), "length", "context" or "cancelled"
    prompt_tokens: int          # the whole prompt
    prompt_evaluated: int       # of which evaluated now (the rest came from the KV cache)
    generated_tokens: int
    prompt_seconds: float       # until the first reply token: prompt evaluation and one sampling step
    generate_seconds: float     # from the first reply token to the end: the other generated_tokens - 1
    text: str = ""              # the whole reply

    @property
    def prompt_tps(self) -> float:
        return self.prompt_evaluated / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def generate_tps(self) -> float:
        """Decode speed: the tokens after the first over the time they took."""
        return (self.generated_tokens - 1) / self.generate_seconds if self.generate_seconds > 0 and self.generated_tokens > 1 else 0.0


class ContextOverflow(InputError):
    def __init__(self, prompt_tokens: int, n_ctx: int):
        super().__init__(f"the prompt has {prompt_tokens} tokens but the context holds {n_ctx}; "
                         "shorten it or raise --ctx")
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


@dataclass
class _StopFilter:
    """Holds back text that could still turn into a stop string."""
    stops: tuple[str, ...]
    pending: str = field(default="")

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that is safe to show, whether a stop string was reached)."""
        self.pending += text
        for s in self.stops:
            at = self.pending.find(s)
            if at >= 0:
                out, self.pending = self.pending[:at], ""
                return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False


def reply_events(stream: Iterator[int], token_bytes: Callable[[int], bytes], eog: Container[int], n_prompt: int,
                 n_evaluated: int, n_ctx: int, s: Sampling,
                 cancel: threading.Event | None = None, strip_space: bool = True) -> Iterator[Piece | Done]:
    """Turn `stream`, the sampled tokens (its first `next` evaluates the prompt), into events.
    The reply ends at any token of `eog` (the vocabulary's end-of-generation tokens: EOS, EOT,
    `<|im_end|>`, ...); `token_bytes` gives what a token shows (nothing for control tokens).
    `n_evaluated` is how many prompt tokens are evaluated now (the rest are in the cache).
    `strip_space=False` keeps the first token's leading space (a raw-text continuation)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stops = _StopFilter(tuple(s.stop))
    text, n_generated, reason = [], 0, "length"
    t0 = time.perf_counter()
    t_first = None
    while n_generated < s.max_tokens:
        if cancel is not None and cancel.is_set():
            reason = "cancelled"
            break
        if n_prompt + n_generated >= n_ctx:
            reason = "context"
            break
        token = next(stream)
        if t_first is None:
            t_first = time.perf_counter()
        if token in eog:
            reason = "eos"
            break
        n_generated += 1
        piece = decoder.decode(token_bytes(token))
        if n_generated == 1 and strip_space:
            piece = piece.removeprefix(" ")  # the SentencePiece word-start of the reply
        shown, stopped = stops.feed(piece)
        text.append(shown)
        yield Piece(token, shown)
        if stopped:
            reason = "stop"
            break
    t_end = time.perf_counter()
    t_first = t_first or t_end
    yield Done(reason, n_prompt, n_evaluated, n_generated, t_first - t0, t_end - t_first, "".join(text))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
