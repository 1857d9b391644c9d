"""How `localmix serve` hands the scheduler's events to the event loop (server/common.py's
Inbox and `coalesced`): a request's first token, its end and errors go at once; the tokens
between wait at most `Inbox.INTERVAL` and then go together; a stream writes the chunks of
events that arrived together as one."""

from __future__ import annotations

import asyncio
import time

from localmix.frontends.server.common import Inbox, coalesced
from localmix.runtime.stream import Done, Piece


class Loop:
    """Stands in for the event loop: records what would be scheduled on it."""

    def __init__(self):
        self.calls = []

    def call_soon_threadsafe(self, fn, *args):
        self.calls.append((fn, args))


def test_first_token_and_end_go_at_once_the_rest_every_interval():
    loop = Loop()
    inbox = Inbox(loop)
    q = object()
    inbox.put(q, (0, Piece(1, "a")), urgent=True)       # a first token
    inbox.flush()
    assert len(loop.calls) == 1 and loop.calls[0][1][0] == [(q, (0, Piece(1, "a")))]
    inbox.put(q, (0, Piece(2, "b")), urgent=False)
    inbox.flush()
    inbox.put(q, (0, Piece(3, "c")), urgent=False)
    inbox.flush()
    assert len(loop.calls) == 1                          # within the interval: held
    time.sleep(Inbox.INTERVAL * 1.5)
    inbox.flush()
    assert len(loop.calls) == 2 and [e[1][1].token for e in loop.calls[1][1][0]] == [2, 3]
    inbox.put(q, (0, Piece(4, "d")), urgent=False)
    inbox.put(q, (0, Done("length", 3, 3, 4, 0.0, 0.0)), urgent=True)  # the end takes what waits with it
    inbox.flush()
    assert len(loop.calls) == 3 and len(loop.calls[2][1][0]) == 2
    inbox.flush()
    assert len(loop.calls) == 3                          # nothing left


def test_chunks_of_events_that_arrived_together_are_one_write():
    class Run:
        queue: asyncio.Queue

    async def main():
        run = Run()
        run.queue = asyncio.Queue()
        for i in range(3):
            run.queue.put_nowait(i)
        closed = []

        async def body():
            try:
                yield b"head;"                    # made before the events
                while True:
                    event = await run.queue.get()
                    yield f"{event};".encode()
                    if event == 4:
                        return
            finally:
                closed.append(True)

        writes = []
        stream = coalesced(body(), run)
        writes.append(await stream.__anext__())   # the queue holds 3: the head goes with them
        run.queue.put_nowait(3)
        run.queue.put_nowait(4)
        async for chunk in stream:
            writes.append(chunk)
        return writes, closed

    writes, closed = asyncio.run(main())
    assert writes == [b"head;0;1;2;", b"3;4;"] and closed == [True]
