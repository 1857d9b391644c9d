"""`localmix chat`: a conversation in the terminal, streamed as the model writes it.

`ChatSession.run(ui)` reads a message, fits the conversation into the context (dropping the
oldest exchanges, never the system prompt), streams the reply and prints one stats line. It
knows nothing of models: it is given a `Reply` callable, `reply(messages, sampling, cancel)`
-> Piece events then one Done; the CLI passes `engine_reply(engine)`, the tests a fake.

Input and output go through a small UI object: `TerminalUI` (prompt_toolkit: line editing,
history file, \"\"\" blocks, bracketed paste; rich: live Markdown) or `PlainUI` for pipes.
The slash commands, and the stats line after each reply, are in commands.py.

Ctrl-C during a reply: the reply runs in a worker thread, so the main thread takes the
KeyboardInterrupt and sets the `cancel` event; the engine stops between two tokens and ends
with its Done, and the partial reply stays in the conversation.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

from localmix.errors import LocalmixError
from localmix.frontends.commands import QUIT, run_command
from localmix.frontends.render import stats_line
from localmix.runtime.stream import Done, Piece, Sampling

Reply = Callable[[list[dict], Sampling, threading.Event], Iterator[Piece | Done]]
CountTokens = Callable[[list[dict]], int]

BLOCK = '"""'  # a message that starts with it goes on until a line that ends with it


# ---- the conversation ----

@dataclass
class Conversation:
    system: str | None = None
    turns: list[dict] = field(default_factory=list)  # user, assistant, user, assistant, ...

    def messages(self) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + [dict(m) for m in self.turns]

    def add_user(self, text: str) -> None:
        if self.turns and self.turns[-1]["role"] == "user":  # an unanswered message (from /load): send both
            self.turns[-1] = {"role": "user", "content": self.turns[-1]["content"] + "\n\n" + text}
        else:
            self.turns.append({"role": "user", "content": text})

    def fit(self, count_tokens: CountTokens, budget: int) -> int:
        """Drop the oldest user+assistant pairs until the prompt has at most `budget` tokens;
        the system prompt and the last message always stay. Returns how many pairs went."""
        dropped = 0
        while len(self.turns) > 2 and count_tokens(self.messages()) > budget:
            del self.turns[:2]
            dropped += 1
        return dropped


@dataclass
class Stats:
    replies: int = 0
    prompt_evaluated: int = 0
    prompt_seconds: float = 0.0
    generated: int = 0
    generate_seconds: float = 0.0
    last: Done | None = None

    def add(self, done: Done) -> None:
        self.replies += 1
        self.prompt_evaluated += done.prompt_evaluated
        self.prompt_seconds += done.prompt_seconds
        self.generated += done.generated_tokens
        self.generate_seconds += done.generate_seconds
        self.last = done


# ---- streaming one reply ----

@dataclass
class _Failed:
    error: BaseException


_END = object()


def stream(reply: Reply, messages: list[dict], sampling: Sampling, show: Callable[[str], None]) -> Done:
    """Run `reply` in a worker thread and show its text as it comes; Ctrl-C (KeyboardInterrupt
    in this thread) sets the cancel event and the reply ends early, with its Done."""
    cancel = threading.Event()
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            for event in reply(messages, sampling, cancel):
                events.put(event)
        except BaseException as e:  # handed over to the main thread
            events.put(_Failed(e))
        events.put(_END)

    worker = threading.Thread(target=work, name="localmix-reply", daemon=True)
    try:
        worker.start()
    except KeyboardInterrupt:  # it started; only the wait for it was cut short
        cancel.set()
    done, shown = None, []
    try:
        while True:
            try:
                event = events.get(timeout=0.1)
                if event is _END:
                    break
                if isinstance(event, _Failed):
                    raise event.error
                if isinstance(event, Done):
                    done = event
                elif event.text:
                    shown.append(event.text)
                    show(event.text)
            except queue.Empty:
                pass
            except KeyboardInterrupt:
                cancel.set()
    except BaseException:
        cancel.set()  # leaving early (the reply failed, or showing it did): stop the worker too
        raise
    finally:
        worker.join()
    if done is None:  # a reply that ended without its Done
        done = Done("cancelled" if cancel.is_set() else "eos", 0, 0, len(shown), 0.0, 0.0, "".join(shown))
    return done


# ---- the loop ----

