"""The same GGUF decoded in one process and split over one and two `localmix worker`s on
127.0.0.1 (llama.cpp's RPC backend, `--rpc`): load time, prompt and decode tokens/s, and the
bytes sent at load (the weights of the workers' layers, from the plan; and what crossed the
loopback interface meanwhile, from /proc/net/dev, which counts the whole machine's loopback).

    python benchmarks/bench_rpc.py [--model tiny | FILE.gguf] [--tokens 64] [--threads 2] [--report FILE.md]

`--model tiny` (the default) builds the tiny Mixtral with 4 layers (F32) under --dir. On one
machine the workers share its cores and memory with the main process: what this measures is
the cost of the protocol's round trips, not a gain.
"""

from __future__ import annotations

import argparse
import gc
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from report import write_report

REPO = Path(__file__).resolve().parents[1]
PROMPT = ("[INST] Explain, in a few paragraphs, how a mixture-of-experts language model routes each token "
          "to two of its eight experts. [/INST]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_bytes() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[0])
    return 0


def tiny_model(folder: Path) -> Path:
    from localmix.convert.pipeline import convert
    from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint

    out = folder / "tiny-mixtral-4l-F32.gguf"
    if not out.exists():
        make_tiny_checkpoint(folder / "tiny-mixtral-4l", spec=TinySpec(num_hidden_layers=4))
        convert(folder / "tiny-mixtral-4l", out, "F32")
    return out


def start_worker(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "worker", "--port", str(port), "--threads",
                             str(threads)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if f"127.0.0.1:{port}" not in line:
        raise SystemExit(f"the worker did not start: {line}")
    return proc, f"127.0.0.1:{port}"


def measure(path: Path, rpc: str | None, threads: int, tokens: int) -> list:
    """One row: workers, layers per device, load s, prompt t/s, decode t/s, weights sent, loopback bytes."""
    from localmix.frontends.load import plan_engine
    from localmix.runtime.llama import LlamaCppEngine
    from localmix.runtime.stream import Sampling

    _, plan, _ = plan_engine(path, 512, rpc=rpc)
    sent = sum(s.weights_bytes for s in plan.shares[1:])
    lo, t = loopback_bytes(), time.perf_counter()
    engine = LlamaCppEngine(path, n_ctx=512, n_threads=threads, plan=plan)
    load, lo = time.perf_counter() - t, loopback_bytes() - lo
    prompt = engine.tokenize(PROMPT, add_bos=True)
    for _ in engine.generate(prompt[:4], Sampling(max_tokens=2)):  # warm-up
        pass
    *_, done = engine.generate(prompt, Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=tokens))
    split = " / ".join(f"{s.device} {s.n_layers}" for s in plan.shares) or "CPU all"
    engine.llm.close()
    del engine
    gc.collect()
    row = [rpc.count(",") + 1 if rpc else 0, split, f"{load:.2f}", f"{done.prompt_tps:.1f}",
           f"{done.generate_tps:.1f}", f"{sent / 2**20:.1f} MiB", f"{lo / 2**20:.1f} MiB"]
    print(" | ".join(map(str, row)), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny, or a GGUF file")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/localmix-rpc-bench"))
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", type=Path, help="write the results as Markdown here")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    path = tiny_model(args.dir) if args.model == "tiny" else Path(args.model)
    workers = [start_worker(args.threads), start_worker(args.threads)]
    header = ["workers", "layers", "load s", "prompt t/s", "decode t/s", "weights sent", "loopback bytes at load"]
    print(" | ".join(header))
    try:
        rows = [measure(path, rpc, args.threads, args.tokens)
                for rpc in (None, workers[0][1], f"{workers[0][1]},{workers[1][1]}")]
    finally:
        for proc, _ in workers:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
    if args.report:
        write_report(args.report, [(f"{path.name}, {args.tokens} tokens decoded, {args.threads} threads per "
                                    "process, workers on 127.0.0.1", header, rows)])


if __name__ == "__main__":
    main()
