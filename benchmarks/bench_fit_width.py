"""`quantize --fit` at Mixtral 8x7B's widths: its peak memory, and what its sensitivity pass costs.

The one-layer checkpoint bench_convert.py builds (hidden 4096, ffn 14336, 8 experts, 32/8
heads, vocab 32000; 3.4 GB of bf16; built once in --dir, the same folder bench_convert.py
uses) is quantized in three processes, one after the other, each measured alone
(child_memory.py: wall time, VmHWM, the largest RssAnon and RssFile):
  1. plainly to --type (Q3_K_M);
  2. to F32, the temporary float copy `--fit` makes of a checkpoint for its forward;
  3. with `--fit` to the size of file 1, on calibration text (GPL-3; 2 windows of 128 tokens).
The sensitivity pass is what 3 costs beyond 1 and 2; it is printed as a multiple of the plain
conversion's time (the goal: at most 3x), and 3's peak resident memory (the goal: under 2 GiB).

    OPENBLAS_NUM_THREADS=1 nice -n 10 python benchmarks/bench_fit_width.py [--dir DIR] [--src CHECKPOINT] [--type Q3_K_M] \
        [--report FILE.md]

(--src: a checkpoint bench_convert.py built elsewhere, only read; the files are written in --dir.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_convert import WIDTHS
from child_memory import GiB, measure
from report import write_report

from localmix.fixtures.tiny import make_tiny_checkpoint

CALIBRATION = Path("/usr/share/common-licenses/GPL-3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench")
    ap.add_argument("--src", type=Path, help="the one-layer checkpoint, if built elsewhere")
    ap.add_argument("--type", default="Q3_K_M")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    src = args.src or args.dir / "mixtral-8x7b-widths-1-layer"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        make_tiny_checkpoint(src, **WIDTHS)
        print(f"built {src} in {time.perf_counter() - t:.0f} s")
    source = f"source: {sum(f.stat().st_size for f in src.glob('*.safetensors')) / 1e9:.2f} GB bf16"
    print(f"{source}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    localmix = [sys.executable, "-m", "localmix", "quantize", str(src)]
    plain, f32, fitted = (args.dir / f"width-{n}.gguf" for n in (args.type, "F32", f"{args.type}-fit"))

    m_plain = measure([*localmix, str(plain), "--type", args.type, "--force"])
    budget = plain.stat().st_size
    m_f32 = measure([*localmix, str(f32), "--type", "F32", "--force"])
    f32.unlink()
    m_fit = measure([*localmix, str(fitted), "--type", args.type, "--fit", str(budget), "--text", str(CALIBRATION),
                     "--force"])
    size = fitted.stat().st_size
    plain.unlink()
    fitted.unlink()

    sensitivity = m_fit.seconds - m_plain.seconds - m_f32.seconds
    rows = [[f"plain {args.type}", m_plain], ["F32 copy", m_f32], [f"--fit {budget}", m_fit]]
    print(f"{'run':24} {'seconds':>8}  peak RSS")
    for label, m in rows:
        print(f"{label:24} {m.seconds:8.1f}  {m}")
    summary = [f"fitted file {size / 2**20:.1f} MiB, within the budget of {budget / 2**20:.1f} MiB: {size <= budget}",
               f"sensitivity pass ~ {sensitivity:.1f} s = {sensitivity / m_plain.seconds:.2f}x the plain conversion "
               f"(with the F32 copy: {(sensitivity + m_f32.seconds) / m_plain.seconds:.2f}x); "
               f"--fit peak {m_fit.peak / GiB:.2f} GiB ({'under' if m_fit.peak < 2 * GiB else 'over'} 2 GiB)"]
    print("\n".join(summary))
    if args.report:
        write_report(args.report, [(source, ["run", "seconds", "peak RSS"],
                                    [[label, f"{m.seconds:.1f}", m] for label, m in rows])], notes="\n\n".join(summary))


if __name__ == "__main__":
    main()
