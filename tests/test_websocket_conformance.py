"""RFC 6455 conformance over a live server in both serving modes, section by section as the Autobahn
testsuite groups them (framing, ping/pong, reserved bits, opcodes, fragmentation, UTF-8, close
handling, limits), on a raw endpoint (``/echo``: text echoed, no hub protocol). Plus memory under two
hostile clients on a hub path: a ping flood from a client that never reads, and a flood of 1-byte
frames while the hub holds its input back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import struct
from typing import Any

import pytest

from tests.conftest import ServerProcess
from tests.hwtools import stats, wait_stats

SERVING = ["native", "asgi"]
WAIT = 10.0


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    if size < 126:
        head = bytes((first, 0x80 | size))
    elif size < 65536:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", size)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


class RawSocket:
    """A WebSocket client on a plain TCP stream: exact bytes out, server frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str) -> RawSocket:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame (unmasked): opcode, payload."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
        assert not b1 & 0x80, "server frames are never masked"
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0 & 0x0F, await asyncio.wait_for(self.reader.readexactly(size), WAIT)

    async def text(self, length: int) -> bytes:
        """Text echoed back, ``length`` bytes of it, in however many frames the server used."""
        got = b""
        while len(got) < length:
            opcode, payload = await self.frame()
            assert opcode in (0, 1), (opcode, payload)
            got += payload
        return got

    async def close_code(self) -> int:
        """Read up to the server's Close frame (skipping data and pongs): its code."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005

    async def aclose(self) -> None:
        # abort, not close: a close would wait for unsent bytes that a paused server never reads
        self.writer.transport.abort()
        with contextlib.suppress(ConnectionError, OSError):
            await asyncio.wait_for(self.writer.wait_closed(), WAIT)


@pytest.fixture(scope="module", params=SERVING)
def echo_server(request: pytest.FixtureRequest) -> Any:
    proc = ServerProcess("tests.interop.apps:plain", args=["--serving", request.param])
    yield proc
    proc.close()


async def _case(server: ServerProcess, wire: bytes) -> int:
    ws = await RawSocket.open(server.port, "/echo")
    try:
        await ws.send(wire)
        return await ws.close_code()
    finally:
        await ws.aclose()


# -- 1 framing, 2 ping/pong, 5 fragmentation ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
async def test_text_of_every_length_class(echo_server: ServerProcess, size: int) -> None:
    ws = await RawSocket.open(echo_server.port, "/echo")
    message = b"a" * size
    await ws.send(frame(1, message) + frame(1, b"end"))
    assert await ws.text(size + 3) == message + b"end"
    await ws.send(frame(8, close_payload(1000)))
    assert await ws.close_code() == 1000
    await ws.aclose()


async def test_ping_is_answered_with_its_payload(echo_server: ServerProcess) -> None:
    ws = await RawSocket.open(echo_server.port, "/echo")
    for payload in (b"", b"hello", b"x" * 125):
        await ws.send(frame(9, payload))
        assert await ws.frame() == (10, payload)
    await ws.send(frame(10, b"unsolicited pong"))  # ignored
    await ws.send(frame(1, b"still open"))
    assert await ws.text(10) == b"still open"
    await ws.aclose()


async def test_fragments_with_a_ping_in_between(echo_server: ServerProcess) -> None:
    ws = await RawSocket.open(echo_server.port, "/echo")
    await ws.send(
        frame(1, b"frag", fin=False) + frame(9, b"p") + frame(0, b"ment", fin=False) + frame(0, b"ed")
    )
    got, pong = b"", False
    while len(got) < 10:
        opcode, payload = await ws.frame()
        if opcode == 10:
            pong = payload == b"p"
        else:
            got += payload
    assert got == b"fragmented" and pong
    await ws.aclose()


# -- 2, 3, 4, 5, 7, 9: protocol errors close with 1002 (1009 past the limit, 1007 bad UTF-8) ---

PROTOCOL_ERRORS = {
    "ping over 125 bytes": frame(9, b"x" * 126),
    "fragmented ping": frame(9, b"x", fin=False),
    "rsv1 without an extension": frame(1, b"x", rsv=4),
    "rsv3": frame(1, b"x", rsv=1),
    "reserved data opcode 3": frame(3, b"x"),
    "reserved control opcode 0xB": frame(0xB),
    "continuation without a start": frame(0, b"x"),
    "text inside a fragmented message": frame(1, b"a", fin=False) + frame(1, b"b"),
    "close with a 1-byte payload": frame(8, b"\x03"),
    "close code 999": frame(8, close_payload(999)),
    "close code 1005": frame(8, close_payload(1005)),
    "close code 1006": frame(8, close_payload(1006)),
    "close code 1015": frame(8, close_payload(1015)),
    "close code 1016": frame(8, close_payload(1016)),
    "close code 2999": frame(8, close_payload(2999)),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
async def test_protocol_errors_close_with_1002(echo_server: ServerProcess, case: str) -> None:
    assert await _case(echo_server, PROTOCOL_ERRORS[case]) == 1002


async def test_invalid_utf8_closes_with_1007(echo_server: ServerProcess) -> None:
    assert await _case(echo_server, frame(1, b"ok \xff\xfe")) == 1007
    # split inside a character across fragments is valid; broken across them is not
    e_acute = "é".encode()
    assert await _case(echo_server, frame(1, e_acute[:1], fin=False) + frame(0, b"\xff")) == 1007
    assert await _case(echo_server, frame(8, close_payload(1000, b"\xff"))) == 1007


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1011, 3000, 4999])
async def test_valid_close_codes_get_a_clean_close(echo_server: ServerProcess, code: int) -> None:
    reply = await _case(echo_server, frame(8, close_payload(code, b"bye")))
    assert reply in (code, 1000)


async def test_a_frame_over_the_limit_closes_with_1009(echo_server: ServerProcess) -> None:
    # the endpoint takes 32 KB messages; frames are bounded at four of them. Only the frame's
    # head is sent: the server refuses on the announced length alone (and nothing unread is left
    # behind that would turn its close into a reset)
    head = frame(1, b"x" * (200 * 1024))[:14]
    assert await _case(echo_server, head) == 1009


# -- memory under hostile clients (hub path, stats from the server) ----------------------------


@pytest.fixture(scope="module", params=SERVING)
def hub_server(request: pytest.FixtureRequest) -> Any:
    proc = ServerProcess("tests.apps.structure:app", args=["--serving", request.param])
    yield proc
    proc.close()


async def _send_until_blocked(ws: RawSocket, chunk: bytes, limit: int) -> int:
    """Send ``chunk`` repeatedly until the server stops reading (a drain blocks) or ``limit`` bytes."""
    sent = 0
    while sent < limit:
        ws.writer.write(chunk)
        try:
            await asyncio.wait_for(ws.writer.drain(), 2.0)
        except TimeoutError:
            break
        sent += len(chunk)
    return sent


async def test_a_ping_flood_from_a_client_that_does_not_read(request: pytest.FixtureRequest) -> None:
    """Native mode only: there hubwire answers pings itself and drops pongs while the socket's
    write buffer is high. (In ASGI serving mode uvicorn's WebSocket implementation answers them and
    queues every pong: a known limit of that mode.)"""
    hub_server = ServerProcess("tests.apps.structure:app", args=["--serving", "native"])
    request.addfinalizer(hub_server.close)
    before = (await stats(hub_server.url))["rss_bytes"]
    ws = await RawSocket.open(hub_server.port, "/hub")
    await ws.send(frame(1, b'{"protocol":"json","version":1}\x1e'))
    pings = frame(9, b"p" * 125) * 1000  # ~131 KB of pings, as much in pongs owed
    sent = await _send_until_blocked(ws, pings, 40 * 1024 * 1024)
    after = (await stats(hub_server.url))["rss_bytes"]
    await ws.aclose()
    # pongs are not queued without bound for a client that never reads them
    assert sent > 4 * 1024 * 1024, sent
    assert after - before < 8 * 1024 * 1024, (before, after, sent)


async def test_tiny_frames_while_the_hub_holds_input_back(hub_server: ServerProcess) -> None:
    ws = await RawSocket.open(hub_server.port, "/hub")
    await ws.send(frame(1, b'{"protocol":"json","version":1}\x1e'))
    assert (await ws.frame())[1] == b"{}\x1e"
    # an upload that never completes holds the invocation slot: the next call waits, input backs up
    held = b'{"type":1,"invocationId":"u","target":"upload_sum","arguments":[],"streamIds":["s"]}\x1e'
    waiting = b'{"type":1,"invocationId":"e","target":"echo","arguments":["queued"]}\x1e'
    await ws.send(frame(1, held + waiting))
    await wait_stats(hub_server.url, lambda s: s["hubs"]["/hub"]["running_tasks"] == 1, 5, "the upload")
    before = (await stats(hub_server.url))["rss_bytes"]
    tiny = b"".join(frame(1, b" ") for _ in range(10_000))  # whitespace: valid, 7 bytes on the wire
    sent = await _send_until_blocked(ws, tiny, 40 * 1024 * 1024)
    after = (await stats(hub_server.url))["rss_bytes"]
    await ws.aclose()
    assert sent < 30 * 1024 * 1024, f"the server kept reading {sent} bytes of tiny frames"
    assert after - before < 8 * 1024 * 1024, (before, after, sent)
