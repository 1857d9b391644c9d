"""Wall time and peak memory of one command, measured in the command's own process.

`os.wait4`'s `ru_maxrss` is no measure of a child forked from a big process: Linux keeps the
high-water mark from before the exec, so a child of a benchmark that has just built a 3 GB
checkpoint reports 2.6 GiB whatever it runs. Here the command's /proc/PID/status is sampled
while it runs (every `interval` seconds): VmHWM, the peak resident size of the program the
exec started (reset by the exec), and the largest RssAnon (heap, buffers: memory the program
owns) and RssFile (pages of mapped files, which the kernel can drop and read again) seen, as
bench_scale.py reports them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

GiB = 1 << 30


@dataclass
class Measured:
    seconds: float
    peak: int        # bytes: VmHWM, the most resident at once (anonymous + file-backed + shared)
    peak_anon: int   # bytes: the most RssAnon seen
    peak_file: int   # bytes: the most RssFile seen

    def __str__(self) -> str:
        return f"{self.peak / GiB:.2f} GiB ({self.peak_anon / GiB:.2f} anon + {self.peak_file / GiB:.2f} file)"


def _status(pid: int) -> dict[str, int]:
    """The memory lines of /proc/PID/status in bytes; empty once the process has exited."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.01) -> Measured:
    """Run `cmd` to completion (exiting with its error on failure), sampling its memory."""
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0}
    with tempfile.TemporaryFile() as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        while proc.poll() is None:
            # until the exec, the child is a fork of this process: its samples do not count
            execed = _cmdline(proc.pid) == cmd
            for k, v in _status(proc.pid).items():
                if execed:
                    peak[k] = max(peak[k], v)
            time.sleep(interval)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            log.seek(0)
            sys.exit(f"failed: {' '.join(cmd)}\n{log.read().decode(errors='replace')[-2000:]}")
    return Measured(seconds, peak["VmHWM"], peak["RssAnon"], peak["RssFile"])


def _cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return None
