"""How fast a broken GGUF is turned away: localmix's `check_gguf` against llama.cpp's loader.

A tiny Mixtral Q8_0 file is written (localmix.fixtures.tiny, converted), then a copy whose
`tokenizer.ggml.scores` array claims 2**60 items (gguf-py's stock reader would read them one
by one). Both readers are timed on the valid file and on the broken one, best of --repeat:
`check_gguf` (localmix.gguf.check, what `chat`/`run`/`info` run before llama.cpp sees a file)
and llama.cpp opening the file with only its vocabulary (`Llama(vocab_only=True)`, which
parses the whole header and the metadata). Prints the times and the speed ratio.

    python benchmarks/bench_check.py [--repeat 5] [--report docs/benchmarks/bench_check.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from report import write_report

from localmix.convert.pipeline import convert
from localmix.errors import InputError
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.gguf.check import check_gguf


def huge_array(model: Path, out: Path) -> Path:
    """`model` with the length of its tokenizer.ggml.scores array set to 2**60."""
    field = gguf.GGUFReader(model).fields["tokenizer.ggml.scores"]
    at = field.offset + sum(int(p.nbytes) for p in field.parts[:4])  # key length, key, type, item type, length
    data = bytearray(model.read_bytes())
    data[at:at + 8] = np.array([2**60], "<u8").tobytes()
    out.write_bytes(data)
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def localmix_check(path: Path) -> None:
    try:
        check_gguf(path)
    except InputError:
        pass


def llama_cpp_open(path: Path) -> None:
    from llama_cpp import Llama

    try:
        Llama(model_path=str(path), vocab_only=True, verbose=False)
    except ValueError:  # llama-cpp-python's "Failed to load model from file"
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = convert(make_tiny_checkpoint(tmp / "ckpt"), tmp / "tiny-Q8_0.gguf", "Q8_0").path
        bad = huge_array(model, tmp / "huge-array.gguf")
        print(f"{'file':28} {'check_gguf':>11} {'llama.cpp':>11}  check_gguf's speed / llama.cpp's")
        for label, path in ((f"valid ({model.stat().st_size / 1e6:.0f} MB)", model), ("scores length 2**60", bad)):
            ours, theirs = best(lambda: localmix_check(path), args.repeat), best(lambda: llama_cpp_open(path), args.repeat)
            print(f"{label:28} {ours * 1e3:8.1f} ms {theirs * 1e3:8.1f} ms {theirs / ours:6.2f}x")
            rows.append([label, f"{ours * 1e3:.1f} ms", f"{theirs * 1e3:.1f} ms", f"{theirs / ours:#.3g}x"])
    if args.report:
        write_report(args.report, [(f"best of {args.repeat}; speed ratio: check_gguf's speed / llama.cpp's",
                                    ["file", "check_gguf", "llama.cpp", "speed ratio"], rows)])


if __name__ == "__main__":
    main()
