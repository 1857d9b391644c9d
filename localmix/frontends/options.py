"""The options several commands share, each defined once: how to load a model (`Load`) and how
to sample (`runtime.stream.Sampling`), with the command-line flags built from their fields.

A command asks for the groups it takes, and for any default or help text of its own:

    @app.command()
    @options(load=LOAD, sampling=SAMPLING.but(max_tokens=512))
    def run(model: str = ..., load: Load = None, sampling: Sampling = None): ...

`options` replaces the `load` and `sampling` parameters by one typer option per field (the
field's default, the flag's help) and hands the command the dataclasses, built once. This
module imports nothing heavy: `localmix --help` reads it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Optional

import typer

from localmix.runtime.stream import Sampling


class FlashAttn(str, enum.Enum):
    """--flash-attn's choices (llama.cpp's `-fa on|off|auto`)."""
    on = "on"
    off = "off"
    auto = "auto"


@dataclass
class Load:
    """How to open a model: `frontends.load.open_engine`'s settings."""
    ctx: int | None = None              # context length; None: the model's own, capped by memory
    force: bool = False                 # load even when the estimate says it does not fit
    verbose: bool = False               # llama.cpp's log on stderr
    vram: str | None = None             # GPU memory to plan for ("20GiB"); None: what the GPU reports
    ram: str | None = None              # RAM to plan for; None: what is available now
    n_cpu_moe: int | None = None        # the experts of the first N layers on the CPU; None: the plan's
    gpu_layers: int | None = None       # llama.cpp's n_gpu_layers; None: the plan's
    repack: bool | None = None          # llama.cpp's repacked CPU layouts; None: the plan's choice
    flash_attn: str = "off"             # llama.cpp's flash attention: off, on, or auto (where the backend has it)
    engine: str = "llama.cpp"           # or "native"
    rpc: str | None = None              # workers "host:port,host:port" (localmix worker) to split across


@dataclass(frozen=True)
class Flag:
    """How one field is spelled on the command line."""
    names: tuple[str, ...]
    help: str | None = None
    type: Any = None                    # the parameter's type for typer (the field's when None)
    extra: dict = dataclasses.field(default_factory=dict)  # min, max, ...


@dataclass(frozen=True)
class Group:
    """A dataclass and the flags of the fields a command takes; `but` changes a command's
    defaults (a value) or help texts (`help_NAME=`), `only`/`without` choose fields."""
    cls: type
    flags: dict[str, Flag]
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)

    def but(self, **changes) -> Group:
        flags, defaults = dict(self.flags), dict(self.defaults)
        for key, value in changes.items():
            if key.startswith("help_"):
                flags[key[5:]] = dataclasses.replace(flags[key[5:]], help=value)
            else:
                defaults[key] = value
        return Group(self.cls, flags, defaults)

    def only(self, *names: str) -> Group:
        return Group(self.cls, {n: self.flags[n] for n in names}, self.defaults)

    def without(self, *names: str) -> Group:
        return self.only(*(n for n in self.flags if n not in names))

    def default(self, name: str):
        if name in self.defaults:
            return self.defaults[name]
        f = self.cls.__dataclass_fields__[name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def build(self, values: dict[str, Any]):
        """The dataclass from the parsed flags (a list becomes the field's tuple); a field the
        command does not take keeps this group's default."""
        given = {n: tuple(values.pop(n) or ()) if self.flags[n].type == list[str] else values.pop(n) for n in self.flags}
        given = {n: v.value if isinstance(v, enum.Enum) else v for n, v in given.items()}  # a choice: its text
        rest = {n: v for n, v in self.defaults.items() if n not in given}
        return self.cls(**rest, **given)


LOAD = Group(Load, {
    "ctx": Flag(("--ctx",), "Context length in tokens \\[default: the model's, capped by memory].", Optional[int],
                {"min": 16}),
    "force": Flag(("--force",), "Load even when the model and context look too big for memory.", bool),
    "vram": Flag(("--vram",), "Plan for this much GPU memory, e.g. 20GiB \\[default: what the GPU reports free].",
                 Optional[str]),
    "ram": Flag(("--ram",), "Plan for this much RAM \\[default: what is available now].", Optional[str]),
    "n_cpu_moe": Flag(("--n-cpu-moe",), "Keep the experts of the first N layers on the CPU "
                      "\\[default: as few as the GPU needs].", Optional[int], {"min": 0}),
    "gpu_layers": Flag(("--gpu-layers", "-ngl"), "llama.cpp's n_gpu_layers \\[default: the plan's].", Optional[int],
                       {"min": 0}),
    "repack": Flag(("--repack/--no-repack",), "Let llama.cpp copy CPU weights into its repacked layouts: faster "
                   "products, but read in full at load and resident instead of mapped \\[default: when RAM holds the "
                   "file and the copy].", Optional[bool]),
    "flash_attn": Flag(("--flash-attn", "-fa"), "llama.cpp's flash attention: off, on, or auto (on where the "
                       "backend supports it: the CPU does). On is faster at several sequences, but then a reply's "
                       "numbers depend on what else the batch holds.", FlashAttn),
    "engine": Flag(("--engine",), "llama.cpp, or native: localmix's own numpy forward (CPU).", str),
    "verbose": Flag(("--verbose", "-v"), "Show llama.cpp's log.", bool),
    "rpc": Flag(("--rpc",), "Split the layers across this machine and `localmix worker`s at HOST:PORT\\[,HOST:PORT...], "
                "in proportion to their memory.", Optional[str]),
})

SAMPLING = Group(Sampling, {
    "max_tokens": Flag(("--max-tokens", "-n"), "Stop a reply after this many tokens.", int, {"min": 1}),
    "temperature": Flag(("--temperature", "--temp"), None, float, {"min": 0.0}),
    "top_k": Flag(("--top-k",), None, int, {"min": 0}),
    "top_p": Flag(("--top-p",), None, float, {"min": 0.0, "max": 1.0}),
    "min_p": Flag(("--min-p",), None, float, {"min": 0.0, "max": 1.0}),
    "repeat_penalty": Flag(("--repeat-penalty",), None, float, {"min": 0.0}),
    "seed": Flag(("--seed",), "Make sampling reproducible.", Optional[int]),
    "stop": Flag(("--stop",), "Stop a reply before this text (repeatable).", list[str]),
})


def options(**groups: Group):
    """Decorate a command: each keyword names a parameter of the command that receives the
    group's dataclass, built from flags of its own (see the module's docstring)."""
    def wrap(command):
        signature = inspect.signature(command)
        params = [p for p in signature.parameters.values() if p.name not in groups]
        for group in groups.values():
            for name, flag in group.flags.items():
                default = group.default(name)
                if flag.type == list[str]:
                    default = list(default) or None
                params.append(inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, annotation=flag.type,
                    default=typer.Option(default, *flag.names, help=flag.help, **flag.extra)))

        @functools.wraps(command)
        def run(**values):
            for param, group in groups.items():
                values[param] = group.build(values)
            return command(**values)

        run.__signature__ = signature.replace(parameters=params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer reads the signature above, not the command's
        return run
    return wrap
