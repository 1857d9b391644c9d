"""The llama.cpp engine: llama.cpp through llama-cpp-python, the GGUF memory-mapped and its
tensors placed by the memory planner (planner.py, offload.py), behind the streaming
interface of stream.py.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterator

from localmix.errors import InputError, LocalmixError
from localmix.runtime.log import set_llama_log
from localmix.runtime.offload import load_llama
from localmix.runtime.planner import Plan
from localmix.runtime.stream import ContextOverflow, Done, Piece, Sampling, common_prefix, reply_events
from localmix.runtime.vocab import Vocab


def _load_error(e: Exception) -> str:
    """What llama-cpp-python raised on load, in a few words: ValueError ("Failed to load model
    from file") when llama.cpp refuses the file, jinja2's TemplateError when the chat template it
    compiles does not, UnicodeDecodeError for a special token's text, ..."""
    first = (str(e).splitlines() or [""])[0][:200]
    return first if isinstance(e, ValueError) and not isinstance(e, UnicodeError) else f"{type(e).__name__}: {first}"


def _metadata(path: Path) -> dict[str, str]:
    """The file's scalar metadata as strings, as `Llama.metadata` gives it, read by localmix:
    llama-cpp-python decodes every value as strict UTF-8 and, at the first that is not (a
    `general.name` in Latin-1), gives up and returns nothing, chat template included."""
    from gguf import GGUFValueType

    from localmix.gguf.read import field_value, open_gguf

    r = open_gguf(path)
    return {key: str(field_value(r, key)) for key, f in r.fields.items()
            if not key.startswith("GGUF.") and f.types[0] != GGUFValueType.ARRAY}


class Handles:
    """What llama-cpp-python keeps private of a loaded `Llama` and localmix needs: the C model
    the batching scheduler makes its own context on (`Llama._model`), and the engine's context
    it frees (`Llama._ctx`). Every read of those private attributes is here, so a version of
    llama-cpp-python that renames them breaks this class alone."""

    def __init__(self, llm):
        self.llm = llm

    @property
    def model(self):
        """The `llama_model *` of the loaded weights."""
        return self.llm._model.model

    @property
    def vocab_pointer(self):
        """The model's `llama_vocab *`, for llama.cpp's C functions (grammar samplers)."""
        return self.llm._model.vocab

    def vocab(self) -> Vocab:
        """The model's vocabulary (vocab.py), keeping `llm`, which frees the model, alive."""
        return Vocab(self.llm._model, owner=self.llm)

    def add_bos(self) -> bool:
        return bool(self.llm._model.add_bos_token())

    def free_context(self) -> None:
        """Free the Llama's own context (its KV cache); freeing it again (at exit) does nothing."""
        self.llm._ctx.close()


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python, the GGUF memory-mapped (the `Engine` of engine.py).
    The KV cache is kept between calls: a prompt that extends the previous one evaluates only
    the new tokens. `flash_attn`: "auto" (llama.cpp's default: on where the backend has it, the
    CPU's does), "on" or "off"; the scheduler's context copies it. `llm` is the llama_cpp.Llama,
    for the batching scheduler (scheduler.py)."""

    def __init__(self, path: str | Path, n_ctx: int | None = None, n_threads: int | None = None, verbose: bool = False,
                 plan: Plan | None = None, n_gpu_layers: int | None = None, repack: bool = False,
                 flash_attn: str = "off", **llama_kwargs):
        self.path, self.plan = Path(path), plan
        set_llama_log(verbose)
        try:
            self.llm = load_llama(str(self.path), plan, n_gpu_layers, repack, flash_attn, n_ctx=n_ctx or 0, n_batch=512,
                                  use_mmap=True, n_threads=n_threads or usable_cpus(), verbose=verbose, **llama_kwargs)
        except LocalmixError:
            raise
        except Exception as e:  # whatever the load of an untrusted file raises is one line, not a traceback
            raise InputError(f"llama.cpp could not load {self.path}: {_load_error(e)}") from None
        # llama.cpp rounds the context up to a multiple of 256; llama-cpp-python's token
        # buffer keeps the size asked for, so the smaller of the two is what we can use
        self.n_ctx = min(self.llm.n_ctx(), len(self.llm.input_ids))
        self.metadata = dict(self.llm.metadata) or _metadata(self.path)
        self.vocab = Handles(self.llm).vocab()  # llama.cpp's vocabulary of the loaded model
        self._lock = threading.Lock()

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def generate(self, tokens: list[int], sampling: Sampling | None = None,
                 cancel: threading.Event | None = None) -> Iterator[Piece | Done]:
        s = sampling or Sampling()
        if len(tokens) >= self.n_ctx:
            raise ContextOverflow(len(tokens), self.n_ctx)
        llm = self.llm
        cached = common_prefix(llm.input_ids[: llm.n_tokens].tolist(), tokens)
        if s.seed is not None:
            llm.set_seed(s.seed)
        with self._lock:
            stream = llm.generate(tokens, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p, temp=s.temperature,
                                  repeat_penalty=s.repeat_penalty, reset=True)
            try:
                yield from reply_events(stream, self.vocab.piece, self.vocab.eog, len(tokens),
                                        len(tokens) - cached, self.n_ctx, s, cancel)
            finally:
                stream.close()


def usable_cpus() -> int:
    """The CPUs this process may run on (taskset, a container's cpuset), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
