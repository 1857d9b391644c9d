"""Mistral's native tool calling: the prompt of a conversation with tools, for a vocabulary
that has the tool control tokens, token for token as mistral-common encodes it.

mistral-common's v2 and v3 SentencePiece tokenizers (Mistral 7B v0.3, Mixtral 8x22B) have
`[TOOL_CALLS]`, `[AVAILABLE_TOOLS]`/`[/AVAILABLE_TOOLS]` and `[TOOL_RESULTS]`/`[/TOOL_RESULTS]`
as control tokens; v3's also has `[IMG]`, `[PREFIX]`, `[MIDDLE]`, `[SUFFIX]`, which is how the
two are told apart (their tool encodings differ). What InstructTokenizerV2/V3 write:

    <s> ... [AVAILABLE_TOOLS] {tools JSON} [/AVAILABLE_TOOLS] [INST] {system}\n\n{last user} [/INST]
    [TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}] </s>          an assistant's calls
    [TOOL_RESULTS] {"content": ..., "call_id": ...} [/TOOL_RESULTS]          a tool's result (v3)

The tools go in front of the LAST user message only; the system prompt goes into it, as for a
plain v2/v3 chat. v3 keeps every call and result; v2 drops those before the last user message
and writes a result as `[{"name": ..., "content": ...}]`. Each JSON text is tokenized on its
own (SentencePiece's word-start in front), as mistral-common's `tokenizer.encode` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from localmix.errors import InputError
from localmix.runtime.vocab import Vocab

SYSTEM_JOIN = "\n\n"
TOOL_TOKENS = ("[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class ToolTokens:
    version: int          # 2 or 3: mistral-common's instruct tokenizer whose tool encoding applies
    calls: int            # [TOOL_CALLS]
    tools: int            # [AVAILABLE_TOOLS]
    end_tools: int
    results: int          # [TOOL_RESULTS]
    end_results: int
    inst: int
    end_inst: int


def tool_tokens(vocab: Vocab) -> ToolTokens | None:
    """The vocabulary's tool control tokens, or None when it lacks them (Mixtral 8x7B's v1)."""
    ids = [vocab.special_id(t) for t in (*TOOL_TOKENS, "[INST]", "[/INST]")]
    if any(i is None for i in ids):
        return None
    version = 3 if all(vocab.special_id(t) is not None for t in ("[IMG]", "[PREFIX]", "[SUFFIX]")) else 2
    return ToolTokens(version, *ids)


def tool_prompt(vocab: Vocab, marks: ToolTokens, messages: Sequence[dict[str, Any]],
                tools: Sequence[dict[str, Any]] | None) -> list[int]:
    """The prompt tokens of `messages` in OpenAI's shape (system, user, assistant with
    `content` or `tool_calls`, tool with `tool_call_id`) and `tools` (OpenAI's function tools)."""
    def text(s: str) -> list[int]:
        return vocab.tokenize(s.encode("utf-8"), add_bos=False, special=False)

    def dumps(obj) -> list[int]:
        return text(json.dumps(obj, ensure_ascii=False))

    system = SYSTEM_JOIN.join(_content(m) for m in messages if m["role"] in ("system", "developer") and _content(m))
    turns: list[dict[str, Any]] = []
    for m in messages:  # mistral-common's normalizer joins neighbouring user (or text assistant) messages
        if m["role"] in ("system", "developer"):
            continue
        if turns and m["role"] == turns[-1]["role"] in ("user", "assistant") and not (m.get("tool_calls") or
                                                                                     turns[-1].get("tool_calls")):
            turns[-1] = {**turns[-1], "content": _content(turns[-1]) + SYSTEM_JOIN + _content(m)}
        else:
            turns.append(m)
    if not any(m["role"] == "user" for m in turns):
        turns.insert(0, {"role": "user", "content": ""})
    last_user = max(i for i, m in enumerate(turns) if m["role"] == "user")
    pending: list[str] = []  # ids of the calls still waiting for their result
    ids = [vocab.token_bos()]
    for i, m in enumerate(turns):
        role, content = m["role"], _content(m)
        if role == "user":
            if i == last_user and tools:
                ids += [marks.tools, *dumps([_tool(t) for t in tools]), marks.end_tools]
            if i == last_user and system:
                content = system + SYSTEM_JOIN + content
            ids += [marks.inst, *text(content), marks.end_inst]
        elif role == "assistant" and m.get("tool_calls"):
            if content:
                raise InputError("an assistant message has either content or tool_calls, not both (Mistral's format)")
            pending = [c.get("id") for c in m["tool_calls"]]
            if marks.version == 2 and i < last_user:
                continue
            calls = [_call(c, marks.version) for c in m["tool_calls"]]
            ids += [marks.calls, *dumps(calls), vocab.token_eos()]
        elif role == "assistant":
            if not content:
                raise InputError(f"message {i}: an assistant message needs content or tool_calls")
            ids += text(content.rstrip(" ")) + [vocab.token_eos()]
        elif role == "tool":
            call = m.get("tool_call_id") or (pending[0] if pending else None)
            pending = [p for p in pending if p != call]
            if marks.version == 2:
                if i < last_user:
                    continue
                result = [{"name": m.get("name"), "content": _json_or_text(content)}]
            else:
                if not call:
                    raise InputError(f"message {i}: a tool result needs the tool_call_id of its call")
                result = {"content": _json_or_text(content), "call_id": call}
            ids += [marks.results, *dumps(result), marks.end_results]
        else:
            raise InputError(f"message {i}: unsupported role {role!r}")
    return ids


def _content(m: dict[str, Any]) -> str:
    content = m.get("content") or ""
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content)
    return content


def _tool(t: dict[str, Any]) -> dict[str, Any]:
    """mistral-common's Tool.model_dump without `strict`: type, then name, description, parameters."""
    f = t["function"]
    return {"type": "function", "function": {"name": f["name"], "description": f.get("description") or "",
                                             "parameters": f.get("parameters") or {}}}


def _call(c: dict[str, Any], version: int) -> dict[str, Any]:
    out = {"name": c["function"]["name"], "arguments": _json_or_text(c["function"].get("arguments") or "")}
    if version == 3 and c.get("id") and c["id"] != "null":
        out["id"] = c["id"]
    return out


def _json_or_text(s: str) -> Any:
    try:
        return json.loads(s)
    except ValueError:
        return s
