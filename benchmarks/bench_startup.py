"""How quickly the command line answers: `localmix --help`, and `localmix run` against
llama-cpp-python loading and answering the same file, each in a fresh process, best of N.

    python benchmarks/bench_startup.py [--model FILE.gguf] [--repeat 5] [--tokens 8] [--report FILE.md]

Without --model the demo's file is built (the tiny random Mixtral at Q4_K_M, 15 MB, in a
temporary folder). The peer is a Python process that imports llama_cpp, loads the file with
`Llama(n_ctx=256)`, tokenizes the prompt and generates the same number of tokens greedily: what
`run` does, without localmix's checks, planning and chat template. Goals: `--help` under 0.25 s;
`run` under 0.3 s more than the peer.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import show

HELP_GOAL, RUN_EXTRA_GOAL = 0.25, 0.30

PEER = """
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, verbose=False)
out = llm.create_completion(sys.argv[2], max_tokens=int(sys.argv[3]), temperature=0.0)
print(out["choices"][0]["text"])
"""


def wall_time(cmd: list[str]) -> float:
    """The wall time of one fresh run of `cmd` (which must succeed)."""
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    return time.perf_counter() - t0


def best_of(cmds: dict[str, list[str]], repeat: int) -> dict[str, float]:
    """The shortest wall time of each command over `repeat` rounds, the commands taking turns in
    each round, so that a machine whose speed drifts (a shared host) slows them alike."""
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(repeat):
        for name, cmd in cmds.items():
            times[name].append(wall_time(cmd))
    return {name: min(t) for name, t in times.items()}


def demo_model(folder: Path) -> Path:
    from localmix.convert.pipeline import convert
    from localmix.fixtures.tiny import make_tiny_checkpoint

    return convert(make_tiny_checkpoint(folder / "tiny-mixtral"), folder / "tiny-mixtral-Q4_K_M.gguf", "Q4_K_M").path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a GGUF file [default: the demo's tiny Mixtral, built here]")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; each runs every command once, and the best of each counts")
    ap.add_argument("--tokens", type=int, default=8, help="tokens each answer generates")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or demo_model(Path(tmp))
        prompt = "Tell me about mixtures of experts."
        localmix = [sys.executable, "-m", "localmix"]
        rows = []
        best = best_of({"help": localmix + ["--help"],
                        "run": localmix + ["run", str(model), prompt, "-n", str(args.tokens), "--temperature", "0"],
                        "peer": [sys.executable, "-c", PEER, str(model), prompt, str(args.tokens)]}, args.repeat)
        help_s, run_s, peer_s = best["help"], best["run"], best["peer"]
        rows.append(["localmix --help", f"{help_s:.3f}", "", f"under {HELP_GOAL} s: {'yes' if help_s < HELP_GOAL else 'no'}"])
        extra = run_s - peer_s
        rows.append(["localmix run", f"{run_s:.3f}", f"{peer_s:.3f}",
                     f"{extra:+.3f} s, {run_s / peer_s:.2f}x; under +{RUN_EXTRA_GOAL} s: "
                     f"{'yes' if extra < RUN_EXTRA_GOAL else 'no'}"])
    header = ["command", "seconds (best)", "llama-cpp-python (best)", "against the goal"]
    caption = f"best of {args.repeat} fresh processes, the three commands in turn; {model.name if args.model else 'the demo model'}, {args.tokens} tokens"
    show(caption, header, rows, args.report)


if __name__ == "__main__":
    main()
