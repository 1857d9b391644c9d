"""Where each tensor of a model goes: the GPU (or Metal's working set) or the CPU.

`plan(tensors, shape, n_ctx, gpu_budget, ram_budget)` is a pure function over a tensor table
(names and bytes), the model's shape and the memory of the machine:
1. Everything on the GPU when weights + KV cache + compute buffers + headroom fit its budget.
2. Otherwise the non-expert tensors (attention, norms, router, embeddings, output) and the KV
   cache stay on the GPU, and the experts of as many layers as fit join them; the experts of
   the first layers stay in CPU memory, read from the memory-mapped file. This is llama.cpp's
   `--n-cpu-moe N`: expert tensors of layers 0..N-1 go to the CPU buffer type.
3. With no GPU, everything stays on the CPU, mapped.
A plan also says when it does not fit and what would: a smaller context, a smaller quant.

Weights on the CPU stay in the memory map unless there is room to `repack` them: llama.cpp
can copy some types (Q4_0, Q4_K, ...) into layouts interleaved for its SIMD kernels, which
is faster but turns those weights into anonymous memory, read in full at load. The plan
repacks only when the file's pages and such a copy of every CPU weight both fit in RAM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from localmix.runtime.memory import flash_attn_counted

GiB = 1 << 30
EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.")
HEADROOM = 512 << 20      # the GPU runtime's own allocations, fragmentation, display
KV_BYTES = {"f16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32, "f32": 4}


@dataclass(frozen=True)
class ModelDims:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ff: int
    n_expert_used: int = 0


@dataclass
class Share:
    """One device's part of a split across machines: consecutive layers, with their experts,
    KV cache and a compute buffer."""
    device: str                       # llama.cpp's name: CPU here, RPC0, RPC1, ... on workers
    where: str                        # "this machine", or the worker's host:port
    first: int                        # its layers are first .. first + n_layers - 1
    n_layers: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    budget: int

    @property
    def need(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


@dataclass
class Plan:
    device: str                       # "gpu", "metal" or "cpu"
    n_ctx: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    gpu_bytes: int                    # what the plan puts on the GPU, buffers included
    cpu_bytes: int                    # weights left on the CPU (mapped)
    gpu_budget: int | None
    ram_budget: int | None
    n_gpu_layers: int                 # llama.cpp's n_gpu_layers (n_layer + 1 = all, output too)
    cpu_expert_layers: list[int] = field(default_factory=list)
    repack: bool = False              # llama.cpp's use_extra_bufts for the CPU weights
    fits: bool = True
    advice: str | None = None
    shares: list[Share] = field(default_factory=list)  # split across machines (--rpc): local first

    @property
    def rpc_devices(self) -> list[str]:
        """llama.cpp's names of the devices the plan uses besides the CPU (this machine's GPUs,
        the workers'), in layer order."""
        return [s.device for s in self.shares[1:]]

    @property
    def tensor_split(self) -> list[float]:
        """llama.cpp's tensor_split over `rpc_devices`: the layers of each. llama.cpp counts the
        output layer as one more, last, layer (n_gpu_layers counts it too): the last worker's
        share holds it, and `overrides` keep its tensors here."""
        split = [float(s.n_layers) for s in self.shares[1:]]
        split[-1] += 1
        return split

    @property
    def overrides(self) -> list[tuple[str, str]]:
        """llama.cpp tensor_buft_overrides: (regex on tensor names, buffer type)."""
        if self.shares:  # split across machines: the output layer stays here
            return [(r"^output(_norm)?\.", "CPU")]
        if not self.cpu_expert_layers:
            return []
        layers = "|".join(str(i) for i in self.cpu_expert_layers)
        return [(rf"^blk\.({layers})\.ffn_(up|down|gate)_exps", "CPU")]

    @property
    def headroom(self) -> int | None:
        return None if self.gpu_budget is None else self.gpu_budget - self.gpu_bytes


def kv_cache_bytes(d: ModelDims, n_ctx: int, kv_type: str = "f16") -> int:
    return int(2 * d.n_layer * n_ctx * d.n_head_kv * d.head_dim * KV_BYTES[kv_type])


