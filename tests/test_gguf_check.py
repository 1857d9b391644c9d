"""`check_gguf` turns every broken file into one clean line; the memory estimate adds up."""

import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from localmix.errors import InputError
from localmix.gguf.check import check_gguf
from localmix.gguf.info import describe
from localmix.gguf.read import open_gguf
from localmix.runtime.memory import available_memory, check_fits, estimate_memory, largest_fitting_ctx


@pytest.fixture(scope="module")
def model(converted) -> Path:
    return converted("mixtral", "Q8_0")


@pytest.fixture(scope="module")
def raw(model) -> bytes:
    return model.read_bytes()


@pytest.fixture(scope="module")
def reader(model) -> gguf.GGUFReader:
    return gguf.GGUFReader(model)


@pytest.fixture(scope="module")
def summary(model):
    return check_gguf(model)


def rejected(path: Path, *words: str) -> str:
    """check_gguf(path) raises InputError (any other exception fails the test), in one line with `words`."""
    with pytest.raises(InputError) as e:
        check_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for w in words:
        assert w in msg, msg
    return msg


def part_offset(field, i: int) -> int:
    """Where part `i` of a field (a tensor-info or metadata entry) lies in the file."""
    return field.offset + sum(int(p.nbytes) for p in field.parts[:i])


def write(path: Path, data: bytes | bytearray) -> Path:
    path.write_bytes(data)
    return path


# --- a valid file --------------------------------------------------------------------------

def test_a_valid_file_passes_with_the_numbers_of_the_reference_reader(model, reader, summary):
    info = describe(model)  # what `localmix info --json` prints
    s = summary
    assert (s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.head_dim_v) == (2, 256, 8, 2, 32, 32)
    assert (s.n_expert, s.n_expert_used, s.n_ff, s.n_vocab, s.context_length) == (8, 2, 512, 32000, 32768)
    assert s.architecture == info["architecture"] == "llama" and s.version == info["gguf_version"] == 3
    assert s.n_tensors == len(reader.tensors) == info["n_tensors"] == 23
    assert s.file_size == info["bytes"]["total"] == model.stat().st_size
    assert s.tensor_bytes == info["bytes"]["experts"] + info["bytes"]["other"]
    assert (s.data_offset, s.alignment) == (reader.data_offset, reader.alignment)
    assert [(t.name, t.type, t.n_bytes, t.offset) for t in s.tensors] == \
           [(t.name, t.tensor_type.name, int(t.n_bytes), int(t.data_offset)) for t in reader.tensors]
    h = info["hyperparameters"]
    assert (s.n_layer, s.n_embd, s.n_head, s.n_head_kv) == (h["block_count"], h["embedding_length"],
                                                             h["attention.head_count"], h["attention.head_count_kv"])


def test_the_check_needs_only_the_header_and_tensor_table(model, summary, tmp_path):
    # The summary keeps no view of the memory map, and a file whose data section is all holes
    # (a sparse copy: same size, tensor bytes never written) checks the same.
    assert not any(isinstance(v, np.ndarray) for v in vars(summary).values())
    sparse = tmp_path / "sparse.gguf"
    with open(model, "rb") as src, open(sparse, "wb") as dst:
        dst.write(src.read(summary.data_offset))
        dst.truncate(summary.file_size)
    assert check_gguf(sparse).tensors == summary.tensors


# --- truncated files -----------------------------------------------------------------------

CUTS = {  # name -> where to cut, from the reference reader's layout
    "magic": lambda r, n: 2,
    "version": lambda r, n: 6,
    "tensor and key counts": lambda r, n: 20,
    "a metadata key": lambda r, n: r.fields["general.architecture"].offset + 10,
    "a metadata number": lambda r, n: r.fields["llama.block_count"].offset + 30,
    "the token list": lambda r, n: r.fields["tokenizer.ggml.tokens"].offset + 100_000,
    "the token scores": lambda r, n: r.fields["tokenizer.ggml.scores"].offset + 1001,
    "the tensor table": lambda r, n: r.tensors[11].field.offset + 20,
    "the first tensor's data": lambda r, n: r.data_offset + r.tensors[0].n_bytes // 2,
    "the middle": lambda r, n: n // 2,
    "one byte short of the end": lambda r, n: n - 1,
}


