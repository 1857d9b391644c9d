"""The real shapes of the models localmix is for, without their weights.

`preset_config(name)` is the Hugging Face config of Mixtral 8x7B, Mixtral 8x22B or Mistral 7B;
`preset_tensors(name, file_type)` is the GGUF tensor table (name, shape, type, bytes) that
localmix's quantizer would write for it, through the same renaming table and the same
llama.cpp mixes. The memory planner plans with these tables, and so can anyone sizing a model
before downloading 90 GB.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmix.convert.config import ModelConfig
from localmix.convert.mix import CONVERTER_TYPES, FILE_TYPES, ModelShape, choose_types
from localmix.convert.names import expected_shapes
from localmix.kernels import QType, tensor_nbytes

PRESETS = {
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                         num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=32768,
                         bos_token_id=1, eos_token_id=2),
    "mixtral-8x22b": dict(architectures=["MixtralForCausalLM"], hidden_size=6144, intermediate_size=16384,
                          num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8, vocab_size=32768,
                          num_local_experts=8, num_experts_per_tok=2, rope_theta=1e6, max_position_embeddings=65536,
                          bos_token_id=1, eos_token_id=2),
    "mistral-7b": dict(architectures=["MistralForCausalLM"], hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       rope_theta=1e6, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2),
}


@dataclass(frozen=True)
class PresetTensor:
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: QType
    n_bytes: int


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        from localmix.errors import InputError
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name])


def preset_tensors(name: str, file_type: str) -> list[PresetTensor]:
    return config_tensors(preset_config(name), file_type)


def config_tensors(cfg: ModelConfig, file_type: str) -> list[PresetTensor]:
    """The GGUF tensor table of the model `cfg` at `file_type`, in the converter's order."""
    shapes = expected_shapes(cfg)
    if file_type in CONVERTER_TYPES:
        from localmix.convert.pipeline import tensor_type
        types = {n: tensor_type(n, s, file_type) for n, s in shapes.items()}
    else:
        model = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
                           cfg.num_local_experts if cfg.is_moe else 0)
        types = choose_types([(n, s, QType.F32) for n, s in shapes.items()], file_type, model)
    assert file_type in FILE_TYPES
    return [PresetTensor(n, s, types[n], tensor_nbytes(types[n], s)) for n, s in shapes.items()]
