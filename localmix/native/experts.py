"""Which experts a prompt uses: the router's choices per token and layer, counted and drawn.

`route(path, tokens)` runs the prompt through the native forward (model.py) and records, for
every token and layer, the A experts the router chose and their weights. `Routing.counts()`
gives the (layer, expert) counts, `Routing.to_json()` a plain dict, and `render(routing)` a
heat map for the terminal: layers as rows, experts as columns, each cell the share of that
layer's choices that went to the expert, shaded; a last row with each expert's share of tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from localmix.errors import InputError
from localmix.native.model import KVCache, prefill
from localmix.native.weights import load_weights


@dataclass
class Routing:
    tokens: list[int]
    experts: np.ndarray   # (T, L, A) int: the chosen experts, best first
    weights: np.ndarray   # (T, L, A) float: their (renormalised) weights
    n_expert: int
    pieces: list[str] | None = None  # each token's text, when known

    @property
    def n_layer(self) -> int:
        return self.experts.shape[1]

    def counts(self) -> np.ndarray:
        """(L, E): how many tokens chose each expert in each layer."""
        out = np.zeros((self.n_layer, self.n_expert), dtype=np.int64)
        for il in range(self.n_layer):
            out[il] = np.bincount(self.experts[:, il].ravel(), minlength=self.n_expert)
        return out

    def token_share(self) -> np.ndarray:
        """(E,): the share of tokens routed to each expert, averaged over layers."""
        return self.counts().mean(0) / max(len(self.tokens), 1)

    def to_json(self) -> dict:
        return {
            "n_tokens": len(self.tokens), "n_layer": self.n_layer, "n_expert": self.n_expert,
            "n_expert_used": int(self.experts.shape[2]),
            "counts": self.counts().tolist(),
            "token_share": [round(float(x), 6) for x in self.token_share()],
            "tokens": [{"id": int(t), **({"text": self.pieces[i]} if self.pieces else {}),
                        "experts": self.experts[i].tolist(),
                        "weights": np.round(self.weights[i].astype(float), 6).tolist()}
                       for i, t in enumerate(self.tokens)],
        }


class _RouteRecorder:
    """A model observer that keeps each layer's routing."""

    def __init__(self, n_layer: int):
        self.experts: list[list[np.ndarray]] = [[] for _ in range(n_layer)]
        self.weights: list[list[np.ndarray]] = [[] for _ in range(n_layer)]

    def routed(self, layer, experts, weights):
        self.experts[layer].append(experts)
        self.weights[layer].append(weights)

    def product(self, w, x, expert):
        pass


def route(path: str | Path, prompt_tokens: list[int], pieces: list[str] | None = None) -> Routing:
    """Run `prompt_tokens` through the model at `path` and return the router's choices."""
    w = load_weights(path)
    if not w.hp.n_expert:
        raise InputError(f"{path} is a dense model: it has no experts to route to")
    if not prompt_tokens:
        raise InputError("the prompt is empty: there is nothing to route")
    rec = _RouteRecorder(w.hp.n_layer)
    prefill(w, prompt_tokens, 0, KVCache.empty(w.hp, len(prompt_tokens)), rec, logits=None)
    experts = np.stack([np.concatenate(e) for e in rec.experts], axis=1)    # (T, L, A)
    weights = np.stack([np.concatenate(x) for x in rec.weights], axis=1)    # (T, L, A)
    return Routing(list(prompt_tokens), experts, weights.astype(np.float32), w.hp.n_expert, pieces)


def route_text(path: str | Path, text: str) -> Routing:
    """`route` for a text: tokenized with the file's own vocabulary, BOS first."""
    from localmix.runtime.vocab import open_vocab

    vocab = open_vocab(path)
    tokens = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
    pieces = [vocab.detokenize([t]).decode("utf-8", errors="replace") for t in tokens]
    return route(path, tokens, pieces)


def _shade(share: float, uniform: float) -> str:
    """A background from dark (unused) through blue to bright (twice the uniform share or more)."""
    t = min(share / (2 * uniform), 1.0) if uniform > 0 else 0.0
    r, g, b = int(20 + 40 * t), int(30 + 120 * t), int(50 + 205 * t)
    return f"white on #{r:02x}{g:02x}{b:02x}"


def render(r: Routing, title: str | None = None):
    """A rich Table: the heat map of expert use per layer and each expert's share of tokens."""
    from rich.table import Table
    from rich.text import Text

    counts = r.counts()
    uniform = 1.0 / r.n_expert
    table = Table(title=title or f"Expert use over {len(r.tokens)} tokens (share of each layer's choices)",
                  show_edge=False, pad_edge=False)
    table.add_column("layer", justify="right")
    for e in range(r.n_expert):
        table.add_column(f"E{e}", justify="right")
    for il, row in enumerate(counts):
        share = row / max(row.sum(), 1)
        table.add_row(str(il), *(Text(f"{s:4.0%}", style=_shade(s, uniform)) for s in share))
    table.add_section()
    tokens = r.token_share()
    table.add_row(Text("tokens", style="bold"), *(Text(f"{s:4.0%}", style="bold") for s in tokens))
    return table
