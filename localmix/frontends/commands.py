"""The slash commands of `localmix chat`: one small function each, over a session and its UI.

`run_command(session, ui, "/set temperature 0.2")` runs one; a mistake a user can make (an
unknown command, a bad value, a missing file) is one line of hint, never a traceback.
`/save` writes the conversation as JSON (`{"messages": [...], ...}`); `/load` reads that, or a
bare list of messages. A command sees the session through `Session`, the little of chat.py's
ChatSession it uses, so this module needs nothing of the loop that runs it.
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Protocol

from localmix.errors import InputError, LocalmixError
from localmix.frontends.render import stats_line
from localmix.frontends.session import UI, Conversation, Stats
from localmix.runtime.stream import Done, Sampling


class Session(Protocol):
    """What a command needs of the chat session (chat.py's ChatSession)."""

    sampling: Sampling
    conversation: Conversation
    stats: Stats
    n_ctx: int | None
    model: str
    memory: str  # what /show says about memory

    def context_used(self) -> int | None: ...  # tokens the conversation takes now, None without a counter
    def send(self, ui: UI, text: str) -> Done | None: ...  # a new message, answered
    def answer(self, ui: UI, restore: list[dict]) -> Done | None: ...  # answer the last message (again)


QUIT = object()

HELP = """\
/set <name> <value>   temperature, top_k, top_p, min_p, repeat_penalty, seed (or random),
                      max_tokens, stop (strings, quoted if they hold spaces; none clears)
/show                 model, memory, parameters, system prompt, context size and use
/system [text]        set the system prompt (no text removes it)
/clear                start over (the system prompt stays)
/regen                write the last reply again
/read <file> [text]   send a file's text as the next message, then the text
/save <file>          write the conversation as JSON; /load <file> reads it back
/stats                token counts and speeds of this session
/exit                 quit (so do Ctrl-D and a second Ctrl-C at an empty prompt)
\"\"\" starts a message of several lines; another \"\"\" at the end of a line sends it.
Ctrl-C during a reply stops it; the part written stays in the conversation."""


# ---- /set ----

def _number(kind: type, check: Callable, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not check(value):
            raise InputError(f"expected {what}, got {text!r}")
        return value
    return parse


def _seed(text: str) -> int | None:
    if text.lower() in ("random", "none", "off"):
        return None
    return _number(int, lambda v: v >= 0, "a whole number >= 0 or 'random'")(text)


def _stops(text: str) -> tuple[str, ...]:
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split, lexer.escape, lexer.commenters = True, "", ""  # "\\n" stays for the line below
    try:
        words = list(lexer)
    except ValueError as e:
        raise InputError(f"cannot read the stop strings: {e}") from None
    if words in ([], ["none"]):
        return ()
    return tuple(w.replace("\\n", "\n").replace("\\t", "\t") for w in words)


SETTINGS = {
    "temperature": _number(float, lambda v: v >= 0, "a number >= 0"),
    "top_k": _number(int, lambda v: v >= 0, "a whole number >= 0"),
    "top_p": _number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "min_p": _number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "repeat_penalty": _number(float, lambda v: v >= 0, "a number >= 0"),
    "seed": _seed,
    "max_tokens": _number(int, lambda v: v >= 1, "a whole number >= 1"),
    "stop": _stops,
}
ALIASES = {"temp": "temperature", "n": "max_tokens"}


def apply_setting(sampling: Sampling, name: str, value: str) -> Sampling:
    """A copy of `sampling` with one parameter set from text, or an InputError that says why not."""
    key = name.lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in SETTINGS:
        raise InputError(f"no parameter {name!r}; choose from {', '.join(SETTINGS)}")
    if not value.strip() and key != "stop":
        raise InputError(f"/set {key} needs a value")
    return replace(sampling, **{key: SETTINGS[key](value.strip())})


def _set(session: Session, ui: UI, arg: str):
    name, value = (arg.split(None, 1) + ["", ""])[:2]
    if not name:
        raise InputError("usage: /set <name> <value>; /show lists the parameters")
    session.sampling = apply_setting(session.sampling, name, value)
    key = ALIASES.get(name.lower().replace("-", "_"), name.lower().replace("-", "_"))
    ui.info(f"{key} = {getattr(session.sampling, key)!r}")


# ---- the other commands ----

def _help(session, ui, arg):
    ui.print(HELP)


def _show(session: Session, ui: UI, arg):
    used = session.context_used()
    context = f"{session.n_ctx} tokens" if session.n_ctx else "unknown"
    if used is not None and session.n_ctx:
        context += f", {used} used ({100 * used / session.n_ctx:.0f}%)"
    s = session.sampling
    ui.print("\n".join([
        f"model           {session.model}",
        f"context         {context}",
        *([f"memory          {session.memory}"] if session.memory else []),
        f"conversation    {len(session.conversation.turns)} messages",
        f"system prompt   {session.conversation.system or '(none)'}",
        *(f"{k:<16}{v!r}" for k, v in asdict(s).items()),
    ]))


def _system(session: Session, ui: UI, arg: str):
    session.conversation.system = arg or None
    ui.info(f"system prompt set ({len(arg)} characters)" if arg else "system prompt removed")


def _clear(session: Session, ui: UI, arg):
    session.conversation.turns.clear()
    ui.info("conversation cleared" + (" (the system prompt stays)" if session.conversation.system else ""))


def _regen(session: Session, ui: UI, arg):
    turns = session.conversation.turns
    if not turns:
        raise InputError("nothing to regenerate yet: send a message first")
    before = list(turns)
    if turns[-1]["role"] == "assistant":
        turns.pop()
    session.answer(ui, before)


def _read(session: Session, ui: UI, arg: str):
    if not arg:
        raise InputError("usage: /read <file> [more text]")
    name, rest = _first_word(arg)
    path = Path(name).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise InputError(f"{path} is a directory") from None
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}") from None
    ui.info(f"read {path} ({len(text)} characters)")
    session.send(ui, text.rstrip("\n") + (f"\n\n{rest}" if rest else ""))


def _first_word(arg: str) -> tuple[str, str]:
    """('a file name', 'the rest'); the name may be quoted."""
    if arg[0] in "'\"":
        end = arg.find(arg[0], 1)
        if end > 0:
            return arg[1:end], arg[end + 1:].strip()
    name, _, rest = arg.partition(" ")
    return name, rest.strip()


def _save(session: Session, ui: UI, arg: str):
    if not arg:
        raise InputError("usage: /save <file>")
    path = Path(_first_word(arg)[0]).expanduser()
    data = {"model": session.model, "messages": session.conversation.messages(), "sampling": asdict(session.sampling)}
    try:
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror}") from None
    ui.info(f"saved {len(data['messages'])} messages to {path}")


