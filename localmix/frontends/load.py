"""Open a GGUF for `run`, `chat` and the other front ends: check the file, choose the context,
plan where the tensors go, check that it fits, and load it in the engine asked for (llama.cpp,
or the native engine). The one module that knows both engines, so that neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from localmix.errors import InputError
from localmix.gguf.check import check_gguf
from localmix.runtime.devices import machine, parse_size
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.memory import available_memory, check_fits, estimate_memory, largest_fitting_ctx
from localmix.runtime.planner import file_plan


def open_engine(path: str | Path, ctx: int | None = None, force: bool = False, verbose: bool = False,
                vram: str | None = None, ram: str | None = None, n_cpu_moe: int | None = None,
                gpu_layers: int | None = None, repack: bool | None = None, engine: str = "llama.cpp"):
    """Check the file, choose the context, plan where the tensors go, check it fits, and load it.

    On the CPU the default context is the model's own, capped by what RAM allows (in steps of
    256) and a model that does not fit is refused with a suggestion unless `force`. With a GPU
    (or `vram`, a size such as "24GiB") the planner keeps attention, norms, router, embeddings
    and the KV cache on it and as many layers' experts as fit; the default context is the
    largest of the model's own, 16K, 8K, 4K and 2K whose plan fits. `n_cpu_moe` and
    `gpu_layers` overrule the planner, as llama.cpp's flags of those names do; `repack` too
    (None: the plan's choice). `engine="native"` runs localmix's own forward (localmix.native) on
    the CPU, its KV cache float32."""
    if engine not in ("llama.cpp", "native"):
        raise InputError(f"unknown engine {engine!r}; choose llama.cpp or native")
    summary = check_gguf(path)
    if engine == "native":  # CPU only: no GPU devices to ask about
        device, gpu_budget, ram_budget = "cpu", None, parse_size(ram) if ram else available_memory()
    else:
        device, gpu_budget, ram_budget = machine(vram, ram)
    if device == "cpu":
        kv_bytes = 4 if engine == "native" else 2
        estimate = estimate_memory(summary, ctx or summary.context_length or 4096, kv_bytes)
        if ctx is None and estimate.total_bytes > ram_budget:
            fitting = largest_fitting_ctx(estimate, ram_budget)
            if fitting:
                estimate = estimate_memory(summary, fitting, kv_bytes)
        ctx = estimate.n_ctx
        check_fits(estimate, ram_budget, force)
        plan = file_plan(path, ctx, None, ram_budget)
        if engine == "native":
            from localmix.native.engine import NativeEngine  # numba's compiled kernels: only when asked for

            plan.repack = False  # the native engine reads the weights where they are mapped
            native = NativeEngine(path, n_ctx=ctx, verbose=verbose)
            native.plan = plan
            return native
    else:
        own = summary.context_length or 4096
        tries = [ctx] if ctx else [own] + [c for c in (16384, 8192, 4096, 2048) if c < own]
        for ctx in tries:
            plan = file_plan(path, ctx, gpu_budget, ram_budget, device, n_cpu_moe)
            if plan.fits:
                break
        if not plan.fits and not force:
            raise InputError(f"{Path(path).name} at {ctx} tokens of context: {plan.advice} (--force loads it anyway)")
    if repack is not None:
        plan.repack = repack
    return LlamaCppEngine(path, n_ctx=ctx, verbose=verbose, plan=plan, n_gpu_layers=gpu_layers, repack=plan.repack)