class UI(Protocol):
    def read(self, continuation: bool = False) -> str: ...  # raises EOFError (quit), KeyboardInterrupt
    def begin_reply(self) -> None: ...
    def piece(self, text: str) -> None: ...
    def end_reply(self, text: str) -> None: ...
    def print(self, text: str) -> None: ...
    def info(self, text: str) -> None: ...  # one dim line
    def error(self, text: str) -> None: ...  # one line: a hint about what went wrong


class ChatSession:
    """One conversation: its messages, sampling parameters and statistics, and the loop."""

    def __init__(self, reply: Reply, *, sampling: Sampling | None = None, system: str | None = None,
                 n_ctx: int | None = None, count_tokens: CountTokens | None = None, model: str = "", memory: str = ""):
        self.reply, self.n_ctx, self.count_tokens, self.model = reply, n_ctx, count_tokens, model
        self.memory = memory  # what /show says about memory: weights, KV cache, compute, placement
        self.sampling = sampling or Sampling()
        self.conversation = Conversation(system or None)
        self.stats = Stats()

    def run(self, ui: UI) -> None:

        armed = False  # after one Ctrl-C at an empty prompt, a second one quits
        while True:
            try:
                text = read_message(ui)
            except EOFError:
                return
            except KeyboardInterrupt:
                if armed:
                    return
                armed = True
                ui.info("(Ctrl-C again, Ctrl-D or /exit quits)")
                continue
            armed = False
            block, body = unquote(text)
            if not body.strip():
                continue
            try:
                if not block and body.lstrip().startswith("/"):
                    if run_command(self, ui, body.strip()) is QUIT:
                        return
                else:
                    self.send(ui, body)
            except KeyboardInterrupt:  # a Ctrl-C that came between two steps: the session goes on
                ui.info("interrupted")

    def send(self, ui: UI, text: str) -> Done | None:
        before = list(self.conversation.turns)
        self.conversation.add_user(text)
        return self.answer(ui, before)

    def answer(self, ui: UI, restore: list[dict]) -> Done | None:
        """Stream a reply to the last user message; on an error, put the turns back as `restore`."""
        turns = self.conversation.turns
        try:
            if self.count_tokens and self.n_ctx:
                dropped = self.conversation.fit(self.count_tokens, self.n_ctx - self.room())
                if dropped:
                    what = f"{dropped} exchanges" if dropped > 1 else "exchange"
                    ui.info(f"the conversation outgrew the context ({self.n_ctx} tokens): dropped the oldest {what}")
            ui.begin_reply()
        except KeyboardInterrupt:  # before the reply began: nothing was sent
            turns[:] = restore
            ui.end_reply("")
            ui.info("interrupted before the reply began: the message was not sent")
            return None
        except LocalmixError as e:
            turns[:] = restore
            ui.error(str(e))
            return None
        done = None
        try:
            done = stream(self.reply, self.conversation.messages(), self.sampling, ui.piece)
        except LocalmixError as e:
            turns[:] = restore
            ui.error(str(e))
            return None
        finally:
            try:
                ui.end_reply(done.text if done else "")
            except KeyboardInterrupt:  # a late Ctrl-C while the reply was being drawn: draw it again
                ui.end_reply(done.text if done else "")
        turns.append({"role": "assistant", "content": done.text})
        self.stats.add(done)
        ui.info(stats_line(done))
        return done

    def room(self) -> int:
        """Tokens kept free for the reply when fitting the conversation into the context."""
        return min(self.sampling.max_tokens, self.n_ctx // 4)

    def context_used(self) -> int | None:
        """The tokens the conversation takes now (None when there is no counter)."""
        if not self.count_tokens:
            return None
        messages = self.conversation.messages()
        return self.count_tokens(messages) if messages else 0


def read_message(ui: UI) -> str:
    text = ui.read()
    while open_block(text):
        text += "\n" + ui.read(continuation=True)
    return text


def open_block(text: str) -> bool:
    """Whether `text` starts a \"\"\" block that has not been closed yet."""
    s = text.strip()
    return s.startswith(BLOCK) and (len(s) < 2 * len(BLOCK) or not s.endswith(BLOCK))


def unquote(text: str) -> tuple[bool, str]:
    """(was it a \"\"\" block, the message without the quotes)."""
    s = text.strip()
    if not s.startswith(BLOCK):
        return False, text.strip()
    s = s[len(BLOCK):]
    if s.endswith(BLOCK):
        s = s[: -len(BLOCK)]
    return True, s.strip("\n")


# ---- the real model ----

def engine_reply(engine) -> tuple[Reply, CountTokens]:
    """`reply` and `count_tokens` over a LlamaCppEngine: the conversation goes through the
    model's chat template; the engine reuses its KV cache when the new prompt extends the old."""
    from localmix.frontends.oneshot import conversation_tokens

    def reply(messages: list[dict], sampling: Sampling, cancel: threading.Event) -> Iterator[Piece | Done]:
        return engine.generate(conversation_tokens(engine, messages), sampling, cancel)

    def count_tokens(messages: list[dict]) -> int:
        return len(conversation_tokens(engine, messages))

    return reply, count_tokens


def history_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "localmix" / "chat_history"


def start(session: ChatSession, raw: bool = False, history: Path | None = None) -> None:
    """Run the chat on this process's terminal, or line by line when stdin is a pipe."""
    if sys.stdin.isatty():
        ui = TerminalUI(history, raw=raw or not sys.stdout.isatty())
        ui.info(f"chatting with {session.model}; /help lists the commands, Ctrl-D quits")
    else:
        ui = PlainUI(sys.stdin, sys.stdout, sys.stderr)
    session.run(ui)


# ---- terminals and pipes ----

class TerminalUI:
    """prompt_toolkit reads (line editing, history, \"\"\" blocks, bracketed paste), rich writes
    the reply as live Markdown (or the raw text with `raw`)."""

    def __init__(self, history: Path | None = None, raw: bool = False, console=None):
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.raw, self.text, self.live, self.replying = raw, "", None, False
        store = InMemoryHistory()
        if history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                history.touch()
                store = FileHistory(str(history))
            except OSError as e:
                self.info(f"no history: cannot write {history} ({e.strerror})")
        self.session = PromptSession(history=store, key_bindings=_key_bindings(), multiline=True,
                                     prompt_continuation=lambda width, line, wrap: "... ".rjust(width))

    def read(self, continuation: bool = False) -> str:
        return self.session.prompt("... " if continuation else ">>> ")

    def begin_reply(self) -> None:
        from rich.live import Live

        self.text, self.replying = "", True
        if not self.raw:
            self.live = Live(_Tail(lambda: self.text), console=self.console, refresh_per_second=12, transient=True)
            self.live.start()

    def piece(self, text: str) -> None:
        self.text += text  # the live region's thread draws it, 12 times a second
        if self.live is None:
            self.console.file.write(text)
            self.console.file.flush()

    def end_reply(self, text: str) -> None:
        from rich.markdown import Markdown

        if not self.replying:
            return
        self.replying = False
        text = text or self.text
        if self.live is None:
            if self.text and not self.text.endswith("\n"):
                self.console.file.write("\n")
            self.console.file.flush()
            return
        self.live.stop()
        self.live = None
        if text:
            self.console.print(Markdown(text))

    def print(self, text: str) -> None:
        self.console.print(text, markup=False)

    def info(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        self.console.print(text, style="yellow", markup=False)


class _Tail:
    """The last screenful of `text()` as Markdown, parsed when drawn: a live region taller than
    the terminal cannot be redrawn, so while streaming only the end shows; the whole reply is
    printed at the end."""

    def __init__(self, text: Callable[[], str]):
        self.text = text

    def __rich_console__(self, console, options):
        from rich.markdown import Markdown
        from rich.segment import Segment

        lines = console.render_lines(Markdown(self.text()), options, pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


def _key_bindings():
    """Enter sends the message unless a \"\"\" block is open; Ctrl-C clears the line, or, at an
    empty prompt, raises KeyboardInterrupt (the loop quits on the second)."""
    from prompt_toolkit.key_binding import KeyBindings

    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event):
        buffer = event.current_buffer
        if open_block(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @kb.add("c-c")
    def _interrupt(event):
        if event.current_buffer.text:
            event.current_buffer.reset()
        else:
            event.app.exit(exception=KeyboardInterrupt, style="class:aborting")

    return kb


class PlainUI:
    """Line by line from a pipe: replies as plain text on stdout, everything else on stderr."""

    def __init__(self, stdin, stdout, stderr):
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.ends_line = True

    def read(self, continuation: bool = False) -> str:
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    def begin_reply(self) -> None:
        self.ends_line = True

    def piece(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
        self.ends_line = text.endswith("\n")

    def end_reply(self, text: str) -> None:
        if not self.ends_line:
            self.stdout.write("\n")
            self.ends_line = True
        self.stdout.flush()

    def print(self, text: str) -> None:
        print(text, file=self.stdout, flush=True)

    def info(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def error(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)
