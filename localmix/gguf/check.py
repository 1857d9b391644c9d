"""Check a GGUF file before llama.cpp loads it.

llama.cpp meets a truncated or corrupt download with a crash or a cryptic message, so a
file is checked first. `check_gguf(path)` parses only the header, the metadata and the tensor
table (through `gguf.GGUFReader`, which memory-maps the file: tensor data is never read, so a
26 GB model is checked in a fraction of a second) and checks what llama.cpp's loader checks:
the magic, a version it reads (2 or 3), metadata and tensor table that parse, known tensor
types, tensors laid back to back at the file's alignment, and every tensor's data inside the
file. Any failure is one line, `FILE is truncated/corrupt: WHAT; re-download it` (or `FILE is
not a GGUF file: ...`); the result is a `GGUFSummary` with what a memory estimate needs
(localmix.runtime.memory).
"""

from __future__ import annotations

import math
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from localmix.errors import InputError
from localmix.gguf.read import field_value

GGUF_VERSIONS = (2, 3)      # what llama.cpp reads: v1 is no longer supported, v3 is the newest
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64          # tensor names are at most 63 bytes


@dataclass(frozen=True)
class TensorEntry:
    name: str
    type: str                # GGML type name: "Q8_0", "F32", ...
    n_bytes: int
    offset: int              # of its first byte in the file


@dataclass(frozen=True)
class GGUFSummary:
    path: Path
    file_size: int
    version: int
    n_tensors: int
    tensor_bytes: int        # sum of the tensors' sizes, without alignment padding
    alignment: int
    data_offset: int         # where the data section starts
    architecture: str | None
    n_layer: int | None
    n_embd: int | None
    n_head: int | None
    n_head_kv: int | None    # defaults to n_head, as in llama.cpp
    head_dim: int | None     # {arch}.attention.key_length, or n_embd / n_head
    head_dim_v: int | None   # {arch}.attention.value_length, or head_dim
    n_ff: int | None         # feed-forward width of one expert (or of the dense MLP)
    n_vocab: int
    context_length: int | None
    n_expert: int            # 0 for a dense model
    n_expert_used: int
    tensors: tuple[TensorEntry, ...] = field(repr=False)


# --- reading -----------------------------------------------------------------------------

class _Corrupt(Exception):
    """What is wrong with the file, in a few words; `check_gguf` adds its path."""


# The fewest bytes an array item of each GGUF type can take (a string is at least its length).
_MIN_ITEM_SIZE = {int(t): np.dtype(np_type).itemsize for t, np_type in GGUFReader.gguf_scalar_to_np.items()}
_MIN_ITEM_SIZE |= {int(GGUFValueType.STRING): 8, int(GGUFValueType.ARRAY): 12}
_ARRAY = int(GGUFValueType.ARRAY)   # a plain int: comparing with the enum member is slow, per array item


