"""llama.cpp's log: on stderr with --verbose, otherwise nowhere.

llama-cpp-python's own log callback prints every ERROR-level line, every continuation line
and, until a `Llama` has been created, everything (its logger starts unset), so a vocabulary
opened alone or a model with an unusual KV cache (Gemma 3's sliding window) wrote lines to
stderr that `run` keeps for its own messages. `set_llama_log(verbose)` installs a callback that
prints llama.cpp's text only when `verbose` (the engines install it when they load).
"""

from __future__ import annotations

import ctypes
import sys

_state = {"verbose": False, "callback": None}


def set_llama_log(verbose: bool | None) -> None:
    """Route llama.cpp's log through our callback; `verbose` None keeps the current choice."""
    import llama_cpp

    if verbose is not None:
        _state["verbose"] = verbose
    if _state["callback"] is None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            if _state["verbose"]:
                print(text.decode("utf-8", errors="replace"), end="", flush=True, file=sys.stderr)

        _state["callback"] = callback  # ctypes must keep the function alive as long as llama.cpp may call it
    llama_cpp.llama_log_set(_state["callback"], ctypes.c_void_p(0))
