"""Both engines keep the written contract (runtime/engine.py) that `run`, `chat`, `serve` and
`eval` rely on: the same method signatures, every attribute set by the constructor with its
type (nothing attached afterwards), and a reply streamed as Pieces ending in one Done."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest

from localmix.frontends.load import open_engine
from localmix.frontends.server.common import State
from localmix.native.engine import NativeEngine
from localmix.runtime.engine import Engine
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.planner import Plan
from localmix.runtime.stream import Done, Piece, Sampling
from localmix.runtime.vocab import Vocab

ENGINES = {"llama.cpp": LlamaCppEngine, "native": NativeEngine}
METHODS = ("tokenize", "detokenize", "generate")


def _parameters(function) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


@pytest.mark.parametrize("name", ENGINES)
def test_methods_have_the_protocols_signatures(name):
    for method in METHODS:
        assert _parameters(getattr(ENGINES[name], method)) == _parameters(getattr(Engine, method)), (name, method)


@pytest.mark.parametrize("name", ENGINES)
def test_an_opened_engine_is_complete_at_construction(name, converted):
    engine = open_engine(converted("mixtral", "Q8_0"), ctx=256, engine=name)
    assert isinstance(engine, ENGINES[name]) and isinstance(engine, Engine)
    assert isinstance(engine.path, Path) and engine.path.name.endswith(".gguf")
    assert isinstance(engine.n_ctx, int) and 0 < engine.n_ctx <= 256
    assert isinstance(engine.vocab, Vocab) and isinstance(engine.plan, Plan)
    assert engine.metadata and all(isinstance(k, str) and isinstance(v, str) for k, v in engine.metadata.items())
    assert engine.metadata["general.architecture"] == "llama"
    events = list(engine.generate(engine.tokenize("Hello", add_bos=True), Sampling(temperature=0, max_tokens=4)))
    assert all(isinstance(e, Piece) for e in events[:-1]) and isinstance(events[-1], Done)
    assert events[-1].generated_tokens == len(events) - 1 and events[-1].text == "".join(e.text for e in events[:-1])


def test_the_server_holds_a_typed_engine():
    hints = typing.get_type_hints(State)
    assert hints["engine"] == typing.Optional[LlamaCppEngine]
