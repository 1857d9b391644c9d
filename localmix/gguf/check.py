"""Check a GGUF file before llama.cpp loads it: its layout and what it says.

llama.cpp meets a truncated or corrupt download with a crash or a cryptic message, and a
well-formed file that is wrong in meaning (a duplicate token text, too many experts, a chat
template that does not compile) with an assertion that kills the process. So every command
that opens a GGUF checks it first with `check_gguf(path)`: the layout (gguf.read: header,
metadata, tensor table, extents, a capped header read in bulk) and the meaning (gguf.meaning:
types and ranges of every key llama.cpp reads, the vocabulary, the template, alignment,
tensor shapes). Only the header is read (the file is memory-mapped), so a 26 GB model is
checked in a fraction of a second. Any failure is one line: `FILE is truncated/corrupt: WHAT;
re-download it`, `FILE is not a GGUF file: ...` or `FILE cannot be loaded: KEY ...`. The result
is a `GGUFSummary` with what a memory estimate needs (localmix.runtime.memory) and the parsed
reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localmix.errors import InputError
from localmix.gguf.meaning import BadValue, check_meaning
from localmix.gguf.read import Reader, open_gguf


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
    reader: Reader | None = field(default=None, repr=False, compare=False)  # the parsed header, for reuse


def _max(v) -> int | None:
    """A per-layer value (an array, for some architectures) bounds the memory by its largest entry."""
    if v is None:
        return None
    return int(np.max(v)) if isinstance(v, np.ndarray) else int(v)


def check_gguf(path: str | Path) -> GGUFSummary:
    """Check that `path` is a whole GGUF file llama.cpp can load; raise InputError, one line, if not."""
    path = Path(path)
    r = open_gguf(path)
    try:
        hp = check_meaning(r)
    except BadValue as e:
        raise InputError(f"{path} cannot be loaded: {e}") from None
    get = lambda key: _max(hp.get(key))  # noqa: E731
    n_embd, n_head = get("n_embd"), get("attention.head_count")
    head_dim = get("attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    tensors = tuple(TensorEntry(t.name, t.tensor_type.name, int(t.n_bytes), int(t.data_offset)) for t in r.tensors)
    return GGUFSummary(
        path=path, file_size=int(r.data.size), version=int(r.fields["GGUF.version"].parts[0][0]),
        n_tensors=len(tensors), tensor_bytes=sum(t.n_bytes for t in tensors),
        alignment=int(r.alignment), data_offset=int(r.data_offset), architecture=hp["architecture"],
        n_layer=get("n_layer"), n_embd=n_embd, n_head=n_head,
        n_head_kv=get("attention.head_count_kv") or n_head,
        head_dim=head_dim, head_dim_v=get("attention.value_length") or head_dim,
        n_ff=get("expert_feed_forward_length") or get("feed_forward_length"),
        n_vocab=get("vocab_size") or hp["n_vocab"],
        context_length=get("n_ctx_train"),
        n_expert=get("n_expert") or 0, n_expert_used=get("n_expert_used") or 0,
        tensors=tensors, reader=r,
    )
