"""Where localmix keeps its files, by the XDG base-directory rules: the cache (the demo model,
numba's compiled kernels) and the data folder (the chat's input history)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/localmix, ~/.cache/localmix by default."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "localmix"


def data_dir() -> Path:
    """$XDG_DATA_HOME/localmix, ~/.local/share/localmix by default."""
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "localmix"
