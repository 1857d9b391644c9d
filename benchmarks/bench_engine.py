"""Prefill and decode speed of localmix's native engine and of llama.cpp, same file, same threads.

For the tiny test model and a mid-size synthetic model with Mixtral 8x7B's widths and 4 layers
(`localmix synth --layers 4`), at Q4_K_M and Q3_K_M. Also the memory-bandwidth limit of this
machine for each file: the bytes one decoded token must read (every non-expert weight, the
chosen 2 of 8 experts of each layer, one embedding row) over the measured copy bandwidth,
and the fraction of that limit each engine reaches.

    python benchmarks/bench_engine.py [--threads 2] [--dir /tmp/localmix-engine-bench] [--report FILE.md]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
from report import write_report

PROMPT = ("[INST] Explain, in a few paragraphs, how a mixture-of-experts language model routes each token "
          "to two of its eight experts, and why that makes it cheaper to run than a dense model. [/INST]")
EXPERT = re.compile(r"^blk\.\d+\.ffn_(gate|up|down)_exps\.")


def copy_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second that np.copyto reads (reading and writing `n_bytes` each time)."""
    a, b = np.ones(n_bytes, np.uint8), np.empty(n_bytes, np.uint8)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return n_bytes / best  # read bandwidth; the write stream is as large again


def bytes_per_token(path: Path) -> int:
    from localmix.gguf.check import check_gguf

    s = check_gguf(path)
    n_expert, used = max(s.n_expert, 1), max(s.n_expert_used, 1)
    total = 0
    for t in s.tensors:
        if t.name == "token_embd.weight":
            total += t.n_bytes // s.n_vocab
        elif EXPERT.match(t.name):
            total += t.n_bytes * used // n_expert
        else:
            total += t.n_bytes
    return total


def run(engine, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill t/s, decode t/s) of one greedy generation from an empty cache."""
    from localmix.runtime.stream import Sampling

    for _ in engine.generate([1, 415], Sampling(max_tokens=2)):  # warm-up: threads, compiled kernels
        pass
    *_, done = engine.generate(prompt, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=tokens))
    return done.prompt_tps, done.generate_tps


def bench(path: Path, threads: int, tokens: int, bandwidth: float) -> list[str]:
    """Print both engines' speeds on `path`; return them as a row of the report's table."""
    from localmix.native.engine import NativeEngine
    from localmix.runtime.llama import LlamaCppEngine

    per_token = bytes_per_token(path)
    limit = bandwidth / per_token
    print(f"\n{path.name}: {path.stat().st_size / 1e9:.2f} GB, {per_token / 1e6:.0f} MB read per decoded token, "
          f"bandwidth limit {limit:.1f} t/s")
    print(f"{'engine':<10} {'prefill t/s':>12} {'decode t/s':>11} {'of limit':>9}")
    results = {}
    for name, make in (("llama.cpp", lambda: LlamaCppEngine(path, n_ctx=512, n_threads=threads, repack=True)),
                       ("native", lambda: NativeEngine(path, n_ctx=512, n_threads=threads))):
        engine = make()
        prompt = [1] + engine.tokenize(PROMPT)
        prefill, decode = run(engine, prompt, tokens)
        results[name] = prefill, decode
        print(f"{name:<10} {prefill:12.1f} {decode:11.2f} {decode / limit:8.0%}")
        del engine
    (native_prefill, native), (llama_prefill, llama) = results["native"], results["llama.cpp"]
    print(f"ratio native / llama.cpp decode: {native / llama:.2f}")
    return [f"{path.name}, {path.stat().st_size / 1e9:.2f} GB", f"{per_token / 1e6:.0f} MB", f"{limit:.1f} t/s",
            f"{native_prefill:.1f} / {native:.2f} t/s ({native / limit:.0%})",
            f"{llama_prefill:.1f} / {llama:.2f} t/s ({llama / limit:.0%})", f"{native / llama:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-engine-bench"))
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.threads))

    from localmix.convert.pipeline import convert
    from localmix.fixtures.synth import synth
    from localmix.fixtures.tiny import make_tiny_checkpoint

    args.dir.mkdir(parents=True, exist_ok=True)
    bandwidth = copy_bandwidth()
    setup = f"{os.cpu_count()} cores, {args.threads} threads, copy bandwidth {bandwidth / 1e9:.1f} GB/s (np.copyto, read side)"
    print(setup)
    rows = []
    tiny = make_tiny_checkpoint(args.dir / "tiny-mixtral")
    for file_type in args.types.split(","):
        files = [args.dir / f"tiny-mixtral-{file_type}.gguf", args.dir / f"mixtral-8x7b-4-layers-{file_type}.gguf"]
        if not files[0].exists():
            convert(tiny, files[0], file_type)
        if not files[1].exists():
            synth("mixtral-8x7b", file_type, files[1], n_layers=4)
        for f in files:
            rows.append(bench(f, args.threads, args.tokens, bandwidth))
    if args.report:
        write_report(args.report, [(f"{setup}; {args.tokens} greedy tokens; (x%): of the bandwidth limit",
                                    ["file", "per decoded token", "bandwidth limit", "native prefill / decode",
                                     "llama.cpp prefill / decode", "decode ratio"], rows)])


if __name__ == "__main__":
    main()
