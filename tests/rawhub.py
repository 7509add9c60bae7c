"""A minimal raw SignalR hub client over the ``websockets`` library, for wire-level tests.

It decodes what the server sends independently of hubwire's own codecs
(``json`` for JSON records, ``msgspec`` + a local varint reader for
MessagePack), records the type of every frame received (``str`` = Text,
``bytes`` = Binary), and bounds every wait.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

RS = "\x1e"
WAIT = 10.0


def ws_url(http_url: str, path: str = "/hub", query: str = "") -> str:
    url = http_url.replace("http://", "ws://", 1) + path
    return f"{url}?{query}" if query else url


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def frame_msgpack(value: Any) -> bytes:
    body = msgspec.msgpack.encode(value)
    return varint(len(body)) + body


def _split_msgpack(buf: bytearray) -> list[bytes]:
    records = []
    while buf:
        length = shift = used = 0
        for byte in buf[:5]:
            used += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            break
        if buf[used - 1] & 0x80 or len(buf) < used + length:
            break
        records.append(bytes(buf[used : used + length]))
        del buf[: used + length]
    return records


async def open_ws(url: str, **kwargs: Any) -> ClientConnection:
    return await connect(url, open_timeout=WAIT, close_timeout=2, max_size=None, ping_interval=None, **kwargs)


class RawHub:
    """One hub connection speaking ``json`` (Text frames) or ``messagepack`` (Binary frames).

    Messages are returned as dicts (JSON) or lists (MessagePack), exactly as decoded.
    """

    def __init__(self, ws: ClientConnection, protocol: str) -> None:
        self.ws = ws
        self.protocol = protocol
        self.binary = protocol == "messagepack"
        self.frame_types: list[type] = []
        #: Ping messages dropped by next_message(skip_pings=True)
        self.skipped_pings = 0
        self._buffer = bytearray()
        self._records: deque[bytes] = deque()
        #: messages that arrived while invoke() waited for its Completion, returned by next_message first
        self._stash: deque[Any] = deque()
        self._ids = itertools.count(1)

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, http_url: str, path: str = "/hub", protocol: str = "json", query: str = "", version: int = 1
    ) -> RawHub:
        """Connect and complete the handshake (asserting success)."""
        hub = cls(await open_ws(ws_url(http_url, path, query)), protocol)
        response = await hub.handshake(protocol, version)
        assert response == {}, response
        return hub

    async def handshake(self, protocol: str, version: int = 1) -> dict[str, Any]:
        """Send the handshake (a Text frame) and return the decoded response."""
        await self.ws.send(json.dumps({"protocol": protocol, "version": version}) + RS)
        return await self.handshake_response()

    async def handshake_response(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while RS.encode() not in self._buffer:
                await self._read_frame(raw=True)
        end = self._buffer.index(RS.encode())
        record = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._split()
        result = json.loads(record)
        assert isinstance(result, dict)
        return result

    # -- receiving ----------------------------------------------------------------------------

    async def _read_frame(self, raw: bool = False) -> None:
        frame = await self.ws.recv()
        self.frame_types.append(type(frame))
        self._buffer += frame.encode() if isinstance(frame, str) else frame
        if not raw:
            self._split()

    def _split(self) -> None:
        if self.binary:
            self._records.extend(_split_msgpack(self._buffer))
            return
        while RS.encode() in self._buffer:
            end = self._buffer.index(RS.encode())
            self._records.append(bytes(self._buffer[:end]))
            del self._buffer[: end + 1]

    async def next_record(self, timeout: float = WAIT) -> bytes:
        """The next raw record (without separator / length prefix)."""
        async with asyncio.timeout(timeout):
            while not self._records:
                await self._read_frame()
        return self._records.popleft()

    def decode(self, record: bytes) -> Any:
        return msgspec.msgpack.decode(record) if self.binary else json.loads(record)

    @staticmethod
    def kind(message: Any) -> int:
        return int(message[0] if isinstance(message, list) else message["type"])

    async def next_message(self, timeout: float = WAIT, skip_pings: bool = True) -> Any:
        if self._stash:
            return self._stash.popleft()
        while True:
            message = self.decode(await self.next_record(timeout))
            if skip_pings and self.kind(message) == 6:
                self.skipped_pings += 1
                continue
            return message

    async def expect_close_message(self, timeout: float = WAIT) -> Any:
        """Skip anything else until a Close message arrives; return it."""
        while True:
            message = await self.next_message(timeout)
            if self.kind(message) == 7:
                return message

    async def expect_closed(self, timeout: float = WAIT) -> None:
        """The server ends the WebSocket within ``timeout`` (records still queued are dropped)."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self._read_frame()
            except ConnectionClosed:
                return

    # -- sending ------------------------------------------------------------------------------

    def encode(self, message: Any) -> bytes | str:
        if self.binary:
            return frame_msgpack(message)
        return json.dumps(message, separators=(",", ":")) + RS

    async def send(self, message: Any) -> None:
        await self.ws.send(self.encode(message))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send(data)

    def invocation(self, target: str, args: list[Any], invocation_id: str | None) -> Any:
        if self.binary:
            return [1, {}, invocation_id, target, args, []]
        msg: dict[str, Any] = {"type": 1, "target": target, "arguments": args}
        if invocation_id is not None:
            msg["invocationId"] = invocation_id
        return msg

    async def invoke_raw(self, target: str, *args: Any, timeout: float = WAIT) -> Any:
        """Invoke and return the Completion message (other messages are skipped)."""
        invocation_id = str(next(self._ids))
        await self.send(self.invocation(target, list(args), invocation_id))
        skipped: list[Any] = []
        try:
            while True:
                message = self.decode(await self.next_record(timeout))
                if self.kind(message) == 6:
                    self.skipped_pings += 1
                    continue
                if self.kind(message) == 3:
                    got = message[2] if self.binary else message["invocationId"]
                    if got == invocation_id:
                        return message
                skipped.append(message)
        finally:
            self._stash.extend(skipped)

    async def invoke(self, target: str, *args: Any, timeout: float = WAIT) -> Any:
        """Invoke and return the result (assert it did not fail)."""
        message = await self.invoke_raw(target, *args, timeout=timeout)
        if self.binary:
            assert message[3] == 3, message
            return message[4]
        assert "error" not in message, message
        return message.get("result")

    async def close(self) -> None:
        await self.ws.close()
