"""Tiny, deterministic Mixtral and Mistral checkpoints in the exact layout of the Hub's.

`make_tiny_checkpoint(dir)` writes what `huggingface-cli download
mistralai/Mixtral-8x7B-Instruct-v0.1` gives you, at toy widths: `config.json`,
`generation_config.json`, bf16 weights in `model-0000N-of-0000M.safetensors` shards with
`model.safetensors.index.json`, the real Mixtral SentencePiece `tokenizer.model` and a
`tokenizer_config.json` with the Mixtral-Instruct chat template. `dense=True` gives Mistral
7B's design (`MistralForCausalLM`, one SwiGLU MLP per layer) instead.

The weights are random (seeded), scaled so that activations stay O(1) and the next-token
distribution is peaked: the text is random, but every engine must agree on it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import safetensors

# The Mixtral-8x7B-Instruct-v0.1 chat template, as in its tokenizer_config.json.
MIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def tokenizer_model_path() -> Path:
    """The real Mixtral SentencePiece model (32000 pieces), shipped inside localmix.

    It is a byte-for-byte copy of `mistral_common/data/tokenizer.model.v1` (Apache-2.0), so
    that the demo needs no extra package; a test checks that the two stay identical.
    """
    return Path(str(resources.files("localmix") / "data" / "mixtral-tokenizer.model"))


@dataclass
class TinySpec:
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    vocab_size: int = 32000
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    dense: bool = False
    n_shards: int = 3
    seed: int = 0
    rope_parameters_form: bool = False  # write the newer transformers `rope_parameters` form


def _config(s: TinySpec) -> dict:
    cfg = {
        "architectures": ["MistralForCausalLM" if s.dense else "MixtralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": s.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_position_embeddings,
        "model_type": "mistral" if s.dense else "mixtral",
        "num_attention_heads": s.num_attention_heads,
        "num_hidden_layers": s.num_hidden_layers,
        "num_key_value_heads": s.num_key_value_heads,
        "rms_norm_eps": 1e-05,
        "rope_theta": s.rope_theta,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0",
        "use_cache": True,
        "vocab_size": s.vocab_size,
    }
    if not s.dense:
        cfg.update(num_experts_per_tok=s.num_experts_per_tok, num_local_experts=s.num_local_experts,
                   output_router_logits=False, router_aux_loss_coef=0.02)
    if s.rope_parameters_form:
        del cfg["rope_theta"]
        cfg["rope_parameters"] = {"rope_theta": s.rope_theta, "rope_type": "default"}
    return dict(sorted(cfg.items()))


def _tokenizer_config() -> dict:
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            "0": {"content": "<unk>", **special},
            "1": {"content": "<s>", **special},
            "2": {"content": "</s>", **special},
        },
        "additional_special_tokens": [],
        "bos_token": "<s>",
        "chat_template": MIXTRAL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": True,
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": None,
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }


def _weight_shapes(s: TinySpec):
    """(name, shape, init std gain) in the Hub's order."""
    d, f, hd = s.hidden_size, s.intermediate_size, s.hidden_size // s.num_attention_heads
    yield "model.embed_tokens.weight", (s.vocab_size, d), None
    for i in range(s.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,), None
        yield p + "self_attn.q_proj.weight", (s.num_attention_heads * hd, d), 2.0
        yield p + "self_attn.k_proj.weight", (s.num_key_value_heads * hd, d), 2.0
        yield p + "self_attn.v_proj.weight", (s.num_key_value_heads * hd, d), 1.0
        yield p + "self_attn.o_proj.weight", (d, s.num_attention_heads * hd), 0.5
        yield p + "post_attention_layernorm.weight", (d,), None
        if s.dense:
            yield p + "mlp.gate_proj.weight", (f, d), 1.0
            yield p + "mlp.up_proj.weight", (f, d), 1.0
            yield p + "mlp.down_proj.weight", (d, f), 0.5
        else:
            yield p + "block_sparse_moe.gate.weight", (s.num_local_experts, d), 4.0
            for x in range(s.num_local_experts):
                q = f"{p}block_sparse_moe.experts.{x}."
                yield q + "w1.weight", (f, d), 1.0
                yield q + "w2.weight", (d, f), 0.5
                yield q + "w3.weight", (f, d), 1.0
    yield "model.norm.weight", (d,), None
    yield "lm_head.weight", (s.vocab_size, d), 4.0


def _init(rng: np.random.Generator, shape: tuple[int, ...], gain: float | None) -> np.ndarray:
    """Embeddings ~ N(0, 1); norms ~ 1 + N(0, 0.1); matrices ~ N(0, gain^2 / fan_in)."""
    x = rng.standard_normal(shape, dtype=np.float32)
    if len(shape) == 1:
        return 1.0 + np.float32(0.1) * x
    if gain is not None:
        x *= np.float32(gain / np.sqrt(shape[1]))
    return x


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _save_bf16_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Save uint16 bf16 bit patterns as BF16 tensors (numpy has no bfloat16 dtype)."""
    if hasattr(safetensors, "TensorSpec"):  # safetensors >= 0.8 takes pointers
        payload = {n: safetensors.TensorSpec(dtype="bfloat16", shape=list(t.shape), data_ptr=t.ctypes.data,
                                             data_len=t.nbytes) for n, t in tensors.items()}
    else:
        payload = {n: {"dtype": "bfloat16", "shape": list(t.shape), "data": t.tobytes()} for n, t in tensors.items()}
    safetensors.serialize_file(payload, str(path), metadata={"format": "pt"})


def make_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None, **overrides) -> Path:
    """Write a tiny checkpoint to `out_dir` (created) and return its path.

    Keyword overrides set fields of `TinySpec`, e.g. `make_tiny_checkpoint(d, dense=True)`.
    The same arguments always give byte-identical files.
    """
    s = spec or TinySpec(**overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # Assign tensors to shards of roughly equal byte size, keeping the Hub's order: a tensor
    # goes to the shard where its middle byte falls. Then generate and write shard by shard.
    layout = list(_weight_shapes(s))
    sizes = [2 * int(np.prod(shape)) for _, shape, _ in layout]
    total = sum(sizes)
    owner = [min(s.n_shards - 1, (start + n // 2) * s.n_shards // total)
             for start, n in zip(np.cumsum([0] + sizes[:-1]), sizes)]
    used = sorted(set(owner))
    rng = np.random.default_rng(s.seed)
    weight_map = {}
    for k, shard in enumerate(used):
        fname = f"model-{k + 1:05d}-of-{len(used):05d}.safetensors"
        tensors = {name: to_bf16_bits(_init(rng, shape, gain))
                   for (name, shape, gain), o in zip(layout, owner) if o == shard}
        _save_bf16_safetensors(tensors, out / fname)
        (out / fname).chmod(0o644)
        weight_map.update({n: fname for n in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(_config(s), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                    "transformers_version": "4.36.0.dev0"}, indent=2) + "\n")
    write_tokenizer_files(out)
    return out


def write_tokenizer_files(out: Path) -> None:
    """Mixtral's tokenizer.model and the Instruct tokenizer_config.json (chat template) in `out`."""
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(), indent=2) + "\n")
    shutil.copyfile(tokenizer_model_path(), out / "tokenizer.model")
