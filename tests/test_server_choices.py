"""`localmix serve`'s log-probabilities and `n` choices through the OpenAI client: the values
are llama.cpp's own (a log-softmax of its logits for the same tokens, computed here), and n
choices share one prompt evaluation. Uses conftest's `server` (tiny Mixtral, --parallel 4)."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from conftest import ENGINE_FLASH_ATTN, load_llama

from localmix.frontends.load import open_engine
from localmix.frontends.oneshot import conversation_tokens

MODEL = "mixtral-Q8_0"
# greedy on the raw logits (no repetition penalty), so the chosen token is the most likely one
GREEDY = dict(temperature=0, max_tokens=8, extra_body={"repetition_penalty": 1.0})
TALK = [{"role": "user", "content": "Name three colours"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(converted):
    """llama.cpp on the same file, KV cache type and flash attention as the server: teacher-forced
    log-probabilities of `prompt`, then of each next greedy token, `steps` of them. (With an
    f16 cache, llama.cpp's CPU flash attention accumulates softmax(QK)V in f16, so the two
    settings differ by far more than the 2e-3 below: 3e-2 in a log-probability here.)"""
    path = converted("mixtral", "Q8_0")
    engine = open_engine(path, ctx=1024)
    llm = load_llama(path, n_ctx=1024, type_k=None, type_v=None, flash_attn=ENGINE_FLASH_ATTN)

    def run(prompt: list[int], steps: int) -> list[tuple[int, np.ndarray]]:
        llm.reset()
        llm.eval(prompt)
        out = []
        for _ in range(steps):
            x = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            x = x - x.max()
            lp = x - np.log(np.exp(x).sum())
            out.append((int(lp.argmax()), lp))
            llm.eval([out[-1][0]])
        return out

    run.engine = engine
    return run


def test_chat_logprobs_are_llama_cpps(client, reference):
    reply = client.chat.completions.create(model=MODEL, messages=TALK, logprobs=True, top_logprobs=5, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens >= 4
    prompt = conversation_tokens(reference.engine, TALK)
    assert len(prompt) == reply.usage.prompt_tokens
    piece = reference.engine.vocab.piece
    for entry, (token, lp) in zip(content, reference(prompt, len(content))):
        assert bytes(entry.bytes) == piece(token, True) and entry.token == piece(token, True).decode(errors="replace")
        assert entry.logprob == pytest.approx(lp[token], abs=2e-3)
        assert len(entry.top_logprobs) == 5
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)  # most likely first ...
        assert entry.top_logprobs[0].token == entry.token and values[0] == entry.logprob  # ... the greedy pick
        best = np.argsort(-lp)[:5]
        assert values == pytest.approx(lp[best], abs=2e-3)
        assert all(v <= 0 for v in values)
    # the reply's text is the tokens' text, and streamed chunks carry the same entries
    assert "".join(e.token for e in content).lstrip() == reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=TALK, logprobs=True, top_logprobs=5,
                                                 stream=True, **GREEDY))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # without logprobs there are none; top_logprobs alone is a 400
    plain = client.chat.completions.create(model=MODEL, messages=TALK, **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=TALK, top_logprobs=2, **GREEDY)
    assert e.value.body["param"] == "top_logprobs"


def test_completion_logprobs_legacy_shape(client, reference):
    prompt = "Once upon a time"
    done = client.completions.create(model=MODEL, prompt=prompt, logprobs=3, **GREEDY)
    lp = done.choices[0].logprobs
    n = done.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    ids = reference.engine.tokenize(prompt, add_bos=True, special=True)
    for token, value, top, (best, ref) in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, reference(ids, n)):
        assert token == reference.engine.vocab.piece(best, True).decode(errors="replace")
        assert value == pytest.approx(ref[best], abs=2e-3)
        assert len(top) <= 3 and max(top.values()) == value
    assert lp.text_offset[0] == len(prompt)
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, logprobs=3, stream=True, **GREEDY))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs


def test_n_choices_share_the_prompt(client, server):
    one = client.chat.completions.create(model=MODEL, messages=TALK, **GREEDY)
    before = server.metrics()
    three = client.chat.completions.create(model=MODEL, messages=TALK, n=3, **GREEDY)
    after = server.metrics()
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content == one.choices[0].message.content for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # counted once
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    # the prompt was evaluated at most once (it may come from a slot's cache): the forks copy it
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] <= one.usage.prompt_tokens
    # sampled with a seed: the choices differ from each other, and the same request repeats them
    sampled = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], n=4, temperature=1.0,
                   seed=11, max_tokens=12)
    first = [c.message.content for c in client.chat.completions.create(**sampled).choices]
    again = [c.message.content for c in client.chat.completions.create(**sampled).choices]
    assert first == again and len(set(first)) >= 3
    # streamed: chunks by index reassemble the same choices
    parts = ["", "", "", ""]
    for c in client.chat.completions.create(stream=True, **sampled):
        for choice in c.choices:
            parts[choice.index] += choice.delta.content or ""
    assert parts == first
    # completions too
    texts = client.completions.create(model=MODEL, prompt="Once upon a time", n=2, **GREEDY).choices
    assert len(texts) == 2 and texts[0].text == texts[1].text
    with pytest.raises(openai.BadRequestError) as e:  # more choices than slots
        client.chat.completions.create(model=MODEL, messages=TALK, n=5, **GREEDY)
    assert e.value.body["param"] == "n" and "--parallel" in e.value.body["message"]
