"""The engine interface: load a GGUF and stream a reply as small events.

`Engine.generate(tokens, sampling)` is a generator of `Piece` events (a token and the text it
completes) ending with one `Done` (why it stopped, token counts, timings); the caller may stop
between tokens by setting the `cancel` event it passed. Front ends (chat, run) see only this
interface, so the engine behind it can change: llama.cpp through llama-cpp-python, with the
GGUF memory-mapped and its tensors placed by the memory planner (planner.py, offload.py).

What llama-cpp-python leaves to us: incremental UTF-8 (a character may span tokens), stop
strings (text that could still become a stop string is held back), the first reply token's
SentencePiece space, a context-length check, and timings.
"""

from __future__ import annotations

import codecs
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import InputError
from .planner import Plan


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
    reason: str                 # "eos", "stop" (a stop string), "length", "context" or "cancelled"
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


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, the GGUF memory-mapped. The KV cache is kept
    between calls: a prompt that extends the previous one evaluates only the new tokens."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None, verbose: bool = False,
                 plan: Plan | None = None, n_gpu_layers: int | None = None, repack: bool = False, **llama_kwargs):
        from .offload import load_llama

        self.path, self.plan = Path(path), plan
        try:
            self.llm = load_llama(str(self.path), plan, n_gpu_layers, repack, n_ctx=n_ctx or 0, n_batch=512,
                                  use_mmap=True, n_threads=n_threads or os.cpu_count(), verbose=verbose, **llama_kwargs)
        except ValueError as e:  # llama-cpp-python's way of saying the load failed
            raise InputError(f"llama.cpp could not load {self.path}: {e}") from None
        # llama.cpp rounds the context up to a multiple of 256; llama-cpp-python's token
        # buffer keeps the size asked for, so the smaller of the two is what we can use
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.metadata = dict(self.llm.metadata)
        self.vocab = self.llm  # tokenize(bytes, add_bos, special), detokenize, token_bos, token_eos
        self._lock = threading.Lock()

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def generate(self, tokens: list[int], sampling: Sampling | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Done]:
        s = sampling or Sampling()
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(len(tokens), self.n_ctx)
        llm = self.llm
        cached = _common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
        if s.seed is not None:
            llm.set_seed(s.seed)
        with self._lock:
            stream = llm.generate(tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                                  repeat_penalty=s.repeat_penalty, reset=True)
            try:
                yield from reply_events(stream, lambda t: llm.detokenize([t]), llm.token_eos(), len(tokens),
                                        len(tokens) - cached, self.n_ctx, s, cancel)
            finally:
                stream.close()


def reply_events(stream: Iterator[int], token_bytes: Callable[[int], bytes], eos: int, n_prompt: int,
                 n_evaluated: int, n_ctx: int, s: Sampling,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Done]:
    """Turn `stream`, the sampled tokens (its first `next` evaluates the prompt), into events.
    `n_evaluated` is how many prompt tokens are evaluated now (the rest are in the cache)."""
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
        if token == eos:
            reason = "eos"
            break
        n_generated += 1
        piece = decoder.decode(token_bytes(token))
        if n_generated == 1:
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


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def open_engine(path: str | Path, ctx: int | None = None, force: bool = False, verbose: bool = False,
                vram: str | None = None, ram: str | None = None, n_cpu_moe: int | None = None,
                gpu_layers: int | None = None, repack: bool | None = None, engine: str = "llama.cpp"):
    """Check the file, choose the context, plan where the tensors go, check it fits, and load it.

    On the CPU the default context is the model's own, capped by what RAM allows (in steps of
    256) and a model that does not fit is refused with a suggestion unless `force`. With a GPU
    (or `vram`, a size such as "24GiB") the planner keeps attention, norms, router, embeddings
    and the KV cache on it and as many layers' experts as fit; the default context is the
    largest of the model's own, 16K, 8K, 4K and 2K whose plan fits. `n_cpu_moe` and
    `gpu_layers` overrule the planner, as llama.cpp's flags of those names do; `repack` too
    (None: the plan's choice). `engine="native"` runs localmix's own forward (native.py) on
    the CPU, its KV cache float32."""
    from .devices import machine, parse_size
    from .gguf_check import available_memory, check_fits, check_gguf, estimate_memory, largest_fitting_ctx
    from .planner import file_plan

    if engine not in ("llama.cpp", "native"):
        raise InputError(f"unknown engine {engine!r}; choose llama.cpp or native")
    summary = check_gguf(path)
    if engine == "native":  # CPU only: no GPU devices to ask about
        device, gpu_budget, ram_budget = "cpu", None, parse_size(ram) if ram else available_memory()
    else:
        device, gpu_budget, ram_budget = machine(vram, ram)
    if device == "cpu":
        kv_bytes = 4 if engine == "native" else 2
        estimate = estimate_memory(summary, ctx or summary.context_length or 4096, kv_bytes)
        if ctx is None and estimate.total_bytes > ram_budget:
            fitting = largest_fitting_ctx(estimate, ram_budget)
            if fitting:
                estimate = estimate_memory(summary, fitting, kv_bytes)
        ctx = estimate.n_ctx
        check_fits(estimate, ram_budget, force)
        plan = file_plan(path, ctx, None, ram_budget)
        if engine == "native":
            from .native import NativeEngine

            plan.repack = False  # the native engine reads the weights where they are mapped
            native = NativeEngine(path, n_ctx=ctx, verbose=verbose)
            native.plan = plan
            return native
    else:
        own = summary.context_length or 4096
        tries = [ctx] if ctx else [own] + [c for c in (16384, 8192, 4096, 2048) if c < own]
        for ctx in tries:
            plan = file_plan(path, ctx, gpu_budget, ram_budget, device, n_cpu_moe)
            if plan.fits:
                break
        if not plan.fits and not force:
            raise InputError(f"{Path(path).name} at {ctx} tokens of context: {plan.advice} (--force loads it anyway)")
    if repack is not None:
        plan.repack = repack
    return LlamaCppEngine(path, n_ctx=ctx, verbose=verbose, plan=plan, n_gpu_layers=gpu_layers, repack=plan.repack)
