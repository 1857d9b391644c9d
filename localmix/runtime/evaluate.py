"""`localmix eval`'s measurement: a model's KL divergence from a reference on a text, over
llama-perplexity's windows, through any engine that returns the logits of a window.

The windows are llama-perplexity's (tools/perplexity/perplexity.cpp): the text's tokens (BOS
first where the vocabulary adds one) cut into non-overlapping windows of n_ctx tokens, the
tail that fills no window dropped, each window evaluated from an empty cache with its first
token replaced by BOS, and only its second half scored (positions n_ctx/2 .. n_ctx-2, each
predicting the next token), so every scored token has at least n_ctx/2 tokens of context.

The reference pass writes what llama-perplexity's `--kl-divergence-base` file holds, in its
layout: "_logits_", n_ctx (u32), n_vocab (i32), n_chunk (i32), the tokens of the windows
(i32), then per window its compressed rows (kld.compress). The model pass reads it back one
window at a time, so the reference and the model are never loaded together.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol

import numpy as np

from localmix.errors import InputError
from localmix.outfile import atomic_output
from localmix.runtime.kld import KLDStats, Scores, compress, row_width, score, summarize

MAGIC = b"_logits_"


class Scorer(Protocol):
    """An engine as eval sees it."""
    n_vocab: int
    add_bos: bool
    bos: int

    def tokenize(self, text: str) -> list[int]: ...          # common_tokenize(ctx, text, add_special=true)
    def logits(self, tokens: list[int]) -> np.ndarray: ...  # (T, V) float32 from an empty cache


class LlamaScorer:
    """llama.cpp through llama-cpp-python, every position's logits kept (logits_all), the KV
    cache in float32 so that what is measured is the file, not the cache."""

    def __init__(self, path: str | Path, n_ctx: int, n_threads: int | None = None):
        import llama_cpp

        from localmix.runtime.llama import Handles

        try:
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                       logits_all=True, n_threads=n_threads or os.cpu_count(), verbose=False,
                                       type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
        except ValueError as e:
            raise InputError(f"llama.cpp could not load {path}: {e}") from None
        self.n_vocab = self.llm.n_vocab()
        self.add_bos = Handles(self.llm).add_bos()
        self.bos = self.llm.token_bos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(tokens)
        return self.llm.scores[: len(tokens)]

    def close(self) -> None:
        self.llm.close()


@dataclass
class Reference:
    """A reference file's header; `rows(f)` then yields each window's compressed rows."""
    n_ctx: int
    n_vocab: int
    windows: np.ndarray      # (n_chunk, n_ctx) int32 tokens
    data_offset: int

    @property
    def n_scored(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    def rows(self, f: BinaryIO) -> Iterator[np.ndarray]:
        f.seek(self.data_offset)
        nv = row_width(self.n_vocab)
        for i in range(len(self.windows)):
            data = np.fromfile(f, np.uint16, self.n_scored * nv)
            if data.size != self.n_scored * nv:
                raise InputError(f"the reference file is truncated in window {i + 1}")
            yield data.reshape(self.n_scored, nv)


def read_reference(path: str | Path) -> Reference:
    """The header of a reference file (ours or llama-perplexity's --kl-divergence-base)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(20)
        if len(head) < 20 or head[:8] != MAGIC:
            raise InputError(f"{path} is not a reference file (llama-perplexity's _logits_ format)")
        n_ctx = int(np.frombuffer(head, np.uint32, 1, 8)[0])
        n_vocab, n_chunk = (int(x) for x in np.frombuffer(head, np.int32, 2, 12))
        tokens = np.fromfile(f, np.int32, n_ctx * n_chunk)
        if tokens.size != n_ctx * n_chunk or n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
            raise InputError(f"{path} is truncated or corrupt")
        expected = 20 + tokens.nbytes + n_chunk * (n_ctx - 1 - n_ctx // 2) * row_width(n_vocab) * 2
        if path.stat().st_size < expected:
            raise InputError(f"{path} is truncated: {path.stat().st_size} bytes of {expected}")
        return Reference(n_ctx, n_vocab, tokens.reshape(n_chunk, n_ctx), f.tell())


def is_reference_file(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == MAGIC


def windows(tokens: list[int], n_ctx: int) -> np.ndarray:
    """The text's tokens as llama-perplexity's non-overlapping windows (n_chunk, n_ctx)."""
    n_chunk = len(tokens) // n_ctx
    if n_chunk < 2:
        raise InputError(f"the text has {len(tokens)} tokens; llama-perplexity's windows of {n_ctx} need at "
                         f"least {2 * n_ctx}: give more text or a smaller --ctx")
    return np.asarray(tokens[: n_chunk * n_ctx], np.int32).reshape(n_chunk, n_ctx)


def _window_logits(scorer: Scorer, window: np.ndarray) -> np.ndarray:
    """Logits of the scored positions of one window: BOS first where the vocabulary adds one."""
    tokens = window.tolist()
    if scorer.add_bos:
        tokens[0] = scorer.bos
    first = len(tokens) // 2
    return scorer.logits(tokens)[first: len(tokens) - 1]


Progress = Callable[[int, int], None]


def save_reference(scorer: Scorer, text: str, n_ctx: int, out: str | Path,
                   progress: Progress | None = None) -> Reference:
    """Run the reference over the text's windows and write its compressed log-probabilities to
    `out` (atomically: a temporary name beside it, renamed when complete)."""
    win = windows(scorer.tokenize(text), n_ctx)
    out = Path(out)
    with atomic_output(out) as tmp, open(tmp, "wb") as f:
        f.write(MAGIC)
        f.write(np.array([n_ctx], np.uint32).tobytes() + np.array([scorer.n_vocab, len(win)], np.int32).tobytes())
        f.write(win.tobytes())
        for i, w in enumerate(win):
            f.write(compress(_window_logits(scorer, w)).tobytes())
            if progress:
                progress(i + 1, len(win))
        f.flush()
        os.fsync(f.fileno())
    return read_reference(out)


def compare(scorer: Scorer, reference: str | Path, progress: Progress | None = None) -> Scores:
    """The model's per-position scores against a reference file, one window at a time."""
    ref = read_reference(reference)
    if ref.n_vocab != scorer.n_vocab:
        raise InputError(f"the reference has a vocabulary of {ref.n_vocab} tokens, the model {scorer.n_vocab}: "
                         "compare models that share a tokenizer")
    parts = []
    first = ref.n_ctx // 2
    with open(reference, "rb") as f:
        for i, rows in enumerate(ref.rows(f)):
            w = ref.windows[i]
            parts.append(score(rows, _window_logits(scorer, w), w[first + 1:]))
            if progress:
                progress(i + 1, len(ref.windows))
    return Scores.concat(parts)


def evaluate(scorer: Scorer, reference: str | Path, progress: Progress | None = None) -> KLDStats:
    return summarize(compare(scorer, reference, progress))
