"""Synthetic models: llama.cpp's tensor table and file size, valid blocks, sane weights."""

import numpy as np
import pytest
from conftest import load_llama, run_localmix
from gguf import GGUFReader

from localmix.convert.config import ModelConfig
from localmix.fixtures.synth import SCALES, SIGMA, random_rows, synth
from localmix.gguf.check import check_gguf
from localmix.kernels import dequantize


def table(path):
    r = GGUFReader(path)
    return sorted((t.name, t.tensor_type, tuple(t.shape)) for t in r.tensors)


def keys(path):
    return {k for k in GGUFReader(path).fields if not k.startswith("GGUF.")} - {"general.name"}


@pytest.mark.parametrize("file_type", ["Q3_K_M", "Q4_K_M", "Q2_K"])
def test_same_tensors_and_size_as_llama_cpp(tiny_mixtral, quantized_by_llama, file_type, tmp_path):
    ours = synth(ModelConfig.load(tiny_mixtral), file_type, tmp_path / "synth.gguf").path
    theirs = quantized_by_llama("mixtral", file_type)
    assert table(ours) == table(theirs)
    assert ours.stat().st_size == pytest.approx(theirs.stat().st_size, rel=0.01)
    assert keys(ours) == keys(theirs)


@pytest.mark.parametrize("qtype", sorted(SCALES, key=lambda t: t.name))
def test_random_blocks_decode_to_sane_weights(qtype):
    rows = random_rows(qtype, 64, 1024, np.random.default_rng(0))
    w = dequantize(rows, qtype)
    assert w.shape == (64, 1024) and np.isfinite(w).all()
    assert 0.4 * SIGMA < w.std() < 2.5 * SIGMA and abs(w.mean()) < 0.5 * SIGMA


def test_llama_cpp_runs_a_synthetic_model(tiny_mixtral, tmp_path):
    path = synth(ModelConfig.load(tiny_mixtral), "Q4_K_M", tmp_path / "s.gguf", seed=3).path
    llm = load_llama(path, n_ctx=64)
    tokens = llm.tokenize(b"[INST] Hello [/INST]")
    llm.eval(tokens)
    logits = np.array(llm.scores[: len(tokens)])
    assert np.isfinite(logits).all() and logits.std() > 0
    assert llm.detokenize(tokens).decode().strip() == "[INST] Hello [/INST]"  # the real tokenizer


def test_synth_command_and_its_errors(tmp_path):
    out = tmp_path / "mid.gguf"
    r = run_localmix("synth", "--preset", "mistral-7b", "--type", "Q3_K_M", "--layers", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    s = check_gguf(out)
    assert s.n_layer == 1 and s.n_embd == 4096 and s.n_vocab == 32000
    again = run_localmix("synth", "--preset", "mistral-7b", "-o", out)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = run_localmix("synth", "--preset", "mixtral-9x9b", "-o", tmp_path / "x.gguf")
    assert bad.returncode == 2 and "unknown preset" in bad.stderr and not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob(".*partial"))
