"""Summarise a GGUF file: architecture, hyper-parameters, parameters, sizes, types, tokenizer.

`describe(path)` returns a plain dict (what `localmix info --json` prints); `render(info)`
turns it into rich renderables for the terminal. The file is read with `gguf.GGUFReader`,
memory-mapped, so a 26 GB model is summarised without reading its weights; it is checked first
(gguf.check), so a file that would not load is one line naming what is wrong.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

from localmix.gguf.check import check_gguf
from localmix.gguf.read import array_length, field_value

HPARAMS = [  # (label, key suffix after "{arch}.")
    ("context length", "context_length"), ("embedding length", "embedding_length"),
    ("layers", "block_count"), ("feed-forward length", "feed_forward_length"),
    ("attention heads", "attention.head_count"), ("KV heads", "attention.head_count_kv"),
    ("experts", "expert_count"), ("experts per token", "expert_used_count"),
    ("RoPE theta", "rope.freq_base"), ("RoPE dimensions", "rope.dimension_count"),
    ("RMS norm epsilon", "attention.layer_norm_rms_epsilon"), ("vocab size", "vocab_size"),
]


def _mistral_version(r) -> str:
    """"v1" when "[INST]" is text (Mixtral 8x7B), "v2/v3" when the vocabulary has it as a control
    token (Mixtral 8x22B, Mistral 7B v0.3: mistral-common puts it at id 3, among the first few)."""
    tokens, types = r.fields.get("tokenizer.ggml.tokens"), field_value(r, "tokenizer.ggml.token_type")
    if tokens is None or types is None:
        return "v1"
    for i in range(min(16, array_length(tokens), len(types))):
        if tokens.contents(i) == "[INST]" and int(types[i]) == 3:  # llama.cpp's CONTROL
            return "v2/v3"
    return "v1"


def describe(path: str | Path) -> dict[str, Any]:
    r = check_gguf(path).reader  # one clean line, naming the key, for a file llama.cpp could not load
    arch = field_value(r, "general.architecture", "unknown")
    hparams = {suffix: field_value(r, f"{arch}.{suffix}") for _, suffix in HPARAMS}
    hparams = {k: v for k, v in hparams.items() if v is not None}

    n_expert = hparams.get("expert_count") or 0
    n_used = hparams.get("expert_used_count") or 0
    params = Counter()
    sizes = Counter()
    types = Counter()
    for t in r.tensors:
        part = "experts" if "_exps." in t.name else "other"
        params[part] += int(t.n_elements)
        sizes[part] += int(t.n_bytes)
        types[t.tensor_type.name] += 1
    total = params["experts"] + params["other"]
    active = params["other"] + (params["experts"] * n_used // n_expert if n_expert else 0)

    file_type = field_value(r, "general.file_type")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    template = field_value(r, "tokenizer.chat_template")
    return {
        "path": str(path),
        "architecture": arch,
        "name": field_value(r, "general.name"),
        "file_type": LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        if file_type in LlamaFileType._value2member_map_ else file_type,
        "gguf_version": field_value(r, "GGUF.version"),
        "hyperparameters": hparams,
        "parameters": {"total": total, "active_per_token": active, "experts": params["experts"],
                       "other": params["other"]},
        "bytes": {"total": Path(path).stat().st_size, "experts": sizes["experts"], "other": sizes["other"]},
        "bits_per_weight": round(8 * (sizes["experts"] + sizes["other"]) / total, 3) if total else None,
        "tensor_types": dict(sorted(types.items())),
        "n_tensors": len(r.tensors),
        "tokenizer": {
            "model": field_value(r, "tokenizer.ggml.model"),
            "vocab_size": array_length(tokens) if tokens is not None else 0,
            "bos_token_id": field_value(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": field_value(r, "tokenizer.ggml.eos_token_id"),
            "unknown_token_id": field_value(r, "tokenizer.ggml.unknown_token_id"),
            "add_bos_token": field_value(r, "tokenizer.ggml.add_bos_token"),
            "add_eos_token": field_value(r, "tokenizer.ggml.add_eos_token"),
        },
        "chat_template": None if template is None else {
            "length": len(template),
            "format": "[INST]" if "[INST]" in template else "other",
            "mistral_version": _mistral_version(r) if "[INST]" in template else None,
            "system_role": "system" in template,
            "text": template,
        },
    }
