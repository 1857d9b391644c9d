"""Reading a chat message and showing a reply, for `localmix chat`: \"\"\" blocks and two UIs.

A message that starts with \"\"\" goes on over several lines until one ends with \"\"\"
(`read_message`, `open_block`, `unquote`). `TerminalUI`: prompt_toolkit reads (line editing, a
history file, bracketed paste; Enter inside an open block adds a line), rich writes the reply as
live Markdown (or the raw text). `PlainUI`: a pipe, line by line, the reply on stdout and
everything else on stderr. Both are session.py's `UI`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from localmix.frontends.session import UI

BLOCK = '"""'  # a message that starts with it goes on until a line that ends with it


# ---- messages of several lines ----

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
