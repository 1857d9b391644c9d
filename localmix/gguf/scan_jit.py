"""The compiled scans over a GGUF header's bytes (scan.py's fast path, for long string
arrays), so that checking a file takes time proportional to its header at machine speed, not a
Python loop per array item. The same results as scan.py's plain loops, which are their reference.

- `string_spans(buf, at, n, limit)`: where each of an array's `n` strings starts and how long it
  is (each is a u64 length and its bytes); the strings of a 32000-token vocabulary, or of a
  hostile 64 MiB array, in one pass.
- `first_invalid_utf8(buf, starts, lengths)`: the index of the first string that is not strict
  UTF-8 (what Python's decoder accepts), or -1.
- `c_string_hashes(buf, starts, lengths)`: a 64-bit hash of each string as llama.cpp sees it (a
  C string: up to its first NUL byte) and that length, for finding duplicate token texts.

Compiled by numba once and cached on disk (`cache=True`), as the kernels are.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def string_spans(buf, at, n, limit):
    """(starts, lengths, end): the strings of an array whose first length field is at `at`.
    `end` is the offset after the last string, or -1 - i when string i runs past `limit`."""
    starts = np.empty(n, np.int64)
    lengths = np.empty(n, np.int64)
    for i in range(n):
        if at + 8 > limit:
            return starts, lengths, -1 - i
        length = np.int64(0)
        for b in range(8):
            length |= np.int64(buf[at + b]) << (8 * b)
        if length < 0 or length > limit - at - 8:   # a u64 over 2**63 reads as negative
            return starts, lengths, -1 - i
        starts[i] = at + 8
        lengths[i] = length
        at += 8 + length
    return starts, lengths, at


@njit(cache=True)
def _utf8_ok(buf, start, length):
    i, end = start, start + length
    while i < end:
        c = buf[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            n, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            n, lo, hi = 2, 0xA0, 0xBF        # no overlong forms
        elif c == 0xED:
            n, lo, hi = 2, 0x80, 0x9F        # no surrogates
        elif 0xE1 <= c <= 0xEF:
            n, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            n, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            n, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            n, lo, hi = 3, 0x80, 0x8F        # nothing past U+10FFFF
        else:
            return False
        if i + n >= end:                     # the sequence is cut off by the end of the string
            return False
        if not (lo <= buf[i + 1] <= hi):
            return False
        for k in range(2, n + 1):
            if not (0x80 <= buf[i + k] <= 0xBF):
                return False
        i += n + 1
    return True


@njit(cache=True)
def first_invalid_utf8(buf, starts, lengths):
    for i in range(starts.size):
        if not _utf8_ok(buf, starts[i], lengths[i]):
            return i
    return -1


@njit(cache=True)
def c_string_hashes(buf, starts, lengths):
    """(FNV-1a hash, length) of each string up to its first NUL byte."""
    n = starts.size
    hashes = np.empty(n, np.uint64)
    c_lengths = np.empty(n, np.int64)
    for i in range(n):
        h = np.uint64(0xCBF29CE484222325)
        k = 0
        while k < lengths[i] and buf[starts[i] + k] != 0:
            h = (h ^ np.uint64(buf[starts[i] + k])) * np.uint64(0x100000001B3)
            k += 1
        hashes[i] = h
        c_lengths[i] = k
    return hashes, c_lengths
