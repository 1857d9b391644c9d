"""Read a GGUF file's header, metadata and tensor table, bounds-checked and in bulk.

`open_gguf(path)` returns a `Reader` (a `gguf.GGUFReader` that memory-maps the file: nothing of
the tensor data is read) or raises InputError with one line: `FILE is not a GGUF file: ...`,
`FILE is truncated/corrupt: WHAT; re-download it`. It checks the layout llama.cpp's gguf.cpp
checks: the magic, a version it reads (2 or 3), metadata and tensor table that parse, known
tensor types, tensors laid back to back at the file's alignment, every tensor's data inside
the file. Whether the contents make sense is `gguf.meaning`'s job; `gguf.check` does both.

The stock reader reads an array item by item in Python (about 5 µs an item: 39 s for an 8 MiB
array) and slices its memory map without bounds checks. `Reader` reads a numeric array as one
numpy view and an array of strings in one compiled pass (`gguf.scan`), so parsing takes time
proportional to the header's bytes; a header that claims more than `HEADER_CAP` bytes is
refused as soon as the claim is read.

`field_value(reader, key, default)` gives a key's value: a string decoded with replacement
characters where it is not UTF-8 (for display; the keys that must be exact are checked by
`gguf.meaning`), an array as a list.
"""

from __future__ import annotations

import math
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField

from localmix.errors import InputError
from localmix.gguf.scan import string_spans

GGUF_VERSIONS = (2, 3)      # what llama.cpp reads: v1 is no longer supported, v3 is the newest
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64          # tensor names are at most 63 bytes
HEADER_CAP = 256 * 2**20    # a header (metadata and tensor table) larger than this is refused

_ARRAY, _STRING = int(GGUFValueType.ARRAY), int(GGUFValueType.STRING)  # plain ints: enum compares are slow
_NUMPY = {int(t): np.dtype(np_type) for t, np_type in GGUFReader.gguf_scalar_to_np.items()}


class Corrupt(Exception):
    """What is wrong with the file, in a few words; `open_gguf` adds its path."""


class StringArray(ReaderField):
    """An array of strings read in one pass: its parts are [key length, key, value type, item
    type, count, starts, lengths] (offsets into the file) and `contents()` decodes on demand."""

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        starts, lengths = self.parts[5], self.parts[6]
        buf = self.parts[7]
        if isinstance(index_or_slice, int):
            i = index_or_slice
            return bytes(buf[starts[i]:starts[i] + lengths[i]]).decode("utf-8", errors="replace")
        return [bytes(buf[s:s + n]).decode("utf-8", errors="replace")
                for s, n in zip(starts[index_or_slice].tolist(), lengths[index_or_slice].tolist())]

    def raw(self, i: int) -> bytes:
        starts, lengths, buf = self.parts[5], self.parts[6], self.parts[7]
        return bytes(buf[starts[i]:starts[i] + lengths[i]])


