"""Turn a conversation into the prompt a Mixtral-Instruct model expects.

`render(messages, template)` runs the GGUF's `tokenizer.chat_template` (a Jinja2 string written
for Hugging Face's `apply_chat_template`) in a sandbox, or, when the file has no template,
builds Mistral's `[INST]` format in code. The reference for what the model was trained on is
mistral-common, Mistral's own tokenizer; for Mixtral-8x7B-Instruct that is its v1 instruct
tokenizer, and `render` matches it token for token:

    <s>[INST] {system}\\n\\n{user 1} [/INST] {assistant 1}</s>[INST] {user 2} [/INST]

- The v1 format has no system role (the Mixtral template raises "Only user and assistant roles
  are supported!"). mistral-common joins the system messages with a blank line and puts them,
  plus a blank line, in front of the FIRST user message; `render` does the same, so a system
  prompt is never dropped.
- mistral-common tokenizes each message on its own, so a reply always starts a new
  SentencePiece word ("▁A"). The original Mixtral template glues the reply to "[/INST]"
  ("[/INST]A"), which tokenizes differently; `render` gives such templates the reply with a
  leading space, which is exactly what the reference produces.

The prompt's token ids, for this and every other format, come from `prompt.chat_tokens`.
(`prompt_tokens` here tokenizes already-rendered text with special tokens parsed, for text
that holds no user-typed markers.)
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.sandbox

from localmix.errors import InputError
from localmix.gguf.read import field_value, open_gguf
from localmix.gguf.sandbox import TemplateRaised, environment

TEMPLATE_KEY = "tokenizer.chat_template"
SYSTEM_JOIN = "\n\n"  # mistral-common's separator between system prompts and the user message
ALTERNATE_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."

Message = Mapping[str, Any]


# ---- where the template comes from ----

def template_from_gguf(path: str | Path) -> str | None:
    """The chat template stored in a GGUF file, or None when it has none."""
    return field_value(open_gguf(path), TEMPLATE_KEY)


def template_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The chat template from a loaded model's metadata (llama_cpp.Llama's `llm.metadata`)."""
    return metadata.get(TEMPLATE_KEY) or None


# ---- rendering ----

def render(messages: Sequence[Message], template: str | None, bos_token: str = "<s>", eos_token: str = "</s>",
           add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ({"role": "system"|"user"|"assistant", "content": str}).

    With `template` None, the Mistral `[INST]` format is built in code. Any problem with the
    conversation or the template is an InputError with one line.
    """
    messages = checked_messages(messages)
    if template is None:
        return _render_inst(_fold_system(messages), bos_token, eos_token)
    compiled = _compile(template)
    has_system_role, glues_reply = _traits(template)
    if not has_system_role:
        messages = _fold_system(messages)
    if glues_reply:
        messages = [{**m, "content": " " + m["content"]} if m["role"] == "assistant" else m for m in messages]
    return _run(compiled, messages, bos_token=bos_token, eos_token=eos_token,
                add_generation_prompt=add_generation_prompt)


def checked_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """Plain dict copies (the caller's list is never touched), each with a role and text content."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"message {i} must be a dict with a string 'role' and a string 'content', got {m!r:.80}")
        out.append(dict(m))
    if not out:
        raise InputError("the conversation has no messages")
    return out


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Put the system prompt in front of the first user message, as mistral-common's v1 does.

    All system messages are joined with a blank line (empty ones are skipped); the result and a
    blank line go before the first user message's text. When the conversation does not start
    with a user message, an empty one is put first to carry the system prompt.
    """
    system = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    rest = [m for m in messages if m["role"] != "system"]
    if not system:
        return rest
    if not rest or rest[0]["role"] != "user":
        rest.insert(0, {"role": "user", "content": ""})
    first = next(i for i, m in enumerate(rest) if m["role"] == "user")
    rest[first] = {**rest[first], "content": SYSTEM_JOIN.join(system) + SYSTEM_JOIN + rest[first]["content"]}
    return rest


def _render_inst(messages: list[dict[str, Any]], bos_token: str, eos_token: str) -> str:
    """The Mistral v1 `[INST]` format, for files without a chat template."""
    parts = [bos_token]
    for i, m in enumerate(messages):
        if m["role"] not in ("user", "assistant"):
            raise InputError(f"chat template: unsupported role {m['role']!r}; use system, user or assistant")
        if (m["role"] == "user") != (i % 2 == 0):
            raise InputError(f"chat template: {ALTERNATE_ERROR}")
        parts.append(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else f" {m['content']}{eos_token}")
    return "".join(parts)


# ---- the sandbox (gguf.sandbox: the checker compiles templates in the same environment) ----

@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise InputError(f"chat template has a syntax error on line {e.lineno}: {e.message}") from None


def _run(compiled: jinja2.Template, messages: list[dict[str, Any]], **variables) -> str:
    try:
        return compiled.render(messages=messages, **variables)
    except TemplateRaised as e:
        raise InputError(f"chat template: {e}") from None
    except jinja2.sandbox.SecurityError as e:
        raise InputError(f"chat template tried something unsafe and was stopped: {e}") from None
    except (jinja2.TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as e:
        raise InputError(f"chat template failed: {type(e).__name__}: {e}") from None


@lru_cache(maxsize=16)
def _traits(template: str) -> tuple[bool, bool]:
    """(has a system role, glues the reply to "[/INST]"), found by rendering probe conversations.

    A template "has" a system role when a system message's text shows up in its output; one
    that raises, or silently drops it, gets the system prompt folded into a user turn.
    """
    system, reply = "\x00system-probe\x00", "\x00reply-probe\x00"
    variables = dict(bos_token="<s>", eos_token="</s>", add_generation_prompt=False)
    try:
        has_system_role = system in _run(_compile(template), [{"role": "system", "content": system},
                                                              {"role": "user", "content": "u"}], **variables)
    except InputError:
        has_system_role = False
    try:
        text = _run(_compile(template), [{"role": "user", "content": "u"}, {"role": "assistant", "content": reply}],
                    **variables)
        glues_reply = reply in text and text.partition(reply)[0].endswith("[/INST]")
    except InputError:
        glues_reply = False
    return has_system_role, glues_reply


# ---- tokens ----

def prompt_tokens(tokenize: Callable[..., list[int]], text: str, bos_id: int | None = None) -> list[int]:
    """Token ids for rendered prompt text, with exactly one BOS at the start.

    `tokenize` is llama-cpp-python's `llm.tokenize(bytes, add_bos=..., special=...)`. Special
    tokens are parsed (the template wrote "<s>" and "</s>" as text) and no BOS is added on top.
    With `bos_id` (`llm.token_bos()`), a doubled leading BOS is collapsed to one, and a BOS is
    put in front when the template wrote none.
    """
    ids = list(tokenize(text.encode("utf-8"), add_bos=False, special=True))
    if bos_id is not None:
        while ids[:2] == [bos_id, bos_id]:
            ids.pop(0)
        if ids[:1] != [bos_id]:
            ids.insert(0, bos_id)
    return ids

