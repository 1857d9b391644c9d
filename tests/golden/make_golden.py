"""Regenerate golden.json: what llama.cpp's own converter writes for the tiny checkpoints.

    python tests/golden/make_golden.py /path/to/llama.cpp/convert_hf_to_gguf.py [CASE ...]

The converter ships in llama-cpp-python's sdist (vendor/llama.cpp/); it needs torch and
transformers. For every tiny checkpoint and --outtype, golden.json records each metadata
key's type and value (arrays by digest) and each tensor's type, shape and data digest. The
test suite converts the same checkpoints with localmix and compares against this record, so
no network and no llama.cpp checkout are needed at test time. Naming CASEs regenerates only
those and keeps the others' records.
"""

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from localmix.fixtures.tiny import TinySpec, make_tiny_checkpoint

CASES = {"mixtral": TinySpec(), "mistral": TinySpec(dense=True), "mixtral8x22b": TinySpec.mixtral_8x22b()}
TYPES = {"mixtral": ["f32", "f16", "bf16", "q8_0"], "mistral": ["f32", "f16", "bf16", "q8_0"], "mixtral8x22b": ["f32"]}


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:32]


def describe(path: Path) -> dict:
    r = GGUFReader(path)
    kv = {}
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.name":
            continue
        value = field.contents()
        if isinstance(value, list):
            value = "sha256:" + digest(json.dumps(value, ensure_ascii=False).encode())
        kv[key] = [[t.name for t in field.types], value]
    tensors = {t.name: [t.tensor_type.name, [int(n) for n in t.shape], digest(np.asarray(t.data).tobytes())]
               for t in r.tensors}
    return {"kv": kv, "tensors": tensors}


def main(converter: str, cases: list[str]) -> None:
    record = Path(__file__).parent / "golden.json"
    golden = json.loads(record.read_text()) if cases and record.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, spec in CASES.items():
            if cases and case not in cases:
                continue
            src = make_tiny_checkpoint(Path(tmp) / case, spec)
            for t in TYPES[case]:
                out = Path(tmp) / f"{case}-{t}.gguf"
                subprocess.run([sys.executable, converter, str(src), "--outtype", t, "--outfile", str(out)],
                               check=True, capture_output=True)
                golden[f"{case}-{t}"] = describe(out)
    record.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
