"""`localmix serve` under a long mixed load: M minutes, C client threads on 127.0.0.1.

Each client thread loops over requests drawn at random (its own seeded generator) from a mix
of the three dialects through their own Python clients (openai, ollama, mistralai): chat
completions streamed and not, sampled (temperature 0.8, a per-request seed) and greedy
(temperature 0), JSON-schema output (`response_format` json_schema / ollama's `format`), `n` = 2,
and a share that disconnect at a random point mid-stream (raw httpx streams of the OpenAI and
ollama shapes, closed after a random number of lines). The SDK clients run with their retries
off, so every status is counted as the server sent it.

Before the load, each greedy request is sent once alone (one at a time); under the load each
greedy reply must equal its solo reply. At the end:

- requests done, and their statuses (the clients' view and the server's `/metrics`): no 5xx
  other than 503, which the server documents for a full queue (`--queue`);
- greedy replies that differ from their solo replies: none;
- the server's resident memory (VmRSS of its process, sampled every second): after the warm-up
  (the first quarter of the run), the mean of the last quarter's samples may exceed the mean of
  the second quarter's by at most `--rss-bound` MiB. The KV cache and the weights are mapped
  before the first request; what may still move is the allocator's arenas (one per thread that
  serves requests) settling, a bounded set of metrics labels, and the RAM prompt cache, which
  the server is started with at 8 MiB (`--cache-ram`, within the bound); a leak of one reply's
  text per request grows without bound and shows as a trend;
- `/metrics`: every slot free (no active sequence, nothing queued) once the clients stop;
- no traceback in the server's log.

Any failed check makes the exit status 1.

    python benchmarks/soak_serve.py --minutes 10 --clients 16 [--model FILE.gguf] [--report FILE.md]

Without --model the tiny test Mixtral is built (fixtures) and converted to Q8_0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import ollama
import openai
from bench_serve import free_port, start, tiny_model
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from report import write_report

MiB = 1 << 20
MODEL = "m"  # the served alias
PROMPTS = ["Name three colours.", "Tell me a story about a fox.", "What is two plus two?",
           "Write a haiku about the sea.", "List the days of the week."]
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "colour"], "additionalProperties": False}
# kind: share of the draws; greedy kinds are checked against their solo replies
KINDS = {"openai": 3, "openai_stream": 3, "openai_greedy": 2, "openai_stream_greedy": 2, "openai_json": 2,
         "openai_n": 1, "openai_n_greedy": 1, "ollama": 2, "ollama_stream": 2, "ollama_greedy": 2,
         "ollama_json": 1, "mistral": 2, "mistral_stream": 2, "mistral_greedy": 2, "disconnect_openai": 2,
         "disconnect_ollama": 1}
GREEDY = sorted(k for k in KINDS if k.endswith("_greedy") or k.endswith("_json"))


@dataclass
class Clients:
    """One thread's clients (the SDKs hold connection pools; one set per thread)."""
    url: str
    timeout: float = 120

    def __post_init__(self):
        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=self.timeout)
        self.ollama = ollama.Client(host=self.url, timeout=self.timeout)
        self.mistral = Mistral(api_key="none", server_url=self.url, timeout_ms=int(self.timeout * 1000))
        self.http = httpx.Client(base_url=self.url, timeout=self.timeout)


@dataclass
class Tally:
    statuses: collections.Counter = field(default_factory=collections.Counter)
    kinds: collections.Counter = field(default_factory=collections.Counter)
    mismatches: list = field(default_factory=list)
    compared: int = 0  # greedy replies checked against their solo replies
    errors: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status) -> None:
        with self.lock:
            self.statuses[status] += 1
            self.kinds[kind] += 1


