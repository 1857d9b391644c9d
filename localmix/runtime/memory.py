"""Will a GGUF fit: the memory llama.cpp needs for a model at a context length, and the check.

`estimate_memory(summary, n_ctx)` adds up weights, KV cache and llama.cpp's compute buffer
for a checked file (`gguf.check.check_gguf`), and `check_fits(estimate, available_memory())`
refuses a run that clearly will not fit, naming the largest --ctx that would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from localmix.errors import InputError
from localmix.gguf.check import GGUFSummary
from localmix.units import human_bytes

FIT_SLACK = 1.1             # refuse only when the estimate is over 1.1 x what is available
MIN_SUGGESTED_CTX = 256     # a shorter context is no use for a chat: suggest a smaller quant instead


@dataclass(frozen=True)
class MemoryEstimate:
    summary: GGUFSummary = field(repr=False)
    n_ctx: int
    kv_type_bytes: float
    n_ubatch: int
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    flash_attn: bool = False

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes


def estimate_memory(summary: GGUFSummary, n_ctx: int, kv_type_bytes: float = 2, n_ubatch: int = 512,
                    flash_attn: bool = False) -> MemoryEstimate:
    """The memory llama.cpp needs resident to run `summary`'s model at `n_ctx` tokens on the CPU.

    weights  the tensors' bytes: llama.cpp maps the file and uses the tensors in place.
    KV cache K and V for every layer and position:
             n_layer * n_ctx * n_head_kv * (head_dim + head_dim_v) * kv_type_bytes,
             i.e. 2 * n_layer * n_ctx * n_head_kv * head_dim * kv_type_bytes when K and V
             heads are the same width (f16 cache: 2 bytes; q8_0: 34/32).
    compute  llama.cpp's CPU compute buffer holds the activations of one micro-batch of
             n_ubatch = min(n_ctx, 512) tokens, f32, and reuses memory between steps, so its
             size is set by the widest step: the output logits (n_vocab per token), the
             gate, up and product of the active experts (3 * n_ff * n_expert_used per token),
             and, without flash attention (`flash_attn=False`), the attention scores plus mask
             ((n_head + 1) * n_ctx per token), plus a few residual-stream rows (8 * n_embd per
             token):
                 4 * n_ubatch * (max(n_vocab, (n_head + 1) * n_ctx, 3 * n_ff * used) + 8 * n_embd)
             llama.cpp (llama-cpp-python 0.3.36) reports 63.5, 74.8 and 290.8 MiB for the tiny
             test Mixtral at n_ctx 512, 4096 and 16384, where this gives 66.5, 76.0 and
             292.0 MiB; for Mixtral 8x7B at 4096 it gives 328 MiB, next to 25-50 GB of weights.
             With flash attention llama.cpp never forms the scores: its kernel walks the KV
             cache a block at a time, so only the f16 mask remains (2 bytes per token and
             position: n_ctx / 2 in f32 units), and llama.cpp reports 63.5 MiB for the tiny
             Mixtral at all three lengths; one more row of n_embd per token is counted for
             the kernel's output beside the residual stream (9 * n_embd), which gives 63.6.
    """
    if n_ctx < 1:
        raise InputError(f"the context length must be at least 1 token, not {n_ctx}")
    for what, v in (("block_count", summary.n_layer), ("embedding_length", summary.n_embd),
                    ("attention.head_count", summary.n_head)):
        if not v:
            raise InputError(f"{summary.path} has no {summary.architecture}.{what}, so its memory use cannot be estimated")
    s = summary
    kv = round(s.n_layer * n_ctx * s.n_head_kv * (s.head_dim + s.head_dim_v) * kv_type_bytes)
    ub = min(n_ctx, n_ubatch)
    attention = n_ctx // 2 if flash_attn else (s.n_head + 1) * n_ctx
    widest = max(s.n_vocab, attention, 3 * (s.n_ff or 0) * max(s.n_expert_used, 1))
    compute = 4 * ub * (widest + (9 if flash_attn else 8) * s.n_embd)
    return MemoryEstimate(summary=s, n_ctx=n_ctx, kv_type_bytes=kv_type_bytes, n_ubatch=n_ubatch,
                          weights_bytes=s.tensor_bytes, kv_bytes=kv, compute_bytes=compute, flash_attn=flash_attn)


def flash_attn_counted(setting: str, device: str = "cpu") -> bool:
    """Whether the estimate may count on flash attention for --flash-attn `setting` ("on", "off",
    "auto") on `device` ("cpu", "gpu", "metal"). "auto" is llama.cpp's choice at load: on where
    the backend runs its flash attention op for the model's layers. The CPU backend always does
    (llama.cpp logs "Flash Attention enabled"); a GPU backend may not (a head size it has no
    kernel for, a KV cache on another device), so there the estimate keeps the scores, an upper
    bound."""
    return setting == "on" or (setting == "auto" and device == "cpu")


def largest_fitting_ctx(estimate: MemoryEstimate, available_bytes: int) -> int | None:
    """The largest context below `estimate.n_ctx`, rounded down to a multiple of 256, whose
    estimate fits in `available_bytes`; None if not even MIN_SUGGESTED_CTX fits."""
    def fits(n: int) -> bool:
        e = estimate_memory(estimate.summary, n, estimate.kv_type_bytes, estimate.n_ubatch, estimate.flash_attn)
        return e.total_bytes <= available_bytes

    lo, hi = 0, estimate.n_ctx - 1   # the estimate grows with n_ctx: bisect for the last that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo // 256 * 256 if lo >= MIN_SUGGESTED_CTX else None


def check_fits(estimate: MemoryEstimate, available_bytes: int, force: bool = False) -> None:
    """Raise InputError, one line, if the run clearly needs more memory than is available.

    llama.cpp maps the weights, so they are file-backed pages: the kernel may drop them and
    read them back from disk later, and a model larger than memory does load. But every token
    reads the shared weights and its experts, and a few tokens read them all, so dropped pages
    are read again and again and generation slows to the speed of the disk. The KV cache and
    compute buffer are anonymous memory and can only go to swap. What has to stay resident for
    a usable speed is therefore weights + KV cache + compute buffer, and that is compared with
    the available memory (on Linux MemAvailable, which counts the page cache the kernel can
    drop, this model's own cached pages included). The estimate is approximate, so only a
    total over FIT_SLACK x the available memory is refused; `force` skips the check.
    """
    if force or estimate.total_bytes <= FIT_SLACK * available_bytes:
        return
    e, s = estimate, estimate.summary
    need = (f"{s.path.name} needs about {human_bytes(e.total_bytes)} at --ctx {e.n_ctx} (weights "
            f"{human_bytes(e.weights_bytes)}, KV cache {human_bytes(e.kv_bytes)}, compute {human_bytes(e.compute_bytes)}) "
            f"but {human_bytes(max(available_bytes, 0))} of memory is available")
    ctx = largest_fitting_ctx(e, available_bytes)
    hint = f"use --ctx {ctx} or less, or a smaller quant" if ctx else "use a smaller quant"
    raise InputError(f"{need}; {hint}, or pass --force to run anyway (slowly, reading weights from disk)")


def available_memory() -> int:
    """Bytes of memory a new process can fill without pushing other work out to swap or disk.

    Linux: MemAvailable from /proc/meminfo (free memory plus the page cache and slabs the
    kernel can reclaim). Elsewhere (macOS, where SC_PHYS_PAGES * SC_PAGE_SIZE is sysctl
    hw.memsize, and other Unixes): the physical memory, an upper bound. Container (cgroup)
    limits are not considered. Raises OSError if neither source is readable.
    """
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        raise OSError("cannot tell how much memory this machine has") from None
