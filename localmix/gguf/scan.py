"""Scans over the string arrays of a GGUF header: where each string lies, whether each is strict
UTF-8, and a hash of each as llama.cpp sees it (a C string).

- `string_spans(buf, at, n, limit)`: where each of an array's `n` strings starts and how long it
  is (each is a u64 length and its bytes), and where the array ends.
- `first_invalid_utf8(buf, starts, lengths)`: the index of the first string that is not strict
  UTF-8 (what Python's decoder accepts), or -1.
- `c_string_hashes(buf, starts, lengths)`: a 64-bit FNV-1a hash of each string up to its first NUL
  byte, and that length, for finding duplicate token texts (numpy across the strings, one step
  per byte position; scan_jit.py's loop per string is its reference).

The first two are plain loops here, the reference; an array of more than PLAIN_MAX strings (a 128K-token
vocabulary, a hostile 64 MiB array) goes to scan_jit.py's compiled loops, which give the same
results at machine speed. Below that the plain loops take less time than importing numba
(a quarter of a second), which every command that opens a GGUF would otherwise pay.
"""

from __future__ import annotations

import numpy as np

PLAIN_MAX = 65536  # strings: Mixtral's 32000 and 32768 tokens, SmolLM2's 49152, stay plain
LONGEST_PLAIN = 4096  # bytes: c_string_hashes takes one numpy step per byte of the longest string
FNV_OFFSET, FNV_PRIME, U64 = 0xCBF29CE484222325, 0x100000001B3, (1 << 64) - 1


def string_spans(buf, at: int, n: int, limit: int):
    """(starts, lengths, end): the strings of an array whose first length field is at `at`.
    `end` is the offset after the last string, or -1 - i when string i runs past `limit`."""
    if n > PLAIN_MAX:
        from localmix.gguf import scan_jit

        return scan_jit.string_spans(buf, at, n, limit)
    view = memoryview(buf)
    starts, lengths = np.empty(n, np.int64), np.empty(n, np.int64)
    for i in range(n):
        if at + 8 > limit:
            return starts, lengths, -1 - i
        length = int.from_bytes(view[at:at + 8], "little")
        if length > limit - at - 8:
            return starts, lengths, -1 - i
        starts[i], lengths[i] = at + 8, length
        at += 8 + length
    return starts, lengths, at


def first_invalid_utf8(buf, starts, lengths) -> int:
    """The index of the first string that Python's strict UTF-8 decoder refuses, or -1."""
    if starts.size > PLAIN_MAX:
        from localmix.gguf import scan_jit

        return int(scan_jit.first_invalid_utf8(buf, starts, lengths))
    view = memoryview(buf)
    for i, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        try:
            str(view[start:start + length], "utf-8")
        except UnicodeDecodeError:
            return i
    return -1


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