def request(c: Clients, kind: str, prompt: str, seed: int, max_tokens: int, rng: random.Random) -> list[str]:
    """Send one request of `kind`; returns its choices' texts (empty for a disconnect)."""
    messages = [{"role": "user", "content": prompt}]
    greedy = kind.endswith("_greedy") or kind.endswith("_json")
    temperature = 0.0 if greedy else 0.8
    if kind.startswith("openai"):
        body = dict(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed)
        if kind == "openai_json":
            body.update(max_tokens=64, response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": SCHEMA}})
        if kind.startswith("openai_n"):
            body["n"] = 2
        if "stream" in kind:
            stream = c.openai.chat.completions.create(stream=True, **body)
            return ["".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)]
        reply = c.openai.chat.completions.create(**body)
        texts = [choice.message.content or "" for choice in sorted(reply.choices, key=lambda ch: ch.index)]
        if kind == "openai_json" and reply.choices[0].finish_reason == "stop":
            json.loads(texts[0])  # a schema-constrained reply that finished is JSON
        return texts
    if kind.startswith("ollama"):
        options = {"temperature": temperature, "num_predict": max_tokens, "seed": seed}
        if kind == "ollama_json":
            reply = c.ollama.chat(MODEL, messages, format=SCHEMA, options={**options, "num_predict": 64})
            return [reply.message.content]
        if kind == "ollama_stream":
            return ["".join(part.message.content for part in c.ollama.chat(MODEL, messages, options=options,
                                                                          stream=True))]
        return [c.ollama.chat(MODEL, messages, options=options).message.content]
    if kind.startswith("mistral"):
        body = dict(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=temperature, random_seed=seed)
        if kind == "mistral_stream":
            return ["".join(e.data.choices[0].delta.content or "" for e in c.mistral.chat.stream(**body)
                            if e.data.choices)]
        return [c.mistral.chat.complete(**body).choices[0].message.content]
    # a client that goes away mid-stream, after a random number of lines
    path, body = (("/v1/chat/completions", {"model": MODEL, "messages": messages, "stream": True,
                                             "max_tokens": max_tokens, "seed": seed})
                  if kind == "disconnect_openai" else
                  ("/api/chat", {"model": MODEL, "messages": messages, "stream": True,
                                 "options": {"num_predict": max_tokens, "seed": seed}}))
    keep = rng.randint(0, max_tokens // 2)
    with c.http.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            raise httpx.HTTPStatusError("refused", request=resp.request, response=resp)
        for i, _ in enumerate(resp.iter_lines()):
            if i >= keep:
                break
    return []


def status_of(e: Exception):
    """The HTTP status an SDK's exception carries, or the exception's type name."""
    for attr in ("status_code",):
        code = getattr(e, attr, None) or getattr(getattr(e, "response", None), attr, None)
        if isinstance(code, int):
            return code
    return type(e).__name__


def solo_replies(url: str, max_tokens: int) -> dict:
    """Every greedy request sent alone, one at a time: (kind, prompt) -> texts."""
    c = Clients(url)
    return {(kind, p): request(c, kind, p, 0, max_tokens, random.Random(0)) for kind in GREEDY for p in PROMPTS}


def client_loop(url: str, k: int, until: float, max_tokens: int, solo: dict, tally: Tally) -> None:
    rng = random.Random(k)
    c = Clients(url)
    kinds, weights = list(KINDS), list(KINDS.values())
    n = 0
    while time.monotonic() < until:
        kind, prompt = rng.choices(kinds, weights)[0], rng.choice(PROMPTS)
        seed = 1000 * k + n
        n += 1
        try:
            texts = request(c, kind, prompt, seed, max_tokens, rng)
            tally.add(kind, "disconnected" if kind.startswith("disconnect") else 200)
        except (openai.APIStatusError, ollama.ResponseError, SDKError, httpx.HTTPStatusError) as e:
            tally.add(kind, status_of(e))
            if status_of(e) == 503:
                time.sleep(0.05 + rng.random() * 0.2)  # Retry-After, shortened
            continue
        except Exception as e:  # a transport error is a finding, not a crash of the soak
            tally.add(kind, type(e).__name__)
            with tally.lock:
                tally.errors.append(f"{kind}: {type(e).__name__}: {e}")
            continue
        expected = solo.get((kind, prompt))
        if expected is not None:
            if kind == "openai_n_greedy":
                expected = expected[:1] * len(texts)  # greedy: every choice is the solo reply's first
            with tally.lock:
                tally.compared += 1
                if texts != expected:
                    tally.mismatches.append((kind, prompt, texts, expected))


def sample_rss(pid: int, stop: threading.Event, samples: list, interval: float = 1.0) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            samples.append((time.monotonic() - t0, rss))
        except (OSError, StopIteration):
            return
        stop.wait(interval)


def metrics(url: str) -> dict:
    """/metrics as {name or name{labels}: value}."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("localmix_")] = float(value)
    return out


def idle_metrics(url: str, wait: float = 30) -> dict:
    """/metrics once no sequence is active and none queued (disconnects take a step to free)."""
    deadline = time.monotonic() + wait
    while True:
        m = metrics(url)
        if (m.get("active_sequences", 0) == 0 and m.get("queue_depth", 0) == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def soak(url: str, pid: int, seconds: float, clients: int, max_tokens: int = 24, rss_bound_mib: float = 32,
         log: Path | None = None) -> dict:
    """Run the load against a started server; returns the summary with `failures` (empty: passed)."""
    solo = solo_replies(url, max_tokens)
    tally, samples, stop = Tally(), [], threading.Event()
    sampler = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(url, k, t0 + seconds, max_tokens, solo, tally))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    try:
        m = idle_metrics(url)
    except httpx.HTTPError as e:  # the server is gone: every check below that needs it fails
        m = {"active_sequences": -1, "error": f"/metrics: {type(e).__name__}: {e}"}
    stop.set()
    sampler.join()
    return summarise(tally, samples, m, wall, clients, seconds, rss_bound_mib, log, len(solo))


def summarise(tally: Tally, samples: list, m: dict, wall: float, clients: int, seconds: float,
              rss_bound_mib: float, log: Path | None, n_solo: int) -> dict:
    failures = []
    done = sum(tally.statuses.values())
    bad = {s: n for s, n in tally.statuses.items() if s not in (200, 503, "disconnected")}
    if bad:
        failures.append(f"statuses other than 200, 503 and a disconnect: {bad}")
    served = {k: v for k, v in m.items() if k.startswith("http_requests_total{")}
    server_5xx = {k: v for k, v in served.items() if '"5' in k.split("status=")[1] and 'status="503"' not in k}
    if server_5xx:
        failures.append(f"the server counted 5xx other than 503: {server_5xx}")
    if tally.mismatches:
        kind, prompt, got, want = tally.mismatches[0]
        failures.append(f"{len(tally.mismatches)} greedy replies differ from their solo replies, first: {kind} "
                        f"{prompt!r}: {got!r} != {want!r}")
    if tally.errors:
        failures.append(f"{len(tally.errors)} transport errors, first: {tally.errors[0]}")
    if "error" in m:
        failures.append(m["error"])
    if m.get("active_sequences", 0) != 0 or m.get("queue_depth", 0) != 0:
        failures.append(f"slots not free at the end: active {m.get('active_sequences')}, "
                        f"queued {m.get('queue_depth')} of {m.get('slots')} slots")
    # memory: warm-up is the first quarter; the last quarter's mean against the second's
    quarter = [[rss for t, rss in samples if q * wall / 4 <= t < (q + 1) * wall / 4] for q in range(4)]
    rss = {"start": samples[0][1] if samples else 0, "max": max((r for _, r in samples), default=0)}
    growth = None
    if quarter[1] and quarter[3]:
        rss["q2"], rss["q4"] = statistics.mean(quarter[1]), statistics.mean(quarter[3])
        growth = (rss["q4"] - rss["q2"]) / MiB
        if growth > rss_bound_mib:
            failures.append(f"resident memory grew {growth:.1f} MiB after the warm-up (bound {rss_bound_mib} MiB)")
    else:
        failures.append("too few memory samples to judge growth")
    if log is not None and "Traceback" in log.read_text():
        failures.append(f"a traceback in the server's log ({log})")
    return {"requests": done, "seconds": wall, "clients": clients, "statuses": dict(tally.statuses),
            "kinds": dict(tally.kinds), "solo": n_solo, "mismatches": len(tally.mismatches),
            "greedy_checked": tally.compared, "rss": rss,
            "rss_samples": len(samples), "growth_mib": growth, "rss_bound_mib": rss_bound_mib,
            "cancelled": m.get("cancelled_total"), "busy_rejections": m.get("busy_rejections_total"),
            "cancel_lag_steps_max": m.get("cancel_lag_steps_max"), "active_at_end": m.get("active_sequences"),
            "slots": m.get("slots"), "generated_tokens": m.get("generated_tokens_total"), "failures": failures}


def serve(model: Path, work: Path, parallel: int, ctx: int, queue: int, cpus: int | None):
    """`localmix serve` on 127.0.0.1 without an API key; returns (process, url, log path)."""
    port, log = free_port(), work / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "LOCALMIX_API_KEY"}
    cmd = [sys.executable, "-m", "localmix", "serve", str(model), "--parallel", str(parallel), "--ctx", str(ctx),
           "--queue", str(queue), "--alias", MODEL, "--port", str(port), "--cache-ram", "8MiB"]
    return start(cmd, port, log, "/health", cpus, env), f"http://127.0.0.1:{port}", log


def lines(s: dict) -> list[str]:
    s = {k: (0 if v is None and k != "growth_mib" else v) for k, v in s.items()}
    r = s["rss"]
    growth = "n/a" if s["growth_mib"] is None else f"{s['growth_mib']:+.1f} MiB"
    return [f"requests done: {s['requests']} in {s['seconds']:.0f} s by {s['clients']} clients "
            f"({s['generated_tokens']:.0f} tokens generated)",
            f"statuses: {s['statuses']}",
            f"by kind: {s['kinds']}",
            f"greedy replies checked against {s['solo']} solo replies: {s['greedy_checked']}, "
            f"mismatched: {s['mismatches']}",
            f"cancelled (server): {s['cancelled']:.0f}, most steps to free a cancelled slot: "
            f"{s['cancel_lag_steps_max']:.0f}, 503s (server): {s['busy_rejections']:.0f}",
            f"server RSS: {r['start'] / MiB:.0f} MiB at the start, max {r['max'] / MiB:.0f} MiB; growth after "
            f"warm-up (mean of the last quarter less the second's): {growth} (bound {s['rss_bound_mib']} MiB, "
            f"{s['rss_samples']} samples)",
            f"/metrics at the end: {s['active_at_end']:.0f} active of {s['slots']:.0f} slots",
            "PASS" if not s["failures"] else "FAIL: " + "; ".join(s["failures"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", type=Path, help="a GGUF (default: the tiny test Mixtral, Q8_0)")
    ap.add_argument("--parallel", type=int, default=4, help="the server's --parallel")
    ap.add_argument("--queue", type=int, default=16, help="the server's --queue (beyond it: 503)")
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="pin the server to this many CPUs")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--rss-bound", type=float, default=32, help="MiB the server may grow after the warm-up")
    ap.add_argument("--report", type=Path, help="also write the summary to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-serve-"))
    model = args.model or tiny_model(work)
    proc, url, log = serve(model, work, args.parallel, args.ctx, args.queue, args.threads)
    try:
        s = soak(url, proc.pid, args.minutes * 60, args.clients, args.max_tokens, args.rss_bound, log)
    finally:
        proc.terminate()
        proc.wait(30)
    out = lines(s)
    print("\n".join(out))
    if args.report:
        setup = (f"{model.name}, --parallel {args.parallel}, --queue {args.queue}, --ctx {args.ctx}, "
                 f"{args.max_tokens} tokens per request")
        write_report(args.report, [(setup, ["check", "result"], [[line.split(":")[0], line.partition(":")[2].strip()
                                                                  or line] for line in out])])
    sys.exit(1 if s["failures"] else 0)


if __name__ == "__main__":
    main()
