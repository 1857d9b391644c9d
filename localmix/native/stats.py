"""Compute an importance matrix with the native forward, as llama.cpp's `llama-imatrix` does.

For every weight matrix of the layers (`blk.*`: llama-imatrix leaves out token_embd, which is
a lookup, and output.weight unless --process-output), the sum over tokens of x[col]^2 of its
input x, and how many tokens were summed. The stacked expert tensors have one sum and one
count per expert, over the tokens routed to that expert (llama-imatrix's MUL_MAT_ID branch).
The text is cut into chunks of n_ctx tokens, each evaluated from an empty cache with its first
token replaced by BOS, the tail that fills no chunk dropped (tools/imatrix/imatrix.cpp,
`compute_imatrix`). `save_imatrix` (convert/imatrix.py) writes llama.cpp's GGUF imatrix format, which
`localmix quantize --imatrix` and llama.cpp's quantizer read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from localmix.convert.imatrix import mean_squares, save_imatrix
from localmix.errors import InputError
from localmix.gguf.read import field_value
from localmix.native.model import KVCache, prefill
from localmix.native.weights import load_weights
from localmix.outfile import atomic_output


class Collector:
    """A model observer that sums each product's squared inputs, per expert when stacked."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}     # name -> (E or 1, K) float64
        self.counts: dict[str, np.ndarray] = {}   # name -> (E or 1,) int64

    def routed(self, layer, experts, weights):
        pass

    def product(self, w, x, expert):
        if not w.name.startswith("blk."):
            return
        n_mat = w.shape[0] if len(w.shape) == 3 else 1
        if w.name not in self.sums:
            self.sums[w.name] = np.zeros((n_mat, x.shape[1]), np.float64)
            self.counts[w.name] = np.zeros(n_mat, np.int64)
        e = expert or 0
        x = np.asarray(x, np.float64)
        self.sums[w.name][e] += (x * x).sum(0)
        self.counts[w.name][e] += len(x)


def compute_imatrix(path: str | Path, tokens: list[int], n_ctx: int = 512,
                    progress: Callable[[int, int], None] | None = None) -> dict:
    """Accumulate llama-imatrix's statistics of the model at `path` over `tokens` (the text's
    tokens, BOS first). Returns {"sums": {name: (E or 1, K) float32}, "counts": {name: (E or 1,)
    float32}, "chunk_count": n, "chunk_size": n_ctx}; `progress(done, total)` after each chunk."""
    w = load_weights(path)
    n_chunk = len(tokens) // n_ctx
    if n_chunk < 1:
        raise InputError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}; "
                         "give more text or a smaller context")
    bos = field_value(w.reader, "tokenizer.ggml.bos_token_id", 1)
    add_bos = field_value(w.reader, "tokenizer.ggml.add_bos_token", True)
    collector = Collector()
    cache = KVCache.empty(w.hp, n_ctx)
    for i in range(n_chunk):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            chunk[0] = bos
        # one batch per chunk, as llama-imatrix evaluates a chunk in one ubatch
        prefill(w, chunk, 0, cache, collector, batch=n_ctx, logits=None)
        if progress:
            progress(i + 1, n_chunk)
    return statistics(collector, n_chunk, n_ctx)


def statistics(collector: Collector, n_chunk: int, n_ctx: int) -> dict:
    """What a Collector summed over `n_chunk` chunks of `n_ctx` tokens, as `compute_imatrix` returns it."""
    return {"sums": {k: v.astype(np.float32) for k, v in collector.sums.items()},
            "counts": {k: v.astype(np.float32) for k, v in collector.counts.items()},
            "chunk_count": n_chunk, "chunk_size": n_ctx}


def importance(imatrix: dict) -> dict[str, np.ndarray]:
    """{tensor name: importance vector} of what `compute_imatrix` returned, as llama.cpp's
    quantizer (and convert.imatrix.load_imatrix) reads them from the saved file: per expert,
    the float32 sums over the float32 count, or 1s where no token reached the expert."""
    return {name: mean_squares(sums, imatrix["counts"][name]) for name, sums in imatrix["sums"].items()}


def write_imatrix(out: str | Path, imatrix: dict, dataset: str = "text", force: bool = False) -> Path:
    """Save what `compute_imatrix` returned in llama.cpp's GGUF imatrix format, atomically:
    to a temporary name beside `out`, renamed when complete."""
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"{out} already exists; pass --force to overwrite it")
    with atomic_output(out) as tmp:
        save_imatrix(tmp, imatrix["sums"], imatrix["counts"], [dataset], imatrix["chunk_count"], imatrix["chunk_size"])
    return out


def imatrix_from_text(path: str | Path, text: str, n_ctx: int = 512,
                      progress: Callable[[int, int], None] | None = None) -> dict:
    """`compute_imatrix` over a text, tokenized with the file's own vocabulary (BOS first)."""
    from localmix.runtime.vocab import open_vocab

    tokens = open_vocab(path).tokenize(text.encode("utf-8"), add_bos=True, special=False)
    return compute_imatrix(path, tokens, n_ctx, progress)