def compute_bytes(d: ModelDims, n_ctx: int, n_ubatch: int = 512, flash_attn: bool = False) -> int:
    """llama.cpp's compute buffer: its widest step over a micro-batch (see memory.estimate_memory;
    with flash attention no attention scores, only the f16 mask)."""
    ub = min(n_ctx, n_ubatch)
    attention = n_ctx // 2 if flash_attn else (d.n_head + 1) * n_ctx
    widest = max(d.n_vocab, attention, 3 * d.n_ff * max(d.n_expert_used, 1))
    return 4 * ub * (widest + (9 if flash_attn else 8) * d.n_embd)


def plan(tensors: list[tuple[str, int]], dims: ModelDims, n_ctx: int, gpu_budget: int | None,
         ram_budget: int | None = None, kv_type: str = "f16", device: str = "gpu",
         n_cpu_moe: int | None = None, flash_attn: str = "off") -> Plan:
    """`n_cpu_moe` fixes the number of layers whose experts stay on the CPU (the user knows
    better); otherwise as few as fit the budget. `flash_attn` is --flash-attn (on, off, auto):
    the compute buffer counts the attention scores unless flash attention is sure to be on
    (memory.flash_attn_counted)."""
    fa = flash_attn_counted(flash_attn, "cpu" if gpu_budget is None else device)
    weights = sum(n for _, n in tensors)
    kv, compute = kv_cache_bytes(dims, n_ctx, kv_type), compute_bytes(dims, n_ctx, flash_attn=fa)
    experts: dict[int, int] = {}
    for name, n in tensors:
        m = EXPERT.match(name)
        if m:
            experts[int(m.group(1))] = experts.get(int(m.group(1)), 0) + n
    base = weights - sum(experts.values())

    if gpu_budget is None:  # CPU only: all mapped from the file
        need = weights + kv + compute
        p = Plan("cpu", n_ctx, weights, kv, compute, 0, weights, None, ram_budget, 0,
                 repack=ram_budget is not None and need + weights <= ram_budget)
        if ram_budget is not None and need > ram_budget:
            p.fits = False
            p.advice = (f"needs {need / GiB:.1f} GiB of RAM for full speed, {ram_budget / GiB:.1f} GiB available: "
                        "it runs, reading weights from disk (slowly); a smaller quant fits")
        return p

    full = weights + kv + compute + HEADROOM
    if full <= gpu_budget and not n_cpu_moe:
        return Plan(device, n_ctx, weights, kv, compute, full, 0, gpu_budget, ram_budget, dims.n_layer + 1)

    fixed = base + kv + compute + HEADROOM
    if fixed > gpu_budget or not experts:
        p = Plan(device, n_ctx, weights, kv, compute, 0, weights, gpu_budget, ram_budget, 0, fits=False)
        smaller = [c for c in (16384, 8192, 4096, 2048) if c < n_ctx and
                   base + kv_cache_bytes(dims, c, kv_type) + compute_bytes(dims, c, flash_attn=fa) + HEADROOM <= gpu_budget]
        p.advice = ("the attention weights and KV cache alone do not fit the GPU: "
                    + (f"use --ctx {smaller[0]} or less, " if smaller else "") + "a smaller quant, or run on the CPU")
        return p

    if n_cpu_moe is None:  # experts of the last layers first onto the GPU, the first layers' stay on the CPU
        room, n_cpu_moe = gpu_budget - fixed, len(experts)
        for layer in sorted(experts, reverse=True):
            if experts[layer] > room:
                break
            room -= experts[layer]
            n_cpu_moe -= 1
    on_cpu = sorted(experts)[:n_cpu_moe]
    cpu = sum(experts[i] for i in on_cpu)
    p = Plan(device, n_ctx, weights, kv, compute, weights - cpu + kv + compute + HEADROOM, cpu, gpu_budget,
             ram_budget, dims.n_layer + 1, on_cpu, repack=ram_budget is not None and 2 * cpu <= ram_budget)
    if p.gpu_bytes > gpu_budget:
        p.fits = False
        p.advice = (f"with the experts of {n_cpu_moe} layers on the CPU the GPU needs {p.gpu_bytes / GiB:.1f} GiB: "
                    "raise --n-cpu-moe or leave it to the planner")
    if ram_budget is not None and cpu > ram_budget:
        p.fits = False
        p.advice = (f"the experts left on the CPU need {cpu / GiB:.1f} GiB of RAM, {ram_budget / GiB:.1f} GiB available: "
                    "it runs, reading them from disk (slowly); a smaller quant fits")
    return p


