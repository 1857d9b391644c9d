"""A conversation's prompt tokens, for any GGUF: `chat_tokens(vocab, metadata, messages)`.

The one function every front end (run, chat, a server) calls. Which format it builds is read
from the file (`prompt_format`):

    "mistral-v1"  the template writes "[INST]" and "[INST]" is text in the vocabulary
                  (Mixtral 8x7B, Mistral 7B v0.1): mistral-common's v1 encoder
    "mistral-v2"  "[INST]" is a control token (v2 and v3 tokenizers: Mixtral 8x22B, Mistral
                  7B v0.2/v0.3; their chat encodings are the same): mistral-common's v2/v3 encoder
    "template"    any other chat template (ChatML, Llama 3, Gemma, ...), rendered in template.py
    "raw"         no template and no Mistral markers (base models): BOS + the text, to continue

The Mistral formats are built in code, message by message, as mistral-common builds them, so
the tokens equal its encoder's whatever the file's template approximates: v1 puts the system
prompt (system messages joined by a blank line) and a blank line in front of the FIRST user
message, v2/v3 in front of the LAST one; each text is tokenized on its own, replies end with EOS.

For any other template the structure it writes is tokenized with control tokens parsed
("<|im_start|>" is one token) and every message's content as plain text, so a "<|im_end|>"
or "[INST]" someone typed stays text: the template is rendered with a placeholder per
content; the text between control tokens is then tokenized in one piece, exactly as llama.cpp
tokenizes a rendered prompt, except that no control token is looked for inside a content.

BOS comes exactly once, and only where the model wants one: the template wrote it, or the
vocabulary's `add_bos_token` asks for it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from localmix.errors import InputError
from localmix.runtime.template import (
    ALTERNATE_ERROR,
    SYSTEM_JOIN,
    Message,
    checked_messages,
    render,
    template_from_metadata,
)
from localmix.runtime.vocab import Vocab

FORMATS = ("mistral-v1", "mistral-v2", "template", "raw")
INST, END_INST = "[INST]", "[/INST]"


def prompt_format(vocab: Vocab, template: str | None) -> str:
    """Which of FORMATS the model's prompts take (see the module docstring)."""
    inst_is_control = vocab.special_id(INST) is not None and vocab.special_id(END_INST) is not None
    if template is None:
        return "mistral-v2" if inst_is_control else "raw"
    if INST in template:
        return "mistral-v2" if inst_is_control else "mistral-v1"
    return "template"


def chat_tokens(vocab: Vocab, metadata: Mapping[str, str], messages: Sequence[Message], raw: bool = False) -> list[int]:
    """The prompt tokens of `messages` ({"role": "system"|"user"|"assistant", "content": str})
    for the model whose vocabulary and metadata (`tokenizer.chat_template`) are given. With
    `raw`, or for a file in the "raw" format, the contents are joined by blank lines and sent
    as text to continue. Problems with the conversation are InputErrors of one line."""
    messages = checked_messages(messages)
    template = template_from_metadata(metadata)
    kind = "raw" if raw else prompt_format(vocab, template)
    if kind == "raw":
        return _with_bos(vocab, _text(vocab, SYSTEM_JOIN.join(m["content"] for m in messages if m["content"])))
    if kind.startswith("mistral"):
        return _mistral(vocab, messages, version=1 if kind == "mistral-v1" else 2)
    return _with_bos(vocab, _templated(vocab, messages, template))


def _text(vocab: Vocab, text: str) -> list[int]:
    """Plain text: no control token is parsed."""
    return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=False)


def _with_bos(vocab: Vocab, ids: list[int]) -> list[int]:
    """One BOS at the start when the model wants one (or the template wrote one), never two."""
    bos = vocab.token_bos()
    while bos >= 0 and ids[:2] == [bos, bos]:
        ids = ids[1:]
    if vocab.add_bos and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


# ---- Mistral's formats, as mistral-common encodes them ----

