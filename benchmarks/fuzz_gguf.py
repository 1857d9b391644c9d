"""Fuzz localmix's GGUF checker and the CLI behind it with mutated copies of a small valid file.

    python benchmarks/fuzz_gguf.py --cases 20000 [--seconds S] [--cli 500] [--llama 60] [--seed 0]

1. bulk:    `check_gguf` on a valid file that also holds a 64 MiB metadata array (numbers, then
            strings), against the stock `gguf.GGUFReader` on a 1 MiB array; a file whose header
            claims more than the 256 MiB cap, refused at once.
2. checker: N mutants (localmix.fixtures.mutate: meaning and byte mutations of the tiny Mixtral,
            its vocabulary cut to 512 tokens) through `check_gguf` in-process: every one must be
            refused with one clean line (InputError) or pass; any other exception is counted.
3. CLI:     up to --cli of the mutants that passed, written whole, through `localmix run` (a
            2-token reply) and, every fourth, `localmix info`, each in its own process (forked
            from this one, which has imported localmix already; --spawn runs `python -m localmix`
            instead): exit code 0 or 2, no signal, no traceback, at most one line on stderr.
4. llama.cpp alone: up to --llama of the meaning mutants the checker refused, loaded by
            llama-cpp-python directly in a subprocess: how many would have killed the process
            (SIGABRT) or raised, had localmix not checked them first.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from localmix.convert.pipeline import convert
from localmix.errors import InputError
from localmix.fixtures.mutate import BYTE_KINDS, KV, Layout, Mutant, T, check_mutants
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.gguf.check import check_gguf
from localmix.gguf.read import HEADER_CAP

RUN_ARGS = ["-n", "2", "--temperature", "0", "--ctx", "64", "--seed", "0", "Say hello."]


def base_model(work: Path) -> tuple[Layout, Path]:
    src = make_tiny_checkpoint(work / "tiny-mixtral")
    full = convert(src, work / "tiny-Q8_0.gguf", "Q8_0").path
    layout = Layout.of(full).with_vocab(512)
    Mutant("base", layout.encode(), layout).write(work / "base.gguf", full)
    check_gguf(work / "base.gguf")  # the base itself must pass
    return layout, full


# --- 1. bulk reads ------------------------------------------------------------------------

def bulk(layout: Layout, full: Path, work: Path) -> None:
    import gguf

    def with_array(name: str, kv: KV) -> Path:
        big = Layout(layout.version, layout.kvs + (kv,), layout.tensors, layout.alignment)
        return Mutant(name, big.encode(), big).write(work / f"{name}.gguf")  # sparse data: only the header is read

    def timed(f, path, repeat=3) -> float:
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            f(path)
            best = min(best, time.perf_counter() - t)
        return best

    numbers = with_array("bulk-numbers", KV(b"localmix.fuzz.numbers", T.ARRAY, np.arange(2**24, dtype=np.int32), T.INT32))
    n_str = 2**22                                           # 4M strings of 8 bytes: 64 MiB with their lengths
    strings = KV(b"localmix.fuzz.strings", T.ARRAY, None, T.STRING,
                 raw=struct.pack("<IQ", int(T.STRING), n_str) + np.tile(np.frombuffer(np.uint64(8).tobytes() + b"abcdefgh", np.uint8), n_str).tobytes())
    strings_path = with_array("bulk-strings", strings)
    small = with_array("stock-1mib", KV(b"localmix.fuzz.numbers", T.ARRAY, np.arange(2**18, dtype=np.int32), T.INT32))
    ours_numbers, ours_strings = timed(check_gguf, numbers), timed(check_gguf, strings_path)
    ours_small = timed(check_gguf, small)
    stock_small = timed(gguf.GGUFReader, small, repeat=1)
    print(f"bulk: check_gguf, valid file + 64 MiB int32 array:   {ours_numbers * 1000:8.1f} ms")
    print(f"bulk: check_gguf, valid file + 64 MiB string array:  {ours_strings * 1000:8.1f} ms (4,194,304 strings)")
    print(f"bulk: 1 MiB int32 array: check_gguf {ours_small * 1000:.1f} ms, gguf.GGUFReader {stock_small * 1000:.0f} ms "
          f"(ratio {stock_small / ours_small:.0f}x)")

    claim = bytearray(Layout(layout.version, layout.kvs + (KV(b"localmix.fuzz.claim", T.ARRAY, [], T.UINT8),),
                             layout.tensors, layout.alignment).encode())
    at = claim.index(b"localmix.fuzz.claim") + len(b"localmix.fuzz.claim") + 4 + 4   # its count field
    claim[at:at + 8] = np.uint64(HEADER_CAP + 1).tobytes()
    path = work / "claim.gguf"
    with open(path, "wb") as f:
        f.write(claim)
        f.truncate(HEADER_CAP + 2**20)                      # a file big enough to hold the claim
    t = time.perf_counter()
    try:
        check_gguf(path)
        print("bulk: a header claiming more than the cap was NOT refused")
    except InputError as e:
        print(f"bulk: a header claiming {HEADER_CAP + 1:,} bytes refused in {(time.perf_counter() - t) * 1000:.1f} ms: "
              f"{str(e).split(': ', 1)[1][:90]}")


# --- 3. the CLI ----------------------------------------------------------------------------

def _cli_child(argv: list[str], out: str) -> None:
    """In a forkserver child: `localmix ARGV`, stdout and stderr to files, exiting as the CLI would."""
    from localmix.frontends.cli import main

    os.cpu_count = lambda: 1  # one llama.cpp thread per child: on a busy machine two spin against each other
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(out + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(out + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        try:
            main(argv)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would do with an uncaught exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


_FORKSERVER = None


def fork_cli(argv: list[str], out: Path):
    """`localmix ARGV` in a process forked from a clean server that has imported localmix and
    llama_cpp once (and never run a thread pool, so a fork is safe): the real CLI, without the
    interpreter's start-up each time."""
    global _FORKSERVER
    if _FORKSERVER is None:
        import multiprocessing

        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload([  # what `run` and `info` import, so each child starts warm
            "localmix.frontends.cli", "localmix.frontends.load", "localmix.frontends.oneshot", "localmix.frontends.render",
            "localmix.gguf.info", "localmix.runtime.llama", "llama_cpp", "llama_cpp.llama_chat_format"])
    p = _FORKSERVER.Process(target=_cli_child, args=(argv, str(out)))
    p.start()
    return p


