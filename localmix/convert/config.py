"""Model hyper-parameters, read from a Hugging Face `config.json`.

`ModelConfig` uses Hugging Face's key names, ignores keys it does not know, and derives
`head_dim` and friends in `__post_init__` (the shape of mlx-lm's `ModelArgs`). Both the
classic form (`rope_theta` at the top level) and the newer transformers form
(`rope_parameters: {"rope_theta": ...}`) are accepted.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmix.errors import InputError

# Hugging Face architecture -> whether it is a mixture of experts.
SUPPORTED_ARCHITECTURES = {"MixtralForCausalLM": True, "MistralForCausalLM": False}


@dataclass
class ModelConfig:
    architectures: list[str]
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_scaling: dict[str, Any] | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
            # llama.cpp's converter reads configs through transformers, whose MistralConfig
            # (unlike MixtralConfig) fills in head_dim: it then writes key/value lengths.
            self.explicit_head_dim = self.head_dim if self.architectures[:1] == ["MistralForCausalLM"] else None
        else:
            self.explicit_head_dim = self.head_dim
        rope = dict(self.rope_parameters or self.rope_scaling or {})
        if "rope_theta" not in rope and self.rope_theta is not None:
            rope["rope_theta"] = self.rope_theta
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        self.rope = rope
        self.rope_theta = rope.get("rope_theta", 10000.0)

    @property
    def architecture(self) -> str:
        return self.architectures[0]

    @property
    def is_moe(self) -> bool:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(SUPPORTED_ARCHITECTURES)
            raise InputError(f"unsupported architecture {arch!r} in config.json; localmix supports {supported}")
        known = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        args = {k: v for k, v in d.items() if k in known}
        try:
            cfg = cls(**args, raw=d)
        except TypeError as e:  # a required key is missing
            raise InputError(f"config.json is missing a required key: {e}") from None
        if cfg.is_moe and not (cfg.num_local_experts and cfg.num_experts_per_tok):
            raise InputError("config.json of a MixtralForCausalLM needs num_local_experts and num_experts_per_tok")
        rope_type = cfg.rope.get("rope_type", "default")
        if rope_type not in ("default", None):
            raise InputError(f"RoPE scaling {rope_type!r} is not supported for {arch}")
        return cfg

    @classmethod
    def load(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InputError(f"{path} not found: is {model_dir} a Hugging Face checkpoint folder?")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise InputError(f"{path} is not a JSON object")
        return cls.from_dict(d)
