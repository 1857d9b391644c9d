"""Importance matrices in both of llama.cpp's formats, read as its quantizer reads them."""

import struct

import numpy as np
import pytest

from localmix.convert.imatrix import load_imatrix, save_imatrix, tensor_importance
from localmix.errors import InputError


def write_legacy(path, entries, chunk_count=None, dataset=None):
    """llama-imatrix's legacy .dat: per entry name, ncall, and sums (mean * ncall)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (ncall, sums) in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(sums)))
            f.write(np.asarray(sums, dtype=np.float32).tobytes())
        if chunk_count is not None:
            f.write(struct.pack("<i", chunk_count) + struct.pack("<i", len(dataset)) + dataset.encode())


def write_llama_gguf(path, entries):
    """llama.cpp's GGUF imatrix (tools/imatrix, save_imatrix), written with gguf-py alone:
    NAME.in_sum2 F32 of ggml shape [n_per_row, n_mat], NAME.counts F32 [1, n_mat]."""
    import gguf

    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["wiki.txt"])
    w.add_uint32("imatrix.chunk_count", 10)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in sorted(entries.items()):
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(counts, dtype=np.float32).reshape(-1, 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_format_per_expert(tmp_path):
    path = tmp_path / "imatrix.gguf"
    write_llama_gguf(path, {
        "blk.0.ffn_down_exps.weight": ([[2, 4, 6], [3, 6, 9], [5, 5, 5]], [2, 3, 0]),  # expert 2 saw no token
        "blk.0.attn_q.weight": ([[2.0, 4.0, 6.0, 8.0]], [2])})
    im = load_imatrix(path)
    assert set(im) == {"blk.0.ffn_down_exps.weight", "blk.0.attn_q.weight"}
    # per expert, the sums over the count; 1s for the expert with none, as llama.cpp's quantizer
    assert im["blk.0.ffn_down_exps.weight"].tolist() == [1, 2, 3, 1, 2, 3, 1, 1, 1]
    assert im["blk.0.attn_q.weight"].tolist() == [1, 2, 3, 4]
    assert tensor_importance(im, "blk.0.ffn_down_exps.weight", (3, 16, 3)).shape == (3, 3)


def test_save_imatrix_writes_llama_cpp_layout(tmp_path):
    """save_imatrix's file, read raw with gguf-py: the keys, shapes and sums llama.cpp writes."""
    from gguf import GGUFReader

    sums = {"blk.0.ffn_down_exps.weight": np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + 1}
    counts = {"blk.0.ffn_down_exps.weight": np.array([1, 2, 0, 4, 5, 6, 7, 8], dtype=np.float32)}
    path = tmp_path / "imatrix.gguf"
    save_imatrix(path, sums, counts, ["wiki.txt"], 10, 512)
    r = GGUFReader(path)
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["wiki.txt"]
    assert (r.fields["imatrix.chunk_count"].contents(), r.fields["imatrix.chunk_size"].contents()) == (10, 512)
    t = {x.name: x for x in r.tensors}
    assert list(t) == ["blk.0.ffn_down_exps.weight.in_sum2", "blk.0.ffn_down_exps.weight.counts"]
    assert t["blk.0.ffn_down_exps.weight.in_sum2"].shape.tolist() == [4, 8]
    assert t["blk.0.ffn_down_exps.weight.counts"].shape.tolist() == [1, 8]
    assert np.array_equal(np.asarray(t["blk.0.ffn_down_exps.weight.in_sum2"].data), sums["blk.0.ffn_down_exps.weight"])
    assert load_imatrix(path)["blk.0.ffn_down_exps.weight"][8:12].tolist() == [1, 1, 1, 1]


def test_legacy_format(tmp_path):
    path = tmp_path / "imatrix.dat"
    write_legacy(path, {"blk.0.attn_k.weight": (4, [4.0, 8.0]), "output.weight": (0, [3.0, 5.0])}, 10, "wiki.txt")
    im = load_imatrix(path)
    assert np.array_equal(im["blk.0.attn_k.weight"], [1.0, 2.0])
    assert np.array_equal(im["output.weight"], [3.0, 5.0])  # ncall 0: the sums as stored


def test_wrong_size_is_an_error_but_embeddings_are_skipped(tmp_path):
    im = {"blk.0.attn_q.weight": np.ones(3, np.float32), "token_embd.weight": np.ones(3, np.float32)}
    with pytest.raises(InputError, match="another model"):
        tensor_importance(im, "blk.0.attn_q.weight", (8, 256))
    assert tensor_importance(im, "token_embd.weight", (100, 256)) is None
    assert tensor_importance(im, "blk.1.attn_q.weight", (8, 256)) is None


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x00\x00", b"not an imatrix at all, just text"])
def test_garbage_is_a_clear_error(tmp_path, content):
    path = tmp_path / "imatrix.dat"
    path.write_bytes(content)
    with pytest.raises(InputError):
        load_imatrix(path)


def test_non_finite_values_are_refused(tmp_path):
    path = tmp_path / "imatrix.dat"
    write_legacy(path, {"blk.0.attn_k.weight": (1, [1.0, float("nan")])})
    with pytest.raises(InputError, match="non-finite"):
        load_imatrix(path)
