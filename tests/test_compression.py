"""permessage-deflate over a live server (native serving): what is negotiated, which frames go out
compressed, that a broadcast is compressed once for all its sockets, that what clients compress is
inflated (and a decompression bomb refused), and that turning it off or serving through ASGI sends
plain frames.

The ``websockets`` client offers permessage-deflate by default and compresses what it sends once
negotiated; the raw-socket tests read the frames' RSV1 bit and inflate them independently.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import zlib
from typing import Any

import httpx
import pytest

from hubwire.protocol.websocket import DEFLATE_RESPONSE
from tests.apps.compression import items
from tests.conftest import ServerProcess
from tests.hwtools import stats
from tests.rawhub import RawHub, open_ws, ws_url
from tests.test_websocket_conformance import frame

WAIT = 10.0
#: what a client offering ``client_max_window_bits`` (browsers, websockets, ws) is answered
AGREED = DEFLATE_RESPONSE + "; client_max_window_bits=12"
RS = b"\x1e"


@pytest.fixture(scope="module")
def server() -> Any:
    proc = ServerProcess("tests.apps.compression:app")
    yield proc
    proc.close()


async def _counters(url: str) -> dict[str, int]:
    result: dict[str, int] = (await stats(url))["websocket_compression"]
    return result


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in after}


def _result(completion: Any) -> Any:
    """The result of a Completion message (JSON: a dict; MessagePack: [3, headers, id, kind, result])."""
    if isinstance(completion, dict):
        assert "error" not in completion, completion
        return completion["result"]
    assert completion[3] == 3, completion
    return completion[4]


def _invocation(message: Any) -> tuple[str, list[Any]]:
    if isinstance(message, dict):
        return message["target"], message["arguments"]
    return message[3], message[4]


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_python_clients_get_compressed_broadcasts_and_their_messages_are_inflated(
    server: ServerProcess, protocol: str
) -> None:
    before = await _counters(server.url)
    hubs = [await RawHub.open(server.url, "/hub", protocol) for _ in range(3)]
    try:
        for hub in hubs:
            assert hub.ws.response is not None
            assert hub.ws.response.headers["Sec-WebSocket-Extensions"] == AGREED
            assert hub.ws.protocol.extensions, "the client uses the extension for what it sends"
        text = "caf\u00e9 " + "x" * 2048
        assert _result(await hubs[0].invoke_raw("Echo", text)) == text
        await hubs[1].send(hubs[1].invocation("Broadcast", [3, 1000], None))
        for hub in hubs:
            for seed in range(3):
                assert _invocation(await hub.next_message()) == ("Items", [seed, items(1000, seed)])
    finally:
        for hub in hubs:
            await hub.ws.close()
    delta = _delta(await _counters(server.url), before)
    assert delta["negotiated"] == 3
    # the echo's completion once, each broadcast once for its three sockets
    assert delta["compressions"] == 1 + 3
    assert delta["frames"] == 1 + 3 * 3
    assert delta["bytes_saved"] > 3 * 3 * 500
    # every message the clients sent was compressed and inflated: 3 handshakes, the echo, the broadcast
    assert delta["inflated"] == 3 + 2


async def test_a_broadcast_is_compressed_once_for_all_its_sockets_per_protocol(server: ServerProcess) -> None:
    before = await _counters(server.url)
    hubs = [await RawHub.open(server.url, "/hub", "json") for _ in range(20)]
    hubs += [await RawHub.open(server.url, "/hub", "messagepack") for _ in range(5)]
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
            response = await client.post("/broadcast/5/1000")
            assert response.status_code == 200, response.text
        for hub in hubs:
            for seed in range(5):
                assert _invocation(await hub.next_message()) == ("Items", [seed, items(1000, seed)])
    finally:
        for hub in hubs:
            await hub.ws.close()
    delta = _delta(await _counters(server.url), before)
    assert delta["compressions"] == 5 * 2  # once per broadcast and protocol, not per socket
    assert delta["frames"] == 5 * 25


# -- the frames on the wire --------------------------------------------------------------------------


class Wire:
    """A raw WebSocket client that offers permessage-deflate and reads server frames with their flags."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: str) -> None:
        self.reader, self.writer, self.head = reader, writer, head

    @classmethod
    async def open(
        cls, port: int, path: str, offer: str = "permessage-deflate; client_max_window_bits"
    ) -> Wire:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Extensions: {offer}\r\n\r\n"
            ).encode()
        )
        head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)).decode("latin-1")
        assert head.startswith("HTTP/1.1 101"), head
        return cls(reader, writer, head)

    def extensions(self) -> str | None:
        for line in self.head.split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "sec-websocket-extensions":
                return value.strip()
        return None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def frame(self) -> tuple[int, bytes]:
        """The next server frame: its first byte (FIN, RSV1, opcode) and payload."""
        b0, b1 = await asyncio.wait_for(self.reader.readexactly(2), WAIT)
        size = b1 & 0x7F
        if size == 126:
            size = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return b0, await asyncio.wait_for(self.reader.readexactly(size), WAIT)

    async def message(self) -> tuple[bool, bytes]:
        """The next data message, skipping pings: (it was compressed, its inflated payload)."""
        while True:
            b0, payload = await self.frame()
            if b0 & 0x0F in (1, 2):
                assert b0 & 0x80, "hubwire sends every message in one frame"
                if b0 & 0x40:
                    return True, zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
                return False, payload

    async def handshake(self) -> None:
        await self.send(frame(1, b'{"protocol":"json","version":1}' + RS))
        assert await self.message() == (False, b"{}" + RS)

    async def close_code(self) -> int:
        while True:
            b0, payload = await self.frame()
            if b0 & 0x0F == 8:
                return int(struct.unpack("!H", payload[:2])[0])

    def close(self) -> None:
        self.writer.transport.abort()


