"""A chat conversation and one streamed reply, for `localmix chat` (the loop is chat.py).

`Conversation` holds the system prompt and the user/assistant turns and fits them into the
context (dropping the oldest exchanges, never the system prompt); `Stats` adds up the replies'
token counts and times. `stream(reply, messages, sampling, show)` runs a `Reply` callable,
`reply(messages, sampling, cancel)` -> Piece events then one Done, on a worker thread and shows
its text as it comes: the main thread stays free to take Ctrl-C (a KeyboardInterrupt), which
sets `cancel`; the engine stops between two tokens and ends with its Done. `engine_reply(engine)`
is that callable over a real engine; the tests pass a fake. `UI` is what the chat reads from and
writes to (terminal.py has the two kinds).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

from localmix.runtime.stream import Done, Piece, Sampling

Reply = Callable[[list[dict], Sampling, threading.Event], Iterator[Piece | Done]]
CountTokens = Callable[[list[dict]], int]


class UI(Protocol):
    def read(self, continuation: bool = False) -> str: ...  # raises EOFError (quit), KeyboardInterrupt
    def begin_reply(self) -> None: ...
    def piece(self, text: str) -> None: ...
    def end_reply(self, text: str) -> None: ...
    def print(self, text: str) -> None: ...
    def info(self, text: str) -> None: ...  # one dim line
    def error(self, text: str) -> None: ...  # one line: a hint about what went wrong


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


def stream(reply: Reply, messages: list[dict], sampling: Sampling, show: Callable[[str], None],
           failed: Callable[[], BaseException | None] | None = None) -> Done:
    """Run `reply` in a worker thread and show its text as it comes; Ctrl-C (KeyboardInterrupt
    in this thread) sets the cancel event and the reply ends early, with its Done. `failed()`,
    asked while waiting, returns an error when the engine cannot go on (an RPC worker lost):
    it is raised here and the worker thread, stuck in the engine, is left behind."""
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
                if failed is not None and failed() is not None:
                    raise failed() from None
            except KeyboardInterrupt:
                cancel.set()
    except BaseException:
        cancel.set()  # leaving early (the reply failed, or showing it did): stop the worker too
        raise
    finally:
        if failed is None or failed() is None:
            worker.join()
    if done is None:  # a reply that ended without its Done
        done = Done("cancelled" if cancel.is_set() else "eos", 0, 0, len(shown), 0.0, 0.0, "".join(shown))
    return done


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
