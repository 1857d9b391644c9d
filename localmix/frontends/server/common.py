"""What every API dialect shares: the server's state, its errors, prompt tokens, and running a
generation on the scheduler as an async stream of events.

`ApiError(status, message, param)` is raised by a dialect and rendered by app.py in the shape of
the dialect the path belongs to (OpenAI's `{"error": {...}}`, ollama's `{"error": "..."}`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from localmix.errors import InputError
from localmix.runtime.llama import LlamaCppEngine
from localmix.runtime.prompt import chat_tokens
from localmix.runtime.scheduler import Busy, Job, Scheduler, Scored
from localmix.runtime.stream import Done, Piece, Sampling


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}


@dataclass
class Options:
    """How the server was started (the CLI's flags)."""
    model_name: str
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]", "::1")
    cors: tuple[str, ...] = ()
    max_body: int = 4 << 20
    sampling: Sampling = field(default_factory=lambda: Sampling(max_tokens=1024))
    retry_after: int = 2
    webui: bool = True  # the chat page at / (serve --no-webui: off)


@dataclass
class State:
    options: Options
    engine: LlamaCppEngine | None = None  # once loaded; the scheduler decodes on its model
    scheduler: Scheduler | None = None
    load_error: str | None = None
    lost_workers: list[str] | None = None   # --rpc workers gone while serving: the model is unusable
    started: float = field(default_factory=time.time)
    http_requests: dict[tuple[str, int], int] = field(default_factory=dict)
    inbox: Inbox | None = None              # the scheduler's events on their way to the event loop

    @property
    def ready(self) -> bool:
        return self.scheduler is not None

    def require(self) -> Scheduler:
        if self.scheduler is None or self.lost_workers is not None:
            raise ApiError(503, self.load_error or "the model is still loading", kind="server_error",
                           headers={"Retry-After": str(self.options.retry_after)})
        return self.scheduler

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.options.model_name, "localmix"):
            raise ApiError(404, f"the model {name!r} does not exist; this server has {self.options.model_name!r}",
                           param="model", code="model_not_found")


def chat_prompt(state: State, messages: list[dict]) -> list[int]:
    """The prompt tokens of a conversation: the one function the dialects call for it."""
    try:
        tokens = chat_tokens(state.engine.vocab, state.engine.metadata, messages)
    except InputError as e:
        raise ApiError(400, str(e), param="messages") from None
    return check_context(state, tokens)


def text_prompt(state: State, text: str) -> list[int]:
    """A raw completion prompt: BOS, then the text (control tokens written in it are parsed)."""
    return check_context(state, state.engine.tokenize(text, add_bos=True, special=True))


def check_context(state: State, tokens: list[int]) -> list[int]:
    n_ctx = state.scheduler.n_ctx
    if len(tokens) >= n_ctx:
        raise ApiError(400, f"the prompt has {len(tokens)} tokens but the context holds {n_ctx}; shorten it "
                       "(or restart the server with a larger --ctx)", param="messages", code="context_length_exceeded")
    return tokens


def sampling_from(state: State, *, temperature=None, top_p=None, top_k=None, min_p=None, repeat_penalty=None,
                  seed=None, max_tokens=None, stop=None) -> Sampling:
    """The server's sampling (its flags), overridden by what the request set."""
    base = state.options.sampling
    if isinstance(stop, str):
        stop = [stop]
    return Sampling(temperature=base.temperature if temperature is None else temperature,
                    top_k=base.top_k if top_k is None else top_k, top_p=base.top_p if top_p is None else top_p,
                    min_p=base.min_p if min_p is None else min_p,
                    repeat_penalty=base.repeat_penalty if repeat_penalty is None else repeat_penalty,
                    seed=base.seed if seed is None else seed,
                    max_tokens=base.max_tokens if max_tokens is None else max_tokens,
                    stop=tuple(s for s in (stop or base.stop) if s))


class Inbox:
    """The scheduler's events on their way to the event loop, handed over in batches: the
    scheduler thread collects them (`put`), and its `handover` hook (`flush`, just before each
    decode and before it sleeps) passes a batch to the loop with one `call_soon_threadsafe`.

    Each hand-over is a write to the loop's self-pipe, after which both threads want the GIL,
    and each batch costs the loop a pass through every stream's response; per token, on 2 cores
    at 8 clients, a tenth of the scheduler thread's time went to those writes. So a batch goes
    at most every `INTERVAL` seconds (10 ms: less than a frame of a 60 Hz screen), except that a
    request's first token, its end and errors go at once (time to the first token is not
    delayed). A model whose step takes longer than that hands over at every step; a fast one
    hands over several tokens of a stream together, which `coalesced` writes at once."""

    INTERVAL = 0.010

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()  # puts come from the scheduler thread, an abandon from a watcher
        self.pending: list[tuple[asyncio.Queue, object]] = []
        self.urgent = False
        self.sent = 0.0

    @classmethod
    def of(cls, state: State) -> Inbox:
        """The inbox of the running loop, made once and hooked to the scheduler."""
        loop = asyncio.get_running_loop()
        if state.inbox is None or state.inbox.loop is not loop:
            state.inbox = cls(loop)
            state.scheduler.handover = state.inbox.flush
        return state.inbox

    def put(self, queue: asyncio.Queue, item, urgent: bool) -> None:
        with self.lock:
            self.pending.append((queue, item))
            self.urgent = self.urgent or urgent

    def flush(self) -> None:
        now = time.monotonic()
        with self.lock:
            if not self.pending or (not self.urgent and now - self.sent < self.INTERVAL):
                return
            batch, self.pending, self.urgent, self.sent = self.pending, [], False, now
        try:
            self.loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the loop is closed: the server is gone, and nobody waits
            pass


