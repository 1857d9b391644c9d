"""The batched scheduler on its own (no HTTP): a full queue says Busy, a cancelled prompt stops
within a step, a slot reuses the prompt prefix of its previous request, greedy replies equal
the llama.cpp engine's (`localmix run`'s path), a prefix another slot holds is copied rather
than evaluated, and the logit bias and repeat penalty written into the logits pick the tokens
llama.cpp's own samplers pick."""

from __future__ import annotations

import ctypes
import queue

import numpy as np
import pytest

from localmix.frontends.load import open_engine
from localmix.frontends.oneshot import conversation_tokens
from localmix.runtime.scheduler import _TOKEN_DATA, Busy, Job, Scheduler, _Edits
from localmix.runtime.stream import Done, Piece, Sampling, common_prefix

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


def solo(engine, tokens: list[int]) -> tuple[Done, Scheduler]:
    """`tokens`' greedy reply alone on a fresh scheduler (closed), and that scheduler."""
    alone = Scheduler(engine.llm, parallel=2, n_ctx=1024)
    try:
        q = queue.Queue()
        alone.submit(Job(tokens, GREEDY, q.put))
        return wait(q), alone
    finally:
        alone.close()


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


def test_bias_and_repeat_penalty_in_the_logits_pick_what_llama_cpp_samplers_pick(engine, monkeypatch):
    """The scheduler writes a job's logit bias and repeat penalty into its row of logits
    (`_Edits`) instead of running llama.cpp's penalties sampler over the whole vocabulary; the
    arithmetic is the same float32 operations, so every token must be the one llama.cpp's own
    logit-bias and penalties samplers give (EDIT_LOGITS False), over 100 tokens (the 64-token
    window wraps), greedy and sampled, with a bias on tokens the penalty also hits, with a
    grammar, and with a frequency penalty (which keeps llama.cpp's sampler)."""
    tokens = conversation_tokens(engine, [{"role": "user", "content": "Tell me a long story"}])
    favour = {t: 8.0 for t in range(100, 120)}  # greedy repeats these unless the penalty pushes it off
    cases = {
        "greedy": dict(sampling=Sampling(temperature=0, repeat_penalty=1.3, max_tokens=100), logit_bias=favour),
        "sampled": dict(sampling=Sampling(temperature=0.9, repeat_penalty=1.1, seed=7, max_tokens=100)),
        "biased": dict(sampling=Sampling(temperature=0.7, repeat_penalty=1.5, seed=3, max_tokens=100),
                       logit_bias={**{t: 2.5 for t in range(100, 400)}, **{t: -1.25 for t in range(29000, 29400)}}),
        "grammar": dict(sampling=Sampling(temperature=0.8, repeat_penalty=1.2, seed=11, max_tokens=100),
                        grammar='root ::= ("yes" | "no" | " " | "maybe")+'),
        "frequency": dict(sampling=Sampling(temperature=0.8, repeat_penalty=1.1, seed=5, max_tokens=100),
                          frequency_penalty=0.4, presence_penalty=0.2),
        "plain greedy": dict(sampling=Sampling(temperature=0, repeat_penalty=1.0, max_tokens=100), logit_bias=favour),
    }

    def generate(edit: bool) -> dict[str, list[int]]:
        monkeypatch.setattr(Scheduler, "EDIT_LOGITS", edit)
        s = Scheduler(engine.llm, parallel=4, n_ctx=1024)
        try:
            got = {}
            for name, kw in cases.items():
                q = queue.Queue()
                s.submit(Job(tokens, emit=q.put, **kw))
                events = []
                while not isinstance(events[-1] if events else None, (Done, Exception)):
                    events.append(q.get(timeout=60))
                assert isinstance(events[-1], Done), events[-1]
                got[name] = [e.token for e in events if isinstance(e, Piece)]
            return got
        finally:
            s.close()

    edited, reference = generate(True), generate(False)
    for name in cases:
        assert edited[name] == reference[name], name
    assert len(edited["greedy"]) > 64  # the window wrapped
    assert edited["greedy"] != edited["plain greedy"]  # the penalty changed what greedy picks
    assert any(100 <= t < 400 for t in edited["biased"])


