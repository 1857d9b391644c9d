"""Mistral's native tool calls, for a model whose vocabulary has the tool tokens (Mixtral
8x22B, Mistral 7B v0.3): the model answers a call as `[TOOL_CALLS] [{"name": ..., "arguments":
{...}}, ...]` (the control token's text is shown for this, see `Job.shown`).

`CallScanner` reads that text as it streams, character by character (strings, escapes and
nesting tracked), and reports each call's name once it is whole and its arguments' raw JSON
text piece by piece, so OpenAI's streamed `tool_calls` deltas carry the arguments as they are
generated; the non-streamed reply runs the same scanner over the whole text, so both give the
same arguments text. `grammar(marks, specs, names)` forces a call: the `[TOOL_CALLS]` token,
then a JSON list of calls whose arguments follow each function's schema.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field

CALLS = "[TOOL_CALLS]"
ID_CHARS = string.ascii_letters + string.digits


def call_id() -> str:
    """A call id as Mistral's API gives them: 9 letters and digits."""
    return "".join(secrets.choice(ID_CHARS) for _ in range(9))


@dataclass
class Call:
    name: str | None = None
    arguments: list[str] = field(default_factory=list)   # the raw JSON text of its arguments, as it came
    sent: int = 0                                          # how much of it was reported


class CallScanner:
    """Incremental reader of `[{"name": "f", "arguments": {...}}, ...]` (the text after
    `[TOOL_CALLS]`): `calls` grows as the calls come, each name set once it is whole, each
    arguments text as it is generated. Depth 1 is the list, depth 2 a call object."""

    def __init__(self):
        self.calls: list[Call] = []
        self.depth, self.in_string, self.escape = 0, False, False
        self.phase, self.key = "key", None      # in a call object: "key", "colon", "value", "after"
        self.raw: list[str] = []                # a string at depth 2 (a key, the name), undecoded
        self.capture, self.scalar = False, False

    def feed(self, text: str) -> None:
        for ch in text:
            self._char(ch)

    def _char(self, ch: str) -> None:
        if self.capture:  # inside the arguments' value
            if self.scalar and not self.in_string and (ch in ",}]" or ch.isspace()):
                self.capture = False
            else:
                self.calls[-1].arguments.append(ch)
        elif (self.depth == 2 and self.phase == "value" and self.key == "arguments" and not self.in_string
              and not ch.isspace()):
            self.capture, self.scalar = True, ch not in '{["'
            self.calls[-1].arguments.append(ch)
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
                if self.depth == 2 and self.capture:
                    self.capture, self.phase = False, "after"
                elif self.depth == 2:
                    self._string(json.loads('"' + "".join(self.raw) + '"'))
                return
            self.raw.append(ch)
            return
        if ch == '"':
            self.in_string, self.raw = True, []
        elif ch in "[{":
            self.depth += 1
            if self.depth == 2 and ch == "{":
                self.calls.append(Call())
                self.phase, self.key = "key", None
        elif ch in "]}":
            self.depth -= 1
            if self.capture and self.depth == 2:
                self.capture, self.phase = False, "after"
        elif self.depth == 2 and not self.capture:
            if ch == ":" and self.phase == "colon":
                self.phase = "value"
            elif ch == ",":
                self.phase, self.key = "key", None

    def _string(self, s: str) -> None:
        if self.phase == "key":
            self.key, self.phase = s, "colon"
        elif self.phase == "value":
            if self.key == "name":
                self.calls[-1].name = s
            self.phase = "after"


def split_calls(text: str) -> str | None:
    """The text after `[TOOL_CALLS]` when the reply is a call, else None."""
    head = text.lstrip()
    return head[len(CALLS):] if head.startswith(CALLS) else None


def grammar(calls_token: int, call_grammar: str) -> str:
    """`[TOOL_CALLS]` (the token, by id), an optional space, then `call_grammar`'s root (a list of calls)."""
    lines = [("calls ::=" + line[len("root ::="):]) if line.startswith("root ::=") else line
             for line in call_grammar.splitlines()]
    return "\n".join(lines) + f'\nroot ::= <[{calls_token}]> " "? calls\n'


def parse(text: str, tools: dict) -> list[dict] | None:
    """The calls of a whole reply in OpenAI's shape, or None when it is not a call to the tools."""
    rest = split_calls(text)
    if rest is None:
        return None
    scanner = CallScanner()
    scanner.feed(rest)
    calls = []
    for c in scanner.calls:
        arguments = "".join(c.arguments).strip() or "{}"
        try:
            valid = isinstance(json.loads(arguments), dict)
        except ValueError:
            valid = False
        if c.name not in tools or not valid:
            return None
        calls.append({"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": arguments}})
    return calls or None


class NativeStream:
    """OpenAI's streamed deltas of a reply that may be a native call: text goes out as content;
    after `[TOOL_CALLS]`, each call's header (index, id, name) once its name is read, then its
    arguments' text in the pieces it was generated in."""

    def __init__(self, tools: dict):
        self.tools, self.held, self.mode = tools, "", "undecided"
        self.scanner, self.announced = CallScanner(), {}   # scanner's call number -> OpenAI index
        self.called = False

    def feed(self, text: str) -> list[dict]:
        if self.mode == "text":
            return [{"content": text}]
        self.held += text  # all of it, for a "call" that turns out to be none
        if self.mode == "undecided":
            head = self.held.lstrip()
            if not head or (CALLS.startswith(head) and head != CALLS):
                return []
            rest = split_calls(self.held)
            if rest is None:
                self.mode, out, self.held = "text", self.held, ""
                return [{"content": out}]
            self.mode, text = "call", rest
        self.scanner.feed(text)
        return self._deltas()

    def _deltas(self, last: bool = False) -> list[dict]:
        out = []
        for k, call in enumerate(self.scanner.calls):
            if call.name is None or call.name not in self.tools:
                continue
            if k not in self.announced:
                self.announced[k] = index = len(self.announced)
                out.append({"tool_calls": [{"index": index, "id": call_id(), "type": "function",
                                            "function": {"name": call.name, "arguments": ""}}]})
            piece = "".join(call.arguments[call.sent:])
            if last and not call.arguments:
                piece = "{}"
            call.sent = len(call.arguments)
            if piece:
                out.append({"tool_calls": [{"index": self.announced[k], "function": {"arguments": piece}}]})
        self.called = self.called or bool(self.announced)
        return out

    def close(self) -> list[dict]:
        if self.mode == "undecided":
            return [{"content": self.held}] if self.held else []
        if self.mode == "text":
            return []
        out = self._deltas(last=True)
        if not self.announced:  # "[TOOL_CALLS]" and then no call to a known tool: the text as it was
            return [{"content": self.held}]
        return out
