"""Mistral's native tool calls through `localmix serve` on a model with the tool tokens (the
tiny Mixtral 8x22B, mistral-common's v3 vocabulary): the prompt is mistral-common's, a forced
call is `[TOOL_CALLS] [...]` read back into OpenAI's `tool_calls` (streamed: the arguments in
pieces) and ollama's, and the round trip with the result goes on in the native format; and
fill in the middle through the mistralai client (the v3 vocabulary has [PREFIX]/[SUFFIX])."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistralai.client import Mistral
from test_server import WEATHER

from localmix.frontends.server import ollama as ollama_dialect
from localmix.frontends.server.structured import Plan
from localmix.frontends.server.toolcalls import NativeStream

MODEL = "mixtral-8x22b-Q8_0"
CLOCK = {"type": "function", "function": {"name": "now", "description": "The time",
                                          "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                                         "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def native(converted, tmp_path_factory):
    from server_util import Server

    s = Server(converted("mixtral-8x22b", "Q8_0"), "--parallel", "2", "--ctx", "2048",
               log=tmp_path_factory.mktemp("serve-v3") / "server.log")
    yield s
    assert s.stop() == 0, s.log_text()
    assert "Traceback" not in s.log_text()


@pytest.fixture(scope="module")
def client(native):
    return openai.OpenAI(base_url=native.url + "/v1", api_key=native.key, max_retries=0, timeout=60)


def mistral_common_length(messages: list[dict], tools: list[dict]) -> int:
    out = []
    for m in messages:
        if m["role"] == "user":
            out.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            out.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            out.append(AssistantMessage(tool_calls=[ToolCall(id=c["id"], function=FunctionCall(
                name=c["function"]["name"], arguments=c["function"]["arguments"])) for c in m["tool_calls"]]))
    request = ChatCompletionRequest(messages=out, tools=[Tool(function=Function(**t["function"])) for t in tools])
    return len(MistralTokenizer.v3().encode_chat_completion(request).tokens)


def test_forced_call_streamed_and_round_trip(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
                                           max_tokens=64, temperature=0)
    assert first.usage.prompt_tokens == mistral_common_length(ASK, [WEATHER, CLOCK])
    assert first.choices[0].finish_reason == "tool_calls" and first.choices[0].message.content is None, first.choices[0].message
    calls = first.choices[0].message.tool_calls
    assert calls and all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in calls)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), schemas[c.function.name])
    # streamed: a header delta per call (id, name), then its arguments in several pieces
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], stream=True,
                                                 tool_choice="required", max_tokens=64, temperature=0))
    deltas = [t for c in chunks if c.choices for t in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function.name] == [c.function.name for c in calls]
    pieces = [d for d in deltas if d.index == 0 and d.function.arguments]
    assert len(pieces) >= 3  # piece by piece, not one delta at the end
    assert "".join(d.function.arguments for d in pieces) == calls[0].function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a named function: that one is called
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=64,
                                           tool_choice={"type": "function", "function": {"name": "now"}},
                                           temperature=0)
    assert {c.function.name for c in named.choices[0].message.tool_calls} == {"now"}
    # the result goes back as [TOOL_RESULTS]; with tool_choice none the answer is text
    talk = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": calls[0].id, "content": '{"sky": "clear", "celsius": 21}'}]
    answer = client.chat.completions.create(model=MODEL, messages=talk, tools=[WEATHER, CLOCK], tool_choice="none",
                                            max_tokens=16, temperature=0)
    assert answer.usage.prompt_tokens == mistral_common_length(talk, [WEATHER, CLOCK])
    assert answer.choices[0].finish_reason != "tool_calls" and not answer.choices[0].message.tool_calls


def test_native_replies_parse_for_openai_and_ollama():
    plan = Plan([], tools={"get_weather": {}, "now": {}}, native=object())
    text = '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "now", "arguments": {}}]'
    message = plan.reply(text)
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == \
        [("get_weather", '{"city": "Paris"}'), ("now", "{}")]
    assert ollama_dialect._message(plan, text)["tool_calls"] == [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}, {"function": {"name": "now",
                                                                                            "arguments": {}}}]
    assert plan.reply("Sunny, 21 degrees.") == {"role": "assistant", "content": "Sunny, 21 degrees."}
    assert plan.reply('[TOOL_CALLS] [{"name": "rm_rf", "arguments": {}}]')["content"]  # not a known tool: text
    # streamed piece by piece (as tokens come): the header once the name is whole, then the arguments
    stream = NativeStream(plan.tools)
    deltas = [d for piece in ["[TOOL_CALLS]", " [{\"", "name", "\": \"get_", "weather\", \"arg", "uments\": {\"ci",
                              "ty\": \"Pa", "ris\"}}]"] for d in stream.feed(piece)] + stream.close()
    calls = [t for d in deltas for t in d["tool_calls"]]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""} and len(calls[0]["id"]) == 9
    assert [c["function"]["arguments"] for c in calls[1:]] == ['{"ci', 'ty": "Pa', 'ris"}']
    assert stream.called
    plain = NativeStream(plan.tools)
    assert plain.feed("Hello") == [{"content": "Hello"}] and plain.feed(" there") == [{"content": " there"}]


def test_fim_through_the_mistral_client(native):
    mistral = Mistral(api_key=native.key, server_url=native.url, timeout_ms=60000)
    assert mistral.models.list().data[0].capabilities.completion_fim is True
    prompt, suffix = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
    done = mistral.fim.complete(model=MODEL, prompt=prompt, suffix=suffix, temperature=0, max_tokens=12)
    middle = done.choices[0].message.content
    assert middle and done.choices[0].finish_reason in ("stop", "length")
    fim = MistralTokenizer.v3().encode_fim(FIMRequest(prompt=prompt, suffix=suffix)).tokens
    assert done.usage.prompt_tokens == len(fim) and done.usage.completion_tokens >= 1
    streamed = "".join(c.data.choices[0].delta.content or "" for c in
                       mistral.fim.stream(model=MODEL, prompt=prompt, suffix=suffix, temperature=0, max_tokens=12))
    assert streamed == middle
