"""Quantization speed: localmix against llama.cpp's own quantizer, in one run.

Both quantize the same F32 GGUF (Mixtral 8x7B's real widths, one layer: 1.7 B weights,
6.9 GB; built and cached in --dir) to Q4_K_M and Q3_K_M with the same number of threads:
`localmix quantize model-F32.gguf ...` and `llama_cpp.llama_model_quantize` (each in its own
process, so both pay their start-up). Prints both times, the ratio and each process's peak
memory (sampled from /proc, anonymous and file-backed apart: child_memory.py), then a
per-type kernel throughput table: localmix's kernels (numba, N threads and 1 thread) against
ggml's `ggml_quantize_chunk` (one thread, as llama.cpp calls it per worker).

    python benchmarks/bench_quantize.py [--threads 2] [--types Q4_K_M,Q3_K_M] [--kernels-only [--kernel-types IQ4_XS,IQ3_S]] \
        [--report FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_convert import LLAMA_QUANTIZE, WIDTHS
from child_memory import measure
from report import write_report

from localmix.convert.pipeline import convert
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.kernels import QType

KERNEL_TYPES = [QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.Q4_0, QType.Q5_0, QType.Q8_0,
                QType.IQ4_NL, QType.IQ4_XS, QType.IQ3_XXS, QType.IQ3_S, QType.IQ2_S]


def file_benchmark(f32: Path, types: list[str], threads: int, work: Path) -> tuple[str, list[str], list[list]]:
    """Quantize `f32` with both tools, printing as it goes; return the report's table."""
    caption = f"F32 GGUF {f32.stat().st_size / 1e9:.2f} GB -> quantized, {threads} threads"
    print(f"\n{caption}")
    rows = []
    print(f"{'type':7} {'tool':10} {'seconds':>8}  peak RSS (of the quantizing process alone)")
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    for file_type in types:
        out = work / f"bench-{file_type}.gguf"
        ours = measure([sys.executable, "-m", "localmix", "quantize", str(f32), str(out), "--type", file_type,
                        "--force"], env=env)
        out.unlink()
        code = LLAMA_QUANTIZE.format(tests=str(REPO / "tests"), src=str(f32), out=str(out), ftype=file_type, threads=threads)
        theirs = measure([sys.executable, "-c", code])
        out.unlink()
        print(f"{file_type:7} {'localmix':10} {ours.seconds:8.1f}  {ours}")
        print(f"{file_type:7} {'llama.cpp':10} {theirs.seconds:8.1f}  {theirs}")
        print(f"{file_type:7} ratio: localmix is {theirs.seconds / ours.seconds:.2f}x llama.cpp's speed")
        rows.append([file_type, f"{ours.seconds:.1f} s", f"{theirs.seconds:.1f} s", f"{theirs.seconds / ours.seconds:.2f}x",
                     ours, theirs])
    return caption, ["type", "localmix", "llama.cpp", "speed ratio", "peak RSS localmix", "peak RSS llama.cpp"], rows


def kernel_benchmark(threads: int, types: list[QType]) -> tuple[str, list[str], list[list]]:
    """Time the quantization kernels, printing as it goes; return the report's table."""
    import numba
    from ggml_ref import ggml_quantize

    from localmix import kernels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 4096), dtype=np.float32)
    imatrix = rng.gamma(1.0, 1.0, 4096).astype(np.float32)

    def rate(fn) -> float:
        fn()  # warm-up (numba compiles or loads its cache)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return x.size / best / 1e6

    caption = f"kernel throughput, million weights/s, rows of 4096 ({x.shape[0]} rows)"
    print(f"\n{caption}")
    rows = []
    print(f"{'type':6} {'imatrix':8} {'localmix ' + str(threads) + 't':>12} {'localmix 1t':>12} {'ggml 1t':>9}")
    for qtype in types:
        rates = []  # (imatrix, localmix N threads, localmix 1 thread, ggml 1 thread), without then with
        for w in (None, imatrix):
            if qtype == QType.Q8_0 and w is not None:
                continue
            numba.set_num_threads(threads)
            many = rate(lambda: kernels.quantize(x, qtype, w))
            numba.set_num_threads(1)
            one = rate(lambda: kernels.quantize(x, qtype, w))
            ggml = rate(lambda: ggml_quantize(x, qtype, w))
            print(f"{qtype.name:6} {'yes' if w is not None else 'no':8} {many:12.1f} {one:12.1f} {ggml:9.1f}")
            rates.append(("yes" if w is not None else "no", f"{many:.1f}", f"{one:.1f}", f"{ggml:.1f}"))
        rows.append([qtype.name] + [" / ".join(column) for column in zip(*rates)])
    numba.set_num_threads(threads)
    return caption, ["type", "imatrix", f"localmix {threads} threads", "localmix 1 thread", "ggml 1 thread"], rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kernels-only", action="store_true")
    ap.add_argument("--kernel-types", default=",".join(t.name for t in KERNEL_TYPES))
    ap.add_argument("--report", type=Path, help="also write the tables to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()

    tables = []
    if not args.kernels_only:
        src = args.dir / "mixtral-8x7b-widths-1-layer"
        if not (src / "config.json").exists():
            make_tiny_checkpoint(src, **WIDTHS)
        f32 = args.dir / "mixtral-8x7b-widths-1-layer-F32.gguf"
        if not f32.exists():
            convert(src, f32, "F32")
        tables.append(file_benchmark(f32, args.types.split(","), args.threads, args.dir))
    tables.append(kernel_benchmark(args.threads, [QType[t] for t in args.kernel_types.split(",")]))
    if args.report:
        write_report(args.report, tables)


if __name__ == "__main__":
    main()