def spawn_cli(argv: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "localmix", *argv], stdin=subprocess.DEVNULL,
                            stdout=open(f"{out}.out", "wb"), stderr=open(f"{out}.err", "wb"),
                            cwd=Path(__file__).resolve().parents[1])


def cli(mutants: list[Mutant], full: Path, work: Path, jobs: int, spawn: bool, timeout: float = 120) -> None:
    jobs_left = []
    for i, m in enumerate(mutants):
        jobs_left.append((m, ["run", None, *RUN_ARGS], i))
        if i % 4 == 0:
            jobs_left.append((m, ["info", None], i))
    outcome = collections.Counter()
    bad: list[str] = []
    running: list[tuple] = []
    t0 = time.perf_counter()
    while jobs_left or running:
        while jobs_left and len(running) < jobs:
            m, argv, i = jobs_left.pop(0)
            path = work / f"cli-{i}.gguf"
            if not path.exists():
                m.write(path, full)
            argv = [argv[0], str(path), *argv[2:]]
            out = work / f"cli-{i}-{argv[0]}"
            running.append((m, argv, out, time.perf_counter(), spawn_cli(argv, out) if spawn else fork_cli(argv, out), i))
        time.sleep(0.01)
        for job in list(running):
            m, argv, out, started, p, i = job
            code = p.poll() if spawn else p.exitcode
            if code is None:
                if time.perf_counter() - started > timeout:
                    p.kill()
                continue
            running.remove(job)
            if not spawn:
                p.join()
            err = Path(f"{out}.err").read_text(errors="replace")
            lines = err.strip().splitlines()
            if code < 0:
                verdict = f"signal {-code}"
            elif "Traceback" in err:
                verdict = "traceback"
            elif code not in (0, 2):
                verdict = f"exit {code}"
            elif len(lines) > 1:
                verdict = "more than one stderr line"
            else:
                verdict = f"exit {code}"
            outcome[(argv[0], verdict)] += 1
            if verdict not in ("exit 0", "exit 2"):
                bad.append(f"  {argv[0]} {m.name}: {verdict}: {' | '.join(lines[-3:])[:240]}")
            if not any(j[2] == i for j in jobs_left) and not any(r[5] == i for r in running):
                (work / f"cli-{i}.gguf").unlink(missing_ok=True)
            Path(f"{out}.out").unlink(missing_ok=True)
            Path(f"{out}.err").unlink(missing_ok=True)
            done = sum(outcome.values())
            if done % 100 == 0:
                print(f"cli: ... {done} processes, {time.perf_counter() - t0:.0f} s: "
                      + ", ".join(f"{cmd} {v} {n}" for (cmd, v), n in sorted(outcome.items())), flush=True)
    seconds = time.perf_counter() - t0
    runs = sum(n for (cmd, _), n in outcome.items() if cmd == "run")
    print(f"cli: {len(mutants)} passing mutants, {runs} `run` and {sum(outcome.values()) - runs} `info` processes "
          f"in {seconds:.0f} s ({'spawned' if spawn else 'forked'}, {jobs} at a time)")
    for (cmd, verdict), n in sorted(outcome.items()):
        print(f"cli:   {cmd:4} {verdict:28} {n}")
    signals = sum(n for (_, v), n in outcome.items() if v.startswith("signal"))
    tracebacks = sum(n for (_, v), n in outcome.items() if v == "traceback")
    print(f"cli: signals {signals}, tracebacks {tracebacks}, other failures "
          f"{sum(n for (_, v), n in outcome.items() if v not in ('exit 0', 'exit 2')) - signals - tracebacks}")
    for line in bad[:40]:
        print(line)