class _Reader(GGUFReader):
    """`GGUFReader` that stops at the first read past the end of the file and says where.

    The stock reader slices its memory map without bounds checks, so a short file fails later
    and elsewhere: an IndexError on an empty slice, a numpy view or reshape error, a
    UnicodeDecodeError. Every read goes through `_get`, so checking there gives one clear
    reason; reading through a plain ndarray view instead of the `np.memmap` subclass also
    makes parsing a 32000-token vocabulary about 4x faster. The tensor table is checked as
    llama.cpp checks it before the reader makes its (lazy) views of the tensor data.
    """

    section = "header"   # where parsing is, for messages
    _buf: np.ndarray | None = None

    def __init__(self, path: Path):
        try:
            super().__init__(path)
        except (ValueError, IndexError, KeyError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise _Corrupt(f"the {self.section} is unreadable ({reason})") from None

    def _get(self, offset, dtype, count=1, override_order=None) -> np.ndarray:
        if self._buf is None:
            self._buf = self.data.view(np.ndarray)
        dtype = np.dtype(dtype)
        start = int(offset)
        end = start + dtype.itemsize * int(count)
        if end > self._buf.size:
            raise self._past_end()
        arr = self._buf[start:end].view(dtype)
        return arr.view(dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _past_end(self) -> _Corrupt:
        return _Corrupt(f"the {self.section} runs past the end of the file ({self._buf.size:,} bytes)")

    def _build_fields(self, offs, count):
        self.section = "metadata"
        return super()._build_fields(offs, count)

    def _get_field_parts(self, orig_offs, raw_type):
        # A corrupt array length must not start a loop of billions of one-item reads.
        if raw_type == _ARRAY:
            item_type = int(self._get(orig_offs, np.uint32)[0])
            n = int(self._get(orig_offs + 4, np.uint64)[0])
            if orig_offs + 12 + n * _MIN_ITEM_SIZE.get(item_type, 1) > self._buf.size:
                raise self._past_end()
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensor_info(self, offs, count):
        self.section = "tensor table"
        return super()._build_tensor_info(offs, count)

    def _build_tensors(self, start_offs, fields):
        self.section = "tensor data"
        alignment, size = int(self.alignment), self._buf.size
        spans = []      # (name, start, end) in the file
        expected = 0    # llama.cpp wants each tensor right after the previous one, padded to the alignment
        for f in fields:
            name, dims = f.name, [int(d) for d in f.parts[3]]
            raw_type, offset = int(f.parts[4][0]), int(f.parts[5][0])
            if len(name.encode()) >= GGML_MAX_NAME:
                raise _Corrupt(f"tensor name {name[:40]!r}... is longer than llama.cpp allows")
            if len(dims) > GGML_MAX_DIMS or any(d >= 2**63 for d in dims):
                raise _Corrupt(f"tensor {name} has an impossible shape {dims}")
            if raw_type not in GGML_QUANT_SIZES:
                raise _Corrupt(f"tensor {name} has unknown type {raw_type}")
            ggml_type = GGMLQuantizationType(raw_type)
            block, type_size = GGML_QUANT_SIZES[ggml_type]
            if dims and dims[0] % block:
                raise _Corrupt(f"tensor {name} has rows of {dims[0]} values, not whole {ggml_type.name} blocks of {block}")
            if offset != expected:
                raise _Corrupt(f"tensor {name} has data offset {offset:,}, but the tensors before it end at {expected:,}")
            n_bytes = math.prod(dims) * type_size // block
            spans.append((name, start_offs + offset, start_offs + offset + n_bytes))
            expected += -(-n_bytes // alignment) * alignment
        cut = [name for name, _, end in spans if end > size]
        if cut:
            raise _Corrupt(f"it has {size:,} bytes but its tensors need {spans[-1][2]:,}; "
                           f"{len(cut)} of {len(spans)} tensors are cut off or missing, from {cut[0]}")
        super()._build_tensors(start_offs, fields)


def _check_header(path: Path) -> int:
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
        raise _Corrupt(f"the header runs past the end of the file ({len(head)} bytes)")
    (version,) = struct.unpack_from("=I", head, 4)
    if version & 0xFFFF == 0:  # what a version written in the other byte order looks like
        raise InputError(f"{path} is a GGUF file of the other byte order (endianness), which llama.cpp cannot read here")
    if version == 1:
        raise InputError(f"{path} is a GGUF version 1 file, which llama.cpp no longer reads; get a newer conversion")
    if version not in GGUF_VERSIONS:
        raise _Corrupt(f"unknown GGUF version {version} (llama.cpp reads versions 2 and 3)")
    return st.st_size


def _value(r: GGUFReader, key: str):
    try:
        return field_value(r, key)
    except UnicodeDecodeError:
        raise _Corrupt(f"metadata value {key} is unreadable") from None


def _int(v) -> int | None:
    if isinstance(v, list):      # a per-layer value (some architectures): the largest bounds the memory
        v = max(v, default=None)
    return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None


def check_gguf(path: str | Path) -> GGUFSummary:
    """Check that `path` is a whole GGUF file llama.cpp can load; raise InputError, one line, if not."""
    path = Path(path)
    try:
        size = _check_header(path)
        r = _Reader(path)
        arch = _value(r, "general.architecture")
        arch = arch if isinstance(arch, str) else None
        hp = {k: _int(_value(r, f"{arch}.{k}")) for k in (
            "block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
            "attention.key_length", "attention.value_length", "feed_forward_length",
            "expert_feed_forward_length", "context_length", "expert_count", "expert_used_count", "vocab_size")}
    except _Corrupt as e:
        raise InputError(f"{path} is truncated/corrupt: {e}; re-download it") from None
    except OSError as e:  # the file went away or became unreadable between the checks
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None

    n_embd, n_head = hp["embedding_length"], hp["attention.head_count"]
    head_dim = hp["attention.key_length"] or (n_embd // n_head if n_embd and n_head else None)
    tokens = r.fields.get("tokenizer.ggml.tokens")
    tensors = tuple(TensorEntry(t.name, t.tensor_type.name, int(t.n_bytes), int(t.data_offset)) for t in r.tensors)
    return GGUFSummary(
        path=path, file_size=size, version=int(r.fields["GGUF.version"].parts[0][0]),
        n_tensors=len(tensors), tensor_bytes=sum(t.n_bytes for t in tensors),
        alignment=int(r.alignment), data_offset=int(r.data_offset), architecture=arch,
        n_layer=hp["block_count"], n_embd=n_embd, n_head=n_head,
        n_head_kv=hp["attention.head_count_kv"] or n_head,
        head_dim=head_dim, head_dim_v=hp["attention.value_length"] or head_dim,
        n_ff=hp["expert_feed_forward_length"] or hp["feed_forward_length"],
        n_vocab=hp["vocab_size"] or (len(tokens.data) if tokens is not None else 0),
        context_length=hp["context_length"],
        n_expert=hp["expert_count"] or 0, n_expert_used=hp["expert_used_count"] or 0,
        tensors=tensors,
    )


