"""No GGUF file crashes localmix: mutated copies of a small valid file, through the checker and
the real CLI.

Each class of file that once got past `check_gguf` and then killed `localmix run` (SIGABRT),
printed a traceback, or was never checked by `info`, is built here and run through `run`,
`info` and `plan`: a clean result, or one clean line naming the key with exit code 2. Then a
seeded, bounded fuzz (localmix.fixtures.mutate) runs thousands of mutants through the checker
in-process and a sample of those that pass through the CLI in subprocesses. The longer run is
`benchmarks/fuzz_gguf.py`.
"""

from __future__ import annotations

import io
import random
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import run_localmix

from localmix.fixtures.mutate import KV, Layout, Mutant, Mutator, T, check_mutants
from localmix.fixtures.tiny import MIXTRAL_CHAT_TEMPLATE
from localmix.frontends.cli import main
from localmix.gguf.check import check_gguf
from localmix.gguf.info import describe
from localmix.gguf.read import HEADER_CAP
from localmix.gguf.scan import first_invalid_utf8, string_spans
from localmix.runtime.llama import LlamaCppEngine


@pytest.fixture(scope="module")
def source(converted):
    return converted("mixtral", "Q8_0")


@pytest.fixture(scope="module")
def layout(source) -> Layout:
    """The tiny Mixtral with its vocabulary cut to 512 tokens: a 14 KB header, fast to fuzz."""
    return Layout.of(source).with_vocab(512)


@pytest.fixture(scope="module")
def mutator(layout) -> Mutator:
    return Mutator(layout, seed=0)


def cli(*argv: str, capsys) -> tuple[int, str]:
    """`localmix ARGV` in this process, standard input empty: (exit code, stderr)."""
    stdin, sys.stdin = sys.stdin, io.StringIO("")
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    finally:
        sys.stdin = stdin
    return code, capsys.readouterr().err


