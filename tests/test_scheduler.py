"""The batched scheduler on its own (no HTTP): a full queue says Busy, a cancelled prompt stops
within a step, a slot reuses the prompt prefix of its previous request, and greedy replies equal
the llama.cpp engine's (`localmix run`'s path)."""

from __future__ import annotations

import queue

import pytest

from localmix.frontends.load import open_engine
from localmix.frontends.oneshot import conversation_tokens
from localmix.runtime.scheduler import Busy, Job, Scheduler
from localmix.runtime.stream import Done, Sampling

GREEDY = Sampling(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def engine(converted):
    return open_engine(converted("mixtral", "Q8_0"), ctx=1024)


def wait(q: queue.Queue) -> Done:
    for _ in range(10_000):
        event = q.get(timeout=60)
        if isinstance(event, Done):
            return event
    raise AssertionError("no Done")


def test_queue_cancel_and_prefix_reuse(engine):
    s = Scheduler(engine.llm, parallel=1, n_ctx=1024, queue_size=2, chunk=8)
    try:
        long = conversation_tokens(engine, [{"role": "user", "content": "word " * 600}])
        first, second = queue.Queue(), queue.Queue()
        job = Job(long, GREEDY, first.put)
        s.submit(job)
        s.submit(Job(long[:50], GREEDY, second.put))
        with pytest.raises(Busy):  # the queue holds 2
            for _ in range(3):
                s.submit(Job(long[:10], GREEDY, queue.Queue().put))
        s.cancel(job)
        done = wait(first)
        assert done.reason == "cancelled" and done.generated_tokens == 0
        assert s.metrics.max_cancel_lag <= 1
        assert wait(second).reason in ("eos", "length")
        # the same conversation, one turn longer: only the new tokens are evaluated
        talk = [{"role": "user", "content": "Hello there"}]
        q = queue.Queue()
        start = conversation_tokens(engine, talk)
        s.submit(Job(start, GREEDY, q.put))
        reply = wait(q)
        before = s.metrics.prompt_tokens
        more = talk + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "And then?"}]
        tokens = conversation_tokens(engine, more)
        s.submit(Job(tokens, GREEDY, q.put))
        again = wait(q)
        assert again.prompt_evaluated <= len(tokens) - len(start)  # at least the first prompt came from the cache
        assert s.metrics.prompt_tokens - before == again.prompt_evaluated
        # greedy equals the llama.cpp engine's reply for the same tokens
        direct = [e for e in engine.generate(tokens, GREEDY)][-1]
        assert again.text == direct.text
    finally:
        s.close()


def test_server_memory_counts_every_sequence_and_holds_one_context(engine, converted):
    """`--parallel N` needs N KV caches of --ctx: the check counts them (an error of one line,
    also from the CLI); the scheduler frees the engine's own context, whose KV cache it replaces."""
    from conftest import run_localmix

    from localmix.errors import InputError
    from localmix.frontends.load import plan_engine
    from localmix.gguf.check import check_gguf
    from localmix.runtime.memory import estimate_memory

    path = converted("mixtral", "Q8_0")
    one = estimate_memory(check_gguf(path), 2048).total_bytes
    ram = f"{one * 21 // 20 // 1024}K"  # room for one KV cache of 2048 tokens (and its compute), not for 48
    assert plan_engine(path, 2048, ram=ram, sequences=1)[0] == 2048
    with pytest.raises(InputError, match=r"48 sequences \(--parallel\) of 2048 tokens"):
        plan_engine(path, 2048, ram=ram, sequences=48)
    r = run_localmix("serve", path, "--parallel", "48", "--ctx", "2048", "--ram", ram, "--port", "1")
    assert r.returncode == 2 and "--parallel" in r.stderr and "Traceback" not in r.stderr
    # the engine's own context is freed and the scheduler's serves: greedy text as before
    mine = open_engine(path, ctx=1024)
    s = Scheduler(mine.llm, parallel=2, n_ctx=1024, release_engine_context=True)
    try:
        assert mine.llm._ctx.ctx is None
        tokens = conversation_tokens(engine, [{"role": "user", "content": "Hello there"}])
        q = queue.Queue()
        s.submit(Job(tokens, GREEDY, q.put))
        assert wait(q).text == [e for e in engine.generate(tokens, GREEDY)][-1].text
    finally:
        s.close()


def test_flash_attention_reaches_llama_cpp_and_the_scheduler_follows_the_engine(engine, converted):
    """--flash-attn off (the default: a greedy reply of `serve` is `run`'s whatever else the
    batch holds) reaches llama.cpp as DISABLED; auto as AUTO, which the CPU runs as on (the same
    tokens as on). The scheduler's context copies the engine's setting."""
    import llama_cpp

    path = converted("mixtral", "Q8_0")
    assert engine.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    tokens = conversation_tokens(engine, [{"role": "user", "content": "Tell me about experts"}])
    on = open_engine(path, ctx=1024, flash_attn="on")
    assert on.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    on_text = [e for e in on.generate(tokens, GREEDY)][-1].text
    del on
    auto = open_engine(path, ctx=1024, flash_attn="auto")
    assert auto.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert [e for e in auto.generate(tokens, GREEDY)][-1].text == on_text
    s = Scheduler(auto.llm, parallel=2, n_ctx=1024)
    try:
        q = queue.Queue()
        s.submit(Job(tokens, GREEDY, q.put))
        assert wait(q).text == on_text
    finally:
        s.close()
