"""What the front ends print: `localmix info`'s table, `plan`'s table, the stats line after a reply."""

from __future__ import annotations

from typing import Any

from localmix.gguf.info import HPARAMS
from localmix.units import human_bytes, human_count


def render(info: dict[str, Any]):
    """Rich renderables for `localmix info`."""
    from rich.table import Table

    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("file", info["path"])
    t.add_row("name", str(info["name"]))
    t.add_row("architecture", f"{info['architecture']}  (GGUF v{info['gguf_version']})")
    t.add_row("file type", str(info["file_type"]))
    for label, key in HPARAMS:
        if key in info["hyperparameters"]:
            t.add_row(label, f"{info['hyperparameters'][key]:g}" if isinstance(info["hyperparameters"][key], float)
                      else str(info["hyperparameters"][key]))
    p, b = info["parameters"], info["bytes"]
    t.add_row("parameters", f"{human_count(p['total'])} total, {human_count(p['active_per_token'])} active per token")
    t.add_row("size", f"{human_bytes(b['total'])}  ({info['bits_per_weight']} bits per weight)")
    if p["experts"]:
        t.add_row("  experts", f"{human_bytes(b['experts'])}  ({human_count(p['experts'])} parameters)")
    t.add_row("  other" if p["experts"] else "  tensors", f"{human_bytes(b['other'])}  ({human_count(p['other'])} parameters)")
    t.add_row("tensor types", ", ".join(f"{k} ×{v}" for k, v in info["tensor_types"].items()))
    tok = info["tokenizer"]
    t.add_row("tokenizer", f"{tok['model']}, {tok['vocab_size']} tokens, BOS {tok['bos_token_id']}, "
              f"EOS {tok['eos_token_id']}, add BOS {tok['add_bos_token']}")
    ct = info["chat_template"]
    t.add_row("chat template", "none" if ct is None else
              f"{ct['format']} format"
              + (f" (Mistral {ct['mistral_version']}: [INST] as "
                 f"{'text' if ct['mistral_version'] == 'v1' else 'control tokens'})" if ct.get("mistral_version") else "")
              + f", {ct['length']} characters, {'with' if ct['system_role'] else 'no'} system role")
    return t


def plan_table(p):
    """`localmix plan`'s table: the device and budget, context, where the weights go, the verdict."""
    from rich.table import Table

    if p.shares:
        return split_table(p)
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    where = {"gpu": "GPU", "metal": "Metal (unified memory)", "cpu": "CPU only, weights mapped from the file"}[p.device]
    t.add_row("device", where + (f", budget {human_bytes(p.gpu_budget)}" if p.gpu_budget else ""))
    t.add_row("context", f"{p.n_ctx} tokens: KV cache {human_bytes(p.kv_bytes)}, "
              f"compute buffers {human_bytes(p.compute_bytes)}")
    t.add_row("weights", human_bytes(p.weights_bytes))
    if p.gpu_budget is not None:
        t.add_row("on the GPU", f"{human_bytes(p.gpu_bytes)} (spare beyond a 512 MiB reserve: "
                  f"{human_bytes(max(p.headroom, 0))}), n_gpu_layers {p.n_gpu_layers}")
    layers = p.cpu_expert_layers
    t.add_row("on the CPU", human_bytes(p.cpu_bytes) + (f": experts of layers {layers[0]}-{layers[-1]} "
                                                         f"(--n-cpu-moe {len(layers)})" if layers else ""))
    t.add_row("RAM", (human_bytes(p.ram_budget) if p.ram_budget else "unknown")
              + ("; CPU weights repacked for speed" if p.repack and p.cpu_bytes else ""))
    t.add_row("verdict", "fits" if p.fits else f"[yellow]{p.advice}[/]")
    return t


def split_table(p):
    """`localmix plan --rpc`'s table: per device, its layers, weights, KV cache and free memory."""
    from rich.table import Table

    t = Table(box=None, pad_edge=False, title=f"{p.n_ctx} tokens of context, weights {human_bytes(p.weights_bytes)}, "
              f"KV cache {human_bytes(p.kv_bytes)}", title_justify="left")
    for column in ("device", "where", "layers", "weights", "KV cache", "compute", "free"):
        t.add_column(column, justify="left" if column in ("device", "where", "layers") else "right", no_wrap=True)
    for s in p.shares:
        layers = f"{s.first}-{s.first + s.n_layers - 1}" if s.n_layers else "none"
        t.add_row(s.device, s.where, layers + ("*" if s is p.shares[0] else ""),
                  human_bytes(s.weights_bytes), human_bytes(s.kv_bytes), human_bytes(s.compute_bytes),
                  human_bytes(s.budget), style=None if s.need <= s.budget else "yellow")
    t.caption = "* and the embeddings and output layer; " + ("fits" if p.fits else p.advice)
    t.caption_justify = "left"
    return t


def models_table(models):
    """`localmix ls`'s table: name, kind and size of each cached model (or how to get one)."""
    from rich.table import Table

    if not models:
        return "no models yet: `localmix pull REPO:QUANT` downloads one"
    table = Table(box=None, pad_edge=False)
    for column in ("name", "kind", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for m in models:
        table.add_row(m.name, m.kind, human_bytes(m.size))
    return table


STOPPED = {"length": "max_tokens", "context": "context full", "cancelled": "interrupted"}


def stats_line(done) -> str:
    """One line after a reply (chat, `run --verbose`): token counts, speeds, time to the first token."""
    new = f"{done.prompt_evaluated} new, {done.prompt_tps:.0f} t/s" if done.prompt_evaluated else "all cached"
    line = (f"prompt {done.prompt_tokens} tokens ({new}), "
            f"reply {done.generated_tokens} tokens ({done.generate_tps:.1f} t/s), "
            f"first token in {done.prompt_seconds:.2f} s")
    return line + (f", stopped: {STOPPED[done.reason]}" if done.reason in STOPPED else "")
