"""Client-to-server (upload) streams handed to hub methods as async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from ..exceptions import HubException

__all__ = ["UploadStream"]


class UploadStream:
    """A client-to-server stream handed to a hub method as an async iterator.

    Holds at most ``capacity`` items; when full, the connection's reader waits
    (back-pressure on the whole connection, as in SignalR).
    """

    _END = object()

    def __init__(self, capacity: int, convert: Callable[[Any], Any] | None) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=max(1, capacity))
        self._convert = convert
        self._error: BaseException | None = None
        self._end_pending = False

    async def put(self, item: Any) -> None:
        await self._queue.put(item)

    def complete(self, error: str | None = None) -> None:
        if error is not None:
            self._error = HubException(error)
        try:
            self._queue.put_nowait(self._END)
        except asyncio.QueueFull:  # reader is behind: queue the end once it has taken an item
            self._end_pending = True

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if self._end_pending:  # the get made room for the end marker (never drop buffered items)
            self._end_pending = False
            self._queue.put_nowait(self._END)
        if item is self._END:
            self._queue.put_nowait(self._END)  # stay ended for further reads
            if self._error is not None:
                raise self._error
            raise StopAsyncIteration
        if self._convert is not None:
            try:
                return self._convert(item)
            except msgspec.ValidationError as exc:
                raise HubException(f"Error binding stream item: {exc}") from None
        return item
