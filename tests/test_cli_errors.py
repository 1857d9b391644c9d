"""Every way a user can hand `localmix quantize` bad input or a bad place to write gets one
clear line on stderr, a non-zero exit code, no traceback, and no file at OUT (nor a stray
temporary file beside it)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_localmix

from localmix.fixtures.tiny import make_tiny_checkpoint


@pytest.fixture
def ckpt(tmp_path, tiny_mixtral):
    """A private copy of the tiny checkpoint that a test may break."""
    return Path(shutil.copytree(tiny_mixtral, tmp_path / "ckpt"))


def assert_clean_failure(r, out: Path, code: int, *words: str):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert r.stdout == ""
    if not out.parent.exists():
        return
    assert not out.exists() or out.read_bytes().startswith(b"old"), "a file was left at OUT"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def test_missing_shard(ckpt, tmp_path):
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "model-00002-of-00003.safetensors", "missing")


def test_truncated_shard(ckpt, tmp_path):
    shard = ckpt / "model-00003-of-00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "model-00003-of-00003.safetensors", "truncated")


def test_garbage_safetensors_header(ckpt, tmp_path):
    shard = ckpt / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00garbage, not a JSON header!!!!!"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "model-00001-of-00003.safetensors", "corrupt")


def test_unsupported_architecture(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "Qwen2ForCausalLM",
                         "MixtralForCausalLM", "MistralForCausalLM")


def test_config_is_not_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{ this is not json")
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "config.json", "not valid JSON")


def test_source_is_not_a_checkpoint(tmp_path):
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", tmp_path / "nowhere", out), out, 2, "nowhere")


def test_no_tokenizer(ckpt, tmp_path):
    (ckpt / "tokenizer.model").unlink()
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "tokenizer.model")


def test_unknown_type(ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", ckpt, out, "--type", "Q9_X"), out, 2, "Q9_X", "Q8_0")


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old contents")
    assert_clean_failure(run_localmix("quantize", ckpt, out), out, 2, "already exists", "--force")
    assert out.read_bytes() == b"old contents"
    r = run_localmix("quantize", ckpt, out, "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def _unwritable_dir(tmp_path) -> Path:
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o555)
        return d
    for candidate in ("/sys", "/proc/sys"):  # root writes anywhere else
        try:
            Path(candidate, ".localmix-probe").write_bytes(b"")
        except OSError:
            return Path(candidate)
    pytest.skip("no directory is read-only for root here")


def test_output_directory_not_writable(ckpt, tmp_path):
    out = _unwritable_dir(tmp_path) / "out.gguf"
    r = run_localmix("quantize", ckpt, out)
    assert_clean_failure(r, out, 1, str(out))


def test_disk_full_mid_write(ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    limit = 8 << 20  # the F32 file is ~90 MiB: the write fails part-way

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run_localmix("quantize", ckpt, out, "--type", "F32", preexec_fn=small_disk)
    assert_clean_failure(r, out, 1, "cannot write", str(out))


@pytest.mark.parametrize("sig,code,words", [(signal.SIGINT, 130, ["interrupted"]), (signal.SIGTERM, 143, ["terminated"])],
                         ids=["ctrl-c", "sigterm"])
def test_signal_mid_write(tmp_path, sig, code, words):
    """Ctrl-C or a `kill` while the data streams out: exit 130 or 143, nothing at OUT, the
    partial file removed."""
    src = make_tiny_checkpoint(tmp_path / "bigger", hidden_size=1024, intermediate_size=2048,
                               num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4)
    out = tmp_path / "out.gguf"
    # As at a terminal: SIGINT is not ignored (a background job's children inherit SIG_IGN).
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "quantize", str(src), str(out), "--type", "F32"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until tensor data is being written
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.gguf.")]
        if partial and partial[0].stat().st_size > (8 << 20):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.002)
    else:
        pytest.fail("the conversion never started writing")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert_clean_failure(r, out, code, *words)


def test_nan_weight_names_the_tensor(tmp_path):
    """A NaN in a weight is a clear error naming the tensor, never a silent file."""
    from safetensors import safe_open

    src = make_tiny_checkpoint(tmp_path / "nan")
    shard = src / "model-00002-of-00003.safetensors"
    with safe_open(str(shard), framework="numpy") as f:
        name = sorted(k for k in f.keys() if "experts.3.w2" in k and "layers.1" in k)[0]
    from gguf.utility import SafetensorsLocal
    t = SafetensorsLocal(shard).tensors[name]
    data = bytearray(shard.read_bytes())
    data[t.data_range.offset + 100: t.data_range.offset + 102] = b"\xc0\x7f"  # bf16 NaN
    shard.write_bytes(bytes(data))
    out = tmp_path / "out.gguf"
    assert_clean_failure(run_localmix("quantize", src, out, "--type", "Q8_0"), out, 2, "blk.1.ffn_down_exps.weight", "NaN")


def _legacy_imatrix(entries: dict[str, list[float]]) -> bytes:
    """llama-imatrix's legacy .dat: entry count; per entry name length, name, ncall 1, values."""
    import struct

    out = struct.pack("<i", len(entries))
    for name, values in entries.items():
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 1, len(values))
        out += struct.pack(f"<{len(values)}f", *values)
    return out


@pytest.mark.parametrize("content,words", [
    (b"", ["truncated or is not an imatrix file"]),
    (b"not an imatrix at all, just text", ["is not an imatrix file"]),
    (b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40, ["imatrix.dat is truncated/corrupt", "re-download it"]),
    (_legacy_imatrix({"blk.0.attn_k.weight": [1.0, float("nan")]}), ["non-finite", "blk.0.attn_k.weight"]),
    (_legacy_imatrix({"blk.0.attn_q.weight": [1.0, 2.0, 3.0]}), ["blk.0.attn_q.weight", "another model"]),
], ids=["empty", "text", "garbled-gguf", "nan", "another-model"])
def test_bad_imatrix(ckpt, tmp_path, content, words):
    imatrix = tmp_path / "imatrix.dat"
    imatrix.write_bytes(content)
    out = tmp_path / "out.gguf"
    r = run_localmix("quantize", ckpt, out, "--type", "Q4_K_M", "--imatrix", imatrix)
    assert_clean_failure(r, out, 2, *words)


def test_missing_imatrix(ckpt, tmp_path):
    out = tmp_path / "out.gguf"
    r = run_localmix("quantize", ckpt, out, "--type", "Q4_K_M", "--imatrix", tmp_path / "nowhere.dat")
    assert_clean_failure(r, out, 2, "nowhere.dat", "not found")
