"""The ollama and Mistral clients against `localmix serve` (conftest's `server`): plain and
streamed chat, a completion, listing models, JSON-schema output, a tool call round trip, and
an error for a bad parameter, each through the client's own API."""

from __future__ import annotations

import json
import re

import jsonschema
import ollama
import pytest
from mistralai.client import Mistral
from mistralai.client.errors import SDKError
from test_server import SCHEMA, WEATHER

MODEL = "mixtral-Q8_0"
GREEDY = {"temperature": 0, "num_predict": 16}


@pytest.fixture(scope="module")
def olla(server):
    return ollama.Client(host=server.url, headers=server.headers, timeout=60)


@pytest.fixture(scope="module")
def mistral(server):
    return Mistral(api_key=server.key, server_url=server.url, timeout_ms=60000)


def test_ollama_chat_stream_generate_and_models(olla, server):
    assert [m.model for m in olla.list().models] == [MODEL]
    assert olla.show(MODEL).details.format == "gguf"
    assert olla.ps().models[0].model == MODEL
    messages = [{"role": "user", "content": "Name three colours"}]
    reply = olla.chat(MODEL, messages, options=GREEDY)
    assert reply.done and reply.message.content and reply.eval_count >= 1
    streamed = list(olla.chat(MODEL, messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in streamed) == reply.message.content
    assert streamed[-1].done and streamed[-1].eval_count == reply.eval_count
    openai_text = server.post("/v1/chat/completions", {"model": MODEL, "messages": messages, "temperature": 0,
                                                       "max_tokens": 16}).json()["choices"][0]["message"]["content"]
    assert openai_text == reply.message.content  # one engine under both dialects
    done = olla.generate(MODEL, "Once upon a time", options=GREEDY, raw=True)
    assert done.response and done.done_reason in ("stop", "length")
    assert "".join(c.response for c in olla.generate(MODEL, "Once upon a time", options=GREEDY, raw=True,
                                                      stream=True)) == done.response


def test_ollama_json_schema_and_tools(olla):
    reply = olla.chat(MODEL, [{"role": "user", "content": "Is the sky blue?"}], format=SCHEMA,
                      options={"temperature": 0, "num_predict": 64})
    jsonschema.validate(json.loads(reply.message.content), SCHEMA)
    messages = [{"role": "user", "content": "What is the weather in Lyon?"}]
    first = olla.chat(MODEL, messages, tools=[WEATHER], options={"temperature": 0, "num_predict": 64})
    # `auto`: a random model may or may not call; when it does the call must be valid
    for call in first.message.tool_calls or []:
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), WEATHER["function"]["parameters"])
    call = {"function": {"name": "get_weather", "arguments": {"city": "Lyon", "celsius": True}}}
    messages += [{"role": "assistant", "content": "", "tool_calls": [call]},
                 {"role": "tool", "content": '{"sky": "clear"}', "tool_name": "get_weather"}]
    answer = olla.chat(MODEL, messages, options={"temperature": 0, "num_predict": 8})
    assert answer.message.content


def test_ollama_errors(olla):
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat(MODEL, [{"role": "user", "content": "hi"}], options={"mirostat": 2})
    assert e.value.status_code == 400 and "mirostat" in str(e.value)
    with pytest.raises(ollama.ResponseError) as e:
        olla.chat("llama3:8b", [{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404


def test_mistral_chat_stream_models_json_tools_and_errors(mistral):
    assert [m.id for m in mistral.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": "Name three colours"}]
    reply = mistral.chat.complete(model=MODEL, messages=messages, temperature=0, max_tokens=16, random_seed=1)
    text = reply.choices[0].message.content
    assert text and reply.usage.completion_tokens >= 1
    streamed = [e.data.choices[0].delta.content or "" for e in mistral.chat.stream(
        model=MODEL, messages=messages, temperature=0, max_tokens=16) if e.data.choices]
    assert "".join(streamed) == text
    safe = mistral.chat.complete(model=MODEL, messages=messages, temperature=0, max_tokens=4, safe_prompt=True)
    assert safe.usage.prompt_tokens > reply.usage.prompt_tokens + 20  # the guardrail prompt went in front
    shaped = mistral.chat.complete(model=MODEL, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                   temperature=0, max_tokens=64, response_format={
                                       "type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    jsonschema.validate(json.loads(shaped.choices[0].message.content), SCHEMA)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    first = mistral.chat.complete(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="any", temperature=0,
                                  max_tokens=64)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and re.fullmatch(r"[A-Za-z0-9]{9}", call.id)
    arguments = call.function.arguments
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments,
                        WEATHER["function"]["parameters"])
    ask += [{"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "name": "get_weather", "content": '{"sky": "clear"}'}]
    answer = mistral.chat.complete(model=MODEL, messages=ask, temperature=0, max_tokens=8)
    assert answer.choices[0].message.content
    with pytest.raises(SDKError) as e:
        mistral.chat.complete(model=MODEL, messages=messages, min_tokens=3)
    assert e.value.status_code == 400 and "min_tokens" in str(e.value.body)


def test_mistral_fim_needs_the_fim_tokens(mistral):
    """Mixtral 8x7B's v1 vocabulary has no [PREFIX]/[SUFFIX]: FIM is a 400 that says why
    (the tiny 8x22B's v3 vocabulary fills in the middle: test_server_tools_v3.py)."""
    with pytest.raises(SDKError) as e:
        mistral.fim.complete(model=MODEL, prompt="def add(a, b):\n    ", suffix="\n", max_tokens=4)
    assert e.value.status_code == 400 and "[PREFIX]/[SUFFIX]" in str(e.value.body)
    assert mistral.models.list().data[0].capabilities.completion_fim is False
