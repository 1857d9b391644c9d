"""Mistral's native tool-call prompt (runtime/tools.py) equals mistral-common's v3 (and v2)
encoder token for token, for conversations with tools, calls and results, on the tiny
Mixtral 8x22B GGUF (its vocabulary is mistral-common's v3 SentencePiece model)."""

from __future__ import annotations

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from localmix.runtime.tools import tool_prompt, tool_tokens
from localmix.runtime.vocab import open_vocab

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "celsius": {"type": "boolean"}},
                                                "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def calls(*pairs):
    return [{"id": i, "type": "function", "function": {"name": n, "arguments": a}} for i, n, a in pairs]


CONVERSATIONS = {
    "tools, one question": [{"role": "user", "content": "What is the weather in Paris?"}],
    "system, call, result": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "tool_calls": calls(("a1B2c3D4e", "get_weather", '{"city": "Paris", "celsius": true}'))},
        {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": '{"sky": "clear", "temp": 21}'},
    ],
    "two calls, two results, then more talk": [
        {"role": "user", "content": "Weather in Lyon, and the time?"},
        {"role": "assistant", "tool_calls": calls(("Zz9Yy8Xx7", "get_weather", '{"city": "Lyon"}'),
                                                  ("Qq1Ww2Ee3", "now", "{}"))},
        {"role": "tool", "tool_call_id": "Zz9Yy8Xx7", "content": "rain"},
        {"role": "tool", "tool_call_id": "Qq1Ww2Ee3", "content": '"12:00"'},
        {"role": "assistant", "content": "It rains in Lyon; it is noon."},
        {"role": "user", "content": "Thanks. And in Paris?"},
    ],
}


def mistral_common(tokenizer: MistralTokenizer, messages: list[dict], tools: list[dict]) -> list[int]:
    kinds = {"system": SystemMessage, "user": UserMessage, "tool": ToolMessage}
    out = []
    for m in messages:
        if m["role"] == "assistant":
            tc = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                             arguments=c["function"]["arguments"]))
                  for c in m.get("tool_calls") or []]
            out.append(AssistantMessage(content=m.get("content"), tool_calls=tc or None))
        else:
            out.append(kinds[m["role"]](**{k: v for k, v in m.items() if k != "role"}))
    request = ChatCompletionRequest(messages=out, tools=[Tool(function=Function(**t["function"])) for t in tools])
    return tokenizer.encode_chat_completion(request).tokens


@pytest.fixture(scope="module")
def vocab(converted):
    return open_vocab(converted("mixtral-8x22b", "Q8_0"))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_v3_tool_prompt_equals_mistral_common(vocab, name):
    marks = tool_tokens(vocab)
    assert marks is not None and marks.version == 3
    messages = CONVERSATIONS[name]
    ours = tool_prompt(vocab, marks, messages, [WEATHER, CLOCK])
    theirs = mistral_common(MistralTokenizer.v3(), messages, [WEATHER, CLOCK])
    assert ours == theirs
    assert ours.count(marks.tools) == 1 and ours.count(marks.calls) == sum(m["role"] == "assistant" and
                                                                           "tool_calls" in m for m in messages)


def test_v2_encoding_and_no_tool_tokens(vocab, converted):
    marks = tool_tokens(vocab)
    v2 = type(marks)(2, *[getattr(marks, f) for f in ("calls", "tools", "end_tools", "results", "end_results",
                                                       "inst", "end_inst")])
    # the v2 and v3 SentencePiece models share pieces 0-9 and the text pieces
    messages = CONVERSATIONS["two calls, two results, then more talk"][:-2] + [
        {"role": "assistant", "content": "Rain."}, {"role": "user", "content": "Thanks."}]
    messages[3] = {**messages[3], "name": "now"}
    messages[2] = {**messages[2], "name": "get_weather"}
    assert tool_prompt(vocab, v2, messages, [WEATHER]) == mistral_common(MistralTokenizer.v2(), messages, [WEATHER])
    assert tool_tokens(open_vocab(converted("mixtral", "Q8_0"))) is None  # 8x7B's v1: the generic JSON prompt


@pytest.mark.parametrize("prompt, suffix", [("def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"), ("x = ", ""),
                                            ("  indented", "  and a suffix with spaces  ")])
def test_fim_tokens_equal_mistral_common(vocab, converted, prompt, suffix):
    from mistral_common.protocol.fim.request import FIMRequest

    from localmix.errors import InputError
    from localmix.runtime.prompt import fim_tokens

    theirs = MistralTokenizer.v3().encode_fim(FIMRequest(prompt=prompt, suffix=suffix or None)).tokens
    assert fim_tokens(vocab, prompt, suffix) == theirs
    with pytest.raises(InputError, match=r"\[PREFIX\]/\[SUFFIX\]"):
        fim_tokens(open_vocab(converted("mixtral", "Q8_0")), prompt, suffix)