def _compressed(payload: bytes) -> bytes:
    """A compressed client message (RSV1 set), one frame."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, -15)
    return frame(1, (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv=4)


def _call(target: str, *args: Any, invocation_id: str = "1") -> bytes:
    body = {"type": 1, "target": target, "arguments": list(args), "invocationId": invocation_id}
    return json.dumps(body).encode() + RS


async def test_large_messages_go_compressed_small_ones_plain(server: ServerProcess) -> None:
    wire = await Wire.open(server.port, "/hub")
    try:
        assert wire.extensions() == AGREED
        await wire.handshake()
        await wire.send(_compressed(_call("Broadcast", 1, 1000)))
        compressed, payload = await wire.message()
        assert compressed and json.loads(payload[:-1])["arguments"] == [0, items(1000, 0)]
        assert await wire.message() == (False, b'{"type":3,"invocationId":"1","result":null}' + RS)
        # under the threshold (256 bytes) a reply goes plain; over it, compressed
        await wire.send(_compressed(_call("Echo", "a" * 100, invocation_id="2")))
        compressed, payload = await wire.message()
        assert not compressed and json.loads(payload[:-1])["result"] == "a" * 100
        await wire.send(frame(1, _call("Echo", "b" * 300, invocation_id="3")))  # plain in, allowed too
        compressed, payload = await wire.message()
        assert compressed and json.loads(payload[:-1])["result"] == "b" * 300
    finally:
        wire.close()


async def test_records_of_one_flush_big_ones_compressed_alone_small_ones_coalesced(
    server: ServerProcess,
) -> None:
    sizes = [10, 1000, 10, 20, 2000, 30]
    wire = await Wire.open(server.port, "/hub")
    try:
        await wire.handshake()
        await wire.send(frame(1, _call("Mixed", sizes)))
        records: list[Any] = []
        async with asyncio.timeout(WAIT):
            while len(records) < len(sizes) + 1:  # the messages, then the completion
                compressed, payload = await wire.message()
                got = [json.loads(r) for r in payload.split(RS) if r]
                if compressed:  # a compressed message is one record, a big one
                    assert len(got) == 1 and len(payload) >= 256, got
                else:
                    assert all(len(json.dumps(r)) < 256 for r in got), got
                records += got
        mixed = [r["arguments"] for r in records if r.get("target") == "Mixed"]
        assert mixed == [[n, "x" * size] for n, size in enumerate(sizes)]
        assert records[-1] == {"type": 3, "invocationId": "1", "result": None}
    finally:
        wire.close()


@pytest.mark.parametrize(
    ("path", "negotiated"),
    [("/plain", False), ("/small", True)],  # compression off; a threshold no message reaches
)
async def test_compression_off_or_under_the_threshold_sends_plain_frames(
    server: ServerProcess, path: str, negotiated: bool
) -> None:
    wire = await Wire.open(server.port, path)
    try:
        assert wire.extensions() == (AGREED if negotiated else None)
        await wire.handshake()
        await wire.send(frame(1, _call("Broadcast", 1, 1000)))
        compressed, payload = await wire.message()  # (uncompressed records may share a frame)
        assert not compressed and json.loads(payload.split(RS)[0])["arguments"] == [0, items(1000, 0)]
        if not negotiated:  # RSV1 without the extension is a protocol error
            await wire.send(_compressed(_call("Echo", "x")))
            assert await wire.close_code() == 1002
    finally:
        wire.close()


async def test_a_decompression_bomb_closes_with_1009(server: ServerProcess) -> None:
    """50 MB of zeros in 50 KB: /hub takes 32 KB messages, so 128 KB frames and inflated messages."""
    wire = await Wire.open(server.port, "/hub")
    try:
        await wire.handshake()
        await wire.send(_compressed(b"\x00" * (50 * 1024 * 1024)))
        assert await wire.close_code() == 1009
    finally:
        wire.close()


async def test_the_asgi_serving_mode_does_not_compress() -> None:
    proc = ServerProcess("tests.apps.compression:app", args=["--serving", "asgi"])
    try:
        hub = RawHub(await open_ws(ws_url(proc.url, "/hub")), "json")
        try:
            assert hub.ws.response is not None
            assert "Sec-WebSocket-Extensions" not in hub.ws.response.headers
            assert await hub.handshake("json") == {}
            assert _result(await hub.invoke_raw("Echo", "x" * 2000)) == "x" * 2000
        finally:
            await hub.ws.close()
    finally:
        proc.close()


async def test_prometheus_counters_match_the_stats(server: ServerProcess) -> None:
    hubs = [await RawHub.open(server.url, "/hub", "json") for _ in range(2)]
    try:
        await hubs[0].send(hubs[0].invocation("Broadcast", [1, 1000], None))
        for hub in hubs:
            assert _invocation(await hub.next_message())[0] == "Items"
    finally:
        for hub in hubs:
            await hub.ws.close()
    counters = await _counters(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT) as client:
        text = (await client.get("/metrics")).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("hubwire_websocket_")
    }
    for metric, stat in (
        ("deflate_negotiated", "negotiated"),
        ("compressions", "compressions"),
        ("compressed_frames", "frames"),
        ("compression_saved_bytes", "bytes_saved"),
        ("inflated_messages", "inflated"),
    ):
        assert values[f"hubwire_websocket_{metric}_total"] == counters[stat] > 0, metric
