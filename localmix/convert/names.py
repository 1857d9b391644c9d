"""Hugging Face tensor names -> GGUF tensor names, in one table, and the plan built from it.

`{bid}` is a layer number, `{xid}` an expert number. The per-expert matrices of a layer are
stacked, expert by expert, into one `(n_expert, rows, cols)` tensor, exactly as llama.cpp's
`convert_hf_to_gguf.py` does. `plan_tensors` checks that every source tensor is used exactly
once and that every shape is what `config.json` implies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from localmix.convert.config import ModelConfig
from localmix.errors import InputError

# HF name template -> (GGUF name template, Q/K permutation: "q", "k" or None)
TENSOR_TABLE: dict[str, tuple[str, str | None]] = {
    "model.embed_tokens.weight":                               ("token_embd.weight", None),
    "model.layers.{bid}.input_layernorm.weight":               ("blk.{bid}.attn_norm.weight", None),
    "model.layers.{bid}.self_attn.q_proj.weight":              ("blk.{bid}.attn_q.weight", "q"),
    "model.layers.{bid}.self_attn.k_proj.weight":              ("blk.{bid}.attn_k.weight", "k"),
    "model.layers.{bid}.self_attn.v_proj.weight":              ("blk.{bid}.attn_v.weight", None),
    "model.layers.{bid}.self_attn.o_proj.weight":              ("blk.{bid}.attn_output.weight", None),
    "model.layers.{bid}.post_attention_layernorm.weight":      ("blk.{bid}.ffn_norm.weight", None),
    "model.layers.{bid}.mlp.gate_proj.weight":                 ("blk.{bid}.ffn_gate.weight", None),
    "model.layers.{bid}.mlp.up_proj.weight":                   ("blk.{bid}.ffn_up.weight", None),
    "model.layers.{bid}.mlp.down_proj.weight":                 ("blk.{bid}.ffn_down.weight", None),
    "model.layers.{bid}.block_sparse_moe.gate.weight":         ("blk.{bid}.ffn_gate_inp.weight", None),
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w1.weight": ("blk.{bid}.ffn_gate_exps.weight", None),
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w2.weight": ("blk.{bid}.ffn_down_exps.weight", None),
    "model.layers.{bid}.block_sparse_moe.experts.{xid}.w3.weight": ("blk.{bid}.ffn_up_exps.weight", None),
    "model.norm.weight":                                       ("output_norm.weight", None),
    "lm_head.weight":                                          ("output.weight", None),
}

# Source tensors that carry nothing a GGUF needs.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
    return re.compile(pattern + "$")


_MATCHERS = [(_template_regex(hf), gguf_name, perm) for hf, (gguf_name, perm) in TENSOR_TABLE.items()]


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from Hugging Face's rotate-half RoPE to llama.cpp's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class OutTensor:
    """One GGUF tensor: its name, numpy-order shape and the source tensors it is made of
    (one, or one per expert stacked along the first axis)."""
    name: str
    shape: tuple[int, ...]
    sources: list[str]
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The numpy-order shape of every GGUF tensor this config implies."""
    d, f, hd, v = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size
    q, kv, e = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.num_local_experts
    shapes = {"token_embd.weight": (v, d)}
    for bid in range(cfg.num_hidden_layers):
        b = f"blk.{bid}."
        shapes.update({b + "attn_norm.weight": (d,), b + "attn_q.weight": (q, d), b + "attn_k.weight": (kv, d),
                       b + "attn_v.weight": (kv, d), b + "attn_output.weight": (d, q), b + "ffn_norm.weight": (d,)})
        if cfg.is_moe:
            shapes.update({b + "ffn_gate_inp.weight": (e, d), b + "ffn_gate_exps.weight": (e, f, d),
                           b + "ffn_down_exps.weight": (e, d, f), b + "ffn_up_exps.weight": (e, f, d)})
        else:
            shapes.update({b + "ffn_gate.weight": (f, d), b + "ffn_up.weight": (f, d), b + "ffn_down.weight": (d, f)})
    shapes["output_norm.weight"] = (d,)
    shapes["output.weight"] = (v, d)
    return shapes


def plan_tensors(cfg: ModelConfig, source_shapes: dict[str, tuple[int, ...]]) -> list[OutTensor]:
    """Map every source tensor to its GGUF tensor (embeddings, layers, output), checking shapes."""
    expected = expected_shapes(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" not in source_shapes:
        del expected["output.weight"]  # llama.cpp reads the embeddings for the output then
    parts: dict[str, dict[int, str]] = {}  # gguf name -> {expert id (or -1): hf name}
    perms: dict[str, str | None] = {}
    for src in source_shapes:
        if IGNORED.match(src):
            continue
        for regex, template, perm in _MATCHERS:
            m = regex.match(src)
            if m:
                bid, xid = m.groupdict().get("bid"), m.groupdict().get("xid")
                name = template.format(bid=bid)
                if bid is not None and int(bid) >= cfg.num_hidden_layers:
                    raise InputError(f"tensor {src} is for layer {bid}, but config.json has {cfg.num_hidden_layers} layers")
                parts.setdefault(name, {})[int(xid) if xid is not None else -1] = src
                perms[name] = perm
                break
        else:
            raise InputError(f"unexpected tensor {src} in the checkpoint: not part of a {cfg.architecture}")

    plan = []
    for name, shape in expected.items():
        got = parts.pop(name, None)
        if got is None:
            raise InputError(f"the checkpoint has no tensor for {name} (a {cfg.architecture} needs it)")
        stacked = len(shape) == 3
        ids = list(range(shape[0])) if stacked else [-1]
        if sorted(got) != ids:
            missing = sorted(set(ids) - set(got))
            raise InputError(f"{name}: the checkpoint has experts {sorted(got)}, expected {ids} (missing {missing})")
        sources = [got[i] for i in ids]
        want = shape[1:] if stacked else shape
        for src in sources:
            if tuple(source_shapes[src]) != tuple(want):
                raise InputError(f"tensor {src} has shape {list(source_shapes[src])}, config.json implies {list(want)}")
        perm = perms[name]
        n_head = cfg.num_attention_heads if perm == "q" else cfg.num_key_value_heads
        transform = (lambda w, n=n_head: permute_qk(w, n)) if perm else None
        plan.append(OutTensor(name, shape, sources, transform))
    if parts:
        extra = sorted(s for p in parts.values() for s in p.values())[0]
        raise InputError(f"unexpected tensor {extra} in the checkpoint: not part of a {cfg.architecture}")
    used = [s for t in plan for s in t.sources]
    assert len(used) == len(set(used)), "a source tensor was used twice"
    return plan
