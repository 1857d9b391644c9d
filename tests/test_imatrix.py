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


def test_gguf_format_per_expert(tmp_path):
    sums = {"blk.0.ffn_down_exps.weight": np.arange(8 * 4, dtype=np.float32).reshape(8, 4) + 1,
            "blk.0.attn_q.weight": np.array([[2.0, 4.0, 6.0, 8.0]], dtype=np.float32)}
    counts = {"blk.0.ffn_down_exps.weight": np.array([1, 2, 0, 4, 5, 6, 7, 8], dtype=np.float32),
              "blk.0.attn_q.weight": np.array([2], dtype=np.float32)}
    path = tmp_path / "imatrix.gguf"
    save_imatrix(path, sums, counts, ["wiki.txt"], 10, 512)
    im = load_imatrix(path)
    assert set(im) == set(sums)
    exps = im["blk.0.ffn_down_exps.weight"].reshape(8, 4)
    assert np.array_equal(exps[1], sums["blk.0.ffn_down_exps.weight"][1] / 2)
    assert np.array_equal(exps[2], np.ones(4))  # an expert that saw no token: 1s, as llama.cpp
    assert np.array_equal(im["blk.0.attn_q.weight"], [1.0, 2.0, 3.0, 4.0])
    got = tensor_importance(im, "blk.0.ffn_down_exps.weight", (8, 16, 4))
    assert got.shape == (8, 4)


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