def _load(session: Session, ui: UI, arg: str):
    if not arg:
        raise InputError("usage: /load <file>")
    path = Path(_first_word(arg)[0]).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path} as JSON: {e}") from None
    system, turns = parse_messages(data.get("messages") if isinstance(data, dict) else data, path)
    session.conversation.system, session.conversation.turns = system, turns
    ui.info(f"loaded {len(turns)} messages from {path}" + (" and a system prompt" if system else ""))
    if turns and turns[-1]["role"] == "user":
        ui.info("the last message has no reply yet: /regen answers it")


def parse_messages(messages, where) -> tuple[str | None, list[dict]]:
    """(system prompt, user/assistant turns) from a list of {"role", "content"} dicts."""
    if not isinstance(messages, list):
        raise InputError(f"{where}: expected a list of messages (or {{\"messages\": [...]}})")
    system, turns = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant"):
            raise InputError(f"{where}: message {i} needs a role (system, user or assistant) and text content")
        if m["role"] == "system":
            if turns:
                raise InputError(f"{where}: message {i}: a system message must come first")
            system.append(m["content"])
        elif m["role"] != ("user", "assistant")[len(turns) % 2]:
            raise InputError(f"{where}: message {i}: user and assistant messages must alternate, user first")
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    return "\n\n".join(system) or None, turns


def _stats(session: Session, ui: UI, arg):
    st = session.stats
    if not st.replies:
        ui.print("no replies yet")
        return

    tps = max(st.generated - st.replies, 0) / st.generate_seconds if st.generate_seconds else 0.0  # after each first token
    ptps = st.prompt_evaluated / st.prompt_seconds if st.prompt_seconds else 0.0
    used = session.context_used()
    ui.print("\n".join([
        f"replies         {st.replies}",
        f"prompt tokens   {st.prompt_evaluated} evaluated in {st.prompt_seconds:.2f} s ({ptps:.0f} t/s)",
        f"reply tokens    {st.generated} in {st.generate_seconds:.2f} s ({tps:.1f} t/s)",
        *([f"context         {used} of {session.n_ctx} tokens"] if used is not None and session.n_ctx else []),
        f"last reply      {stats_line(st.last)}",
    ]))


def _exit(session, ui, arg):
    return QUIT


COMMANDS = {"help": _help, "?": _help, "set": _set, "show": _show, "system": _system, "clear": _clear,
            "regen": _regen, "read": _read, "save": _save, "load": _load, "stats": _stats,
            "exit": _exit, "quit": _exit, "bye": _exit}


def run_command(session: Session, ui: UI, line: str):
    """Run one slash command; returns QUIT when the chat should end."""
    name, arg = (line[1:].split(None, 1) + ["", ""])[:2]
    command = COMMANDS.get(name.lower())
    if command is None:
        ui.error(f"unknown command /{name}; /help lists the commands")
        return None
    try:
        return command(session, ui, arg.strip())
    except LocalmixError as e:
        ui.error(str(e))
        return None
