"""The header scans' plain loops (gguf/scan.py, used for arrays of up to PLAIN_MAX strings) and
their compiled twins (gguf/scan_jit.py, for longer ones) give the same results on the same
bytes: valid and invalid UTF-8 of every kind, NUL bytes, empty strings, arrays cut short."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from localmix.gguf import scan, scan_jit

# what strict UTF-8 refuses, each a way Python's decoder says no
INVALID = [b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
           b"\xc3", b"\xe2\x82", b"a\xffb", b"\xf0\x9f\x98"]
VALID = [b"", b"a", b"\x00", b"a\x00b", "é".encode(), "€".encode(), "😀".encode(), "\U0010ffff".encode(), b"\x7f" * 40,
         "<0x0A>".encode(), "▁the".encode()]


def _array(texts: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(struct.pack("<Q", len(t)) + t for t in texts), np.uint8)


def _both(texts: list[bytes], limit_cut: int = 0):
    buf = _array(texts)
    limit = buf.size - limit_cut
    plain, jit = scan.string_spans(buf, 0, len(texts), limit), scan_jit.string_spans(buf, 0, len(texts), limit)
    return buf, plain, jit


@pytest.mark.parametrize("seed", range(6))
def test_plain_and_compiled_scans_agree(seed):
    rng = np.random.default_rng(seed)
    pool = VALID + INVALID + [bytes(rng.integers(0, 256, rng.integers(0, 12), dtype=np.uint8)) for _ in range(40)]
    texts = [pool[i] for i in rng.integers(0, len(pool), 300)]
    buf, (s1, l1, e1), (s2, l2, e2) = _both(texts)
    assert e1 == e2 == buf.size and (s1 == s2).all() and (l1 == l2).all()
    assert scan.first_invalid_utf8(buf, s1, l1) == scan_jit.first_invalid_utf8(buf, s1, l1)
    h1, c1 = scan.c_string_hashes(buf, s1, l1)
    h2, c2 = scan_jit.c_string_hashes(buf, s1, l1)
    assert (h1 == h2).all() and (c1 == c2).all()
    for text in texts:  # each string alone: valid or not as Python's decoder says
        one, ok = _array([text]), True
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            ok = False
        assert (scan.first_invalid_utf8(one, np.array([8]), np.array([len(text)])) == -1) == ok, text


@pytest.mark.parametrize("cut", [1, 5, 9, 30])
def test_an_array_cut_short_ends_at_the_same_string(cut):
    texts = [b"alpha", b"", b"beta\x00x", b"gamma" * 3]
    _, (_, _, e1), (_, _, e2) = _both(texts, limit_cut=cut)
    assert e1 == e2 < 0


def test_a_huge_length_field_is_refused_alike():
    buf = np.frombuffer(struct.pack("<Q", 1 << 63) + b"abc", np.uint8)
    assert scan.string_spans(buf, 0, 1, buf.size)[2] == scan_jit.string_spans(buf, 0, 1, buf.size)[2] == -1


def test_long_arrays_go_to_the_compiled_scan():
    texts = [b"x"] * (scan.PLAIN_MAX + 1)
    buf, (s1, l1, e1), _ = _both(texts)
    assert e1 == buf.size and scan.c_string_hashes(buf, s1, l1)[1].sum() == len(texts)


def test_hashes_agree_on_the_longest_plain_string_and_beyond():
    """c_string_hashes steps once per byte position: the longest string it takes plainly, one
    that ends in NUL there, and one too long for it (the compiled loop's) hash as the loop does."""
    n = scan.LONGEST_PLAIN
    for texts in ([b"a" * n, b"b", b""], [b"c" * (n - 1) + b"\x00", b"\x00x"], [b"d" * (n + 1), b"e"]):
        buf, (s, l_, _), _ = _both(texts)
        h1, c1 = scan.c_string_hashes(buf, s, l_)
        h2, c2 = scan_jit.c_string_hashes(buf, s, l_)
        assert (h1 == h2).all() and (c1 == c2).all()


@pytest.mark.parametrize("bad", INVALID)
def test_the_first_invalid_string_is_found_wherever_it_lies(bad):
    """The whole-array decode names the same string as decoding each alone, wherever the bad one
    is, even where its neighbours would complete its bytes if the strings were simply joined."""
    rng = np.random.default_rng(len(bad))
    for at in (0, 1, 7, 99):
        texts = [VALID[i] for i in rng.integers(0, len(VALID), 100)]
        texts[at] = bad
        if at + 1 < len(texts):
            texts[at + 1] = b"\xa9\x80\x80"   # continuation bytes: joined, a cut sequence could look whole
        first = next(i for i, t in enumerate(texts) if not _valid(t))
        buf, (s, l_, _), _ = _both(texts)
        assert scan.first_invalid_utf8(buf, s, l_) == scan_jit.first_invalid_utf8(buf, s, l_) == first


def _valid(text: bytes) -> bool:
    try:
        text.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False
