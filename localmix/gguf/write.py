"""Write a GGUF file tensor by tensor, atomically.

The header, metadata and tensor table are encoded by the `gguf` package's `GGUFWriter` (the
reference implementation of the format); the tensor data is then appended piece by piece, so
a tensor never has to be held whole in memory: a stacked expert tensor is written one
expert's slice at a time.

Everything goes to a hidden temporary file beside the destination (`.NAME.partial-XXXX`),
which is fsynced and renamed over the destination only when every byte is written. On any
error, Ctrl-C included, the temporary file is removed; a crash leaves at worst a `.partial`
file that no tool mistakes for a model.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import gguf
import numpy as np

from localmix.errors import InputError, OutputError
from localmix.outfile import publish, temporary_beside


def _io_error(path: Path, e: OSError) -> OutputError:
    reason = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is too large for this disk or limit",
              errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
    return OutputError(f"cannot write {path}: {reason}; nothing was written")


class GGUFFileWriter:
    """Usage:

        with GGUFFileWriter(out, arch="llama", force=False) as w:
            w.header.add_...(...)                      # metadata through gguf.GGUFWriter
            w.header.add_tensor_info(...)              # every tensor, in write order
            w.begin_data()
            for each tensor: w.write(part) ...; w.end_tensor()
        # the file now exists at `out`, complete
    """

    def __init__(self, path: str | Path, arch: str, force: bool = False):
        self.path = Path(path)
        self.force = force
        self.header = gguf.GGUFWriter(path=None, arch=arch)
        self._tmp: Path | None = None
        self._f = None
        self._tensor_sizes: list[int] = []
        self._written = 0  # bytes of the current tensor so far

    def __enter__(self) -> "GGUFFileWriter":
        if self.path.exists() and not self.force:
            raise InputError(f"{self.path} already exists; pass --force to overwrite it")
        if self.path.is_dir():
            raise InputError(f"{self.path} is a directory; give the output file's name")
        parent = self.path.parent
        if not parent.is_dir():
            raise OutputError(f"cannot write {self.path}: directory {parent} does not exist")
        try:
            self._tmp = temporary_beside(self.path)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror} (is {parent} writable?)") from None
        return self

    def begin_data(self) -> None:
        """Write the header, metadata and tensor table; tensor data follows."""
        tensors = self.header.tensors[0]
        self._tensor_sizes = [ti.nbytes for ti in tensors.values()]
        self._alignment = self.header.data_alignment
        try:
            self.header.write_header_to_file(path=self._tmp)
            self.header.write_kv_data_to_file()
            self.header.write_ti_data_to_file()
            self.header.close()
            self._f = open(self._tmp, "ab")
            self._pad()
        except OSError as e:
            raise _io_error(self.path, e) from None

    def _pad(self) -> None:
        pad = -self._f.tell() % self._alignment
        if pad:
            self._f.write(b"\0" * pad)

    def write(self, data: np.ndarray) -> int:
        """Append bytes of the current tensor; returns how many."""
        try:
            self._f.write(np.ascontiguousarray(data).data)
        except OSError as e:
            raise _io_error(self.path, e) from None
        self._written += data.nbytes
        return data.nbytes

    def end_tensor(self) -> None:
        expected = self._tensor_sizes.pop(0)
        assert self._written == expected, f"wrote {self._written} bytes for a tensor of {expected}"
        self._written = 0
        try:
            self._pad()
        except OSError as e:
            raise _io_error(self.path, e) from None

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                assert not self._tensor_sizes, f"{len(self._tensor_sizes)} tensors were never written"
                try:
                    self._f.flush()
                    os.fsync(self._f.fileno())
                    self._f.close()
                    publish(self._tmp, self.path)
                except OSError as e:
                    raise _io_error(self.path, e) from None
                self._tmp = None
        finally:
            if self._f is not None and not self._f.closed:
                try:
                    self._f.close()
                except OSError:
                    pass
            self.header.close()
            if self._tmp is not None:
                self._tmp.unlink(missing_ok=True)
