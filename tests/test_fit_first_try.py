"""`quantize --fit` as a first try meets it: no --imatrix (the importance matrix is collected
from the calibration text and the file written with it, i-quants included, byte for byte as
llama.cpp's quantizer writes it with that matrix), a budget below the smallest file refused at
once, and a checkpoint folder measured in place (no converted copy beside OUT)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_localmix
from gguf import GGUFReader
from llama_quantize import llama_model_quantize

from localmix.convert.checkpoint import Checkpoint
from localmix.convert.imatrix import load_imatrix
from localmix.errors import InputError
from localmix.kernels import QType

TEXT = " ".join(["a small model reads this text to measure how much each of its tensors minds being rounded"] * 18)
BUDGET = 9 << 20  # tight enough on the tiny Mixtral for IQ3_XXS, which llama.cpp quantizes only with an imatrix


def _largest_beside(folder: Path, out: Path) -> int:
    """The largest file or folder in `folder` other than OUT and its partial file (being written)."""
    largest = 0
    for entry in list(folder.iterdir()):
        if entry.name == out.name or (entry.name.startswith(f".{out.name}.") and entry.name.endswith(".partial")):
            continue
        try:
            if entry.is_dir():
                size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            else:
                size = entry.stat().st_size
        except FileNotFoundError:  # removed while we looked
            continue
        largest = max(largest, size)
    return largest


@pytest.fixture(scope="module")
def fitted(tiny_mixtral, tmp_path_factory):
    """`quantize CHECKPOINT OUT --fit 9MiB --text FILE` without --imatrix, run as a user would,
    with the largest temporary file or folder beside OUT sampled while it runs."""
    base = tmp_path_factory.mktemp("fit-first-try")
    beside, kept = base / "out", base / "kept"
    beside.mkdir()
    kept.mkdir()
    text = kept / "cal.txt"
    text.write_text(TEXT)
    out = beside / "fit.gguf"
    args = ["quantize", tiny_mixtral, out, "--fit", str(BUDGET), "--text", text,
            "--save-mix", kept / "mix.json", "--save-imatrix", kept / "im.gguf"]
    proc = subprocess.Popen([sys.executable, "-m", "localmix", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0]

    def sample():
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            peak[0] = max(peak[0], _largest_beside(beside, out))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        _, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        sampler.join()
    assert proc.returncode == 0, stderr
    return {"out": out, "beside": beside, "kept": kept, "stderr": stderr, "peak": peak[0]}


def test_without_imatrix_the_file_fits_and_holds_i_quants(fitted):
    size = fitted["out"].stat().st_size
    types = json.loads((fitted["kept"] / "mix.json").read_text())["types"]
    assert size <= BUDGET
    assert "IQ3_XXS" in types.values()  # the type that needs an importance matrix
    assert "importance matrix" not in fitted["stderr"]


def test_llama_cpp_writes_the_same_bytes_with_the_collected_imatrix(fitted, converted, tmp_path):
    """llama_model_quantize from the F32 file, with the mix's per-tensor types and the imatrix
    --fit saved (--save-imatrix), writes every tensor as --fit did."""
    types = {name: QType[t] for name, t in json.loads((fitted["kept"] / "mix.json").read_text())["types"].items()}
    ref = tmp_path / "llama.gguf"
    llama_model_quantize(converted("mixtral", "F32"), ref, "Q4_K_M", imatrix=load_imatrix(fitted["kept"] / "im.gguf"),
                         tensor_types=types)
    ours = {t.name: t for t in GGUFReader(fitted["out"]).tensors}
    theirs = GGUFReader(ref).tensors
    assert len(theirs) == len(ours)
    for t in theirs:
        assert t.tensor_type == ours[t.name].tensor_type, t.name
        assert bytes(t.data) == bytes(ours[t.name].data), t.name


def test_the_collected_imatrix_is_localmix_imatrix_over_the_calibration_windows(fitted, converted):
    """The reference pass's windows are llama-imatrix's chunks (BOS first): the same statistics
    as `localmix imatrix --ctx 128` over the text's first two windows, from the F32 file."""
    from localmix.native.stats import compute_imatrix, importance
    from localmix.runtime.vocab import open_vocab

    f32 = converted("mixtral", "F32")
    tokens = open_vocab(f32).tokenize(TEXT.encode(), add_bos=True, special=False)
    expected = importance(compute_imatrix(f32, tokens[:256], 128))
    got = load_imatrix(fitted["kept"] / "im.gguf")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, err_msg=name)


def test_a_saved_mix_writes_the_same_file_with_its_imatrix(fitted, tiny_mixtral, tmp_path):
    """--save-mix names the imatrix the file was written with; --mix uses it again."""
    assert json.loads((fitted["kept"] / "mix.json").read_text())["imatrix"] == "im.gguf"
    again = tmp_path / "again.gguf"
    r = run_localmix("quantize", tiny_mixtral, again, "--mix", fitted["kept"] / "mix.json")
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == fitted["out"].read_bytes()


