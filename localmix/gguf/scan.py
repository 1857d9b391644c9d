"""Scans over the string arrays of a GGUF header: where each string lies, whether each is strict
UTF-8, and a hash of each as llama.cpp sees it (a C string).

- `string_spans(buf, at, n, limit)`: where each of an array's `n` strings starts and how long it
  is (each is a u64 length and its bytes), and where the array ends (a plain loop).
- `first_invalid_utf8(buf, starts, lengths)`: the index of the first string that is not strict
  UTF-8 (what Python's decoder accepts), or -1 (the array decoded at once, its lengths zeroed).
- `c_string_hashes(buf, starts, lengths)`: a 64-bit FNV-1a hash of each string up to its first NUL
  byte, and that length, for finding duplicate token texts (numpy across the strings, one step
  per byte position).

An array of more than PLAIN_MAX strings (a 128K-token vocabulary, a hostile 64 MiB array) goes to
scan_jit.py's compiled loops, a loop per string each, which are also the reference the tests
hold these to. Below that these take less time than importing numba (a quarter of a second),
which every command that opens a GGUF would otherwise pay.
"""

from __future__ import annotations

import struct

import numpy as np

PLAIN_MAX = 65536  # strings: Mixtral's 32000 and 32768 tokens, SmolLM2's 49152, stay plain
LONGEST_PLAIN = 4096  # bytes: c_string_hashes takes one numpy step per byte of the longest string
FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3
_U64 = struct.Struct("<Q")


def string_spans(buf, at: int, n: int, limit: int):
    """(starts, lengths, end): the strings of an array whose first length field is at `at`.
    `end` is the offset after the last string, or -1 - i when string i runs past `limit`."""
    if n > PLAIN_MAX:
        from localmix.gguf import scan_jit

        return scan_jit.string_spans(buf, at, n, limit)
    length_at = _U64.unpack_from
    starts, lengths = [], []
    for i in range(n):
        if at + 8 > limit:
            return _filled(starts, n), _filled(lengths, n), -1 - i
        (length,) = length_at(buf, at)
        if length > limit - at - 8:
            return _filled(starts, n), _filled(lengths, n), -1 - i
        starts.append(at + 8)
        lengths.append(length)
        at += 8 + length
    return np.array(starts, np.int64), np.array(lengths, np.int64), at


def _filled(values: list[int], n: int) -> np.ndarray:
    out = np.zeros(n, np.int64)
    out[:len(values)] = values
    return out


def first_invalid_utf8(buf, starts, lengths) -> int:
    """The index of the first string that Python's strict UTF-8 decoder refuses, or -1.

    The strings of one array lie back to back, each after its 8-byte length: with those lengths
    zeroed (NUL is one valid byte, and ends any sequence cut short before it) the whole array is
    decoded at once, and a refusal found there is checked on its own string. Strings that do not
    lie so are decoded one by one."""
    if starts.size > PLAIN_MAX:
        from localmix.gguf import scan_jit

        return int(scan_jit.first_invalid_utf8(buf, starts, lengths))
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    view = memoryview(buf)
    if starts.size and (starts[1:] == starts[:-1] + lengths[:-1] + 8).all():
        first, end = int(starts[0]), int(starts[-1] + lengths[-1])
        region = np.frombuffer(view[first:end], np.uint8).copy()
        gaps = (starts[1:] - 8 - first)[:, None] + np.arange(8)
        region[gaps.reshape(-1)] = 0
        try:
            region.tobytes().decode("utf-8")
            return -1
        except UnicodeDecodeError as e:
            i = int(np.searchsorted(starts - first, e.start, side="right")) - 1
            if not _decodes(view, int(starts[i]), int(lengths[i])):
                return i   # (else a rule of the decoder's that this reasoning missed: go one by one)
    for i, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        if not _decodes(view, start, length):
            return i
    return -1


def _decodes(view: memoryview, start: int, length: int) -> bool:
    try:
        str(view[start:start + length], "utf-8")
        return True
    except UnicodeDecodeError:
        return False


def c_string_hashes(buf, starts, lengths):
    """(FNV-1a hash, length) of each string up to its first NUL byte, as uint64 and int64 arrays.

    One numpy step per byte position, over every string still that long: a vocabulary's tokens
    are short, so this is a few dozen steps where a loop per byte would take 60 ms for Mixtral's.
    A string longer than LONGEST_PLAIN (only a hostile file has one) goes to the compiled loop."""
    if starts.size > PLAIN_MAX or (lengths.size and int(lengths.max()) > LONGEST_PLAIN):
        from localmix.gguf import scan_jit

        return scan_jit.c_string_hashes(buf, starts, lengths)
    data = np.frombuffer(buf, np.uint8) if not isinstance(buf, np.ndarray) else buf.view(np.uint8).reshape(-1)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    hashes = np.full(starts.size, FNV_OFFSET, np.uint64)
    c_lengths = lengths.copy()
    live = np.flatnonzero(lengths > 0)
    for pos in range(int(lengths.max()) if lengths.size else 0):
        byte = data[starts[live] + pos]
        nul = byte == 0
        if nul.any():                       # the C string ends here
            c_lengths[live[nul]] = pos
            live, byte = live[~nul], byte[~nul]
        hashes[live] = (hashes[live] ^ byte) * np.uint64(FNV_PRIME)   # uint64 arithmetic wraps, as in C
        live = live[lengths[live] > pos + 1]
        if not live.size:
            break
    return hashes, c_lengths
