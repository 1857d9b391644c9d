"""Conversion speed and peak memory at Mixtral 8x7B's real widths.

Builds (once, cached in --dir) a one-layer checkpoint with Mixtral 8x7B's widths: hidden
4096, ffn 14336, 8 experts, 32 query / 8 KV heads, vocab 32000, bf16 (3.4 GB). Converts it
with localmix to each --type in a subprocess and reports wall time, MB/s of output and peak
resident memory of the converting process alone, anonymous and file-backed apart (sampled
from /proc: child_memory.py). With --reference PATH/convert_hf_to_gguf.py (llama.cpp's
converter, shipped in llama-cpp-python's sdist under vendor/llama.cpp; it needs torch),
llama.cpp does the same job in the same run and the ratio is printed: for F32/F16/BF16/Q8_0
its converter alone; for K-quants its two passes, the converter to F32 and then
`llama_model_quantize`.

    python benchmarks/bench_convert.py [--types Q4_K_M,F16] [--reference .../convert_hf_to_gguf.py] [--report FILE.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_memory import GiB, Measured, measure
from report import write_report

from localmix.convert.mix import CONVERTER_TYPES
from localmix.fixtures.tiny import make_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
# llama.cpp's quantizer through llama-cpp-python, in its own process
LLAMA_QUANTIZE = """
import sys
sys.path.insert(0, {tests!r})
from llama_quantize import llama_model_quantize
llama_model_quantize({src!r}, {out!r}, {ftype!r}, nthread={threads})
"""

WIDTHS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=1, num_attention_heads=32,
              num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,F16,Q8_0")
    ap.add_argument("--reference", type=Path, help="llama.cpp's convert_hf_to_gguf.py, to compare with")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()

    src = args.dir / "mixtral-8x7b-widths-1-layer"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        make_tiny_checkpoint(src, **WIDTHS)
        print(f"built {src} in {time.perf_counter() - t:.0f} s")
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    source = f"source: {src_bytes / 1e9:.2f} GB bf16, {os.cpu_count()} CPUs"
    print(source)
    print(f"{'type':6} {'tool':10} {'seconds':>8} {'out MB/s':>9}  peak RSS")
    rows = []

    for file_type in args.types.split(","):
        out = args.dir / f"out-{file_type}.gguf"
        results: dict[str, tuple[Measured, int]] = {}
        two_passes = ""
        m = measure([sys.executable, "-m", "localmix", "quantize", str(src), str(out), "--type", file_type, "--force"])
        results["localmix"] = m, out.stat().st_size
        out.unlink()
        if args.reference and file_type in CONVERTER_TYPES:
            m = measure([sys.executable, str(args.reference), str(src), "--outtype", file_type.lower(),
                         "--outfile", str(out)])
            results["llama.cpp"] = m, out.stat().st_size
            out.unlink()
        elif args.reference:  # llama.cpp needs two passes: convert to F32, then quantize
            f32 = args.dir / "reference-F32.gguf"
            m1 = measure([sys.executable, str(args.reference), str(src), "--outtype", "f32", "--outfile", str(f32)])
            code = LLAMA_QUANTIZE.format(tests=str(REPO / "tests"), src=str(f32), out=str(out), ftype=file_type,
                                         threads=os.cpu_count())
            m2 = measure([sys.executable, "-c", code])
            # two processes one after the other: the time of both, the peak of the larger
            worse = max(m1, m2, key=lambda m: m.peak)
            results["llama.cpp"] = Measured(m1.seconds + m2.seconds, worse.peak, worse.peak_anon, worse.peak_file), \
                out.stat().st_size
            two_passes = f" (converter {m1.seconds:.1f} + quantizer {m2.seconds:.1f})"
            print(f"{file_type:6} llama.cpp: converter {m1.seconds:.1f} s, {m1}; quantizer {m2.seconds:.1f} s, {m2}")
            out.unlink()
            f32.unlink()
        for tool, (m, size) in results.items():
            print(f"{file_type:6} {tool:10} {m.seconds:8.1f} {size / 1e6 / m.seconds:9.0f}  {m}")
        ours = results["localmix"][0]
        if "llama.cpp" in results:
            theirs = results["llama.cpp"][0]
            print(f"{file_type:6} ratio: localmix is {theirs.seconds / ours.seconds:.2f}x llama.cpp's speed, with "
                  f"{ours.peak / theirs.peak:.2f}x its peak memory ({ours.peak / GiB:.2f} / {theirs.peak / GiB:.2f} GiB)")
            rows.append([file_type, f"{ours.seconds:.1f} s", f"{theirs.seconds:.1f} s{two_passes}",
                         f"{theirs.seconds / ours.seconds:.2f}x", str(ours), str(theirs)])
        else:
            rows.append([file_type, f"{ours.seconds:.1f} s", "", "", str(ours), ""])
    if args.report:
        write_report(args.report, [(source, ["type", "localmix", "llama.cpp", "speed ratio", "peak RSS localmix",
                                             "peak RSS llama.cpp"], rows)])


if __name__ == "__main__":
    main()
