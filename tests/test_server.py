"""`localmix serve` through the official OpenAI client (sync and async), and with raw HTTP for
what a client library hides: bad input, auth, Host, the batched scheduler, cancellation.
One server (conftest's `server`: tiny Mixtral, --parallel 4) serves the tests; all traffic is on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time

import httpx
import jsonschema
import openai
import pytest
from conftest import run_localmix

GREEDY = dict(temperature=0, max_tokens=16)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "colour"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Lyon"]},
                                                "celsius": {"type": "boolean"}},
                                                "required": ["city", "celsius"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)


def model_name(client) -> str:
    return client.models.list().data[0].id


def test_models_chat_stream_and_usage(client, converted):
    models = client.models.list().data
    assert [m.id for m in models] == ["mixtral-Q8_0"]
    messages = [{"role": "user", "content": "Name three colours"}]
    reply = client.chat.completions.create(model=models[0].id, messages=messages, **GREEDY)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    # greedy equals `localmix run --temperature 0`, counts included
    r = run_localmix("run", converted("mixtral", "Q8_0"), "Name three colours", "--temperature", "0",
                     "--max-tokens", "16", "--json")
    ran = json.loads(r.stdout)
    assert text == ran["text"]
    assert reply.usage.prompt_tokens == ran["prompt_tokens"]
    assert reply.usage.completion_tokens == ran["completion_tokens"]
    assert reply.usage.total_tokens == ran["prompt_tokens"] + ran["completion_tokens"]
    # streamed deltas concatenate to the same text; usage only when asked for
    chunks = list(client.chat.completions.create(model=models[0].id, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(model=models[0].id, messages=messages, stream=True, **GREEDY))
    assert all(c.usage is None for c in plain)


def test_completion(client):
    done = client.completions.create(model=model_name(client), prompt="Once upon a time", **GREEDY)
    assert done.choices[0].text and done.usage.completion_tokens >= 1
    streamed = list(client.completions.create(model=model_name(client), prompt="Once upon a time", stream=True,
                                              **GREEDY))
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_json_schema_output_validates(client):
    reply = client.chat.completions.create(
        model=model_name(client), messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0.7, seed=3,
        max_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)


def test_tool_call_round_trip(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model=model_name(client), messages=messages, tools=[WEATHER],
                                           tool_choice="required", max_tokens=64, temperature=0)
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed, the call comes as a tool_calls delta
    chunks = list(client.chat.completions.create(model=model_name(client), messages=messages, tools=[WEATHER],
                                                 tool_choice="required", max_tokens=64, temperature=0, stream=True))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}]
    answer = client.chat.completions.create(model=model_name(client), messages=messages, tools=[WEATHER],
                                            tool_choice="none", max_tokens=16, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_the_async_client_does_the_same(client, server):
    """openai.AsyncOpenAI: models, a chat, a streamed chat, a completion, JSON-schema output, a tool
    round trip and a 400, the greedy texts equal to what the sync client gets."""
    colours = [{"role": "user", "content": "Name three colours"}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]

    async def session():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0,
                                      timeout=60) as aclient:
            name = (await aclient.models.list()).data[0].id
            reply = await aclient.chat.completions.create(model=name, messages=colours, **GREEDY)
            stream = await aclient.chat.completions.create(model=name, messages=colours, stream=True, **GREEDY)
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            completion = await aclient.completions.create(model=name, prompt="Once upon a time", **GREEDY)
            shaped = await aclient.chat.completions.create(
                model=name, messages=[{"role": "user", "content": "Is the sky blue?"}], temperature=0.7, seed=3,
                max_tokens=64, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}})
            first = await aclient.chat.completions.create(model=name, messages=ask, tools=[WEATHER],
                                                          tool_choice="required", max_tokens=64, temperature=0)
            call = first.choices[0].message.tool_calls[0]
            answer = await aclient.chat.completions.create(
                model=name, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0,
                messages=ask + [first.choices[0].message.model_dump(exclude_none=True),
                                {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "clear", "celsius": 21}'}])
            with pytest.raises(openai.BadRequestError) as e:
                await aclient.chat.completions.create(model=name, messages=colours, extra_body={"top_q": 1})
            return name, reply, streamed, completion, shaped, first, answer, e.value

    name, reply, streamed, completion, shaped, first, answer, error = asyncio.run(session())
    assert name == model_name(client)
    sync = client.chat.completions.create(model=name, messages=colours, **GREEDY).choices[0].message.content
    assert reply.choices[0].message.content == streamed == sync and sync
    assert completion.choices[0].text == client.completions.create(model=name, prompt="Once upon a time",
                                                                   **GREEDY).choices[0].text
    jsonschema.validate(json.loads(shaped.choices[0].message.content), SCHEMA)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    assert error.body["param"] == "top_q"


def test_bad_parameters_are_400s_naming_them(client, server):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name(client), messages=messages, extra_body={"top_q": 1})
    assert "top_q" in str(e.value) and e.value.body["param"] == "top_q"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_name(client), messages=messages, extra_body={"best_of": 2})
    assert "best_of" in str(e.value) and e.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_name(client), messages=messages, temperature=5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages)
    # harmless bookkeeping is accepted
    ok = client.chat.completions.create(model=model_name(client), messages=messages, user="u1", store=False,
                                        metadata={"a": "b"}, max_tokens=2)
    assert ok.choices[0].message.content is not None


def test_llama_server_sampling_names(client):
    """`repeat_penalty` and `min_p`, as a client written for llama-server sends them, reach the
    sampler: the same reply as `repetition_penalty`, a different one when the penalty bites (a
    bias makes greedy repeat 20 tokens), `min_p` 1 leaves sampling only the most likely token
    (greedy's); the two names disagreeing are a 400."""
    name, messages = model_name(client), [{"role": "user", "content": "Name three colours"}]
    favour = {str(t): 8 for t in range(100, 120)}

    def reply(**extra):
        return client.chat.completions.create(model=name, messages=messages, max_tokens=24, logit_bias=favour,
                                              **{"temperature": 0, **extra}).choices[0].message.content
    plain = reply(extra_body={"repeat_penalty": 1.0})
    assert plain == reply(extra_body={"repetition_penalty": 1.0})
    assert reply(extra_body={"repeat_penalty": 1.5}) != plain
    assert reply(temperature=1.0, seed=9, extra_body={"repeat_penalty": 1.0, "min_p": 1.0}) == plain
    with pytest.raises(openai.BadRequestError) as e:
        reply(extra_body={"repeat_penalty": 1.0, "repetition_penalty": 1.2})
    assert e.value.body["param"] == "repeat_penalty"
    for name in ("repeat_penalty", "repetition_penalty"):  # llama.cpp divides logits by it
        with pytest.raises(openai.BadRequestError) as e:
            reply(extra_body={name: 0})
        assert name in str(e.value)


def test_bad_input_statuses(server):
    def post(body=None, **kw):
        return server.post("/v1/chat/completions", body, **kw)

    hi = {"model": "mixtral-Q8_0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (post(content=b"{not json", headers={"Content-Type": "application/json"}), 400, None),
        (post({**hi, "max_tokens": "many"}), 400, "max_tokens"),
        (post({**hi, "messages": "hi"}), 400, "messages"),
        (post({**hi, "messages": [{"role": "user", "content": "x" * 70000}]}), 413, None),
        (post({**hi, "messages": [{"role": "user", "content": "word " * 2100}]}), 400, None),
        (post({**hi, "model": "nope"}), 404, "model"),
        (post(hi, headers={"Authorization": ""}), 401, None),
        (post(hi, headers={"Authorization": "Bearer wrong"}), 401, None),
        (post(hi, headers={"Host": "evil.example:80"}), 400, None),
        (server.post("/v1/nowhere", hi), 404, None),
    ]
    for r, status, param in cases:
        assert r.status_code == status, (status, r.text)
        err = r.json()["error"]
        assert err["message"] and "Traceback" not in r.text
        if param:
            assert err["param"] == param, r.text
    over = cases[4][0].json()["error"]["message"]
    assert re.search(r"\b21\d\d tokens\b", over) and "2048" in over  # both counts
    assert post(hi).status_code == 200  # still serving
    r = httpx.get(server.url + "/api/tags", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)  # ollama's shape under /api/


def test_non_loopback_bind_needs_a_key(converted):
    r = run_localmix("serve", converted("mixtral", "Q8_0"), "--host", "0.0.0.0", "--port", "1",
                     env={k: v for k, v in os.environ.items() if k != "LOCALMIX_API_KEY"})
    assert r.returncode == 2 and "--api-key" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags,words", [(("--cache-ram", "lots"), "'lots'"), (("--cache-ram", "-5"), "negative"),
                                         (("--cache-ram", "1e999"), "'1e999'"), (("--ram", "inf"), "'inf'")])
