"""`localmix chat`: a conversation in the terminal, streamed as the model writes it.

`ChatSession.run(ui)` reads a message, fits the conversation into the context (dropping the
oldest exchanges, never the system prompt), streams the reply and prints one stats line. It
knows nothing of models: it is given a `Reply` callable, `reply(messages, sampling, cancel)`
-> Piece events then one Done; `chat` passes `engine_reply(engine)`, the tests a fake.
`start(session)` runs it on this process's terminal, or on a pipe; `chat` opens a model and
starts a session with it.

The jobs around the loop have their own modules: session.py (the conversation, and one reply
streamed on a worker thread so that Ctrl-C stops it between two tokens, the partial reply
staying in the conversation), terminal.py (\"\"\" blocks, the terminal and pipe UIs) and
commands.py (the slash commands).
"""

from __future__ import annotations

import sys
from pathlib import Path

from localmix.errors import LocalmixError
from localmix.frontends.commands import QUIT, run_command
from localmix.frontends.load import open_engine
from localmix.frontends.options import Load
from localmix.frontends.render import stats_line
from localmix.frontends.session import UI, Conversation, CountTokens, Reply, Stats, engine_reply, stream
from localmix.frontends.terminal import PlainUI, TerminalUI, read_message, unquote
from localmix.paths import data_dir
from localmix.runtime.planner import placement_line
from localmix.runtime.stream import Done, Sampling


class ChatSession:
    """One conversation: its messages, sampling parameters and statistics, and the loop."""

    def __init__(self, reply: Reply, *, sampling: Sampling | None = None, system: str | None = None,
                 n_ctx: int | None = None, count_tokens: CountTokens | None = None, model: str = "", memory: str = ""):
        self.reply, self.n_ctx, self.count_tokens, self.model = reply, n_ctx, count_tokens, model
        self.memory = memory  # what /show says about memory: weights, KV cache, compute, placement
        self.sampling = sampling or Sampling()
        self.conversation = Conversation(system or None)
        self.stats = Stats()
        self.failed = None  # () -> the error that ended the engine (an RPC worker lost), or None

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
            done = stream(self.reply, self.conversation.messages(), self.sampling, ui.piece, self.failed)
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


def worker_lost(gone: list[str], rpc: str | None) -> LocalmixError:
    """The chat's line for a lost RPC worker: the session goes on (/save keeps it), the model
    must be loaded again."""
    from localmix.runtime.rpc import WorkerLost, lost_line, parse_endpoints

    return WorkerLost(lost_line(gone, parse_endpoints(rpc) if rpc else []) + ": /save the conversation if you "
                      "want it, then start the chat again")


def history_path() -> Path:
    return data_dir() / "chat_history"


def chat(model: Path, load: Load, sampling: Sampling, system: str | None = None, raw: bool = False,
         history: bool = True) -> None:
    """`localmix chat`: open the model as `load` says and chat with it on this terminal."""
    lost: list[LocalmixError] = []  # set from llama.cpp's thread when an RPC worker goes away
    engine = open_engine(model, load, on_lost=lambda gone, message: lost.append(worker_lost(gone, load.rpc)))
    reply, count_tokens = engine_reply(engine)

    def guarded(messages, sampling, cancel):
        if lost:  # the engine waits on the lost worker for ever: never call it again
            raise lost[0]
        yield from reply(messages, sampling, cancel)

    session = ChatSession(guarded, sampling=sampling, system=system, n_ctx=engine.n_ctx, count_tokens=count_tokens,
                          model=str(model), memory=placement_line(engine.plan))
    session.failed = lambda: lost[0] if lost else None
    start(session, raw=raw, history=history_path() if history else None)
    if lost:  # llama.cpp's threads wait on the lost worker for ever: leave without its exit handlers
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def start(session: ChatSession, raw: bool = False, history: Path | None = None) -> None:
    """Run the chat on this process's terminal, or line by line when stdin is a pipe."""
    if sys.stdin.isatty():
        ui = TerminalUI(history, raw=raw or not sys.stdout.isatty())
        ui.info(f"chatting with {session.model}; /help lists the commands, Ctrl-D quits")
    else:
        ui = PlainUI(sys.stdin, sys.stdout, sys.stderr)
    session.run(ui)