def _mistral(vocab: Vocab, messages: list[dict[str, Any]], version: int) -> list[int]:
    """mistral-common's InstructTokenizerV1 (version 1) or V2/V3 (version 2), for text chats."""
    system = SYSTEM_JOIN.join(m["content"] for m in messages if m["role"] == "system" and m["content"])
    turns = [m for m in messages if m["role"] != "system"]
    if not any(m["role"] == "user" for m in turns):
        turns.insert(0, {"role": "user", "content": ""})  # carries the system prompt
    users = [i for i, m in enumerate(turns) if m["role"] == "user"]
    with_system = users[0] if version == 1 else users[-1]
    ids = [vocab.token_bos()]
    for i, m in enumerate(turns):
        if m["role"] not in ("user", "assistant"):
            raise InputError(f"chat template: unsupported role {m['role']!r}; use system, user or assistant")
        if (m["role"] == "user") != (i % 2 == 0):
            raise InputError(f"chat template: {ALTERNATE_ERROR}")
        content = m["content"]
        if m["role"] == "user":
            if i == with_system and system:
                content = system + SYSTEM_JOIN + content
            if version == 1:  # "[INST]" is text: one piece with the message
                ids += _text(vocab, f"{INST} {content} {END_INST}")
            else:
                ids += [vocab.special_id(INST), *_text(vocab, content), vocab.special_id(END_INST)]
        else:
            ids += _text(vocab, content if version == 1 else content.rstrip(" ")) + [vocab.token_eos()]
    return ids


# ---- any other template ----

_MARK = "\x00localmix-content-{}\x00"
_MARK_RE = re.compile("\x00localmix-content-(\\d+)\x00")


def _templated(vocab: Vocab, messages: list[dict[str, Any]], template: str) -> list[int]:
    """The template rendered with a placeholder per content; structure has its control tokens
    parsed, contents stay text, and the text between control tokens is tokenized in one piece."""
    contents = [m["content"] for m in messages]
    marked = [{**m, "content": _MARK.format(i)} for i, m in enumerate(messages)]
    bos, eos = (vocab.model.token_get_text(t) if t >= 0 else "" for t in (vocab.token_bos(), vocab.token_eos()))
    text = render(marked, template, bos_token=bos, eos_token=eos)
    if sorted(int(i) for i in _MARK_RE.findall(text)) != list(range(len(contents))):
        # the template changed or dropped a content (a filter on it): its output as it is,
        # control tokens parsed everywhere, as llama.cpp's own chat path would tokenize it
        return vocab.tokenize(render(messages, template, bos_token=bos, eos_token=eos).encode("utf-8"),
                              add_bos=False, special=True)
    ids: list[int] = []
    run: list[str] = []  # text since the last control token

    def flush():
        if run:
            ids.extend(_text(vocab, "".join(run)))
            run.clear()

    pattern = vocab.specials_pattern
    for k, part in enumerate(_MARK_RE.split(text)):
        if k % 2:  # a content
            run.append(contents[int(part)])
            continue
        at = 0
        for match in (pattern.finditer(part) if pattern else ()):
            run.append(part[at:match.start()])
            flush()
            ids.append(vocab.specials[match.group()])
            at = match.end()
        run.append(part[at:])
    flush()
    return ids



# ---- fill in the middle ----

FIM_TOKENS = ("[PREFIX]", "[SUFFIX]")


def fim_tokens(vocab: Vocab, prompt: str, suffix: str) -> list[int]:
    """mistral-common's FIM encoding (InstructTokenizerV2.encode_fim), for a vocabulary with the
    [PREFIX] and [SUFFIX] control tokens (mistral-common's v3 SentencePiece tokenizer, Codestral):
    `<s> [SUFFIX] suffix [PREFIX] prompt`, the model writing what goes between. The suffix has
    no SentencePiece word-start (mistral-common tokenizes "☺" + suffix and drops two tokens)."""
    prefix_id, suffix_id = (vocab.special_id(t) for t in FIM_TOKENS)
    if prefix_id is None or suffix_id is None:
        raise InputError("this model cannot fill in the middle: its vocabulary has no [PREFIX]/[SUFFIX] control "
                         "tokens (mistral-common's FIM needs them; Mixtral 8x22B's v3 tokenizer has them, "
                         "Mixtral 8x7B's v1 does not)")
    middle = _text(vocab, "☺" + suffix)[2:] if suffix else []
    return [vocab.token_bos(), suffix_id, *middle, prefix_id, *_text(vocab, prompt)]
