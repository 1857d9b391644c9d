"""The Mixtral (and dense Mistral) forward pass over a GGUF's weights, in numpy.

Legend of the shape tags:
    T   tokens in this batch           S   positions attended (cached + this batch)
    D   model width (n_embd)           F   feed-forward width (n_ff)
    H   query heads                    Hk  key/value heads (G = H / Hk query heads share one)
    hd  head width                     V   vocabulary
    E   experts                        A   active experts per token (2)

The same as llama.cpp's graph for the llama architecture: the GGUF's Q/K rows were permuted by
the converter, so RoPE turns adjacent pairs (llama.cpp's "normal" mode); the router is a
softmax over all experts, the top A, renormalised (as HF's softmax, top-k, divide by the sum).
Every weight product is `linear`, i.e. `kernels.matmul.matmul` on the stored bytes; the
tokens of a batch are grouped by expert, so each chosen expert's weights are read once.

An observer (optional, see `Observer`) is told each layer's routing and each product's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from localmix.kernels.matmul import dequantize_rows, matmul
from localmix.native.weights import HParams, Layer, Tensor, Weights


class Observer(Protocol):
    def routed(self, layer: int, experts: np.ndarray, weights: np.ndarray) -> None:
        """experts (T, A) int, weights (T, A): each token's chosen experts and their weights."""

    def product(self, w: Tensor, x: np.ndarray, expert: int | None) -> None:
        """x (T, K) is about to be multiplied by w (by its expert `expert` if stacked)."""


@dataclass
class KVCache:
    k: np.ndarray  # (L, n_ctx, Hk, hd) float32
    v: np.ndarray  # (L, n_ctx, Hk, hd)

    @classmethod
    def empty(cls, hp: HParams, n_ctx: int) -> "KVCache":
        shape = (hp.n_layer, n_ctx, hp.n_head_kv, hp.head_dim)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, np.float32))  # pages are touched as filled

    @property
    def n_ctx(self) -> int:
        return self.k.shape[1]


def linear(x: np.ndarray, w: Tensor, obs: Observer | None = None, expert: int | None = None) -> np.ndarray:
    """x @ W.T, W as stored in the file (or its expert `expert`): (T, K) -> (T, N)."""
    if obs is not None:
        obs.product(w, x, expert)
    return matmul(x, w.data if expert is None else w.data[expert], w.qtype)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rms_norm(x: np.ndarray, w: Tensor, eps: float) -> np.ndarray:
    """(T, D) -> (T, D), each row scaled to unit root-mean-square, then by the weight. As ggml
    computes it, to the bit: the squares summed in float64, then float32 scale = 1 / sqrt."""
    mean = (np.square(x).astype(np.float64).sum(-1, keepdims=True) / x.shape[-1]).astype(np.float32)
    return x * (np.float32(1.0) / np.sqrt(mean + np.float32(eps))) * w.data


def rope(x: np.ndarray, pos: np.ndarray, hp: HParams) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of each head by pos * base^(-2i/n_rot)."""
    freqs = hp.rope_base ** (-np.arange(0, hp.n_rot, 2) / hp.n_rot)     # (n_rot/2,)
    angle = pos[:, None] * freqs                                        # (T, n_rot/2)
    cos = np.cos(angle).astype(np.float32)[:, None, :]                  # (T, 1, n_rot/2)
    sin = np.sin(angle).astype(np.float32)[:, None, :]
    x0, x1 = x[..., 0:hp.n_rot:2], x[..., 1:hp.n_rot:2]                 # (T, heads, n_rot/2)
    out = x.copy()
    out[..., 0:hp.n_rot:2] = x0 * cos - x1 * sin
    out[..., 1:hp.n_rot:2] = x0 * sin + x1 * cos
    return out


def attention(x: np.ndarray, layer: Layer, il: int, cache: KVCache, pos: int, hp: HParams,
              obs: Observer | None = None) -> np.ndarray:
    """Grouped-query attention of the batch at positions pos..pos+T-1 over the cache: (T, D) -> (T, D)."""
    T, H, Hk, hd = len(x), hp.n_head, hp.n_head_kv, hp.head_dim
    positions = np.arange(pos, pos + T)
    q = rope(linear(x, layer.attn_q, obs).reshape(T, H, hd), positions, hp)    # (T, H, hd)
    k = rope(linear(x, layer.attn_k, obs).reshape(T, Hk, hd), positions, hp)   # (T, Hk, hd)
    v = linear(x, layer.attn_v, obs).reshape(T, Hk, hd)                        # (T, Hk, hd)
    # append to the cache, then attend to everything up to this batch's end
    cache.k[il, pos:pos + T], cache.v[il, pos:pos + T] = k, v
    S = pos + T
    keys = cache.k[il, :S].transpose(1, 2, 0)                                  # (Hk, hd, S)
    values = cache.v[il, :S].transpose(1, 0, 2)                                # (Hk, S, hd)
    # query heads h = g * G + r share key/value head g
    qg = q.reshape(T, Hk, H // Hk, hd).transpose(1, 2, 0, 3).reshape(Hk, -1, hd)  # (Hk, G*T, hd)
    scores = (qg @ keys) / np.float32(np.sqrt(hd))                             # (Hk, G*T, S)
    scores = scores.reshape(Hk, H // Hk, T, S)                                 # (Hk, G, T, S)
    scores[..., positions[:, None] < np.arange(S)[None, :]] = -np.inf          # causal: no future positions
    probs = softmax(scores).reshape(Hk, -1, S)                                 # (Hk, G*T, S)
    out = (probs @ values).reshape(Hk, H // Hk, T, hd)                         # (Hk, G, T, hd)
    out = out.transpose(2, 0, 1, 3).reshape(T, H * hd)                         # (T, H*hd)
    return linear(out, layer.attn_output, obs)


def route(x: np.ndarray, layer: Layer, hp: HParams, obs: Observer | None = None):
    """The router: each token's top-A experts and their weights, (T, A) and (T, A)."""
    probs = softmax(linear(x, layer.ffn_gate_inp, obs))                       # (T, E)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :hp.n_expert_used]  # (T, A)
    weights = np.take_along_axis(probs, chosen, axis=-1)                      # (T, A)
    return chosen, weights / weights.sum(-1, keepdims=True)


