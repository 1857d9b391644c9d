"""A benchmark's results as a Markdown file: its tables, and where, when and how they were measured.

    from report import write_report
    write_report(args.report, [("", ["type", "seconds"], rows)])

The file gives the date and how long the run took, the machine (CPU model, cores, RAM), the
load average when the benchmark started and when it ended, the localmix commit, and the exact
command line, with the thread and niceness settings that change the figures. The start is when
this module was first imported: the benchmarks import it before they measure anything.
Results go to docs/benchmarks/NAME.md (see docs/benchmarks.md).
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

STARTED = datetime.datetime.now().astimezone()
STARTED_MONOTONIC = time.monotonic()
LOAD_AT_START = os.getloadavg()
# settings that change what a benchmark measures, written in front of the command line
ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
GiB = 1 << 30
MEASURED = ("localmix", "benchmarks", "tests")  # the code whose changes change the figures


def write_report(path: Path | str, tables: list[tuple[str, list[str], list[list]]], notes: str = "") -> Path:
    """Write `tables` (each a caption, which may be empty, a header and rows of cells) as
    Markdown to `path`, after a header that says when, where and how they were measured."""
    path = Path(path)
    lines = [
        f"# {Path(sys.argv[0]).name}",
        "",
        f"- date: {STARTED:%Y-%m-%d %H:%M %Z}; the run took {time.monotonic() - STARTED_MONOTONIC:.0f} s",
        f"- machine: {_machine()}",
        f"- load average (1, 5, 15 min): {_load(LOAD_AT_START)} at the start, {_load(os.getloadavg())} at the end",
        f"- localmix: {_commit()}",
        f"- command: `{command_line()}`",
    ]
    for caption, header, rows in tables:
        lines += ["", caption, ""] if caption else [""]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if notes:
        lines += ["", notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def show(caption: str, header: list[str], rows: list[list], report: Path | str | None = None) -> None:
    """Print one table (its caption, then a line per row, cells split by " | "), and write it
    to `report` with write_report when one is given (a script's --report)."""
    if caption:
        print(caption)
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(cell) for cell in row))
    if report:
        write_report(report, [(caption, header, rows)])


def command_line() -> str:
    """How this process was started, as a shell line: the settings of ENV that are set, `nice`
    when it runs niced, then `python` and its arguments."""
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in ENV if name in os.environ]
    nice = os.nice(0)
    return " ".join(env + ([f"nice -n {nice}"] if nice else []) + ["python", shlex.join(sys.argv)])


def _machine() -> str:
    """The CPU model (with its family and model numbers, and its widest x86 SIMD), cores, RAM."""
    cpu = platform.processor() or platform.machine()
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" in info:
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"
        flags = info.get("flags", "").split()
        simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "AVX" if "avx" in flags else ""
        cpu += f", {simd}" if simd else ""
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB
    return f"{cpu}, {cores} cores" + (f" ({usable} usable)" if usable != cores else "") + f", {ram:.1f} GiB RAM"


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.2f}" for x in load)


def _commit() -> str:
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *MEASURED], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (f" with uncommitted changes in {', '.join(MEASURED)}" if dirty else "")