def _deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


class Run:
    """One request's jobs on the scheduler (several for OpenAI's `n`: the first job and its
    forks), submitted at once (a full queue is a 503 before any byte of the reply is sent).
    `async for index, event in run.tagged()` yields each job's Scored, Piece and Done events,
    tagged with the job's index; `async for event in run` is that for a run of one job.
    Leaving early (a client that disconnected, an error) cancels every sequence of the run."""

    def __init__(self, state: State, job_kwargs: dict | list[dict]):
        self.scheduler = state.require()
        inbox = Inbox.of(state)
        self.queue: asyncio.Queue = asyncio.Queue()
        kwargs = [job_kwargs] if isinstance(job_kwargs, dict) else job_kwargs
        self.jobs = [Job(emit=self._emitter(inbox, i), **kw) for i, kw in enumerate(kwargs)]
        self.scores: list[list[Scored]] = [[] for _ in self.jobs]  # what the jobs' Scored events said
        self.finished = False
        try:
            self.scheduler.submit(*self.jobs)
        except Busy:
            raise ApiError(503, "the server is busy: every slot is taken and the queue is full; retry shortly",
                           kind="server_error", code="overloaded",
                           headers={"Retry-After": str(state.options.retry_after)}) from None

    def _emitter(self, inbox: Inbox, index: int):
        started = [False]

        def emit(event) -> None:  # on the scheduler thread
            # until the first text (a first token may show none yet), the end, errors: at once
            urgent = not started[0] or not isinstance(event, (Piece, Scored))
            started[0] = started[0] or (isinstance(event, Piece) and bool(event.text))
            inbox.put(self.queue, (index, event), urgent)
        return emit

    async def tagged(self) -> AsyncIterator[tuple[int, Scored | Piece | Done]]:
        running = len(self.jobs)
        try:
            while running:
                index, event = await self.queue.get()
                if isinstance(event, Exception):
                    self.finished = True
                    if isinstance(event, ValueError):
                        raise ApiError(400, str(event))
                    raise event
                if isinstance(event, Scored):
                    self.scores[index].append(event)
                if isinstance(event, Done):
                    running -= 1
                    self.finished = not running
                yield index, event
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[Scored | Piece | Done]:
        async for _, event in self.tagged():
            yield event

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            for job in self.jobs:
                self.scheduler.cancel(job)


async def coalesced(chunks: AsyncIterator[bytes], run: Run) -> AsyncIterator[bytes]:
    """A streamed reply's chunks, those made while more of the run's events were already waiting
    joined into one write (each still its own SSE event or NDJSON line): a batch from the
    `Inbox` with several tokens of a stream costs one pass through the ASGI stack and one send."""
    parts = []
    try:
        async for part in chunks:
            parts.append(part)
            if run.queue.empty():
                yield b"".join(parts)
                parts = []
        if parts:
            yield b"".join(parts)
    finally:
        await chunks.aclose()  # its own cleanup (cancelling the run) now, not when collected


async def collect(run: Run, request=None) -> Done:
    """Run a job to its end; with `request`, a client that disconnects cancels it."""
    return (await collect_all(run, request))[0]


async def collect_all(run: Run, request=None) -> list[Done]:
    """Run every job of `run` to its end (their Done by index); with `request`, a client that
    disconnects cancels them."""
    async def drain() -> list[Done]:
        dones: list[Done | None] = [None] * len(run.jobs)
        async for index, event in run.tagged():
            if isinstance(event, Done):
                dones[index] = event
        if any(d is None for d in dones):
            raise ApiError(500, "the generation ended without a result", kind="server_error")
        return dones

    task = asyncio.ensure_future(drain())
    if request is None:
        return await task
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    run.close()
    raise ApiError(499, "the client closed the connection", kind="server_error")


async def _disconnected(request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# characters JSON leaves raw that Python's str.splitlines, and so httpx's iter_lines (the ollama
# and mistralai clients read streams with it), takes for line breaks: one in a token would cut
# a streamed line in two
LINE_BREAKS = {"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def json_line(obj, **kwargs) -> str:
    """`obj` as JSON on one line, whatever splits the line: UTF-8 as it is (ensure_ascii=False),
    but the three characters a line reader may break at escaped (JSON's own escapes for them).
    Three `replace` calls: each is a C scan (80 ns for a token's event, where `str.translate`
    with a table takes 3 us), and this runs for every token streamed."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    for char, escaped in LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text


def sse(obj) -> bytes:
    return b"data: " + json_line(obj, separators=(",", ":")).encode() + b"\n\n"
