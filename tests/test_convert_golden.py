"""Our GGUF files are interchangeable with llama.cpp's own converter's.

tests/golden/golden.json records what llama.cpp's `convert_hf_to_gguf.py` wrote for the tiny
checkpoints (see make_golden.py: Mixtral 8x7B's and Mistral 7B's designs, and Mixtral 8x22B's
with the v3 tokenizer, 32768 pieces and 64K context): every metadata key with its type and value, every tensor's
type, shape and data digest. localmix must write the same, key for key and byte for byte.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map
from golden.make_golden import CASES
from golden.make_golden import describe as _describe

from localmix.convert.names import TENSOR_TABLE
from localmix.convert.pipeline import convert
from localmix.fixtures.tiny import make_tiny_checkpoint

GOLDEN = json.loads((Path(__file__).parent / "golden" / "golden.json").read_text())


@pytest.fixture(scope="module")
def golden_sources(tmp_path_factory):
    # The same folder names as make_golden.py: general.* names come from them.
    base = tmp_path_factory.mktemp("golden")
    return {case: make_tiny_checkpoint(base / case, spec) for case, spec in CASES.items()}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_same_file_as_llama_cpp_converter(case, golden_sources, tmp_path):
    model, file_type = case.split("-")
    out = convert(golden_sources[model], tmp_path / f"{case}.gguf", file_type.upper()).path
    ours, theirs = _describe(out), GOLDEN[case]
    assert ours["kv"] == theirs["kv"]
    assert ours["tensors"].keys() == theirs["tensors"].keys()
    for name, want in theirs["tensors"].items():
        assert ours["tensors"][name] == want, name


def test_rope_parameters_form_gives_the_same_file(tmp_path, converted):
    src = make_tiny_checkpoint(tmp_path / "tiny-mixtral", rope_parameters_form=True)
    assert "rope_parameters" in json.loads((src / "config.json").read_text())
    ours = _describe(convert(src, tmp_path / "new-form.gguf", "F32").path)
    classic = _describe(converted("mixtral", "F32"))
    assert ours == classic


def test_tensor_table_agrees_with_gguf_name_map():
    """Our one renaming table gives the names gguf-py's own map gives for llama."""
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, 4)
    for hf, (gguf_name, _) in TENSOR_TABLE.items():
        if "{xid}" in hf:  # per-expert tensors are stacked; gguf-py maps the merged name
            wid = hf.split(".")[-2]
            hf = f"layers.{{bid}}.feed_forward.experts.{wid}.weight"
        got = name_map.get_name(hf.format(bid=3), try_suffixes=(".weight",))
        assert got == gguf_name.format(bid=3), hf


def test_f32_data_is_the_checkpoint_exactly(tiny_mixtral, converted):
    """F32 tensors hold the bf16 weights exactly: embeddings as is, experts stacked in order."""
    from localmix.convert.checkpoint import Checkpoint
    from localmix.convert.names import permute_qk

    ckpt = Checkpoint(tiny_mixtral)
    tensors = {t.name: t for t in GGUFReader(converted("mixtral", "F32")).tensors}
    assert np.array_equal(tensors["token_embd.weight"].data, ckpt.load("model.embed_tokens.weight"))
    exps = tensors["blk.1.ffn_down_exps.weight"].data
    assert exps.shape == (8, 256, 512)
    for e in range(8):
        assert np.array_equal(exps[e], ckpt.load(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"))
    k = ckpt.load("model.layers.0.self_attn.k_proj.weight")
    assert np.array_equal(tensors["blk.0.attn_k.weight"].data, permute_qk(k, 2))
    assert not np.array_equal(tensors["blk.0.attn_k.weight"].data, k)
