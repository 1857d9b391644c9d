"""Structured output and tool calls, for every dialect: what the prompt gets, the grammar that
constrains sampling, and how the reply's text turns back into a message.

- `response_format` `json_object` / `json_schema`: a llama.cpp GBNF grammar (llama-cpp-python's
  for any JSON, grammar.py's from the schema), so the reply always parses (and validates); a
  schema keyword the grammar cannot enforce is a 400 that names it and its place in the schema.
- `tools` on a model without tool tokens (Mixtral 8x7B's v1 tokenizer): the tools are described
  in the system prompt with the form of a call, `{"name": ..., "arguments": {...}}`; with
  `tool_choice` `required`/`any` or a named function a grammar forces such a call (its
  arguments by the function's JSON schema, as for `json_schema`), with `auto` a reply of that
  form is read as a call.
  Calls get 9-character ids, as Mistral's API gives them. Tool results and earlier calls are put
  back into the conversation as text, so v1 templates (user/assistant only) still render it.
- `tools` (or tool messages) on a model WITH Mistral's tool tokens (v2/v3 tokenizers: Mixtral
  8x22B): the native format (runtime/tools.py renders the prompt as mistral-common does,
  toolcalls.py reads `[TOOL_CALLS] [...]` back); `required`/`any`/a named function force a call
  by a grammar that starts with the `[TOOL_CALLS]` token, `none` bans that token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from llama_cpp.llama_grammar import JSON_GBNF

from localmix.frontends.server import toolcalls
from localmix.frontends.server.common import ApiError, State, chat_prompt, check_context
from localmix.frontends.server.grammar import Grammar, Refused, to_gbnf
from localmix.frontends.server.toolcalls import call_id
from localmix.runtime.tools import ToolTokens, tool_prompt, tool_tokens

TOOL_PROMPT = ("You can call these tools (JSON schema of each):\n{tools}\n\nTo call a tool, reply with only a JSON "
               'object of the form {{"name": "<tool name>", "arguments": {{...}}}} and nothing else.')


def schema_grammar(schema: dict, param: str) -> str:
    """The grammar of `schema` (the request's `param`), or a 400 naming what it cannot enforce."""
    try:
        return to_gbnf(schema, where=param)
    except Refused as e:
        raise ApiError(400, str(e), param=param) from None


def calls_grammar(tools: list, names: list[str], listed: bool = False) -> str:
    """The grammar of a call to one of `names`: `{"name": ..., "arguments": {...}}`, the arguments
    by the function's schema (a document of its own); `listed`: a list of one or more calls."""
    g = Grammar()
    specs = {t.function.name: (i, t.function.parameters or {"type": "object", "properties": {}})
             for i, t in enumerate(tools)}
    try:
        calls = []
        for n in names:
            i, spec = specs[n]
            arguments = g.document(spec, where=f"tools[{i}].function.parameters")
            calls.append({"type": "object", "properties": {"name": {"const": n}, "arguments": arguments},
                          "required": ["name", "arguments"], "additionalProperties": False})
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return g.text(g.document({"type": "array", "minItems": 1, "items": call} if listed else call))
    except Refused as e:
        raise ApiError(400, str(e), param="tools") from None


@dataclass
class Plan:
    messages: list[dict]
    grammar: str | None = None
    tools: dict[str, dict] = field(default_factory=dict)   # name -> parameters schema
    forced: bool = False                                   # a tool call is required
    native: ToolTokens | None = None                       # Mistral's tool tokens: the native format
    tool_defs: list[dict] = field(default_factory=list)    # the request's tools (OpenAI's shape), native
    bias: dict[int, float] = field(default_factory=dict)   # logit bias the plan needs (tool_choice none)

    @property
    def shown(self) -> frozenset[int]:
        """Control tokens the reply's text must show (the parser looks for "[TOOL_CALLS]")."""
        return frozenset({self.native.calls}) if self.native is not None else frozenset()

    def prompt(self, state: State) -> list[int]:
        if self.native is None:
            return chat_prompt(state, self.messages)
        try:
            tokens = tool_prompt(state.engine.vocab, self.native, self.messages, self.tool_defs)
        except (KeyError, TypeError) as e:
            raise ApiError(400, f"messages: a tool call or result is missing a field ({e})", param="messages") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        return check_context(state, tokens)

    def parse_calls(self, text: str) -> list[dict] | None:
        """The tool calls in OpenAI's shape, when the reply is a call."""
        if not self.tools:
            return None
        if self.native is not None:
            return toolcalls.parse(text, self.tools)
        call = self._parse_generic(text)
        return [call] if call is not None else None

    def _parse_generic(self, text: str) -> dict | None:
        body = text.strip().removeprefix("[TOOL_CALLS]").strip()
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if isinstance(obj, list) and len(obj) == 1:
            obj = obj[0]
        if not isinstance(obj, dict) or obj.get("name") not in self.tools or not isinstance(obj.get("arguments", {}), dict):
            return None
        return {"id": call_id(), "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}), ensure_ascii=False)}}

    def reply(self, text: str) -> dict:
        calls = self.parse_calls(text)
        if calls is not None:
            return {"role": "assistant", "content": None, "tool_calls": calls}
        return {"role": "assistant", "content": text}

    def stream_parser(self):
        if self.native is not None and self.tools:
            return toolcalls.NativeStream(self.tools)
        return StreamParser(self)


class StreamParser:
    """Streams content deltas as they come, except a reply that may be a tool call (tools given
    and the reply starts with "{" or "[TOOL_CALLS]"): that is held and sent as one tool_calls
    delta when it parses, or as content when it does not."""

    def __init__(self, plan: Plan):
        self.plan, self.held, self.mode, self.called = plan, "", "undecided" if plan.tools else "text", False

    def feed(self, text: str) -> list[dict]:
        if self.mode == "text":
            return [{"content": text}]
        self.held += text
        if self.mode == "undecided":
            head = self.held.lstrip()
            if not head:
                return []
            could_be_call = head[0] in "{[" or "[TOOL_CALLS]".startswith(head[:12]) or head.startswith("[TOOL_CALLS]")
            if self.plan.forced or could_be_call:
                self.mode = "call"
            else:
                self.mode, out, self.held = "text", self.held, ""
                return [{"content": out}]
        return []

    def close(self) -> list[dict]:
        if not self.held:
            return []
        call = self.plan._parse_generic(self.held)
        if call is None:
            return [{"content": self.held}]
        self.called = True
        return [{"tool_calls": [{"index": 0, **call}]}]


def plan(state, body, messages: list[dict], format_param: str = "response_format") -> Plan:
    """What a chat request asks for beyond plain text: `body` has `response_format`, `tools`,
    `tool_choice` (OpenAI's models in schemas.py, or ollama's mapped onto them, whose
    `format` is `format_param` in errors)."""
    marks = tool_tokens(state.engine.vocab)
    if marks is not None and (getattr(body, "tools", None) or any(m["role"] == "tool" or m.get("tool_calls")
                                                                  for m in messages)):
        return _native(marks, body, messages, format_param)
    messages = _as_text(messages)
    fmt = getattr(body, "response_format", None)
    tools = getattr(body, "tools", None) or []
    choice = getattr(body, "tool_choice", None)
    grammar = None
    if fmt is not None and fmt.type == "json_object":
        grammar = JSON_GBNF
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise ApiError(400, "response_format: json_schema needs a 'json_schema' object", param="response_format")
        grammar = schema_grammar(fmt.json_schema.schema_, format_param)
    if not tools or choice == "none":
        if choice not in (None, "none", "auto") and not tools:
            raise ApiError(400, "tool_choice is set but no tools are given", param="tool_choice")
        return Plan(messages, grammar)
    if grammar is not None:
        raise ApiError(400, "give either response_format or tools, not both", param="response_format")
    specs = {t.function.name: t.function.parameters or {"type": "object", "properties": {}} for t in tools}
    named = getattr(getattr(choice, "function", None), "name", None)
    if named is not None and named not in specs:
        raise ApiError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    described = json.dumps([{"name": t.function.name, "description": t.function.description or "",
                             "parameters": specs[t.function.name]} for t in tools], ensure_ascii=False)
    messages = _with_system(messages, TOOL_PROMPT.format(tools=described))
    forced = choice in ("required", "any") or named is not None
    if forced:
        grammar = calls_grammar(tools, [named] if named else list(specs))
    return Plan(messages, grammar, specs, forced)


def _native(marks: ToolTokens, body, messages: list[dict], format_param: str) -> Plan:
    """Mistral's own format: the prompt keeps the calls and results as its control tokens."""
    fmt, tools, choice = getattr(body, "response_format", None), getattr(body, "tools", None) or [], \
        getattr(body, "tool_choice", None)
    if fmt is not None and fmt.type != "text":
        if tools and choice != "none":
            raise ApiError(400, "give either response_format or tools, not both", param="response_format")
        grammar = JSON_GBNF if fmt.type == "json_object" else None
        if fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ApiError(400, "response_format: json_schema needs a 'json_schema' object",
                               param="response_format")
            grammar = schema_grammar(fmt.json_schema.schema_, format_param)
    else:
        grammar = None
    if not tools and choice not in (None, "none", "auto"):
        raise ApiError(400, "tool_choice is set but no tools are given", param="tool_choice")
    specs = {t.function.name: t.function.parameters or {"type": "object", "properties": {}} for t in tools}
    named = getattr(getattr(choice, "function", None), "name", None)
    if named is not None and named not in specs:
        raise ApiError(400, f"tool_choice names {named!r}, which is not among the tools", param="tool_choice")
    defs = [t.model_dump(exclude_none=True) for t in tools]
    forced = bool(tools) and (choice in ("required", "any") or named is not None)
    if forced:
        grammar = toolcalls.grammar(marks.calls, calls_grammar(tools, [named] if named else list(specs), listed=True))
    bias = {marks.calls: float("-inf")} if choice == "none" or not tools else {}
    return Plan(messages, grammar, specs if choice != "none" else {}, forced, marks, defs, bias)


def _with_system(messages: list[dict], text: str) -> list[dict]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:]
    return [{"role": "system", "content": text}] + messages


def _as_text(messages: list[dict]) -> list[dict]:
    """Messages as {role, content} text: earlier tool calls as their JSON, tool results as user
    turns, "developer" as "system", and same-role neighbours joined so the roles alternate."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content)
        if role == "developer":
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + json.dumps(calls[0] if len(calls) == 1 else calls,
                                                                       ensure_ascii=False)
        if role == "tool":
            role, content = "user", f"Tool result ({m.get('tool_call_id') or m.get('name') or 'call'}): {content}"
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return out


def _loads(arguments):
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments
