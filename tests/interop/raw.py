"""Raw HTTP helpers for the transport and auth tests: negotiate, polls, SSE reads, JSON records.

These speak the wire protocol directly (httpx, websockets) so tests can check status codes,
headers and bytes that the official clients hide.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

RS = b"\x1e"
JSON_HANDSHAKE = b'{"protocol":"json","version":1}\x1e'
MSGPACK_HANDSHAKE = b'{"protocol":"messagepack","version":1}\x1e'
SSE = {"Accept": "text/event-stream"}


def invocation(target: str, *args: Any, invocation_id: str | None = None, stream: bool = False) -> bytes:
    """One JSON hub invocation record (type 4 when ``stream``)."""
    message: dict[str, Any] = {"type": 4 if stream else 1, "target": target, "arguments": list(args)}
    if invocation_id is not None:
        message["invocationId"] = invocation_id
    return json.dumps(message).encode() + RS


def cancel(invocation_id: str) -> bytes:
    return json.dumps({"type": 5, "invocationId": invocation_id}).encode() + RS


def records(data: bytes) -> list[dict[str, Any]]:
    """The JSON records in ``data`` (handshake response included, as ``{}``)."""
    return [json.loads(part) for part in data.split(RS) if part]


async def negotiate(
    client: httpx.AsyncClient, path: str = "/testhub", headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """``(connectionId, connectionToken)`` from a version-1 negotiate."""
    response = await client.post(f"{path}/negotiate?negotiateVersion=1", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["connectionId"], body["connectionToken"]


async def poll(
    client: httpx.AsyncClient, path: str, token: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.get(f"{path}?id={token}&_={time.time_ns()}", headers=headers)


async def post(
    client: httpx.AsyncClient, path: str, token: str, data: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(f"{path}?id={token}", content=data, headers=headers)


async def poll_records(
    client: httpx.AsyncClient,
    path: str,
    token: str,
    want: int = 1,
    timeout: float = 5.0,
    headers: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Poll until ``want`` records arrived (bounded by ``timeout``), returning all of them."""
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = await poll(client, path, token, headers)
        assert response.status_code == 200, (response.status_code, response.text)
        got += records(response.content)
        if len(got) >= want:
            return got
    raise AssertionError(f"only {got} within {timeout} s")


async def start_long_polling(
    client: httpx.AsyncClient, path: str = "/testhub", headers: dict[str, str] | None = None
) -> tuple[str, str]:
    """Negotiate, first poll, hub handshake: a connected long-polling JSON hub connection."""
    connection_id, token = await negotiate(client, path, headers)
    first = await poll(client, path, token, headers)
    assert first.status_code == 200 and first.content == b""
    assert (await post(client, path, token, JSON_HANDSHAKE, headers)).status_code == 200
    assert await poll_records(client, path, token, headers=headers) == [{}]
    return connection_id, token


class SseReader:
    """Incremental reads of an open SSE response, each bounded by a timeout."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._chunks: AsyncIterator[bytes] = response.aiter_raw()
        self.buffer = b""

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        """Everything up to and including ``marker`` (the rest stays buffered)."""
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{marker!r} not seen; have {self.buffer!r}")
            self.buffer += await asyncio.wait_for(anext(self._chunks), remaining)
        end = self.buffer.index(marker) + len(marker)
        head, self.buffer = self.buffer[:end], self.buffer[end:]
        return head

    async def read_event(self, timeout: float = 5.0) -> bytes:
        return await self.read_until(b"\r\n\r\n", timeout)

    async def at_end(self, timeout: float = 5.0) -> bool:
        """True when the server ends the stream within ``timeout`` (after any buffered bytes)."""
        try:
            while True:
                self.buffer += await asyncio.wait_for(anext(self._chunks), timeout)
        except StopAsyncIteration:
            return True
        except TimeoutError:
            return False


def event_payload(event: bytes) -> bytes:
    """The payload of one SSE event (``data:`` lines joined by newlines)."""
    lines = event.removesuffix(b"\r\n\r\n").split(b"\r\n")
    assert all(line.startswith(b"data: ") for line in lines), event
    return b"\n".join(line[len(b"data: ") :] for line in lines)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Wait (bounded) until ``check()`` is true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


async def disconnects(client: httpx.AsyncClient, connection_id: str) -> int:
    """How many times the interop app's TestHub.on_disconnected ran for ``connection_id``."""
    return int((await client.get(f"/disconnected/{connection_id}")).text)
