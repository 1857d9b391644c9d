"""The native engine and its tools from the command line: run --engine native, experts, imatrix."""

import json

from conftest import run_localmix
from gguf import GGUFReader


def test_run_with_the_native_engine_streams_what_llama_cpp_streams(converted):
    model = converted("mixtral", "F32")
    args = ("run", model, "Tell me about experts", "-n", "12", "--temperature", "0")
    # llama.cpp without flash attention: the algorithm the native engine follows (the whole row of
    # scores, then softmax). With it on (the default, auto, on the CPU) and run's f16 KV cache,
    # llama.cpp's CPU kernel keeps the sum over V in f16, rounding at every position: not the
    # same arithmetic, so equal greedy text would be chance, not a property.
    native, llama = run_localmix(*args, "--engine", "native"), run_localmix(*args, "--flash-attn", "off")
    assert native.returncode == 0 and llama.returncode == 0, native.stderr + llama.stderr
    assert native.stdout == llama.stdout and native.stdout.strip() and native.stderr == ""
    bad = run_localmix(*args, "--engine", "gpt")
    assert bad.returncode == 2 and "unknown engine" in bad.stderr and "Traceback" not in bad.stderr


def test_experts_command(converted):
    model = converted("mixtral", "Q8_0")
    r = run_localmix("experts", model, "--json", input="The router picks two experts.")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["n_layer"] == 2 and out["n_expert"] == 8 and len(out["tokens"]) == out["n_tokens"] > 3
    assert all(sum(row) == 2 * out["n_tokens"] for row in out["counts"])  # two experts per token and layer
    table = run_localmix("experts", model, "The router picks two experts.")
    assert table.returncode == 0 and "E7" in table.stdout and "tokens" in table.stdout
    dense = run_localmix("experts", converted("mistral", "Q8_0"), "hello")
    assert dense.returncode == 2 and "dense" in dense.stderr and "Traceback" not in dense.stderr


def test_imatrix_command_writes_what_quantize_reads(converted, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(" ".join(f"Sentence {i} about experts, routers and tokens." for i in range(120)))
    out = tmp_path / "imatrix.gguf"
    r = run_localmix("imatrix", converted("mixtral", "F32"), "--text", text, "-o", out, "--ctx", "128")
    assert r.returncode == 0, r.stderr
    names = {t.name for t in GGUFReader(out).tensors}
    assert "blk.0.ffn_up_exps.weight.in_sum2" in names and "blk.1.attn_q.weight.counts" in names
    q = run_localmix("quantize", converted("mixtral", "F32"), tmp_path / "q.gguf", "--type", "Q3_K_M", "--imatrix", out)
    assert q.returncode == 0, q.stderr
    again = run_localmix("imatrix", converted("mixtral", "F32"), "--text", text, "-o", out)
    assert again.returncode == 2 and "already exists" in again.stderr
    short = run_localmix("imatrix", converted("mixtral", "F32"), "--text", text, "-o", tmp_path / "x.gguf", "--ctx", "100000")
    assert short.returncode == 2 and "fewer than one chunk" in short.stderr and not (tmp_path / "x.gguf").exists()
    assert not list(tmp_path.glob(".*partial"))
