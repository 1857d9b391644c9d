"""A short soak (benchmarks/soak_serve.py's functions, 15 s of load): `localmix serve` on the tiny
Mixtral, 127.0.0.1, two slots and a queue of one (so that some requests get the queue-full
503), four client threads mixing the openai, ollama and mistralai clients, streamed
and not, JSON schemas, `n` = 2 and disconnects mid-stream. The same checks as the benchmark's:
no 5xx but a queue-full 503, every greedy reply equal to its solo reply, memory flat after the
warm-up, every slot free at the end; and a failed check is reported as one."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import soak_serve


def test_a_short_soak_passes_every_check(converted, tmp_path):
    proc, url, log = soak_serve.serve(converted("mixtral", "Q8_0"), tmp_path, parallel=2, ctx=1024, queue=1, cpus=None)
    try:
        s = soak_serve.soak(url, proc.pid, seconds=15, clients=4, max_tokens=16, rss_bound_mib=32, log=log)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    print("\n".join(soak_serve.lines(s)))
    assert s["failures"] == [], s["failures"]
    assert s["requests"] >= 20 and s["greedy_checked"] >= 5 and s["mismatches"] == 0
    assert set(s["statuses"]) <= {200, 503, "disconnected"}
    assert s["rss_samples"] >= 8 and s["active_at_end"] == 0
    assert {"openai", "ollama", "mistral"} <= {kind.split("_")[0] for kind in s["kinds"]}


def test_a_failed_check_is_a_failure():
    tally = soak_serve.Tally(statuses=collections.Counter({200: 3, 500: 1}))
    tally.mismatches.append(("openai_greedy", "hi", ["a"], ["b"]))
    samples = [(t, (100 + (64 if t >= 5 else 0)) << 20) for t in range(8)]  # +64 MiB after the warm-up
    metrics = {"active_sequences": 1, "queue_depth": 0, "slots": 4,
               'http_requests_total{path="/v1/chat/completions",status="500"}': 1}
    s = soak_serve.summarise(tally, samples, metrics, wall=8, clients=1, seconds=8, rss_bound_mib=32, log=None,
                             n_solo=1)
    text = " ".join(s["failures"])
    for finding in ("statuses other than", "counted 5xx", "differ from their solo", "slots not free", "grew"):
        assert finding in text
