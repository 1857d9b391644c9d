"""The machine's memory: free VRAM per GPU, Metal's working set, and available RAM.

Asked of llama.cpp's own backend device API (`ggml_backend_dev_count/get/type/memory`, bound
with ctypes from the libggml that llama-cpp-python ships), so localmix sees exactly the
devices llama.cpp will use: CUDA cards report their free memory, Metal reports the
recommended working set of unified memory. RAM comes from memory.available_memory.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
from dataclasses import dataclass
from functools import cache

DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str        # "gpu", "igpu", "accel" or "cpu"
    free: int
    total: int


@cache
def libs() -> tuple[ctypes.CDLL, ctypes.CDLL]:
    import llama_cpp

    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    base = ctypes.CDLL(_loaded(lib_dir, "libggml-base"), mode=ctypes.RTLD_GLOBAL)
    ggml = ctypes.CDLL(_loaded(lib_dir, "libggml"), mode=ctypes.RTLD_GLOBAL)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    for f, res in (("ggml_backend_dev_name", ctypes.c_char_p), ("ggml_backend_dev_description", ctypes.c_char_p),
                   ("ggml_backend_dev_type", ctypes.c_int)):
        getattr(base, f).restype = res
        getattr(base, f).argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    base.ggml_backend_dev_memory.restype = None
    base.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    return base, ggml


def _loaded(lib_dir: str, name: str) -> str:
    """The file of library `name` that libllama loaded: on Linux its soname (libggml.so.0), for
    pip installs the wheel's symlinks as copies (libggml.so, libggml.so.0, libggml.so.0.25.3),
    and opening another copy would give a second ggml with registries and settings of its own."""
    found = sorted(glob.glob(os.path.join(lib_dir, f"{name}.*")))
    return next((f for f in found if re.fullmatch(rf"{re.escape(name)}\.so\.\d+", os.path.basename(f))), found[0])


def devices() -> list[Device]:
    """Every device llama.cpp's build can use, CPU included."""
    import llama_cpp

    llama_cpp.llama_backend_init()  # loads the backends, as a model load would
    base, ggml = libs()
    found = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        base.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Device(base.ggml_backend_dev_name(dev).decode(), base.ggml_backend_dev_description(dev).decode(),
                            DEV_TYPES.get(base.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return found


def buffer_type(name: str) -> int:
    """The address of the buffer type llama.cpp calls `name` ("CPU", "CUDA0", "Metal"...): a
    device's default buffer type, as llama.cpp's --override-tensor looks them up."""
    import llama_cpp

    from localmix.errors import InputError

    llama_cpp.llama_backend_init()
    base, ggml = libs()
    names = []
    for i in range(ggml.ggml_backend_dev_count()):
        buft = base.ggml_backend_dev_buffer_type(ggml.ggml_backend_dev_get(i))
        names.append(base.ggml_backend_buft_name(buft).decode())
        if names[-1] == name:
            return buft
    raise InputError(f"llama.cpp has no buffer type {name!r} here; it has {', '.join(names)}")


def gpu_budget() -> tuple[str, int] | None:
    """(device kind, bytes free) of the largest GPU-like device, or None on a CPU-only build."""
    gpus = [d for d in devices() if d.kind in ("gpu", "igpu", "accel")]
    if not gpus:
        return None
    best = max(gpus, key=lambda d: d.free)
    return ("metal" if best.name.lower().startswith("metal") else "gpu"), best.free


def machine(vram: str | None = None, ram: str | None = None, metal: bool = False) -> tuple[str, int | None, int]:
    """(device kind, GPU budget or None, RAM budget) of this machine, or of the one that
    `vram`/`ram` describe ("24GiB"; `metal`: the VRAM is a Mac's Metal working set)."""
    from localmix.runtime.memory import available_memory

    ram_bytes = parse_size(ram) if ram else available_memory()
    if vram:
        return ("metal" if metal else "gpu"), parse_size(vram), ram_bytes
    found = gpu_budget()
    return (*found, ram_bytes) if found else ("cpu", None, ram_bytes)


def parse_size(text: str) -> int:
    """'24GiB', '24G', '24GB', '512MiB', '1.5T' -> bytes (G and GB taken as GiB, as people mean them)."""
    from localmix.errors import InputError

    t = text.strip().upper().replace(" ", "")
    units = {"T": 1 << 40, "G": 1 << 30, "M": 1 << 20, "K": 1 << 10, "": 1}
    for suffix in ("IB", "B"):
        if t.endswith(suffix) and t[:-len(suffix)][-1:].isalpha():
            t = t[: -len(suffix)]
            break
    unit = t[-1] if t[-1:].isalpha() else ""
    try:
        value = float(t[:-1] if unit else t)
        size = int(value * units[unit])  # inf and nan raise here
    except (ValueError, KeyError, OverflowError):
        raise InputError(f"cannot read {text!r} as a size; write e.g. 24GiB or 512MiB") from None
    if size < 0:
        raise InputError(f"a size cannot be negative: {text!r}")
    return size