def test_edits_give_the_bits_of_llama_cpp_bias_and_penalties_samplers():
    """`_Edits` against llama.cpp's logit-bias then penalties samplers on the same candidates:
    logits with zeros (the penalty's `<= 0` edge), negatives and -inf, biases that overlap the
    penalised tokens, penalties below and above 1, histories shorter and longer than the
    64-token window with repeats; every logit bit-equal, and `undo` gives the row back."""
    import llama_cpp as L

    rng = np.random.default_rng(0)
    n_vocab = 400
    for trial in range(40):
        logits = rng.normal(0, 4, n_vocab).astype(np.float32)
        logits[rng.choice(n_vocab, 30, replace=False)] = 0.0
        logits[rng.choice(n_vocab, 5, replace=False)] = -np.inf
        bias = {int(t): float(rng.normal(0, 3)) for t in rng.choice(n_vocab, int(rng.integers(0, 40)), replace=False)}
        repeat = float(rng.choice([0.7, 1.0, 1.1, 1.3, 2.5]))
        history = rng.choice(100, size=int(rng.integers(0, 200))).tolist()  # tokens 0..99: repeats, overlaps
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if bias:
            arr = (L.llama_logit_bias * len(bias))(*[L.llama_logit_bias(t, b) for t, b in bias.items()])
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(n_vocab, len(arr), arr))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(n_vocab, 64, repeat, 0.0, 0.0))
        edits = _Edits(bias, repeat)
        for token in history:
            L.llama_sampler_accept(chain, token)
            edits.accept(token)
        cur = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        cur["id"], cur["logit"] = np.arange(n_vocab), logits
        view = L.llama_token_data_array(cur.ctypes.data_as(L.llama_token_data_p), n_vocab, -1, False)
        L.llama_sampler_apply(chain, ctypes.byref(view))
        L.llama_sampler_free(chain)
        mine = logits.copy()
        edit = edits.apply(mine)
        assert np.array_equal(mine.view(np.uint32), cur["logit"].view(np.uint32)), (trial, repeat, len(history))
        edits.undo(mine, edit)
        assert np.array_equal(mine.view(np.uint32), logits.view(np.uint32))


def test_a_prefix_another_slot_holds_is_copied_not_evaluated(engine):
    """Two conversations with one long system prompt: the second, admitted while the first
    generates in the other slot, evaluates only what follows the shared prefix (copied from the
    first slot's KV cache), and its greedy reply is the one it gets alone on a fresh scheduler."""
    system = {"role": "system", "content": "You answer questions about colours. " * 40}
    first = conversation_tokens(engine, [system, {"role": "user", "content": "Name three colours"}])
    second = conversation_tokens(engine, [system, {"role": "user", "content": "Which colour is the sky?"}])
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert shared > 200
    long = Sampling(temperature=0, max_tokens=40)
    s = Scheduler(engine.llm, parallel=2, n_ctx=1024)
    try:
        q1, q2 = queue.Queue(), queue.Queue()
        s.submit(Job(first, long, q1.put))
        assert isinstance(q1.get(timeout=60), Piece)  # the first prompt is in its slot's cache
        s.submit(Job(second, GREEDY, q2.put))
        done = wait(q2)
        wait(q1)
        assert done.prompt_evaluated == len(second) - shared
        assert s.metrics.borrowed_tokens == shared
    finally:
        s.close()
    alone, by = solo(engine, second)
    assert alone.prompt_evaluated == len(second) and by.metrics.borrowed_tokens == 0
    assert done.text == alone.text


