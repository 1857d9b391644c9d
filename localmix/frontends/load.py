"""Open a GGUF for `run`, `chat` and the other front ends: check the file, choose the context,
plan where the tensors go, check that it fits, and load it in the engine asked for (llama.cpp,
or the native engine). The one module that knows both engines, so that neither imports the other.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from localmix.errors import InputError
from localmix.frontends.options import Load
from localmix.gguf.check import check_gguf
from localmix.runtime.devices import machine, parse_size
from localmix.runtime.engine import Engine
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.memory import (
    FIT_SLACK,
    available_memory,
    check_fits,
    estimate_memory,
    flash_attn_counted,
    largest_fitting_ctx,
)
from localmix.runtime.planner import file_plan
from localmix.units import human_bytes


def open_engine(path: str | Path, load: Load | None = None, sequences: int = 1, on_lost=None, **fields) -> Engine:
    """Check the file, choose the context, plan where the tensors go, check it fits, and load it
    as `load` says (a `Load`; keywords such as `ctx=1024` change its fields).

    On the CPU the default context is the model's own, capped by what RAM allows (in steps of
    256) and a model that does not fit is refused with a suggestion unless `force`. With a GPU
    (or `vram`, a size such as "24GiB") the planner keeps attention, norms, router, embeddings
    and the KV cache on it and as many layers' experts as fit; the default context is the
    largest of the model's own, 16K, 8K, 4K and 2K whose plan fits. `n_cpu_moe` and
    `gpu_layers` overrule the planner, as llama.cpp's flags of those names do; `repack` too
    (None: the plan's choice). `engine="native"` runs localmix's own forward (localmix.native) on
    the CPU, its KV cache float32. `sequences`: how many KV caches of `ctx` tokens the caller
    will hold (a server's --parallel); the memory check counts them all. `rpc` ("host:port,...")
    splits the layers across this machine and those workers (runtime/rpc.py); a worker lost
    later calls `on_lost(gone, message)` (default: one line and exit 1, see `rpc.watch`).
    `flash_attn` (on, off, auto: on where the backend has it) is the context's; the estimate
    counts the attention scores only where it may be off (memory.flash_attn_counted)."""
    o = dataclasses.replace(load or Load(), **fields)
    ctx, plan, _ = plan_engine(path, o.ctx, o.force, o.vram, o.ram, o.n_cpu_moe, o.engine, sequences, o.rpc,
                               o.flash_attn)
    if o.rpc:
        from localmix.runtime.rpc import parse_endpoints, watch

        watch(parse_endpoints(o.rpc), on_lost)
    if o.engine == "native":
        from localmix.native.engine import NativeEngine  # numba's compiled kernels: only when asked for

        plan.repack = False  # the native engine reads the weights where they are mapped
        return NativeEngine(path, n_ctx=ctx, verbose=o.verbose, plan=plan)
    if o.repack is not None:
        plan.repack = o.repack
    return LlamaCppEngine(path, n_ctx=ctx, verbose=o.verbose, plan=plan, n_gpu_layers=o.gpu_layers, repack=plan.repack,
                          flash_attn=o.flash_attn)


def plan_engine(path: str | Path, ctx: int | None = None, force: bool = False, vram: str | None = None,
                ram: str | None = None, n_cpu_moe: int | None = None, engine: str = "llama.cpp", sequences: int = 1,
                rpc: str | None = None, flash_attn: str = "off"):
    """open_engine's checks without the loading: (context per sequence, placement plan, device).
    A model that does not fit with `sequences` KV caches of the context is an InputError."""
    if engine not in ("llama.cpp", "native"):
        raise InputError(f"unknown engine {engine!r}; choose llama.cpp or native")
    summary = check_gguf(path)
    if rpc:
        return split_engine(path, summary, ctx, force, ram, engine, sequences, rpc)
    if engine == "native":  # CPU only: no GPU devices to ask about
        device, gpu_budget, ram_budget = "cpu", None, parse_size(ram) if ram else available_memory()
    else:
        device, gpu_budget, ram_budget = machine(vram, ram)
    if device == "cpu":
        kv_bytes = 4 if engine == "native" else 2
        fa = engine != "native" and flash_attn_counted(flash_attn, "cpu")  # the native engine forms the scores
        estimate = estimate_memory(summary, (ctx or summary.context_length or 4096) * sequences, kv_bytes, flash_attn=fa)
        if ctx is None and estimate.total_bytes > ram_budget:
            fitting = (largest_fitting_ctx(estimate, ram_budget) or 0) // sequences // 256 * 256
            if fitting:
                estimate = estimate_memory(summary, fitting * sequences, kv_bytes, flash_attn=fa)
        ctx = estimate.n_ctx // sequences
        if sequences > 1:  # KV caches for every token of every sequence; attention spans one sequence's
            # cache, over the server's batches of 128 tokens a sequence (scheduler.py's chunk)
            one = estimate_memory(summary, ctx, kv_bytes, n_ubatch=128 * sequences, flash_attn=fa)
            estimate = dataclasses.replace(estimate, compute_bytes=one.compute_bytes)
        if sequences == 1:
            check_fits(estimate, ram_budget, force)
        elif not force and estimate.total_bytes > FIT_SLACK * ram_budget:
            raise InputError(f"{Path(path).name} with {sequences} sequences (--parallel) of {ctx} tokens (--ctx) "
                             f"needs about {human_bytes(estimate.total_bytes)} (weights "
                             f"{human_bytes(estimate.weights_bytes)}, KV caches {human_bytes(estimate.kv_bytes)}, "
                             f"compute {human_bytes(estimate.compute_bytes)}) but "
                             f"{human_bytes(max(ram_budget, 0))} of memory is available; lower --parallel or --ctx, "
                             "or pass --force")
        return ctx, file_plan(path, ctx * sequences, None, ram_budget, summary=summary, flash_attn=flash_attn), device
    own = summary.context_length or 4096
    tries = [ctx] if ctx else [own] + [c for c in (16384, 8192, 4096, 2048) if c < own]
    for ctx in tries:
        plan = file_plan(path, ctx * sequences, gpu_budget, ram_budget, device, n_cpu_moe, summary=summary,
                         flash_attn=flash_attn)
        if plan.fits:
            break
    if not plan.fits and not force:
        held = f" with {sequences} sequences (--parallel)" if sequences > 1 else ""
        raise InputError(f"{Path(path).name} at {ctx} tokens of context{held}: {plan.advice} (--force loads it anyway)")
    return ctx, plan, device


def split_engine(path, summary, ctx: int | None, force: bool, ram: str | None, engine: str, sequences: int, rpc: str):
    """plan_engine across machines: add the workers, then the largest of the model's own
    context, 16K, 8K, 4K and 2K whose split fits (or `ctx`)."""
    from localmix.runtime.planner import split_file_plan
    from localmix.runtime.rpc import split_devices

    if engine != "llama.cpp":
        raise InputError("--rpc splits the model with llama.cpp's RPC backend: it needs --engine llama.cpp")
    workers = split_devices(rpc)
    ram_budget = parse_size(ram) if ram else available_memory()
    own = summary.context_length or 4096
    tries = [ctx] if ctx else [own] + [c for c in (16384, 8192, 4096, 2048) if c < own]
    for ctx in tries:
        plan = split_file_plan(summary, ctx * sequences, ram_budget, workers)
        if plan.fits:
            break
    if not plan.fits and not force:
        raise InputError(f"{Path(path).name} at {ctx} tokens of context: {plan.advice} (--force loads it anyway)")
    return ctx, plan, "rpc"


def split_file_plan(path, ctx: int, ram: str | None, rpc: str):
    """`plan --rpc`: the split of the GGUF at `path` across this machine and the workers."""
    from localmix.runtime.planner import split_file_plan as plan_split
    from localmix.runtime.rpc import split_devices

    workers = split_devices(rpc)
    return plan_split(check_gguf(path), ctx, parse_size(ram) if ram else available_memory(), workers)