def one_clean_line(code: int, err: str, *words: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


def test_the_base_file_passes_and_runs(layout, source, tmp_path, capsys):
    path = Mutant("base", layout.encode(), layout).write(tmp_path / "base.gguf", source)
    assert check_gguf(path).n_vocab == 512
    code, err = cli("info", path, "--json", capsys=capsys)
    assert code == 0 and not err


# --- each class, through run, info and plan ------------------------------------------------

def _set_token(m: Mutator, i: int, text: bytes) -> Mutant:
    return m._set_tokens("token", {i: text})


REFUSED = {  # name -> (make the mutant, words the one line must hold)
    "template that does not compile": (
        lambda m: m._set("t", KV(b"tokenizer.chat_template", T.STRING, b"{% for m in messages %}{{ m.content }}")),
        ["tokenizer.chat_template does not compile"]),
    "template with an unknown filter": (
        lambda m: m._set("t", KV(b"tokenizer.chat_template", T.STRING, b"{{ messages | no_such_filter }}")),
        ["tokenizer.chat_template does not compile", "no_such_filter"]),
    "template stored as an integer": (
        lambda m: m._set("t", KV(b"tokenizer.chat_template", T.UINT32, 7)),
        ["tokenizer.chat_template is uint32"]),
    "template not UTF-8": (
        lambda m: m._set("t", KV(b"tokenizer.chat_template", T.STRING, b"{{ bos_token }}\xc3(")),
        ["tokenizer.chat_template is not valid UTF-8"]),
    "two tokens with one text": (
        lambda m: _set_token(m, 300, m._tokens()[301]), ["tokens 300 and 301 have the same text"]),
    "a token equal to another up to a NUL": (
        lambda m: _set_token(m, 300, m._tokens()[301] + b"\0tail"), ["tokens 300 and 301 have the same text"]),
    "a token not UTF-8": (
        lambda m: _set_token(m, 300, b"\xe2\x96"), ["token 300", "not valid UTF-8"]),
    "alignment 16": (
        lambda m: m._with("a", [*m.layout.kvs, KV(b"general.alignment", T.UINT32, 16)], alignment=16),
        ["general.alignment is 16"]),
    "more experts used than there are": (
        lambda m: m._set("e", KV(b"llama.expert_used_count", T.UINT32, 9)), ["llama.expert_used_count is 9"]),
    "experts used as a per-layer array (llama.cpp reads one number and aborts)": (
        lambda m: m._set("u", KV(b"llama.expert_used_count", T.ARRAY, [2, 2], T.UINT32)),
        ["llama.expert_used_count is an array of uint32"]),
    "a SentencePiece byte token missing (llama.cpp's byte fallback aborts)": (
        lambda m: _set_token(m, 3 + 0x41, b"<0x4A1>"), ["no byte token <0x41>"]),
    "scores shorter than the tokens": (
        lambda m: m._set("s", KV(b"tokenizer.ggml.scores", T.ARRAY, np.zeros(256, np.float32), T.FLOAT32)),
        ["tokenizer.ggml.scores has 256 scores for 512 tokens"]),
    "a norm that is not F32": (
        lambda m: m._with("n", tensors=[replace(t, type=1, n_bytes=t.n_bytes // 2) if t.name == b"output_norm.weight"
                                        else t for t in m.layout.tensors]),
        ["tensor output_norm.weight is F16"]),
    "a tensor shape against the hyper-parameters": (
        lambda m: m._set("f", KV(b"llama.feed_forward_length", T.UINT32, 256)),
        ["tensor blk.0.ffn_gate_exps.weight has shape"]),
}


@pytest.mark.parametrize("case", REFUSED)
def test_a_file_wrong_in_meaning_is_one_line_from_run_info_and_plan(case, mutator, source, tmp_path, capsys):
    make, words = REFUSED[case]
    path = make(mutator).write(tmp_path / "m.gguf", source)
    for argv in (["run", path, "hi"], ["info", path], ["plan", path, "--ctx", "64"]):
        one_clean_line(*cli(*argv, capsys=capsys), "cannot be loaded", *words)


def test_a_header_claiming_more_than_the_cap_is_refused(layout, tmp_path, capsys):
    big = Layout(layout.version, (*layout.kvs, KV(b"x.claim", T.ARRAY, [], T.UINT8)), layout.tensors, layout.alignment)
    header = bytearray(big.encode())
    at = header.index(b"x.claim") + len(b"x.claim") + 8  # after the key: value type, item type, then the count
    header[at:at + 8] = np.uint64(HEADER_CAP + 1).tobytes()
    path = tmp_path / "claim.gguf"
    with open(path, "wb") as f:   # sparse: big enough to hold what the header claims
        f.write(header)
        f.truncate(HEADER_CAP + 2**20)
    one_clean_line(*cli("info", path, capsys=capsys), "truncated/corrupt", "more than 256 MiB")


def test_a_valid_file_with_a_large_metadata_array_is_described(layout, tmp_path, capsys):
    """8 MiB of array (the stock reader took 39 s on it) and 2**20 strings: read in bulk."""
    strings = KV(b"x.strings", T.ARRAY, [b"ab"] * 2**20, T.STRING)
    numbers = KV(b"x.numbers", T.ARRAY, np.arange(2**21, dtype=np.int32), T.INT32)
    big = Layout(layout.version, (*layout.kvs, numbers, strings), layout.tensors, layout.alignment)
    path = Mutant("big", big.encode(), big).write(tmp_path / "big.gguf")
    assert check_gguf(path).n_vocab == 512
    code, err = cli("info", path, capsys=capsys)
    assert code == 0 and not err


def test_a_name_that_is_not_utf8_is_shown_with_replacement_characters(mutator, source, tmp_path, capsys):
    path = mutator._set("n", KV(b"general.name", T.STRING, b"Tiny \xff Mixtral")).write(tmp_path / "n.gguf", source)
    for argv in (["info", path, "--json"], ["plan", path, "--ctx", "64", "--json"]):
        code, err = cli(*argv, capsys=capsys)
        assert code == 0 and not err
    assert "Tiny \ufffd Mixtral" in describe(path)["name"]
    r = run_localmix("run", path, "-n", "2", "--ctx", "64", "hi")  # llama.cpp loads it: in a subprocess, where an abort shows
    assert r.returncode == 0 and not r.stderr, r.stderr
    engine = LlamaCppEngine(path, n_ctx=64)  # llama-cpp-python reads no metadata at all from such a file
    assert engine.metadata["tokenizer.chat_template"] == MIXTRAL_CHAT_TEMPLATE


# --- the fuzz ------------------------------------------------------------------------------

def test_the_utf8_scan_agrees_with_python():
    rng = random.Random(0)
    pieces = [bytes(rng.choice([0x41, 0x80, 0xBF, 0xC2, 0xE0, 0xED, 0xF0, 0xF4, 0xF5, 0xFF, rng.randrange(256)])
                    for _ in range(rng.randrange(1, 6))) for _ in range(4000)]
    pieces += ["héllo ▁wörld 🦙".encode(), "\ud7ff\ue000\U0010ffff".encode()]
    buf = np.frombuffer(b"".join(len(p).to_bytes(8, "little") + p for p in pieces), np.uint8)
    starts, lengths, end = string_spans(buf, 0, len(pieces), buf.size)
    assert end == buf.size
    for i, p in enumerate(pieces):
        try:
            p.decode("utf-8")
            ok = True
        except UnicodeDecodeError:
            ok = False
        assert (first_invalid_utf8(buf, starts[i:i + 1], lengths[i:i + 1]) == -1) == ok, p


def test_thousands_of_mutants_get_a_clean_line_or_pass(layout, tmp_path):
    run = check_mutants(layout, tmp_path / "m.gguf", cases=2000, seconds=20, seed=1)
    assert run.unexpected == []
    assert run.cases >= 500 and run.refused > run.cases // 2 and run.n_passed > 0


def test_mutants_that_pass_the_checker_run_cleanly_through_the_cli(layout, source, tmp_path):
    run = check_mutants(layout, tmp_path / "m.gguf", cases=400, seed=2, keep=400)
    assert run.unexpected == []
    for i, m in enumerate(random.Random(2).sample(run.passed, 2)):
        path = m.write(tmp_path / f"pass-{i}.gguf", source)
        for argv in (["run", path, "-n", "2", "--ctx", "64", "--temperature", "0", "hi"], ["info", path])[: 2 - i % 2]:
            r = run_localmix(*argv)
            assert r.returncode in (0, 2), (m.name, r.returncode, r.stderr)
            assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 1, (m.name, r.stderr)
