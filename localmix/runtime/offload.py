"""Hand a placement plan to llama.cpp: tensor buffer-type overrides and n_gpu_layers.

llama.cpp places tensors by layer (`n_gpu_layers`) and then by pattern: a NULL-terminated
array of `{regex, buffer type}` in `llama_model_params.tensor_buft_overrides` sends matching
tensors elsewhere (what `--override-tensor` and `--n-cpu-moe` fill in llama.cpp's tools).
llama-cpp-python declares that field but never fills it (`c_void_p  # NOTE: unused`), and its
`Llama` builds the params and loads the model within one constructor. So `load_llama` builds
the array here and has it copied into the params that constructor asks
`llama_model_default_params` for, by wrapping that function for the duration of the one call
(under a lock, so no other load sees it); the flash attention type likewise, through
`llama_init_from_model` (`_params_with`). The array and its strings stay referenced from the
returned `Llama` for as long as the model lives.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager

from localmix.runtime.log import set_llama_log
from localmix.runtime.planner import Plan

_LOCK = threading.Lock()


class BufferTypeOverride(ctypes.Structure):
    """struct llama_model_tensor_buft_override { const char * pattern; ggml_backend_buffer_type_t buft; }"""
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def override_array(overrides: list[tuple[str, str]]) -> ctypes.Array | None:
    """(regex, buffer type name) pairs -> the NULL-terminated C array, or None for no overrides.

    The patterns are C++ std::regex searches on tensor names, as llama.cpp's own flags."""
    if not overrides:
        return None
    from localmix.runtime.devices import buffer_type

    array = (BufferTypeOverride * (len(overrides) + 1))()  # zeroed: the last entry is the terminator
    for entry, (pattern, buft_name) in zip(array, overrides):
        entry.pattern = pattern.encode()
        entry.buft = buffer_type(buft_name)
    return array


FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama.cpp's enum llama_flash_attn_type (AUTO, DISABLED, ENABLED)


@contextmanager
def _params_with(overrides: ctypes.Array | None, repack: bool, devices: ctypes.Array | None, flash_attn: str):
    """While active, llama-cpp-python's `llama_model_default_params()` returns params whose
    tensor_buft_overrides point at `overrides`, whose use_extra_bufts is `repack` and whose
    devices (a NULL-terminated `ggml_backend_dev_t *`, NULL: every GPU) are `devices`, and
    `llama_init_from_model` makes its context with `flash_attn` ("on", "off" or "auto").

    `Llama(flash_attn=...)` is a bool, which it turns into ENABLED or DISABLED: llama.cpp's own
    default, AUTO (on where the backend supports it, which the CPU's does), it cannot express.
    So the type is set in the `llama_context_params` the constructor hands to
    `llama_init_from_model`: the same object as the `Llama`'s `context_params`, which the
    batching scheduler (scheduler.py) copies for its own context, so both follow the setting."""
    import llama_cpp.llama_cpp as lib

    default, init = lib.llama_model_default_params, lib.llama_init_from_model
    fa_type = FLASH_ATTN[flash_attn]

    def with_overrides():
        params = default()
        params.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p).value if overrides else None
        params.use_extra_bufts = repack
        if devices is not None:
            params.devices = ctypes.cast(devices, ctypes.c_void_p).value
        return params

    def init_with_flash_attn(model, params):
        params.flash_attn_type = fa_type
        return init(model, params)

    with _LOCK:
        lib.llama_model_default_params, lib.llama_init_from_model = with_overrides, init_with_flash_attn
        try:
            yield
        finally:
            lib.llama_model_default_params, lib.llama_init_from_model = default, init


def load_llama(model_path: str, plan: Plan | None = None, n_gpu_layers: int | None = None, repack: bool = False,
               flash_attn: str = "off", **kwargs):
    """`llama_cpp.Llama(model_path, **kwargs)` placed by `plan`: its n_gpu_layers (unless given)
    and its tensor overrides (the experts it keeps on the CPU), its context with flash attention
    `flash_attn`: "off" (localmix's default), "on", or "auto", llama.cpp's default (`-fa auto` in
    its tools), which turns it on where the backend supports it (on the CPU it does).

    `repack=False` keeps every CPU tensor in the memory map. llama.cpp's default (True) copies
    the weights of some types (Q4_0, Q4_K, IQ4_NL...) into "CPU_REPACK" buffers interleaved for
    its SIMD kernels (and AMX tiles where built in): faster matrix products, but the copy is
    anonymous memory the size of those weights, read in full at load time (20 GiB of the
    28.4 GB Mixtral Q4_K_M on a 24 GB machine: a load 4x as slow, and little room left for
    anything else)."""
    from llama_cpp import Llama

    set_llama_log(bool(kwargs.get("verbose", True)))  # llama.cpp's log on stderr exactly when verbose
    if n_gpu_layers is None:
        n_gpu_layers = plan.n_gpu_layers if plan else 0
    overrides = override_array(plan.overrides if plan else [])
    if flash_attn not in FLASH_ATTN:
        raise ValueError(f"flash attention {flash_attn!r}: on, off or auto")
    devices = None
    if getattr(plan, "shares", None):  # split across devices and workers: the layers of each
        from localmix.runtime.rpc import device_array

        devices = device_array(plan.rpc_devices)
        kwargs["tensor_split"] = plan.tensor_split
    with _params_with(overrides, repack, devices, flash_attn):
        llm = Llama(model_path=model_path, n_gpu_layers=n_gpu_layers, **kwargs)
    llm._localmix_overrides = (overrides, devices)  # llama.cpp holds the pointers: keep them alive with the model
    return llm