def test_no_prefix_is_copied_from_a_fork_whose_own_copy_is_still_pending(engine):
    """A fork (`n` > 1) gets its leader's cache at the next llama_decode; a request admitted
    before that must not copy the fork's cells (they still hold the slot's old data): the
    soak caught such a reply, wrong from its first token. Driven step by step so the fork sits
    in a lower slot than its leader and is the first candidate donor."""
    system = {"role": "system", "content": "You answer questions about colours. " * 30}
    prompt = conversation_tokens(engine, [system, {"role": "user", "content": "Name three colours"}])
    other = conversation_tokens(engine, [system, {"role": "user", "content": "Which colour is the sky?"}])
    s = Scheduler(engine.llm, parallel=3, n_ctx=1024, thread=False)

    def step():
        with s._wake:
            s._admit()
        s._step()

    def until_done(q: queue.Queue) -> Done:
        for _ in range(500):
            step()
            events = []
            while not q.empty():
                events.append(q.get())
            if any(isinstance(e, Done) for e in events):
                return next(e for e in events if isinstance(e, Done))
        raise AssertionError("no Done")
    try:
        busy, keep, b = queue.Queue(), queue.Queue(), queue.Queue()
        unrelated = Job(conversation_tokens(engine, [{"role": "user", "content": "Count to a hundred"}]),
                        Sampling(temperature=0, max_tokens=500), busy.put)
        s.submit(unrelated)
        step()                                                      # slot 0: an unrelated cache
        s.submit(Job(prompt[:-4], Sampling(temperature=0, max_tokens=1), keep.put))
        until_done(keep)                                            # slot 1: a prefix of `prompt`
        s.cancel(unrelated)
        step()                                                      # slot 0 free, its old cells kept
        assert s.slots[0].job is None and s.slots[1].job is None
        lead, fork = queue.Queue(), queue.Queue()
        sampling = Sampling(temperature=0, max_tokens=200)
        s.submit(Job(prompt, sampling, lead.put), Job(prompt, sampling, fork.put))
        step()                                                      # the prompt is in; the fork's copy waits
        assert s.slots[1].job is not None and s.slots[0].leader is None and s.slots[0].job is not None
        s.submit(Job(other, GREEDY, b.put))
        done = until_done(b)
    finally:
        s.close()
    assert done.text == solo(engine, other)[0].text


def test_cells_a_new_request_drops_are_kept_in_ram_and_restored(engine, monkeypatch):
    """One slot, two conversations taking turns: with `cache_bytes` the first conversation's
    cells, dropped when the second takes the slot, come back from RAM for its next turn (only
    the new tokens are evaluated, the greedy reply is the same as without the cache); the least
    recently used entry goes when the bound is reached; without a bound nothing is kept."""
    system = {"role": "system", "content": "You answer questions about colours. " * 30}
    ask = [system, {"role": "user", "content": "Name three colours"}]
    first = conversation_tokens(engine, ask)
    other = conversation_tokens(engine, [{"role": "user", "content": "Count to ten " * 40}])
    again = conversation_tokens(engine, ask + [{"role": "assistant", "content": "Red, green, blue."},
                                               {"role": "user", "content": "And a fourth?"}])
    shared = common_prefix(first, again)
    own = common_prefix(other, again)  # what the slot still holds after `other` (BOS, [INST])

    def turns(cache_bytes: int) -> tuple[Done, Scheduler]:
        s = Scheduler(engine.llm, parallel=1, n_ctx=1024, cache_bytes=cache_bytes)
        for tokens in (first, other, again):
            q = queue.Queue()
            s.submit(Job(tokens, GREEDY, q.put))
            done = wait(q)
        return done, s

    cached, s = turns(64 << 20)
    try:
        assert cached.prompt_evaluated == len(again) - shared and s.metrics.borrowed_tokens == shared - own
        assert len(s.saved) == 2 and s.metrics.saved_bytes > 0  # `first`, then `other` when `again` came
    finally:
        s.close()
    plain, s = turns(0)
    try:
        assert plain.prompt_evaluated == len(again) - own and not s.saved
        assert cached.text == plain.text
    finally:
        s.close()
    small, s = turns(1)  # too small for any entry
    try:
        assert not s.saved and small.prompt_evaluated == len(again) - own
    finally:
        s.close()
    monkeypatch.setattr(Scheduler, "SAVED", 1)  # `other`'s entry pushes `first`'s out
    one, s = turns(64 << 20)
    try:
        ((held, _),) = s.saved.values()
        assert held[: len(other)].tolist() == other  # `other` and its reply
        assert one.prompt_evaluated == len(again) - own
    finally:
        s.close()
