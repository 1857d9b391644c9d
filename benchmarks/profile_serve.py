"""Where a step of `localmix serve`'s scheduler goes, at 8 and 16 clients, without HTTP.

The scheduler (localmix/runtime/scheduler.py) runs in this process on a GGUF (the tiny test
Mixtral unless --model), its loop on the thread that loaded the model as serve's does
(`--other-thread`: on another, which shows what that costs); C client threads each submit
`--requests` chat prompts in a row (temperature 0.8, a per-request seed, `--max-tokens`
tokens, `--repeat-penalty`) and wait for each reply. The scheduler's own methods are wrapped
with timers (perf_counter, a few microseconds a call, not a profiler's per-call overhead),
which split its thread's time into: `llama_decode`; sampling (`_sample`: the llama.cpp sampler
chain per sequence, through ctypes); handing each token out (`reply_events`' detokenising and
stop checks); building the batch and the rest of a step (each job's callback, finishing and
freeing slots, the fork copies); admitting waiting requests; and idle time waiting for work.
With `--cprofile` the scheduler thread also runs under cProfile and its top functions are
printed.

    python benchmarks/profile_serve.py [--model FILE.gguf] [--clients 8,16] [--parallel 8] [--threads 2]
                                       [--flash-attn on|off|auto] [--repeat-penalty 1.1] [--other-thread]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import queue
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench_serve import tiny_model
from report import write_report

from localmix.frontends.load import open_engine
from localmix.frontends.oneshot import conversation_tokens
from localmix.runtime import scheduler as sched
from localmix.runtime.stream import Done, Sampling


class Timers:
    """Seconds and calls per label, for functions called on the scheduler thread."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1
        setattr(owner, name, timed)


def profile(engine, clients: int, parallel: int, requests: int, max_tokens: int, use_cprofile: bool,
            other_thread: bool = False, repeat_penalty: float = 1.1) -> dict:
    timers = Timers()
    # timers on the class and on the llama_cpp module the scheduler calls through
    saved = {n: getattr(sched.Scheduler, n) for n in ("_step", "_sample", "_admit", "_next_event")}
    saved_decode = sched.L.llama_decode
    timers.wrap(sched.Scheduler, "_step", "step")
    timers.wrap(sched.Scheduler, "_sample", "sampling")
    timers.wrap(sched.Scheduler, "_admit", "admit")
    timers.wrap(sched.Scheduler, "_next_event", "events")
    timers.wrap(sched.L, "llama_decode", "decode")
    prof = cProfile.Profile() if use_cprofile else None
    loop = sched.Scheduler._loop

    def loop_profiled(self):
        if prof is not None:
            prof.runcall(loop, self)
        else:
            loop(self)
    sched.Scheduler._loop = loop_profiled
    try:
        # the engine context stays (the next count needs it); the loop runs on this thread, which
        # loaded the model, as serve's does (two threads that compute slow llama.cpp's OpenMP
        # down), or with `other_thread` on a thread of its own, to show that
        s = sched.Scheduler(engine.llm, parallel=parallel, n_ctx=1024, queue_size=64, thread=False)
        prompts = [conversation_tokens(engine, [{"role": "user", "content": f"Client {k} asks question {r}: "
                                                 "tell me a story."}]) for k in range(clients) for r in range(requests)]
        served = []

        def client(k: int):
            for r in range(requests):
                q = queue.Queue()
                sampling = Sampling(temperature=0.8, max_tokens=max_tokens, seed=1000 * k + r,
                                    repeat_penalty=repeat_penalty)
                s.submit(sched.Job(prompts[k * requests + r], sampling, q.put))
                while not isinstance(event := q.get(timeout=600), Done):
                    if isinstance(event, Exception):
                        raise event
                served.append(event.generated_tokens)

        steps0 = s.metrics.steps
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        timing = {}

        def watch():
            for t in threads:
                t.join()
            timing["wall"], timing["steps"] = time.perf_counter() - t0, s.metrics.steps - steps0
            s.close()  # run() below returns
        for t in threads:
            t.start()
        if other_thread:
            loop_thread = threading.Thread(target=s.run)
            loop_thread.start()
            watch()
            loop_thread.join()
        else:
            threading.Thread(target=watch).start()
            s.run()
        wall, steps = timing["wall"], timing["steps"]
    finally:
        for n, f in saved.items():
            setattr(sched.Scheduler, n, f)
        sched.L.llama_decode = saved_decode
        sched.Scheduler._loop = loop
    sec = timers.seconds
    out = {"clients": clients, "wall": wall, "steps": steps, "tokens": sum(served), **dict(sec),
           "max_batch": s.metrics.max_batch_sequences}
    if prof is not None:
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        out["cprofile"] = text.getvalue()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF (default: the tiny test Mixtral, Q8_0)")
    ap.add_argument("--clients", default="8,16", help="client counts, comma-separated")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--flash-attn", default="auto", choices=("on", "off", "auto"),
                    help="llama.cpp's flash attention, as serve's --flash-attn (default: auto)")
    ap.add_argument("--repeat-penalty", type=float, default=1.1, help="the requests' (1.1: serve's default)")
    ap.add_argument("--other-thread", action="store_true",
                    help="run the scheduler's loop on a thread other than the one that loaded the model (serve "
                         "does not: llama.cpp's OpenMP threads slow down)")
    ap.add_argument("--cprofile", action="store_true", help="also print cProfile's top functions (slows Python)")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    model = args.model or tiny_model(Path(tempfile.mkdtemp(prefix="profile-serve-")))
    if args.threads < len(os.sched_getaffinity(0)):  # localmix uses the CPUs it may run on, as serve does
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    engine = open_engine(model, ctx=1024, flash_attn=args.flash_attn)
    header = ["clients", "tok/s", "steps", "ms/step", "decode", "sampling", "token events", "batch + rest",
              "admit", "idle"]
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        r = profile(engine, clients, args.parallel, args.requests, args.max_tokens, args.cprofile, args.other_thread,
                    args.repeat_penalty)
        step, n = r.get("step", 0.0), max(r["steps"], 1)
        rest = step - r.get("decode", 0) - r.get("sampling", 0) - r.get("events", 0)

        def ms(x):
            return f"{1000 * x / n:.2f} ({100 * x / r['wall']:.0f}%)"
        rows.append([clients, f"{r['tokens'] / r['wall']:.1f}", r["steps"], f"{1000 * step / n:.2f}",
                     ms(r.get("decode", 0)), ms(r.get("sampling", 0)), ms(r.get("events", 0)), ms(rest),
                     ms(r.get("admit", 0)),
                     ms(r["wall"] - step - r.get("admit", 0))])
        if "cprofile" in r:
            print(f"--- cProfile, {clients} clients (scheduler thread, by own time) ---\n{r['cprofile']}")
    caption = (f"{model.name}, {args.threads} threads, --parallel {args.parallel}, {args.requests} request(s) per "
               f"client, {args.max_tokens} tokens each, repeat penalty {args.repeat_penalty}, the loop on "
               f"{'another thread than' if args.other_thread else 'the thread'} that loaded the model; "
               "per step: ms (share of the wall time); load average "
               f"{os.getloadavg()[0]:.1f}")
    print(caption)
    for line in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(str(cell) for cell in line) + " |")
    if args.report:
        write_report(args.report, [(caption, header, rows)])


if __name__ == "__main__":
    main()
