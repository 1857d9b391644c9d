"""The tiny checkpoints have the Hub's layout, so that converting them exercises what a real
download exercises."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from localmix.fixtures.tiny import make_tiny_checkpoint, tokenizer_model_path

# The keys of mistralai/Mixtral-8x7B-Instruct-v0.1's config.json.
HUB_MIXTRAL_KEYS = {
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "hidden_act", "hidden_size",
    "initializer_range", "intermediate_size", "max_position_embeddings", "model_type", "num_attention_heads",
    "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_router_logits",
    "rms_norm_eps", "rope_theta", "router_aux_loss_coef", "sliding_window", "tie_word_embeddings", "torch_dtype",
    "transformers_version", "use_cache", "vocab_size",
}


def test_config_matches_the_hub_layout(tiny_mixtral):
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    assert set(cfg) == HUB_MIXTRAL_KEYS
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (256, 512, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 2)
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["vocab_size"]) == (8, 2, 32000)
    assert cfg["rope_theta"] == 1e6


def test_shards_index_and_bf16_tensors(tiny_mixtral):
    index = json.loads((tiny_mixtral / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    names = set()
    total = 0
    for shard in shards:
        with safe_open(str(tiny_mixtral / shard), framework="numpy") as f:
            for name in f.keys():
                assert index["weight_map"][name] == shard
                sl = f.get_slice(name)
                assert sl.get_dtype() == "BF16"
                total += 2 * int(np.prod(sl.get_shape()))
                names.add(name)
    assert names == set(index["weight_map"])
    assert index["metadata"]["total_size"] == total
    for e in range(8):
        for w in ("w1", "w2", "w3"):
            assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names


def test_tokenizer_is_the_real_mixtral_one(tiny_mixtral):
    mistral_common = pytest.importorskip("mistral_common")
    upstream = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert tokenizer_model_path().read_bytes() == upstream.read_bytes()
    assert (tiny_mixtral / "tokenizer.model").read_bytes() == upstream.read_bytes()
    tc = json.loads((tiny_mixtral / "tokenizer_config.json").read_text())
    assert tc["add_bos_token"] is True and tc["add_eos_token"] is False
    assert "[INST]" in tc["chat_template"]


def test_same_arguments_same_bytes(tmp_path, tiny_mixtral):
    again = make_tiny_checkpoint(tmp_path / "again")
    for f in sorted(p.name for p in tiny_mixtral.iterdir()):
        assert (again / f).read_bytes() == (tiny_mixtral / f).read_bytes(), f


def test_dense_variant_is_mistral(tiny_mistral):
    cfg = json.loads((tiny_mistral / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and "num_local_experts" not in cfg
    index = json.loads((tiny_mistral / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.gate_proj.weight" in index["weight_map"]
    assert not any("block_sparse_moe" in n for n in index["weight_map"])
