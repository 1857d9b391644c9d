"""One GPU decode measurement in a fresh process: load a GGUF, feed a fixed prompt, decode greedily.

    python benchmarks/gpu_decode.py FILE --engine localmix --vram 24GiB --ctx 8192
    python benchmarks/gpu_decode.py FILE --engine llama-cpp-python --n-gpu-layers fit --vram 24GiB --ctx 8192

`localmix`: llama.cpp placed by localmix's planner for a `--vram` budget (`open_engine`, what
`localmix run --vram 24GiB` does: attention, KV cache and as many layers' experts as fit on the
GPU, the first layers' experts in CPU memory). `llama-cpp-python`: plain `Llama(model_path,
n_ctx, n_gpu_layers)`, llama.cpp's own layer offload (the last N layers whole on the GPU, the
rest on the CPU); `--n-gpu-layers fit` takes the largest N whose estimate (layers' tensor
bytes + their share of the KV cache + compute buffer + headroom, the planner's arithmetic) fits
`--vram`. Both decode with the same loop: a prompt of exactly `--prompt-tokens` tokens (BOS and
a fixed English text), then `--tokens` greedy tokens, end of sequence not stopping it; the
decode speed is the tokens after the first over the time they took. Threads: every core for
both.

GPU memory is read twice: llama.cpp's own log (its `CUDA0 model/KV/compute buffer size` lines,
parsed by `gpu-check` from this process's stderr) and the device API (`ggml_backend_dev_memory`:
total minus free after generating, which counts the CUDA context and cuBLAS's pool as a card of
that size would have to hold them). Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father had, and "
        "wrote the weather, the ships and the colour of the sea into the log before he lit the lamp. ")
BUFFER = re.compile(r"(\S+)\s+(model|KV|compute|output|RS) buffer size\s*=\s*([\d.]+) MiB")
MiB = 1 << 20


def gpu_memory() -> dict | None:
    """{name, total, free} of the first GPU-like device llama.cpp sees, or None on a CPU-only build."""
    from localmix.runtime.devices import devices

    gpus = [d for d in devices() if d.kind in ("gpu", "igpu", "accel")]
    return {"name": gpus[0].description, "total": gpus[0].total, "free": gpus[0].free} if gpus else None


def log_buffers(log: str) -> dict[str, dict[str, int]]:
    """llama.cpp's buffer lines from its log: {buffer type: {"model"|"KV"|"compute"|...: bytes}}."""
    found: dict[str, dict[str, int]] = {}
    for buft, what, mib in BUFFER.findall(log):
        found.setdefault(buft, {})
        found[buft][what] = found[buft].get(what, 0) + round(float(mib) * MiB)
    return found


def device_bytes(buffers: dict[str, dict[str, int]]) -> int:
    """The bytes of the buffers on a GPU (CUDA0, ROCm0, Metal...; host-side pinned buffers excluded)."""
    return sum(sum(v.values()) for b, v in buffers.items() if not b.startswith("CPU") and not b.endswith("_Host"))


def offload_estimates(path: str, n_ctx: int) -> list[int]:
    """GPU bytes of llama.cpp's layer offload for each n_gpu_layers from 0 to n_layer + 1: the last
    N blocks' tensors (the output matrix and norm too when N is n_layer + 1), their share of the KV
    cache, the compute buffer and the headroom, as the planner counts them."""
    from localmix.gguf.check import check_gguf
    from localmix.runtime.planner import HEADROOM, ModelDims, compute_bytes, kv_cache_bytes

    s = check_gguf(path)
    dims = ModelDims(s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.head_dim, s.n_vocab, s.n_ff, s.n_expert_used)
    per_block, output = [0] * s.n_layer, 0
    for t in s.tensors:
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m:
            per_block[int(m.group(1))] += t.n_bytes
        elif t.name.startswith("output"):
            output += t.n_bytes
    fixed, kv = compute_bytes(dims, n_ctx) + HEADROOM, kv_cache_bytes(dims, n_ctx)
    sizes = [0]
    for n in range(1, s.n_layer + 1):
        sizes.append(sum(per_block[s.n_layer - n:]) + kv * n // s.n_layer + fixed)
    return sizes + [sizes[-1] + output]


def layers_that_fit(path: str, n_ctx: int, budget: int) -> int:
    """The largest n_gpu_layers (0 .. n_layer + 1) whose offload estimate fits `budget`."""
    return max(n for n, size in enumerate(offload_estimates(path, n_ctx)) if size <= budget)


def prompt_tokens(llm, n: int) -> list[int]:
    ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    body = (ids * (n // len(ids) + 1))[: n - 1]
    return [llm.token_bos()] + body


def decode(llm, prompt: list[int], n: int) -> dict:
    """Prompt evaluation and `n` greedy tokens through llama-cpp-python's generate loop."""
    t0 = time.perf_counter()
    t_first, count = None, 0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if t_first is None:
            t_first = time.perf_counter()
        count += 1
        if count == n:
            break
    t_end = time.perf_counter()
    return {"prompt_tokens": len(prompt), "prompt_s": t_first - t0, "generated": count, "decode_s": t_end - t_first,
            "prompt_tps": len(prompt) / (t_first - t0), "decode_tps": (count - 1) / (t_end - t_first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file")
    ap.add_argument("--engine", choices=("localmix", "llama-cpp-python"), required=True)
    ap.add_argument("--vram", default="24GiB")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--n-gpu-layers", default="fit", help="llama-cpp-python only: a number, or fit")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()

    from localmix.runtime.devices import parse_size

    budget = parse_size(args.vram)
    threads = os.cpu_count()
    before = gpu_memory()
    t0 = time.perf_counter()
    result: dict = {"engine": args.engine, "file": os.path.basename(args.file), "ctx": args.ctx, "threads": threads}
    if args.engine == "localmix":
        from localmix.frontends.load import open_engine
        from localmix.runtime.planner import describe, placement_line

        engine = open_engine(args.file, ctx=args.ctx, verbose=True, vram=args.vram)
        llm = engine.llm
        result.update(placement=placement_line(engine.plan), plan=describe(engine.plan),
                      estimate_gpu_bytes=engine.plan.gpu_bytes)
    else:
        from llama_cpp import Llama

        n = layers_that_fit(args.file, args.ctx, budget) if args.n_gpu_layers == "fit" else int(args.n_gpu_layers)
        llm = Llama(model_path=args.file, n_ctx=args.ctx, n_gpu_layers=n, n_threads=threads, n_threads_batch=threads,
                    verbose=True)
        result.update(placement=f"n_gpu_layers={n}", n_gpu_layers=n,
                      estimate_gpu_bytes=offload_estimates(args.file, args.ctx)[n])
    result["load_s"] = time.perf_counter() - t0
    after_load = gpu_memory()
    result.update(decode(llm, prompt_tokens(llm, args.prompt_tokens), args.tokens))
    after = gpu_memory()
    if before and after and after_load:
        result["gpu"] = {"name": before["name"], "total": before["total"], "used_before_load": before["total"] - before["free"],
                         "used_after_load": after_load["total"] - after_load["free"],
                         "used_after_decode": after["total"] - after["free"]}
    sys.stderr.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