def layer_bytes(tensors: list[tuple[str, int]], n_layer: int) -> tuple[list[int], int]:
    """(bytes of each layer's tensors, bytes of the rest: embeddings, output norm and output)."""
    per = [0] * n_layer
    rest = 0
    for name, n in tensors:
        m = re.match(r"^blk\.(\d+)\.", name)
        if m and int(m.group(1)) < n_layer:
            per[int(m.group(1))] += n
        else:
            rest += n
    return per, rest


def proportional(n: int, weights: list[float]) -> list[int]:
    """`n` whole items in proportion to `weights` (largest remainders), each at least one while
    there are as many items as weights."""
    total = sum(weights) or 1.0
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: exact[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(counts)):  # a device with none takes one from the device with most
        if counts[i] == 0 and n >= len(counts):
            counts[counts.index(max(counts))] -= 1
            counts[i] = 1
    return counts


def split_plan(tensors: list[tuple[str, int]], dims: ModelDims, n_ctx: int, ram_budget: int,
               workers: list[tuple[str, str, int]], kv_type: str = "f16") -> Plan:
    """Split the layers between this machine's CPU (the first layers, the embeddings and the
    output layer) and the other devices (`workers`: llama.cpp's device name, "this machine" or
    host:port, free bytes: this machine's GPUs, then the workers'), in proportion to the memory
    of each; all the experts of a layer go with it.
    Each device also holds the KV cache of its layers and a compute buffer."""
    per, rest = layer_bytes(tensors, dims.n_layer)
    kv_layer = kv_cache_bytes(dims, n_ctx, kv_type) // max(dims.n_layer, 1)
    compute = compute_bytes(dims, n_ctx)
    # a GPU here keeps a reserve for its runtime and display; a worker reports what it can give
    workers = [(name, where, max(free - HEADROOM, 0) if where == "this machine" else free)
               for name, where, free in workers]
    budgets = [max(ram_budget - rest, 0), *(free for _, _, free in workers)]
    counts = proportional(dims.n_layer, [float(b) for b in budgets])
    names = [("CPU", "this machine"), *((name, where) for name, where, _ in workers)]
    shares, first = [], 0
    for (name, where), n, budget in zip(names, counts, [ram_budget, *(free for _, _, free in workers)]):
        weights = sum(per[first:first + n]) + (rest if not shares else 0)
        shares.append(Share(name, where, first, n, weights, kv_layer * n, compute, budget))
        first += n
    weights = sum(n for _, n in tensors)
    kv = kv_layer * dims.n_layer
    local = shares[0]
    p = Plan("rpc", n_ctx, weights, kv, compute, sum(s.need for s in shares[1:]), local.weights_bytes, None,
             ram_budget, dims.n_layer - local.n_layers + 1, shares=shares)
    short = [s for s in shares if s.need > s.budget]
    if short:
        from localmix.units import human_bytes as h

        s = short[0]
        p.fits = False
        p.advice = (f"{s.device} ({s.where}) is short: its {s.n_layers} layers need {h(s.need)} with their KV cache, "
                    f"{h(s.budget)} is free there; add a worker, use a smaller --ctx or a smaller quant")
    return p


def preset_plan(preset: str, file_type: str, n_ctx: int, gpu_budget: int | None, ram_budget: int | None = None,
                device: str = "gpu", n_cpu_moe: int | None = None, flash_attn: str = "off") -> Plan:
    """Plan for a preset model (localmix.convert.presets), with no file at hand."""
    from localmix.convert.presets import preset_config, preset_tensors

    cfg = preset_config(preset)
    dims = ModelDims(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts_per_tok if cfg.is_moe else 0)
    tensors = [(t.name, t.n_bytes) for t in preset_tensors(preset, file_type)]
    return plan(tensors, dims, n_ctx, gpu_budget, ram_budget, device=device, n_cpu_moe=n_cpu_moe, flash_attn=flash_attn)


def split_preset_plan(preset: str, file_type: str, n_ctx: int, ram: str | None, rpc: str) -> Plan:
    """`plan --rpc` for a preset model: its split across this machine and the workers at `rpc`."""
    from localmix.convert.presets import preset_config, preset_tensors
    from localmix.runtime.devices import parse_size
    from localmix.runtime.memory import available_memory
    from localmix.runtime.rpc import split_devices

    cfg = preset_config(preset)
    dims = ModelDims(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.vocab_size, cfg.intermediate_size, cfg.num_experts_per_tok if cfg.is_moe else 0)
    workers = split_devices(rpc)
    return split_plan([(t.name, t.n_bytes) for t in preset_tensors(preset, file_type)], dims, n_ctx,
                      parse_size(ram) if ram else available_memory(), workers)


