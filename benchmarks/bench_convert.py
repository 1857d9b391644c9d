"""Conversion speed and peak memory at Mixtral 8x7B's real widths.

Builds (once, cached in --dir) a one-layer checkpoint with Mixtral 8x7B's widths: hidden
4096, ffn 14336, 8 experts, 32 query / 8 KV heads, vocab 32000, bf16 (3.4 GB). Converts it
with localmix to each --type in a subprocess and reports wall time, MB/s of output and peak
resident memory. With --reference PATH/convert_hf_to_gguf.py (llama.cpp's converter, shipped
in llama-cpp-python's sdist under vendor/llama.cpp; it needs torch), llama.cpp does the same
job in the same run and the ratio is printed: for F32/F16/BF16/Q8_0 its converter alone; for
K-quants its two passes, the converter to F32 and then `llama_model_quantize`.

    python benchmarks/bench_convert.py [--types Q4_K_M,F16] [--reference .../convert_hf_to_gguf.py]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of a command run to completion."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-bench")
    ap.add_argument("--types", default="Q4_K_M,Q3_K_M,F16,Q8_0")
    ap.add_argument("--reference", type=Path, help="llama.cpp's convert_hf_to_gguf.py, to compare with")
    args = ap.parse_args()

    src = args.dir / "mixtral-8x7b-widths-1-layer"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        make_tiny_checkpoint(src, **WIDTHS)
        print(f"built {src} in {time.perf_counter() - t:.0f} s")
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    print(f"source: {src_bytes / 1e9:.2f} GB bf16, {os.cpu_count()} CPUs")
    print(f"{'type':6} {'tool':10} {'seconds':>8} {'out MB/s':>9} {'peak RSS':>10}")

    for file_type in args.types.split(","):
        out = args.dir / f"out-{file_type}.gguf"
        results = {}
        seconds, rss = measure([sys.executable, "-m", "localmix", "quantize", str(src), str(out), "--type", file_type,
                                "--force"])
        results["localmix"] = seconds, rss, out.stat().st_size
        out.unlink()
        if args.reference and file_type in CONVERTER_TYPES:
            seconds, rss = measure([sys.executable, str(args.reference), str(src), "--outtype", file_type.lower(),
                                    "--outfile", str(out)])
            results["llama.cpp"] = seconds, rss, out.stat().st_size
            out.unlink()
        elif args.reference:  # llama.cpp needs two passes: convert to F32, then quantize
            f32 = args.dir / "reference-F32.gguf"
            s1, r1 = measure([sys.executable, str(args.reference), str(src), "--outtype", "f32", "--outfile", str(f32)])
            code = LLAMA_QUANTIZE.format(tests=str(REPO / "tests"), src=str(f32), out=str(out), ftype=file_type,
                                         threads=os.cpu_count())
            s2, r2 = measure([sys.executable, "-c", code])
            results["llama.cpp"] = s1 + s2, max(r1, r2), out.stat().st_size
            out.unlink()
            f32.unlink()
        for tool, (seconds, rss, size) in results.items():
            print(f"{file_type:6} {tool:10} {seconds:8.1f} {size / 1e6 / seconds:9.0f} {rss / 2**30:8.2f} GiB")
        if "llama.cpp" in results:
            (ts, tr, _), (rs, rr, _) = results["localmix"], results["llama.cpp"]
            print(f"{file_type:6} ratio: localmix is {rs / ts:.2f}x llama.cpp's speed, with {tr / rr:.2f}x its peak memory")


if __name__ == "__main__":
    main()
