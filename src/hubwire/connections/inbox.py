"""Inbound bytes waiting for the application, bounded by bytes, shared by every reading transport.

Why: reading and handling are apart. The application may hold its input back
for long (an invocation waiting for the slot a running one holds, a full
upload buffer) while a disconnect must still be seen at once, so the reader
keeps reading into this inbox; past the high-water mark it pauses reading
(back-pressure to the client), below the low-water mark it resumes. Each chunk
also counts a fixed overhead, so a flood of tiny frames is bounded as well as
a few big ones.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

__all__ = ["Inbox"]

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
#: what one queued chunk costs beyond its payload (the bytes object, the deque slot)
CHUNK_OVERHEAD = 64


class Inbox:
    """Chunks in arrival order; ``pause`` / ``resume`` are called at the water marks."""

    __slots__ = ("_chunks", "_pause", "_paused", "_resume", "_waiter", "high", "low", "size")

    def __init__(
        self,
        pause: Callable[[], None],
        resume: Callable[[], None],
        high: int = HIGH_WATER,
        low: int = LOW_WATER,
    ) -> None:
        #: created on the first chunk and dropped once drained (an idle connection holds no deque)
        self._chunks: deque[bytes] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.high = high
        self.low = low
        #: bytes counted against the marks (payload plus per-chunk overhead)
        self.size = 0

    def __len__(self) -> int:
        return len(self._chunks) if self._chunks is not None else 0

    def put(self, data: bytes) -> None:
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = deque()
        chunks.append(data)
        self.size += len(data) + CHUNK_OVERHEAD
        if self.size > self.high and not self._paused:
            self._paused = True
            self._pause()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def get_nowait(self) -> bytes | None:
        """The oldest chunk, or None when empty (resumes reading below the low-water mark)."""
        chunks = self._chunks
        if not chunks:
            return None
        data = chunks.popleft()
        if not chunks:
            self._chunks = None
        self.size -= len(data) + CHUNK_OVERHEAD
        if self._paused and self.size < self.low:
            self._paused = False
            self._resume()
        return data

    async def get(self) -> bytes:
        """Wait for the oldest chunk."""
        while not self._chunks:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self.get_nowait()
        assert data is not None
        return data

    def clear(self) -> None:
        """Drop everything (the connection is over: nothing it sent still needs handling)."""
        self._chunks = None
        self.size = 0
