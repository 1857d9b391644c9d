"""Speed of `matmul` on Mixtral 8x7B's shapes: decode matvec against memory bandwidth, prefill.

For each type and shape: the time of one decode product (T = 1) and the weight bytes it
reads per second, as a fraction of what the machine's threads can read (a numba parallel sum
over a 1 GiB array: the ceiling for a kernel that reads every weight byte once); then T = 64
prefill throughput, of `matmul` and of dequantize + numpy BLAS (`matmul_ref`). Weights are
random bytes with sane FP16 scales (speed does not depend on the values), in enough copies to
spill the caches as a model's experts do; each figure is the best of several runs (the
machine is shared).

    python benchmarks/bench_kernels.py [--types Q4_K,Q6_K] [--prefill-t 64] [--repeat 5] [--report FILE.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from numba import njit, prange
from report import write_report

from localmix.kernels import QType, quantize, row_nbytes
from localmix.kernels.matmul import matmul, matmul_ref

SHAPES = {"w1/w3": (14336, 4096), "w2": (4096, 14336), "attn_q": (4096, 4096)}
OUTPUT = ("output", (32000, 4096), QType.Q6_K)
TYPES = ["Q4_K", "Q3_K", "Q6_K", "Q8_0", "Q5_0", "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S"]
POOL_BYTES = 1 << 30  # weight copies cycled through per shape, to read from memory, not cache


@njit(parallel=True, cache=True)
def _read_all(a, out):
    for r in prange(a.shape[0]):
        s = np.int32(0)
        for i in range(a.shape[1]):
            s = np.int32(s + np.int32(a[r, i]))
        out[r] = s


def best(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


def bandwidth(repeat: int) -> tuple[float, float]:
    """(np.copyto of 1 GiB, bytes copied per second; a parallel read of 1 GiB, bytes per second)."""
    a = np.ones(POOL_BYTES // 4, dtype=np.float32)
    b = np.empty_like(a)
    copy = a.nbytes / best(lambda: np.copyto(b, a), repeat)
    rows = a.view(np.uint8).reshape(-1, 4096)
    sums = np.empty(rows.shape[0], dtype=np.int32)
    read = rows.nbytes / best(lambda: _read_all(rows, sums), repeat)
    return copy, read


def weights(qtype: QType, n: int, k: int, copies: int, rng) -> np.ndarray:
    """`copies` tensors of n rows of k: random bytes, with real (quantized) bytes in each block's
    scales so no value is inf or nan: one quantized row tiled over the blocks' scale fields."""
    real = quantize(rng.standard_normal((1, k)).astype(np.float32), qtype)[0]
    pool = rng.integers(0, 256, size=(copies, n, real.size), dtype=np.uint8)
    block = real.size // (k // GGML_QUANT_SIZES[qtype][0])
    scale_bytes = {"Q2_K": slice(80, 84), "Q3_K": slice(108, 110), "Q4_K": slice(0, 4), "Q5_K": slice(0, 4),
                   "Q6_K": slice(208, 210)}.get(qtype.name, slice(0, 2 if qtype.name.endswith("_0") or
                                                               qtype.name.startswith("IQ") else 4))
    view = pool.reshape(copies, n, -1, block)
    view[..., scale_bytes] = real.reshape(-1, block)[:, scale_bytes]
    return pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--prefill-t", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-ref", action="store_true", help="skip dequantize + BLAS (slow)")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    copy, read = bandwidth(args.repeat)
    setup = (f"{numba.get_num_threads()} threads; np.copyto 1 GiB: {copy / 1e9:.1f} GB/s copied; "
             f"parallel read 1 GiB: {read / 1e9:.1f} GB/s")
    print(setup)
    rows = []
    runs = [(name, shape, QType[t]) for t in args.types.split(",") for name, shape in SHAPES.items()] + [OUTPUT]
    print(f"{'type':5} {'shape':8} {'N x K':>12} {'MB':>6} | {'decode ms':>9} {'GB/s':>6} {'of read':>7} | "
          f"{'T':>3} {'GFLOP/s':>7} {'deq+BLAS':>8}")
    for name, (n, k), qtype in runs:
        nbytes = n * row_nbytes(qtype, k)
        copies = max(1, min(8, POOL_BYTES // nbytes))
        pool = weights(qtype, n, k, copies, rng)
        x1 = rng.standard_normal((1, k)).astype(np.float32)
        at = iter(range(1 << 30))
        t1 = best(lambda: matmul(x1, pool[next(at) % copies], qtype), max(args.repeat, 2 * copies))
        xt = rng.standard_normal((args.prefill_t, k)).astype(np.float32)
        flop = 2.0 * args.prefill_t * n * k
        tp = best(lambda: matmul(xt, pool[0], qtype), max(2, args.repeat // 2))
        ref = "" if args.no_ref else f"{flop / best(lambda: matmul_ref(xt, pool[0], qtype), 1) / 1e9:8.1f}"
        print(f"{qtype.name:5} {name:8} {n:>6}x{k:<5} {nbytes / 1e6:6.1f} | {t1 * 1e3:9.2f} {nbytes / t1 / 1e9:6.1f} "
              f"{nbytes / t1 / read:7.0%} | {args.prefill_t:3} {flop / tp / 1e9:7.1f} {ref}", flush=True)
        rows.append([qtype.name, name, f"{n}x{k}", f"{nbytes / 1e6:.1f}", f"{t1 * 1e3:.2f}", f"{nbytes / t1 / 1e9:.1f}",
                     f"{nbytes / t1 / read:.0%}", f"{flop / tp / 1e9:.1f}", ref.strip()])
        pool = None  # free the copies before the next shape
    if args.report:
        write_report(args.report, [(f"{setup}; prefill T = {args.prefill_t}, best of {args.repeat}",
                                    ["type", "shape", "N x K", "MB", "decode ms", "GB/s", "of read", "prefill GFLOP/s",
                                     "dequantize + BLAS GFLOP/s"], rows)])


if __name__ == "__main__":
    main()
