"""The outbound side of a connection: a synchronous append, drained by one writer per connection.

Why: a broadcast touching thousands of connections must do no awaiting and
create no task per recipient. ``Outbox.write`` appends; each transport drains
its outbox in its own single writer loop (or, natively served WebSockets,
through a *sink* flushed once per event-loop iteration), coalescing whatever
piled up into one frame / event / poll response.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Outbox"]


#: outboxes with a sink and unsent records, flushed together at the end of the loop iteration
_dirty: list[Outbox] = []


def _flush_dirty() -> None:
    """Hand every dirty outbox's records to its sink; one frame memo for the whole pass.

    A broadcast leaves the same bytes object in many outboxes, so the sink
    frames it once and writes the same frame to every socket.
    """
    batch = _dirty[:]
    _dirty.clear()
    memo: dict[int, tuple[bytes, bytes]] = {}
    for outbox in batch:
        sink = outbox.sink
        outbox.dirty = False
        if sink is not None and outbox._chunks:
            sink.flush(outbox, memo)


class Outbox:
    """Outbound bytes of one connection, drained by the transport's single writer loop.

    ``write`` never awaits: it appends and wakes the writer if it is idle.
    ``max_buffered`` bounds memory for slow consumers: once more than that many
    bytes wait while the writer is stuck sending earlier ones (or, for long
    polling, no poll is waiting), ``on_overflow`` is called and the owner closes
    the connection instead of growing without bound.
    """

    __slots__ = (
        "_chunks",
        "_closed",
        "_waiter",
        "_woken",
        "buffered",
        "dirty",
        "max_buffered",
        "on_overflow",
        "sent",
        "sent_bytes",
        "sink",
        "wrote",
    )

    def __init__(self, max_buffered: int | None = None) -> None:
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        #: the writer was woken and will take everything queued at its next step
        self._woken = False
        self._closed = False
        self.buffered = 0
        self.max_buffered = max_buffered
        self.on_overflow: Any = None
        #: set on every write; the heartbeat clears it to decide when a keep-alive ping is due
        self.wrote = False
        #: native mode: writes go to this sink once per loop iteration instead of the writer loop
        self.sink: Any = None
        self.dirty = False
        #: records and bytes queued so far (metrics: plain ints, summed at scrape time)
        self.sent = 0
        self.sent_bytes = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        """Queue bytes for the transport (dropped silently once the outbox is closed)."""
        if self._closed:
            return
        self._chunks.append(data)
        size = len(data)
        self.buffered += size
        self.sent += 1
        self.sent_bytes += size
        self.wrote = True
        if self.sink is not None:
            if not self.dirty:
                # native mode: flushed once per loop iteration, all dirty sockets in one pass
                self.dirty = True
                _dirty.append(self)
                if len(_dirty) == 1:
                    asyncio.get_running_loop().call_soon(_flush_dirty)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True
        # over the bound while the writer is busy (blocked sending earlier bytes to a client that
        # does not read) or absent (no long poll waiting): a slow consumer. Bytes written while
        # the writer is about to take them anyway (one burst) do not count.
        if (
            self.max_buffered is not None
            and self.buffered > self.max_buffered
            and not self._woken
            and self.on_overflow
        ):
            callback, self.on_overflow = self.on_overflow, None
            callback()

    def close(self) -> None:
        """No more writes; the writer drains what is queued, then sees the end."""
        sink = self.sink
        if sink is not None and not self._closed:
            if self._chunks:
                sink.flush(self)
            self._closed = True
            sink.closed()
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_nowait(self) -> list[bytes]:
        """Everything queued right now (possibly nothing)."""
        chunks = self._chunks
        self._chunks = []
        self.buffered = 0
        self._woken = False
        return chunks

    def put_back(self, chunks: list[bytes]) -> None:
        """Queue again, first, what a long poll took but could not deliver (its client was gone).

        Why: a poll takes everything queued before it writes; when its client turns out to be
        gone, the bytes belong to the next poll, in their original order.
        """
        if not chunks:
            return
        self._chunks[:0] = chunks
        self.buffered += sum(len(c) for c in chunks)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True

    async def take(self) -> list[bytes] | None:
        """Wait for queued bytes and return them all; None once closed and drained."""
        while not self._chunks:
            if self._closed:
                return None
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        return self.take_nowait()

    async def wait_readable(self, timeout: float | None) -> bool:
        """Wait until something is queued or the outbox closes; False on timeout."""
        if self._chunks or self._closed:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            if self._waiter is waiter:
                self._waiter = None
            return False
        return True