# --- 4. llama.cpp alone --------------------------------------------------------------------

LOAD = "import sys; from llama_cpp import Llama; Llama(model_path=sys.argv[1], n_ctx=64, verbose=False)"


def llama_alone(layout: Layout, full: Path, work: Path, n: int, seed: int) -> None:
    """The meaning mutants the checker refuses, loaded by llama-cpp-python without localmix."""
    from localmix.fixtures.mutate import Mutator

    mutator, rng = Mutator(layout, seed + 1), random.Random(seed)
    kinds = [k for k, _ in mutator._kinds if k not in BYTE_KINDS]
    outcome = collections.Counter()
    path = work / "alone.gguf"
    tried = 0
    while tried < n:
        kind = rng.choice(kinds)
        m = dict(mutator._kinds)[kind](kind)
        m.write(path)
        try:
            check_gguf(path)
            continue                      # passes: not what this phase measures
        except InputError:
            pass
        m.write(path, full)
        tried += 1
        r = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, timeout=120)
        outcome["killed by a signal" if r.returncode < 0 else "raised" if r.returncode else "loaded"] += 1
    print(f"llama.cpp alone, on {n} meaning mutants localmix refuses: "
          + ", ".join(f"{what} {k}" for what, k in sorted(outcome.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seconds", type=float, default=None, help="Stop the in-process phase after this long.")
    ap.add_argument("--cli", type=int, default=500, help="Passing mutants to run through the CLI.")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--llama", type=int, default=60, help="Refused meaning mutants to load in llama.cpp alone.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spawn", action="store_true", help="Run the CLI as `python -m localmix` instead of forking.")
    ap.add_argument("--skip-bulk", action="store_true")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="localmix-fuzz-") as tmp:
        work = Path(tmp)
        layout, full = base_model(work)
        if not args.skip_bulk:
            bulk(layout, full, work)
        run = check_mutants(layout, work / "mutant.gguf", args.cases, args.seconds, args.seed, keep=10**9)
        print(f"checker: {run.cases} mutants in {run.seconds:.1f} s ({run.seconds / max(run.cases, 1) * 1000:.2f} ms each): "
              f"{run.refused} refused with one line, {run.n_passed} passed, {len(run.unexpected)} other exceptions")
        for name, what in run.unexpected[:20]:
            print(f"  {name}: {what}")
        by_kind = collections.Counter(m.name.split(":")[0] for m in run.passed)
        print("checker: passed by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.most_common()))
        sample = random.Random(args.seed).sample(run.passed, min(args.cli, len(run.passed)))
        if sample:
            cli(sample, full, work, args.jobs, args.spawn)
        if args.llama:
            llama_alone(layout, full, work, args.llama, args.seed)


if __name__ == "__main__":
    main()