def test_bad_sizes_are_one_line_errors(converted, flags, words):
    r = run_localmix("serve", converted("mixtral", "Q8_0"), *flags, "--port", "1")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_eight_clients_four_slots_interleave(server):
    """8 streams at once on --parallel 4: each gets its text when sent alone; tokens interleave."""
    prompts = [f"Tell me about the number {i}" for i in range(8)]
    sync = openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)
    alone = [sync.chat.completions.create(model="mixtral-Q8_0", messages=[{"role": "user", "content": p}],
                                          **GREEDY).choices[0].message.content for p in prompts]
    before = server.metrics()

    async def one(client, prompt):
        times, parts = [], []
        stream = await client.chat.completions.create(model="mixtral-Q8_0", stream=True,
                                                      messages=[{"role": "user", "content": prompt}], **GREEDY)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(time.monotonic())
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), times

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0, timeout=60)
        return await asyncio.wait_for(asyncio.gather(*(one(client, p) for p in prompts)), 120)

    results = asyncio.run(main())
    assert [text for text, _ in results] == alone
    spans = [(t[0], t[-1]) for _, t in results if t]
    overlapping = sum(1 for a in spans for b in spans if a is not b and a[0] < b[1] and b[0] < a[1])
    assert overlapping >= 4  # streams were live at the same time ...
    after = server.metrics()
    assert after["batch_sequences_max"] >= 4  # ... because one llama_decode served 4 sequences
    assert after["decode_steps_total"] - before["decode_steps_total"] < sum(len(t) for _, t in results)