def test_from_a_checkpoint_the_temporary_disk_is_under_one_layer(fitted, tiny_mixtral):
    """No converted copy of the weights beside OUT: at most one layer's worth of the checkpoint's
    own BF16 ever, said in one line before the measuring; nothing left behind."""
    ckpt = Checkpoint(tiny_mixtral)
    layer = sum(ckpt.nbytes(n) for n in ckpt.tensors if n.startswith("model.layers.0."))
    assert 0 < fitted["peak"] <= layer, (fitted["peak"], layer)
    lines = [line for line in fitted["stderr"].splitlines() if line.startswith("--fit:")]
    assert len(lines) == 1 and "of temporary files beside OUT" in lines[0] and "about" in lines[0], fitted["stderr"]
    assert [p.name for p in fitted["beside"].iterdir()] == [fitted["out"].name]


def test_measured_in_place_as_from_the_f32_conversion(fitted, converted, tmp_path):
    """The checkpoint's own BF16 weights, mapped, measure what its F32 GGUF measures: the same
    mix, the same importance matrix, the same file."""
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    out = tmp_path / "from-f32.gguf"
    r = run_localmix("quantize", converted("mixtral", "F32"), out, "--fit", str(BUDGET), "--text", text,
                     "--save-imatrix", tmp_path / "im.gguf")
    assert r.returncode == 0, r.stderr
    assert "no temporary files" in r.stderr  # a GGUF is read as it is, the imatrix kept where asked
    assert (tmp_path / "im.gguf").read_bytes() == (fitted["kept"] / "im.gguf").read_bytes()
    assert out.read_bytes() == fitted["out"].read_bytes()


def test_a_budget_below_the_smallest_file_is_refused_at_once(tiny_mixtral, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    started = time.monotonic()
    r = run_localmix("quantize", tiny_mixtral, out_dir / "x.gguf", "--fit", "1KiB", "--text", text)
    elapsed = time.monotonic() - started
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localmix: error:"), r.stderr
    assert "smallest file this model makes: 7.91 MiB" in lines[0], r.stderr
    assert elapsed < 8, elapsed  # the command's start included, on a loaded 2-core machine
    assert list(out_dir.iterdir()) == []


def test_a_disk_without_room_is_refused_before_measuring(tiny_mixtral, tmp_path, monkeypatch):
    import shutil

    from localmix.frontends import fit

    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    monkeypatch.setattr(fit.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(InputError, match=r"--fit needs about .* free in .*; 1.00 MiB are free"):
        fit.fit_quantize(tiny_mixtral, tmp_path / "x.gguf", fit.Budget(size="12MiB"), text)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.txt"]


def test_importance_is_what_llama_cpp_reads_from_the_saved_file(tmp_path):
    """stats.importance, which the pass quantizes its candidates with, is load_imatrix of the
    file the pass saves, to the bit (an expert no token reached reads as 1s)."""
    from localmix.native.stats import importance, write_imatrix

    rng = np.random.default_rng(0)
    counts = {"blk.0.ffn_up_exps.weight": np.array([3, 0, 250], np.float32), "blk.0.attn_q.weight": np.array([7.0], np.float32)}
    sums = {name: (rng.random((len(c), 64)) * 100).astype(np.float32) for name, c in counts.items()}
    data = {"sums": sums, "counts": counts, "chunk_count": 2, "chunk_size": 128}
    write_imatrix(tmp_path / "im.gguf", data)
    loaded = load_imatrix(tmp_path / "im.gguf")
    ours = importance(data)
    assert loaded.keys() == ours.keys()
    for name in ours:
        assert np.array_equal(loaded[name], ours[name]), name
    assert (ours["blk.0.ffn_up_exps.weight"][64:128] == 1).all()


@pytest.mark.parametrize("model", ["mixtral", "mistral"])
def test_checkpoint_weights_are_the_f32_conversions_values(model, tiny_mixtral, tiny_mistral, converted):
    """Every tensor of the mapped checkpoint (Q/K rows reordered, norms and router in float32,
    experts one view each) holds the values the converter's F32 file holds."""
    from localmix.convert.sources import open_source
    from localmix.kernels.matmul import dequantize_rows
    from localmix.native.weights import checkpoint_weights, load_weights

    ours = checkpoint_weights(open_source(tiny_mixtral if model == "mixtral" else tiny_mistral))
    theirs = {t.name: t for t in load_weights(converted(model, "F32")).tensors()}
    names = [t.name for t in ours.tensors()]
    assert sorted(set(names)) == sorted(theirs)
    for t in ours.tensors():
        ref = theirs[t.name]
        assert t.shape == ref.shape, t.name
        for e in range(t.shape[0]) if len(t.shape) == 3 else [None]:
            a = t.data if e is None else t.data[e]
            got = np.asarray(a, np.float32) if t.qtype == QType.F32 else dequantize_rows(a, t.qtype)
            want = np.asarray(ref.data if e is None else ref.data[e], np.float32)
            assert np.array_equal(got.reshape(want.shape), want), (t.name, e)
