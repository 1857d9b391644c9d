"""Full-size Mixtral on this machine: load time, first token, resident memory, decode speed.

Writes synthetic Mixtral 8x7B files (`localmix synth`: real shapes and sizes, random
weights) and runs each through localmix (its planner's placement: weights in the memory map)
(and through localmix's native engine with `--engines native`) and through plain
llama-cpp-python with its defaults (`Llama(model_path, n_ctx, n_threads)`:
memory-mapped, but Q4_K and other types repacked into anonymous memory at load), in one run.
Every measurement is a fresh process started with the file evicted from the page cache, so
each engine loads cold, as after a reboot. The same prompt, greedy, `--tokens` tokens.

    python benchmarks/bench_scale.py --types Q3_K_M,Q4_K_M --dir /tmp/localmix-scale [--report FILE.md]

Files are written one at a time and deleted after their runs unless --keep (22.5 + 28.4 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from report import write_report

PROMPT = "[INST] Write a short story about a lighthouse keeper who finds a message in a bottle. [/INST]"
GiB = 1 << 30


def rss() -> dict[str, float]:
    """This process's resident memory in GiB: anonymous (heap, KV cache, repacked weights) and
    file-backed (pages of the mapped model)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0]] = int(line.split()[1]) / (1 << 20)
    return out


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def worker(path: str, engine: str, ctx: int, threads: int, tokens: int) -> dict:
    t0 = time.perf_counter()
    if engine in ("localmix", "native"):
        from localmix.frontends.load import open_engine
        from localmix.runtime.stream import Sampling

        # os.cpu_count() threads, as --threads defaults to
        e = open_engine(path, ctx=ctx, force=True, engine="llama.cpp" if engine == "localmix" else "native")
        load = time.perf_counter() - t0
        after_load = rss()
        prompt = [1] + e.tokenize(PROMPT)
        *_, ev = e.generate(prompt, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=tokens))
        ttft, n, gen = ev.prompt_seconds, ev.generated_tokens - 1, ev.generate_seconds  # tokens after the first
        placement = e.plan.repack and "repacked" or "mapped"
    else:
        from llama_cpp import Llama

        llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
        load = time.perf_counter() - t0
        after_load = rss()
        prompt = [1] + llm.tokenize(PROMPT.encode(), add_bos=False, special=True)
        t1 = time.perf_counter()
        n, t_first = 0, None
        for _token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            if t_first is None:
                t_first = time.perf_counter()
            n += 1
            if n == tokens:
                break
        ttft, gen, n = t_first - t1, time.perf_counter() - t_first, n - 1  # tokens after the first
        placement = "defaults"
    return {"engine": engine, "placement": placement, "load_s": load, "rss_after_load": after_load, "ttft_s": ttft,
            "prompt_tokens": len(prompt), "decode_tps": n / gen if gen > 0 else 0.0, "rss_after_tokens": rss(),
            "tokens": n}


def measure(path: Path, engine: str, args) -> dict:
    evict(path)
    cmd = [sys.executable, __file__, "--worker", str(path), engine, str(args.ctx), str(args.threads), str(args.tokens)]
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "failed": f"still running after {args.timeout} s"}
    if r.returncode != 0:
        why = f"killed by signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
        return {"engine": engine, "failed": why, "after_s": time.perf_counter() - t0}
    return json.loads(r.stdout.strip().splitlines()[-1])


def show(file_type: str, size: int, results: list[dict]) -> list[list[str]]:
    """Print one file's results; return them as rows of the report's table."""
    label = f"{file_type} {size / 1e9:.1f} GB"
    rows = []
    print(f"\nMixtral 8x7B {file_type}, synthetic, {size / 1e9:.1f} GB ({size / GiB:.1f} GiB)")
    print(f"{'engine':<18} {'load s':>7} {'RSS after load (anon+file) GiB':>31} {'first token s':>14} "
          f"{'decode t/s':>11} {'RSS after tokens GiB':>21}")
    for r in results:
        if "failed" in r:
            print(f"{r['engine']:<18} failed: {r['failed']}")
            rows.append([label, r["engine"], f"failed: {r['failed']}", "", "", "", ""])
            continue
        a, b = r["rss_after_load"], r["rss_after_tokens"]
        print(f"{r['engine']:<18} {r['load_s']:7.1f} {a['RssAnon']:14.2f} + {a['RssFile']:5.2f} = {a['RssAnon'] + a['RssFile']:5.2f}"
              f"   {r['ttft_s']:14.2f} {r['decode_tps']:11.2f} {b['RssAnon']:7.2f} + {b['RssFile']:5.2f} = "
              f"{b['RssAnon'] + b['RssFile']:5.2f}")
        rows.append([label, r["engine"], f"{r['load_s']:.1f} s", f"{a['RssAnon']:.2f} + {a['RssFile']:.2f}",
                     f"{r['ttft_s']:.1f} s", f"{r['decode_tps']:.2f} t/s", f"{b['RssAnon']:.2f} + {b['RssFile']:.2f}"])
    ok = {r["engine"]: r for r in results if "failed" not in r}
    if "localmix" in ok and "llama-cpp-python" in ok:
        ours, theirs = ok["localmix"], ok["llama-cpp-python"]
        print(f"ratio localmix / llama-cpp-python: load {theirs['load_s'] / ours['load_s']:.2f}x faster, "
              f"decode {ours['decode_tps'] / theirs['decode_tps']:.2f}x, first token "
              f"{theirs['ttft_s'] / ours['ttft_s']:.2f}x faster")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, engine, ctx, threads, tokens = sys.argv[2:7]
        print(json.dumps(worker(path, engine, int(ctx), int(threads), int(tokens))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--types", default="Q3_K_M,Q4_K_M")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-scale"))
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--timeout", type=int, default=900, help="seconds a run may take before it counts as failed")
    ap.add_argument("--engines", default="localmix,llama-cpp-python",
                    help="of localmix (llama.cpp as localmix places it), llama-cpp-python (its defaults), native")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers (a quick check)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()

    from localmix.fixtures.synth import synth

    args.dir.mkdir(parents=True, exist_ok=True)
    mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    setup = (f"{os.cpu_count()} cores, {mem / GiB:.1f} GiB RAM, {args.threads} threads, context {args.ctx}, "
             f"{args.tokens} tokens greedy, each run a fresh process with the file evicted from the page cache")
    print(setup)
    rows = []
    for file_type in args.types.split(","):
        layers = f"-{args.layers}-layers" if args.layers else ""
        path = args.dir / f"{args.preset}{layers}-{file_type}-synthetic.gguf"
        if not path.exists():
            t0 = time.perf_counter()
            synth(args.preset, file_type, path, n_layers=args.layers)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
        results = [measure(path, engine, args) for engine in args.engines.split(",")]
        rows += show(file_type, path.stat().st_size, results)
        print(json.dumps({"type": file_type, "results": results}))
        if not args.keep:
            path.unlink()
    if args.report:
        write_report(args.report, [(f"{args.preset}, synthetic (`localmix synth`); {setup}; RSS anonymous + file-backed, GiB",
                                    ["file", "engine", "load", "RSS after load", "first token", "decode",
                                     f"RSS after {args.tokens} tokens"], rows)])


if __name__ == "__main__":
    main()
