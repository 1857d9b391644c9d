"""Open a GGUF file and read its metadata: `open_gguf(path)` (one clean line for a file that is
missing or does not parse) and `field_value(reader, key, default)`. The reader memory-maps the
file, so nothing of the tensor data is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import GGUFReader

from localmix.errors import InputError


def open_gguf(path: str | Path) -> GGUFReader:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found")
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise InputError(f"{path} is not a valid GGUF file, or it is truncated/corrupt ({e}); re-download or re-convert it") from None


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()