@pytest.mark.parametrize("where", CUTS)
def test_a_truncated_file_is_one_clean_line(where, raw, reader, tmp_path):
    cut = CUTS[where](reader, len(raw))
    path = write(tmp_path / "cut.gguf", raw[:cut])
    if cut < 4:
        rejected(path, "not a GGUF file")
    else:
        rejected(path, "is truncated/corrupt: ", "; re-download it")


def test_a_cut_in_the_data_names_the_missing_tensors(raw, reader, tmp_path):
    last = reader.tensors[-1]
    msg = rejected(write(tmp_path / "cut.gguf", raw[:last.data_offset + 1]), "truncated")
    assert f"it has {last.data_offset + 1:,} bytes but its tensors need {len(raw):,}" in msg
    assert f"1 of 23 tensors are cut off or missing, from {last.name}" in msg


def small_gguf(path: Path) -> Path:
    """A 2 KB GGUF with every kind of metadata value and three tensor types."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_rope_freq_base(1e4)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_token_list(["<unk>", "<s>", "</s>", "a"])
    w.add_token_scores([0.0, 0.0, 0.0, -1.0])
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float16))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_every_cut_of_a_small_file_is_one_clean_line(tmp_path):
    src = small_gguf(tmp_path / "small.gguf")
    assert len(open_gguf(src).tensors) == 3  # a valid layout (it is no model llama.cpp could run: gguf.meaning)
    raw, data_offset = src.read_bytes(), int(open_gguf(src).data_offset)
    cut = tmp_path / "cut.gguf"
    for n in [*range(1, data_offset + 1), *range(data_offset + 1, len(raw), 97), len(raw) - 1]:
        rejected(write(cut, raw[:n]), "not a GGUF file" if n < 4 else "is truncated/corrupt: ")


# --- not GGUF at all -----------------------------------------------------------------------

@pytest.mark.parametrize("content, words", [
    (b"", ["is empty"]),
    (b"hello, this is a text file\n", ["not a GGUF file", "b'hell'"]),
    (np.random.default_rng(0).bytes(4096), ["not a GGUF file"]),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 26000000000\n", ["Git LFS pointer"]),
    (b"<!DOCTYPE html><html><body>Access denied</body></html>", ["web page"]),
])
def test_a_file_that_is_not_gguf_is_one_clean_line(content, words, tmp_path):
    rejected(write(tmp_path / "model.gguf", content), *words)


def test_garbage_after_a_valid_header_start_is_one_clean_line(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(50):
        head = b"GGUF" + (3).to_bytes(4, "little")
        counts = rng.integers(0, 40, 2).astype("<u8").tobytes() if i % 2 else rng.bytes(16)
        rejected(write(tmp_path / "g.gguf", head + counts + rng.bytes(2000)), "is truncated/corrupt: ")


def test_a_directory_or_a_missing_path_is_one_clean_line(tmp_path):
    rejected(tmp_path, "is a directory")
    rejected(tmp_path / "nope.gguf", "not found")


# --- corrupt files -------------------------------------------------------------------------

def patched(raw: bytes, at: int, value: int, dtype: str) -> bytearray:
    b = bytearray(raw)
    v = np.array([value], dtype).tobytes()
    b[at:at + len(v)] = v
    return b


def test_a_tensor_offset_pointing_past_the_end_is_caught(raw, reader, tmp_path):
    last = reader.tensors[-1]
    at = part_offset(last.field, 5)   # parts: name length, name, n_dims, dims, type, offset
    path = write(tmp_path / "bad.gguf", patched(raw, at, len(raw), "<u8"))
    rejected(path, "is truncated/corrupt: ", f"tensor {last.name} has data offset {len(raw):,}")


def test_a_tensor_offset_moved_inside_the_file_is_caught(raw, reader, tmp_path):
    # llama.cpp wants the tensors back to back; a shifted offset would read the wrong bytes.
    t = reader.tensors[5]
    at = part_offset(t.field, 5)
    offset = t.data_offset - reader.data_offset
    rejected(write(tmp_path / "bad.gguf", patched(raw, at, offset + 32, "<u8")),
             f"tensor {t.name} has data offset {offset + 32:,}, but the tensors before it end at {offset:,}")


def test_an_unknown_tensor_type_is_caught(raw, reader, tmp_path):
    t = reader.tensors[3]
    path = write(tmp_path / "bad.gguf", patched(raw, part_offset(t.field, 4), 4, "<u4"))  # Q4_2, long removed
    rejected(path, "is truncated/corrupt: ", f"tensor {t.name} has unknown type 4")


def test_a_huge_array_length_fails_fast(raw, reader, tmp_path):
    # The stock reader would read 2**60 scores one by one; how fast the check fails is a
    # figure of benchmarks/bench_check.py, not a test.
    at = part_offset(reader.fields["tokenizer.ggml.scores"], 4)   # key length, key, type, item type, length
    path = write(tmp_path / "bad.gguf", patched(raw, at, 2**60, "<u8"))
    rejected(path, "the metadata runs past the end of the file")


@pytest.mark.parametrize("version, words", [
    (1, ["GGUF version 1 file", "no longer"]),
    (7, ["is truncated/corrupt: unknown GGUF version 7"]),
    (3 << 24, ["other byte order"]),
])
def test_a_version_llama_cpp_cannot_read_is_caught(version, words, raw, tmp_path):
    rejected(write(tmp_path / "v.gguf", patched(raw[:4096], 4, version, "<u4")), *words)


# --- memory --------------------------------------------------------------------------------

def test_kv_cache_bytes_are_exact(summary):
    # 2 (K and V) x 2 layers x n_ctx x 2 KV heads x 32 dims x 2 bytes (f16); llama.cpp reports
    # "CPU KV buffer size = 0.25 MiB" at 512 and 2.00 MiB at 4096 for this model.
    assert estimate_memory(summary, 512).kv_bytes == 2 * 2 * 512 * 2 * 32 * 2 == 262144
    assert estimate_memory(summary, 4096).kv_bytes == 2 * 2 * 4096 * 2 * 32 * 2 == 2 * 2**20
    assert estimate_memory(summary, 4096, kv_type_bytes=4).kv_bytes == 4 * 2**20


def test_the_estimate_grows_linearly_with_the_context(summary):
    e = {n: estimate_memory(summary, n) for n in (1024, 2048, 4096, 8192, 12288, 16384)}
    assert all(x.weights_bytes == summary.tensor_bytes for x in e.values())
    assert all(x.kv_bytes == e[1024].kv_bytes * n // 1024 for n, x in e.items())
    # past the point where attention scores outgrow the logits, the whole estimate is linear
    totals = [e[n].total_bytes for n in (4096, 8192, 12288, 16384)]
    assert totals[1] - totals[0] == totals[2] - totals[1] == totals[3] - totals[2] > 0


def test_the_compute_allowance_covers_what_llama_cpp_allocates(summary):
    # "CPU compute buffer size" from llama-cpp-python 0.3.36 for this model (n_ubatch 512,
    # flash attention off), in MiB.
    for n_ctx, mib in ((512, 63.502), (4096, 74.760), (16384, 290.760)):
        allowance = estimate_memory(summary, n_ctx).compute_bytes / 2**20
        assert mib <= allowance <= 1.1 * mib, (n_ctx, allowance)
    # with flash attention (--flash-attn auto or on, on the CPU) there are no attention scores:
    # 63.502 MiB at every length
    for n_ctx in (512, 4096, 16384):
        allowance = estimate_memory(summary, n_ctx, flash_attn=True).compute_bytes / 2**20
        assert 63.502 <= allowance <= 1.1 * 63.502, (n_ctx, allowance)


def test_check_fits_suggests_the_largest_context_that_fits(summary):
    available = estimate_memory(summary, 2048).total_bytes + 1000
    want = estimate_memory(summary, 32768)
    with pytest.raises(InputError) as e:
        check_fits(want, available)
    msg = str(e.value)
    assert "\n" not in msg and "--ctx 32768" in msg and "--force" in msg and "smaller quant" in msg
    assert re.search(r"use --ctx (\d+) or less", msg).group(1) == "2048" == str(largest_fitting_ctx(want, available))
    check_fits(want, available, force=True)
    check_fits(estimate_memory(summary, 2048), available)


def test_check_fits_allows_a_small_overshoot_and_suggests_a_quant_when_nothing_fits(summary):
    e = estimate_memory(summary, 4096)
    check_fits(e, int(e.total_bytes / 1.05))
    with pytest.raises(InputError, match="use a smaller quant, or pass --force") as err:
        check_fits(e, summary.tensor_bytes // 2)
    assert "--ctx" not in str(err.value).split("; ")[1]
    check_fits(e, summary.tensor_bytes // 2, force=True)


def test_available_memory_is_a_plausible_number():
    n = available_memory()
    assert isinstance(n, int) and 0 < n <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