def test_a_kept_alive_connection_outlives_the_clients_own_keep_alive(server):
    """httpx (the openai, ollama and mistralai clients) keeps an idle connection 5 s; the server
    keeps it longer, so a client never sends on a connection the server is closing that moment
    (with uvicorn's default 5 s the soak met a "connection reset"). After 6 idle seconds the
    same socket still answers."""
    import socket

    request = (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request)
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = sock.recv(4096)
                assert chunk, "the server closed the kept-alive connection"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200")
            time.sleep(6)


def test_disconnects_stop_the_sequence(server):
    """Mid-stream and mid-prompt disconnects stop their sequence within one step; the next request is served."""
    before = server.metrics()
    body = {"model": "mixtral-Q8_0", "messages": [{"role": "user", "content": "Tell a long story"}],
            "max_tokens": 1000, "temperature": 0.8, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers,
                      timeout=30) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n >= 6:
                break  # leave after a few tokens
    long = {"model": "mixtral-Q8_0", "messages": [{"role": "user", "content": "word " * 1900}], "max_tokens": 4}
    with pytest.raises(httpx.ReadTimeout):
        # the client gives up 50 ms in: the prompt (~1,900 tokens, about 0.15 s of prefill on
        # the tiny model on 2 quiet cores, longer under load) is still being evaluated
        server.post("/v1/chat/completions", long, timeout=httpx.Timeout(30, read=0.05))
    deadline = time.monotonic() + 30
    while server.metrics()["cancelled_total"] < before.get("cancelled_total", 0) + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = server.metrics()
    assert after["cancelled_total"] == before["cancelled_total"] + 2
    assert after["cancel_lag_steps_max"] <= 1
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < 200
    log = server.log_text()
    evaluated = [(int(a), int(b)) for a, b in re.findall(r"cancelled after (\d+) of (\d+) prompt tokens", log)]
    assert any(a < b for a, b in evaluated), log  # one was stopped inside its prompt
    t0 = time.monotonic()
    r = server.post("/v1/chat/completions", {"model": "mixtral-Q8_0", "max_tokens": 2,
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and time.monotonic() - t0 < 5
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert re.search(r'"POST /v1/chat/completions" 200', log)  # the access log


def test_safe_prompt_matches_run_safe(server, converted):
    """Mistral's safe_prompt on the server and `localmix run --safe` put the same guardrail in front."""
    body = {"model": "mixtral-Q8_0", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0,
            "max_tokens": 8, "safe_prompt": True}
    served = server.post("/v1/chat/completions", body).json()
    plain = server.post("/v1/chat/completions", {**body, "safe_prompt": False}).json()
    r = run_localmix("run", converted("mixtral", "Q8_0"), "Hello", "--safe", "--temperature", "0", "--max-tokens", "8",
                     "--json")
    ran = json.loads(r.stdout)
    assert served["usage"]["prompt_tokens"] == ran["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20
    assert served["choices"][0]["message"]["content"] == ran["text"]