def moe(x: np.ndarray, layer: Layer, il: int, hp: HParams, obs: Observer | None = None) -> np.ndarray:
    """Sparse mixture of SwiGLU experts: (T, D) -> (T, D)."""
    chosen, weights = route(x, layer, hp, obs)                                # (T, A), (T, A)
    if obs is not None:
        obs.routed(il, chosen, weights)
    out = np.zeros_like(x)                                                    # (T, D)
    for e in np.unique(chosen):             # each chosen expert once, with all its tokens
        t, slot = np.nonzero(chosen == e)   # a token picks an expert at most once
        xe = x[t]                                                             # (Te, D)
        h = silu(linear(xe, layer.ffn_gate_exps, obs, e)) * linear(xe, layer.ffn_up_exps, obs, e)  # (Te, F)
        out[t] += weights[t, slot, None] * linear(h, layer.ffn_down_exps, obs, e)                   # (Te, D)
    return out


def mlp(x: np.ndarray, layer: Layer, obs: Observer | None = None) -> np.ndarray:
    """Dense SwiGLU (Mistral): (T, D) -> (T, D)."""
    return linear(silu(linear(x, layer.ffn_gate, obs)) * linear(x, layer.ffn_up, obs), layer.ffn_down, obs)


def block(x: np.ndarray, layer: Layer, il: int, cache: KVCache, pos: int, hp: HParams,
          obs: Observer | None = None) -> np.ndarray:
    """One transformer layer, pre-norm with residuals: (T, D) -> (T, D)."""
    x = x + attention(rms_norm(x, layer.attn_norm, hp.norm_eps), layer, il, cache, pos, hp, obs)
    h = rms_norm(x, layer.ffn_norm, hp.norm_eps)
    return x + (moe(h, layer, il, hp, obs) if hp.n_expert else mlp(h, layer, obs))


def forward(w: Weights, tokens, pos: int, cache: KVCache, obs: Observer | None = None,
            logits: str | None = "last") -> np.ndarray | None:
    """Logits of the last token (1, V), of every token (T, V) or none (logits "last", "all",
    None) for `tokens` at positions pos..pos+T-1; their keys and values go to the cache."""
    tokens = np.asarray(tokens, dtype=np.int64)
    x = dequantize_rows(w.token_embd.data[tokens], w.token_embd.qtype)    # (T, D): only these rows
    for il, layer in enumerate(w.layers):
        x = block(x, layer, il, cache, pos, w.hp, obs)
    if logits is None:
        return None
    if logits == "last":
        x = x[-1:]
    return linear(rms_norm(x, w.output_norm, w.hp.norm_eps), w.output, obs)   # (T or 1, V)


def prefill(w: Weights, tokens, pos: int, cache: KVCache, obs: Observer | None = None,
            batch: int = 64, logits: str | None = "last") -> np.ndarray | None:
    """`forward` over a prompt, `batch` tokens at a time: the logits of its last token (1, V),
    of all its tokens (T, V), or none."""
    out = []
    for i in range(0, len(tokens), batch):
        last = i + batch >= len(tokens)
        x = forward(w, tokens[i:i + batch], pos + i, cache, obs, logits if logits == "all" or last else None)
        if x is not None:
            out.append(x)
    return np.concatenate(out) if out else None
