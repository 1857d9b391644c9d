"""The native engine: the numpy forward (model.py) over the memory-mapped GGUF, behind the
same interface as the llama.cpp engine (localmix.runtime.llama).

Tokens in and out go through llama.cpp's vocabulary (`runtime.vocab.open_vocab`: the file's own
tokenizer, no weights loaded); the next token is chosen by `sampler.Sampler`, which picks
what llama-cpp-python's `Llama.generate` picks. The KV cache is kept between calls: a prompt
that extends the previous conversation evaluates only its new tokens.

From sampled tokens to `Piece`s and a `Done`, it shares `runtime.stream.reply_events` with llama.cpp's
engine, so streaming, stop strings, limits and cancellation behave the same.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from localmix.native.model import KVCache, forward, prefill
from localmix.native.sampler import Sampler
from localmix.native.weights import load_weights
from localmix.runtime.log import set_llama_log
from localmix.runtime.planner import Plan
from localmix.runtime.stream import ContextOverflow, Done, Piece, Sampling, common_prefix, reply_events
from localmix.runtime.vocab import open_vocab

PREFILL_BATCH = 64


class NativeEngine:
    """Mixtral/Mistral GGUFs run by localmix's own forward pass (the `Engine` of runtime/engine.py)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None,
                 verbose: bool = False, plan: Plan | None = None):
        self.path = Path(path)
        set_llama_log(verbose)  # the vocabulary is llama.cpp's: its log only with verbose
        self.weights = load_weights(self.path)
        self.vocab = open_vocab(self.path)
        self.n_ctx = n_ctx or self.weights.hp.context_length
        self.n_threads = n_threads  # numpy's BLAS decides; kept for the interface
        self.metadata = self.vocab.metadata()
        self.plan = plan  # open_engine's placement: all on the CPU, mapped
        self.cache = KVCache.empty(self.weights.hp, self.n_ctx)
        self.cached: list[int] = []  # the tokens whose keys and values are in the cache, in order
        self._lock = threading.Lock()

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.vocab.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.vocab.detokenize(tokens).decode("utf-8", errors="replace")

    def generate(self, tokens: list[int], sampling: Sampling | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Done]:
        s = sampling or Sampling()
        tokens = list(tokens)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(len(tokens), self.n_ctx)
        # reuse the cached prefix, but evaluate at least one token: its logits choose the first reply token
        reuse = min(common_prefix(self.cached, tokens), len(tokens) - 1)
        with self._lock:
            stream = self._sampled(tokens, reuse, Sampler(s))
            try:
                yield from reply_events(stream, self.vocab.piece, self.vocab.eog,
                                        len(tokens), len(tokens) - reuse, self.n_ctx, s, cancel)
            finally:
                stream.close()

    def _sampled(self, tokens: list[int], reuse: int, sampler: Sampler) -> Iterator[int]:
        """Evaluate the prompt's new tokens, then sample, evaluate, sample... for ever."""
        self.cached = tokens[:reuse]
        logits = prefill(self.weights, tokens[reuse:], reuse, self.cache, batch=PREFILL_BATCH)
        self.cached = list(tokens)
        while True:
            token = sampler.sample(logits[-1])
            yield token
            logits = forward(self.weights, [token], len(self.cached), self.cache)
            self.cached.append(token)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """The logits (T, V) of every position of `tokens`, from an empty cache (for tests and tools)."""
        with self._lock:
            self.cached = []
            out = prefill(self.weights, tokens, 0, self.cache, batch=PREFILL_BATCH, logits="all")
            self.cached = list(tokens)
            return out
