"""What one side of a link has queued for the other, and the writer's pace: shared by both sides.

Frames are queued as encoded bytes and sent by the link's single writer, all that is queued
at once, cut into WebSocket messages of at most 64 KiB (the other side's server bounds each
message). ``writable`` is the link's back-pressure: cleared past 4 MiB queued, set again once
the writer is back under 1 MiB, so only the connections of a slow link wait. Nothing queued
for 5 seconds sends a Ping: the other side drops a link silent for 30.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from ..protocol.service import Ping, encode_frame

__all__ = ["BACKLOG_HIGH", "BACKLOG_LOW", "LINK_MESSAGE", "LINK_PING", "Outgoing"]

BACKLOG_HIGH = 4 * 1024 * 1024
BACKLOG_LOW = 1024 * 1024
#: largest WebSocket message a link's writer sends (frames are a byte stream, cut anywhere)
LINK_MESSAGE = 64 * 1024
#: a link's keep-alive (both sides)
LINK_PING = 5.0
_PING = encode_frame(Ping())


class Outgoing:
    """The frames a link's writer has yet to send, and how many bytes are queued or in flight."""

    def __init__(self) -> None:
        self._frames: list[bytes] = []
        self._wake = asyncio.Event()
        #: bytes queued and not yet sent (a batch being written counts until it is written)
        self.queued = 0
        self.writable = asyncio.Event()
        self.writable.set()

    def put(self, data: bytes) -> None:
        self._frames.append(data)
        self.queued += len(data)
        if self.queued > BACKLOG_HIGH:
            self.writable.clear()
        self._wake.set()

    async def batch(self) -> bytes:
        """Everything queued, once there is something (or a Ping after :data:`LINK_PING`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), LINK_PING)
        self._wake.clear()
        if not self._frames:  # (not through put: that would wake the next call at once)
            self._frames.append(_PING)
            self.queued += len(_PING)
        frames, self._frames = self._frames, []
        return b"".join(frames)

    @staticmethod
    def messages(data: bytes) -> Iterator[bytes]:
        for start in range(0, len(data), LINK_MESSAGE):
            yield data[start : start + LINK_MESSAGE]

    def sent(self, size: int) -> None:
        """A batch of ``size`` bytes went out."""
        self.queued = max(0, self.queued - size)
        if self.queued <= BACKLOG_LOW:
            self.writable.set()

    def clear(self) -> None:
        """The link is gone: drop what is queued; whoever waits for room sees it at once."""
        self._frames.clear()
        self.queued = 0
        self.writable.set()
        self._wake.set()
