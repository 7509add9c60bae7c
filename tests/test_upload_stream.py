"""UploadStream (client-to-server stream buffer): completion must never drop buffered items."""

from __future__ import annotations

import asyncio

import pytest

from hubwire import HubException
from hubwire.hubs.streams import UploadStream


async def _fill(stream: UploadStream, items: range) -> None:
    for item in items:
        await asyncio.wait_for(stream.put(item), 1)


def test_complete_with_a_full_buffer_keeps_every_item() -> None:
    async def scenario() -> list[int]:
        stream = UploadStream(10, None)
        await _fill(stream, range(1, 11))  # buffer full: the hub method has not read yet
        stream.complete()
        return [item async for item in stream]

    assert asyncio.run(scenario()) == list(range(1, 11))


def test_error_with_a_full_buffer_keeps_every_item_then_raises() -> None:
    async def scenario() -> tuple[list[int], str]:
        stream = UploadStream(3, None)
        await _fill(stream, range(3))
        stream.complete("Something bad")
        got: list[int] = []
        with pytest.raises(HubException) as err:
            async for item in stream:
                got.append(item)
        with pytest.raises(HubException):  # stays failed
            await stream.__anext__()
        return got, str(err.value)

    assert asyncio.run(scenario()) == ([0, 1, 2], "Something bad")


def test_complete_with_room_ends_after_the_items() -> None:
    async def scenario() -> list[int]:
        stream = UploadStream(10, None)
        await _fill(stream, range(4))
        stream.complete()
        items = [item async for item in stream]
        with pytest.raises(StopAsyncIteration):  # stays ended
            await stream.__anext__()
        return items

    assert asyncio.run(scenario()) == [0, 1, 2, 3]