class Reader(GGUFReader):
    """`GGUFReader`, bounds-checked, with arrays read in bulk and the header capped.

    Every read goes through `_get`, so checking there gives one clear reason instead of an
    IndexError, a numpy reshape error or a UnicodeDecodeError somewhere later; reading through a
    plain ndarray view instead of the `np.memmap` subclass is also several times faster. The
    tensor table is checked as llama.cpp checks it before the reader makes its (lazy) views of
    the tensor data.
    """

    section = "header"   # where parsing is, for messages
    _buf: np.ndarray | None = None

    def __init__(self, path: Path):
        try:
            super().__init__(path)
        except (ValueError, IndexError, KeyError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise Corrupt(f"the {self.section} is unreadable ({reason})") from None

    def _get(self, offset, dtype, count=1, override_order=None) -> np.ndarray:
        if self._buf is None:
            self._buf = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        start = int(offset)
        end = start + dtype.itemsize * int(count)
        self._claim(end)
        arr = self._buf[start:end].view(dtype)
        return arr.view(dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _claim(self, end: int, what: str = "") -> None:
        """Refuse a read (or a length field) that reaches `end`: past the file, or past the cap."""
        if end > self._buf.size:
            raise Corrupt(f"the {self.section} runs past the end of the file ({self._buf.size:,} bytes){what}")
        if end > HEADER_CAP and self.section != "tensor data":
            raise Corrupt(f"the {self.section} claims more than {HEADER_CAP // 2**20} MiB{what}, "
                          "more than any real model's header")

    def _build_fields(self, offs, count):
        self.section = "metadata"
        self._claim(offs + 13 * int(count), f" for its {int(count):,} keys")  # each key takes at least 13 bytes
        return super()._build_fields(offs, count)

    def _get_str(self, offset):
        length = self._get(offset, np.uint64)
        self._claim(int(offset) + 8 + int(length[0]), f" for a string of {int(length[0]):,} bytes")
        return length, self._get(offset + 8, np.uint8, length[0])

    def _get_field_parts(self, orig_offs, raw_type):
        if int(raw_type) != _ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        # An array in one step: a numpy view for numbers, one compiled scan for strings.
        item_type = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        n, at, itype = int(count[0]), orig_offs + 12, int(item_type[0])
        types = [GGUFValueType.ARRAY]
        if itype in _NUMPY:
            self._claim(at + n * _NUMPY[itype].itemsize, f" for an array of {n:,} items")
            values = self._get(at, _NUMPY[itype], n)
            return 12 + values.nbytes, [item_type, count, values], [2], types + [GGUFValueType(itype)]
        if itype == _STRING:
            self._claim(at + 8 * n, f" for an array of {n:,} strings")
            starts, lengths, end = string_spans(self._buf, at, n, min(self._buf.size, HEADER_CAP))
            if end < 0:
                self._claim(self._buf.size + 1 if self._buf.size <= HEADER_CAP else HEADER_CAP + 1,
                            f" at string {-1 - end:,} of an array of {n:,}")
            return end - orig_offs, [item_type, count, starts, lengths, self._buf], [], types + [GGUFValueType.STRING]
        raise Corrupt(f"the metadata has an array of unknown item type {itype}")

    def _push_field(self, field, skip_sum=False):
        if field.name in self.fields:
            raise Corrupt(f"metadata key {field.name[:60]} appears twice (llama.cpp refuses duplicate keys)")
        if not field.name:
            raise Corrupt("the metadata has a key with an empty name (llama.cpp refuses it)")
        if len(field.types) == 2 and field.types[1] == GGUFValueType.STRING and not field.data:
            field = StringArray(*field)
        return super()._push_field(field, skip_sum)

    def _build_tensor_info(self, offs, count):
        self.section = "tensor table"
        self._claim(offs + 24 * int(count), f" for its {int(count):,} tensors")  # each takes at least 24 bytes
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        self.section = "tensor data"
        alignment, size = int(self.alignment), self._buf.size
        spans = []      # (name, start, end) in the file
        expected = 0    # llama.cpp wants each tensor right after the previous one, padded to the alignment
        for f in fields:
            name, dims = f.name, [int(d) for d in f.parts[3]]
            raw_type, offset = int(f.parts[4][0]), int(f.parts[5][0])
            if any(name == other for other, _, _ in spans):
                raise Corrupt(f"tensor {name} appears twice in the tensor table")
            if len(name.encode()) >= GGML_MAX_NAME:
                raise Corrupt(f"tensor name {name[:40]!r}... is longer than llama.cpp allows")
            if len(dims) > GGML_MAX_DIMS or any(d < 1 or d >= 2**63 for d in dims):
                raise Corrupt(f"tensor {name} has an impossible shape {dims}")
            if raw_type not in GGML_QUANT_SIZES:
                raise Corrupt(f"tensor {name} has unknown type {raw_type}")
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if dims and dims[0] % block:
                raise Corrupt(f"tensor {name} has rows of {dims[0]} values, not whole {ggml_type.name} blocks of {block}")
            if offset != expected:
                raise Corrupt(f"tensor {name} has data offset {offset:,}, but the tensors before it end at {expected:,}")
            n_bytes = math.prod(dims) * type_size // block
            spans.append((name, start_offs + offset, start_offs + offset + n_bytes))
            expected += -(-n_bytes // alignment) * alignment
        cut = [name for name, _, end in spans if end > size]
        if cut:
            raise Corrupt(f"it has {size:,} bytes but its tensors need {spans[-1][2]:,}; "
                          f"{len(cut)} of {len(spans)} tensors are cut off or missing, from {cut[0]}")
        super()._build_tensors(start_offs, fields)


def read_header(path: Path) -> int:
    """The checks that need no parser: a readable regular file, the magic, the version. Returns its size."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{path} is a directory, not a GGUF file; give the path of the .gguf file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path} is not a regular file, so not a GGUF file")
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise InputError(f"{path} not found") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None

    if not head:
        raise InputError(f"{path} is empty, not a GGUF file; re-download it")
    if head[:4] != b"GGUF":
        if head.startswith(b"version https://git-lfs"):
            what = "it is a Git LFS pointer, not the model; fetch the real file (git lfs pull, or download it directly)"
        elif head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
            what = "it is a web page (an error or login page saved by the download); re-download it"
        elif len(head) < 4 and b"GGUF".startswith(head):
            what = f"it is only {len(head)} bytes long; re-download it"
        else:
            what = f"it starts with {head[:4]!r}, not b'GGUF'; check the path, or re-download it"
        raise InputError(f"{path} is not a GGUF file: {what}")
    if len(head) < 24:
        raise Corrupt(f"the header runs past the end of the file ({len(head)} bytes)")
    (version,) = struct.unpack_from("=I", head, 4)
    if version & 0xFFFF == 0:  # what a version written in the other byte order looks like
        raise InputError(f"{path} is a GGUF file of the other byte order (endianness), which llama.cpp cannot read here")
    if version == 1:
        raise InputError(f"{path} is a GGUF version 1 file, which llama.cpp no longer reads; get a newer conversion")
    if version not in GGUF_VERSIONS:
        raise Corrupt(f"unknown GGUF version {version} (llama.cpp reads versions 2 and 3)")
    return st.st_size


def open_gguf(path: str | Path) -> Reader:
    """The parsed header of the GGUF at `path`, its layout checked; InputError, one line, if not."""
    path = Path(path)
    try:
        read_header(path)
        return Reader(path)
    except Corrupt as e:
        raise InputError(f"{path} is truncated/corrupt: {e}; re-download it") from None
    except OSError as e:  # the file went away or became unreadable between the checks
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The value of `key`, or `default`; strings decoded with replacement characters."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if field.types == [GGUFValueType.STRING]:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    if field.types[0] == GGUFValueType.ARRAY and field.types[-1] == GGUFValueType.STRING and not isinstance(field, StringArray):
        return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
    return field.contents()


def array_length(field: ReaderField) -> int:
    """How many items an array field holds."""
    return int(field.parts[4][0])