def file_plan(path, n_ctx: int, gpu_budget: int | None, ram_budget: int | None = None, device: str = "gpu",
              n_cpu_moe: int | None = None, summary=None, flash_attn: str = "off") -> Plan:
    """Plan for a GGUF file, from its tensor table alone (the weights are not read); `summary`
    is the file's `check_gguf` when the caller has checked it already."""
    from localmix.gguf.check import check_gguf

    s = summary or check_gguf(path)
    dims = ModelDims(s.n_layer or 0, s.n_embd or 0, s.n_head or 0, s.n_head_kv or 0, s.head_dim or 0, s.n_vocab,
                     s.n_ff or 0, s.n_expert_used)
    return plan([(t.name, t.n_bytes) for t in s.tensors], dims, n_ctx, gpu_budget, ram_budget, device=device,
                n_cpu_moe=n_cpu_moe, flash_attn=flash_attn)


def split_file_plan(summary, n_ctx: int, ram_budget: int, workers: list[tuple[str, str, int]]) -> Plan:
    """split_plan for a checked GGUF file (its `check_gguf` summary)."""
    s = summary
    dims = ModelDims(s.n_layer or 0, s.n_embd or 0, s.n_head or 0, s.n_head_kv or 0, s.head_dim or 0, s.n_vocab,
                     s.n_ff or 0, s.n_expert_used)
    return split_plan([(t.name, t.n_bytes) for t in s.tensors], dims, n_ctx, ram_budget, workers)


def placement_line(p: Plan) -> str:
    """The plan in one line, for `/show` and `run --verbose`."""
    from localmix.units import human_bytes as h

    sizes = f"weights {h(p.weights_bytes)}, KV cache {h(p.kv_bytes)}, compute ~{h(p.compute_bytes)}"
    if p.device == "cpu":
        return f"{sizes}; all on the CPU, weights " + ("repacked" if p.repack else "memory-mapped")
    if p.shares:
        return f"{sizes}; " + ", ".join(f"layers {s.first}-{s.first + s.n_layers - 1} on {s.device} ({s.where})"
                                         for s in p.shares if s.n_layers)
    where = "Metal" if p.device == "metal" else "the GPU"
    if not p.cpu_expert_layers:
        return f"{sizes}; all on {where} ({h(p.gpu_bytes)} of {h(p.gpu_budget)})"
    layers = p.cpu_expert_layers
    return (f"{sizes}; {h(p.gpu_bytes)} on {where} (of {h(p.gpu_budget)}), experts of layers "
            f"{layers[0]}-{layers[-1]} ({h(p.cpu_bytes)}) on the CPU, " + ("repacked" if p.repack else "memory-mapped"))


def describe(p: Plan) -> dict:
    """The plan as plain data (`localmix plan --json`)."""
    return {"device": p.device, "n_ctx": p.n_ctx, "fits": p.fits, "advice": p.advice,
            "n_gpu_layers": p.n_gpu_layers, "cpu_expert_layers": p.cpu_expert_layers, "repack": p.repack,
            "tensor_overrides": [{"pattern": pat, "buffer_type": buft} for pat, buft in p.overrides],
            "bytes": {"weights": p.weights_bytes, "kv_cache": p.kv_bytes, "compute": p.compute_bytes,
                      "gpu_total": p.gpu_bytes, "cpu_weights": p.cpu_bytes, "gpu_budget": p.gpu_budget,
                      "gpu_headroom": p.headroom, "ram_budget": p.ram_budget},
            "split": [{"device": s.device, "where": s.where, "layers": [s.first, s.first + s.n_layers - 1],
                       "n_layers": s.n_layers, "weights": s.weights_bytes, "kv_cache": s.kv_bytes,
                       "compute": s.compute_bytes, "free": s.budget} for s in p.shares]}


def weights_budget(d: ModelDims, n_ctx: int, gpu_budget: int) -> int:
    """Bytes of weights that fit on a GPU of `gpu_budget` beside the KV cache and compute
    buffers of `n_ctx` tokens and the headroom: what `quantize --fit-gpu` fits a file to."""
    return gpu_budget - kv_cache_bytes(d, n_ctx) - compute_bytes(d, n_ctx) - HEADROOM
