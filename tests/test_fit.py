"""`quantize --fit`: the budget solver against brute force, and the command end to end on the
tiny Mixtral: within the budget, llama.cpp's quantizer writes the same bytes for the same
per-tensor types, a saved mix writes the same file again."""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np
import pytest
from conftest import run_localmix
from gguf import GGML_QUANT_SIZES, GGUFReader
from llama_quantize import llama_model_quantize

from localmix.convert.fit import Curve, candidate_types, solve
from localmix.convert.imatrix import load_imatrix
from localmix.kernels import QType


def _random_curves(rng, n):
    curves = []
    for g in range(n):
        nbytes = np.sort(rng.integers(10, 200, 4)) + np.arange(4)
        loss = np.sort(rng.random(4))[::-1] * rng.random() * 10   # more bytes, less loss
        curves.append(Curve(f"t{g}", [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q6_K], nbytes.tolist(), loss.tolist()))
    return curves


@pytest.mark.parametrize("seed", range(6))
def test_solver_fits_the_budget_and_is_near_the_optimum(seed):
    rng = np.random.default_rng(seed)
    curves = _random_curves(rng, 5)
    lo, hi = sum(min(c.nbytes) for c in curves), sum(max(c.nbytes) for c in curves)
    budget = int(rng.integers(lo, hi))
    mix = solve(curves, budget)
    pick = [c.types.index(mix[c.name]) for c in curves]
    size = sum(c.nbytes[i] for c, i in zip(curves, pick))
    loss = sum(c.loss[i] for c, i in zip(curves, pick))
    best = min(sum(c.loss[i] for c, i in zip(curves, p)) for p in itertools.product(range(4), repeat=5)
               if sum(c.nbytes[i] for c, i in zip(curves, p)) <= budget)
    assert size <= budget
    assert loss <= best * 1.25 + 1e-9  # a Lagrangian and greedy solution: near, not always at, the optimum
    # no single upgrade still fits and saves loss
    for c, i in zip(curves, pick):
        assert not any(c.nbytes[j] - c.nbytes[i] <= budget - size and c.loss[j] < c.loss[i] for j in range(4))


def test_candidates_fit_the_rows():
    assert QType.Q4_K in candidate_types(512) and QType.Q4_K not in candidate_types(576)
    assert all(576 % GGML_QUANT_SIZES[t][0] == 0 for t in candidate_types(576))  # 32-value blocks only
    assert candidate_types(512)[0] == QType.Q2_K and candidate_types(512)[-1] == QType.Q8_0


TEXT = " ".join(["a small model reads this text to measure how much each of its tensors minds being rounded"] * 18)


def test_fit_within_budget_llama_cpp_bytes_and_a_saved_mix(converted, tiny_mixtral, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    budget = converted("mixtral", "Q3_K_M").stat().st_size
    out, mix_file = tmp_path / "fit.gguf", tmp_path / "mix.json"
    r = run_localmix("quantize", tiny_mixtral, out, "--fit", str(budget), "--text", text, "--save-mix", mix_file,
                     "--save-imatrix", tmp_path / "im.gguf")
    assert r.returncode == 0, r.stderr
    assert "down" in r.stderr and "token_embd" in r.stderr and "Q8_0" in r.stderr  # the mix, as a table
    size = out.stat().st_size
    types = {name: QType[t] for name, t in json.loads(mix_file.read_text())["types"].items()}
    steps = []
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in GGUFReader(out).tensors}
    from localmix import kernels
    for name in types:
        sizes = sorted(kernels.tensor_nbytes(q, shapes[name]) for q in candidate_types(shapes[name][-1]))
        steps += [b - a for a, b in zip(sizes, sizes[1:])]
    assert size <= budget
    assert budget - size < max(steps), "a larger type still fits somewhere"
    assert len(set(types.values())) > 1

    # llama.cpp's quantizer with the same per-tensor types (its tensor-type overrides) writes the same bytes
    ref = tmp_path / "llama.gguf"
    llama_model_quantize(converted("mixtral", "F32"), ref, "Q4_K_M", tensor_types=types,
                         imatrix=load_imatrix(tmp_path / "im.gguf"))  # the matrix --fit collected and wrote with
    ours = {t.name: t for t in GGUFReader(out).tensors}
    theirs = GGUFReader(ref).tensors
    assert len(theirs) == len(ours)
    for t in theirs:
        assert t.tensor_type == ours[t.name].tensor_type, t.name
        assert bytes(t.data) == bytes(ours[t.name].data), t.name

    # the saved mix writes the same file again, without measuring
    again = tmp_path / "again.gguf"
    r = run_localmix("quantize", tiny_mixtral, again, "--mix", mix_file)
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("case", ["no text", "two budgets", "foreign mix", "budget too small"])
def test_fit_errors_are_one_line(case, tiny_mixtral, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    args = {"no text": ("--fit", "20MiB"),
            "two budgets": ("--fit", "20MiB", "--fit-bpw", "4", "--text", text),
            "foreign mix": ("--mix", tmp_path / "m.json"),
            "budget too small": ("--fit", "1MiB", "--text", text)}[case]
    (tmp_path / "m.json").write_text(json.dumps({"types": {"blk.0.attn_q.weight": "Q4_K"}}))
    r = run_localmix("quantize", tiny_mixtral, tmp_path / "out.gguf", *args)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("localmix: error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.gguf").exists()


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_DONTNEED) is Linux's")
def test_the_sensitivity_pass_gives_back_the_pages_it_read(converted):
    """What keeps --fit's resident set small on a file larger than memory should hold: release()
    takes a mapped tensor's pages out of the process's resident set, the view then reads the same
    values (from the page cache), and an array that is not a view of the mapping is left alone."""
    from localmix.native.weights import load_weights, release

    w = load_weights(converted("mixtral", "F32"))
    t = w.token_embd.data  # 32000 x 256 float32: 31 MiB of the mapping
    before = _rss_file()
    total = float(t.sum(dtype=np.float64))
    touched = _rss_file()
    assert touched - before > 24 << 20
    release(w, t)
    assert _rss_file() < touched - (24 << 20)
    assert float(t.sum(dtype=np.float64)) == total
    copy = np.array(t[:1000])
    release(w, copy)
    assert np.array_equal(copy, t[:1000]) and copy.any()
