"""Output files that are never left half-written: each is written under a temporary name
beside its final one and renamed only when complete, so an interrupted or failed write
leaves the old file (or none) and no partial one. Imports no stage, like errors and units."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_beside(out: Path) -> Path:
    """A new empty file `.NAME.XXXX.partial` in `out`'s folder (the same file system, so the
    final rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    return Path(tmp)


def publish(tmp: Path, out: Path) -> None:
    """Give the finished temporary file the permissions of an ordinary new file (mkstemp makes
    it private to its owner) and rename it to `out`, replacing what was there."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, out)


@contextmanager
def atomic_output(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; when the block ends normally it becomes `out`,
    when it raises (or is interrupted) the temporary file is removed."""
    out = Path(out)
    tmp = temporary_beside(out)
    try:
        yield tmp
        publish(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
