"""The engine interface over llama.cpp: streaming events, sampling, stops, cancellation,
KV-cache reuse and context accounting, on the tiny model."""

import threading

import numpy as np
import pytest
from conftest import THREADS, load_llama

from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.stream import ContextOverflow, Done, Piece, Sampling

GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=16)


@pytest.fixture(scope="module")
def engine(converted):
    return LlamaCppEngine(converted("mixtral", "F32"), n_ctx=256, n_threads=THREADS)


def run(engine, tokens, sampling, cancel=None):
    events = list(engine.generate(tokens, sampling, cancel))
    pieces, done = [e for e in events if isinstance(e, Piece)], events[-1]
    assert isinstance(done, Done) and all(isinstance(e, Piece) for e in events[:-1])
    return pieces, done


def prompt(engine, text="[INST] Tell me about experts. [/INST]"):
    return [1] + engine.tokenize(text)


def test_greedy_stream_equals_llama_cpp_argmax(engine, converted):
    tokens = prompt(engine)
    pieces, done = run(engine, tokens, GREEDY)
    llm = load_llama(converted("mixtral", "F32"), n_ctx=256, type_k=1, type_v=1)  # F16 cache, as the engine
    llm.eval(tokens)
    want = []
    for _ in range(16):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        want.append(t)
        llm.eval([t])
    assert [p.token for p in pieces] == want[: len(pieces)]
    assert done.reason in ("length", "eos") and done.generated_tokens == len(pieces)
    assert done.text == "".join(p.text for p in pieces) and done.text.strip()
    assert done.prompt_tokens == len(tokens) and done.prompt_seconds > 0


def test_max_tokens_and_counts(engine):
    _, done = run(engine, prompt(engine), Sampling(temperature=0.0, max_tokens=5))
    assert done.reason == "length" and done.generated_tokens == 5


def test_seed_makes_sampling_reproducible(engine):
    s = Sampling(temperature=1.0, seed=42, max_tokens=12)
    a = run(engine, prompt(engine), s)[1].text
    b = run(engine, prompt(engine, "[INST] Something else entirely. [/INST]"), s)[1].text
    c = run(engine, prompt(engine), s)[1].text
    assert a == c and a != b


def test_stop_string_cuts_the_reply(engine):
    full = run(engine, prompt(engine), GREEDY)[1].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    _, done = run(engine, prompt(engine), Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=16, stop=(stop,)))
    assert done.reason == "stop"
    assert done.text == full[: full.find(stop)]


def test_cancel_between_tokens(engine):
    cancel = threading.Event()
    seen = []
    for event in engine.generate(prompt(engine), Sampling(temperature=0.0, max_tokens=100), cancel):
        if isinstance(event, Piece):
            seen.append(event)
            if len(seen) == 3:
                cancel.set()
        else:
            done = event
    assert done.reason == "cancelled" and done.generated_tokens == 3


def test_next_turn_reuses_the_kv_cache(engine):
    first = prompt(engine)
    _, done1 = run(engine, first, GREEDY)
    second = first + engine.tokenize(done1.text + "</s>[INST] And then? [/INST]")
    _, done2 = run(engine, second, GREEDY)
    assert done2.prompt_tokens == len(second)
    assert done2.prompt_evaluated < len(second) - len(first) + 2  # only the new turn


def test_prompt_longer_than_the_context(engine):
    tokens = [1] + [733] * 300
    with pytest.raises(ContextOverflow) as e:
        list(engine.generate(tokens, GREEDY))
    assert "301" in str(e.value) and "256" in str(e.value)
