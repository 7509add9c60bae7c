"""The floor reference: a minimal picows server speaking just enough SignalR JSON for the bench.

    python bench/servers/picows_server.py --port P --redis URL --prefix X

Per Broadcast it publishes the framed SignalR record through Redis once; every instance (this one
included) receives it, builds ONE WebSocket frame and writes those same bytes to every local socket
(``transport.write``): no per-recipient encoding, framing, task or await. That is the cheapest fan-out
a Python server can do over a Redis backplane, so it is the floor the others are compared with.

``--batch`` (the ``picows-batch`` floor): the same, but coalescing as hubwire's outbox does. A
received record is appended to each target socket's pending list; once per event-loop iteration
(``call_soon``) every socket with pending records gets ONE write: the pre-framed frame when it has
one record (framed once for all sockets, like hubwire's frame memo), else one frame holding all its
records (SignalR separates records with ``\x1e``, so one frame may carry several). In bursts that
is fewer frames and writes than one per message, so it is the fair floor for a coalescing server.

Understood records: the handshake, ``Broadcast(payload)`` (no invocation id), ``JoinGroup(name)``
(completes after Redis confirmed the group subscription), ``GroupBroadcast(name, payload)``, pings.
Anything else is ignored. No negotiate, no keep-alive, no auth: a floor, not a server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from typing import Any
from urllib.parse import urlparse

import hiredis
import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

RS = b"\x1e"
HANDSHAKE_OK = b"{}" + RS


def ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """An unmasked server-to-client frame, FIN set."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return header + payload


def resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class RedisConn(asyncio.Protocol):
    """A raw RESP connection: fire-and-forget commands, push messages to ``on_reply``."""

    #: set when the process is stopping, so losing Redis then is not an error
    closing = False

    def __init__(self, on_reply: Any) -> None:
        self.reader = hiredis.Reader()
        self.on_reply = on_reply
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            reply = self.reader.gets()
            if reply is False:
                return
            self.on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not RedisConn.closing:
            os._exit(3)  # a floor does not reconnect: let the runner see it died

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class Node:
    """One instance: its sockets, its groups and its two Redis connections."""

    def __init__(self, prefix: str, batch: bool = False) -> None:
        self.batch = batch
        #: --batch: records waiting per socket for the end of this loop iteration
        self.pending: dict[asyncio.Transport, list[bytes]] = {}
        self.flush_scheduled = False
        self.all_channel = f"{prefix}picows:all".encode()
        self.group_prefix = f"{prefix}picows:group:".encode()
        self.clients: set[asyncio.Transport] = set()
        self.groups: dict[str, set[asyncio.Transport]] = {}
        self.pub: RedisConn | None = None
        self.sub: RedisConn | None = None
        self.confirm: dict[bytes, list[asyncio.Future[None]]] = {}

    async def connect(self, url: str) -> None:
        loop = asyncio.get_running_loop()
        u = urlparse(url)
        host, port = u.hostname or "127.0.0.1", u.port or 6379
        _, self.pub = await loop.create_connection(lambda: RedisConn(lambda r: None), host, port)
        _, self.sub = await loop.create_connection(lambda: RedisConn(self.on_push), host, port)
        await self.subscribe(self.all_channel)

    async def subscribe(self, channel: bytes) -> None:
        assert self.sub is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.confirm.setdefault(channel, []).append(fut)
        self.sub.send(resp_command(b"SUBSCRIBE", channel))
        await fut

    def publish(self, channel: bytes, data: bytes) -> None:
        assert self.pub is not None
        self.pub.send(resp_command(b"PUBLISH", channel, data))

    def on_push(self, reply: Any) -> None:
        kind = reply[0]
        if kind == b"message":
            channel, record = reply[1], reply[2]
            if channel == self.all_channel:
                targets: Any = self.clients
            else:
                targets = self.groups.get(channel[len(self.group_prefix) :].decode(), ())
            if self.batch:
                self.queue(targets, record)
                return
            frame = ws_frame(record)
            for transport in targets:
                transport.write(frame)
        elif kind == b"subscribe":
            for fut in self.confirm.pop(reply[1], ()):
                if not fut.done():
                    fut.set_result(None)

    def queue(self, targets: Any, record: bytes) -> None:
        """--batch: append the record to each target's pending list; flush at the iteration's end."""
        pending = self.pending
        for transport in targets:
            records = pending.get(transport)
            if records is None:
                pending[transport] = [record]
            else:
                records.append(record)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """One write per socket: a single record's frame is built once and shared (memo by identity)."""
        pending, self.pending = self.pending, {}
        self.flush_scheduled = False
        memo: dict[int, tuple[bytes, bytes]] = {}
        for transport, records in pending.items():
            if transport.is_closing():
                continue
            if len(records) == 1:
                record = records[0]
                entry = memo.get(id(record))
                if entry is None or entry[0] is not record:
                    entry = memo[id(record)] = (record, ws_frame(record))
                transport.write(entry[1])
            else:
                transport.write(ws_frame(b"".join(records)))

    def broadcast_record(self, payload: Any) -> bytes:
        record = {"type": 1, "target": "broadcast", "arguments": [payload]}
        return json.dumps(record, separators=(",", ":")).encode() + RS

    async def join(
        self, transport: asyncio.Transport, ws: WSTransport, invocation_id: Any, name: str
    ) -> None:
        members = self.groups.get(name)
        if members is None:
            members = self.groups[name] = set()
            await self.subscribe(self.group_prefix + name.encode())
        members.add(transport)
        if invocation_id is not None:
            done = json.dumps(
                {"type": 3, "invocationId": invocation_id, "result": None}, separators=(",", ":")
            )
            ws.send(WSMsgType.TEXT, done.encode() + RS)

    def leave_all(self, transport: asyncio.Transport) -> None:
        self.clients.discard(transport)
        for members in self.groups.values():
            members.discard(transport)


class SignalRListener(WSListener):
    def __init__(self, node: Node) -> None:
        self.node = node
        self.ws: WSTransport | None = None
        self.raw: asyncio.Transport | None = None
        self.handshaken = False
        self.buffer = b""

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.ws = transport
        self.raw = transport.underlying_transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if kind is not WSMsgType.TEXT and kind is not WSMsgType.BINARY:
            return
        data = self.buffer + frame.get_payload_as_bytes()
        *records, self.buffer = data.split(RS)
        for record in records:
            if record:
                self.on_record(transport, record)

    def on_record(self, transport: WSTransport, record: bytes) -> None:
        assert self.raw is not None
        if not self.handshaken:
            self.handshaken = True
            transport.send(WSMsgType.TEXT, HANDSHAKE_OK)
            self.node.clients.add(self.raw)
            return
        msg = json.loads(record)
        if msg.get("type") != 1:
            return
        target, args = msg.get("target"), msg.get("arguments") or []
        node = self.node
        if target == "Broadcast":
            node.publish(node.all_channel, node.broadcast_record(args[0]))
        elif target == "GroupBroadcast":
            node.publish(node.group_prefix + str(args[0]).encode(), node.broadcast_record(args[1]))
        elif target == "JoinGroup":
            asyncio.get_running_loop().create_task(
                node.join(self.raw, transport, msg.get("invocationId"), str(args[0]))
            )

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.raw is not None:
            self.node.leave_all(self.raw)


async def serve(args: argparse.Namespace) -> None:
    node = Node(args.prefix, batch=args.batch)
    await node.connect(args.redis)

    def factory(request: WSUpgradeRequest) -> WSListener:
        return SignalRListener(node)

    server = await ws_create_server(
        factory,
        args.host,
        args.port,
        websocket_handshake_timeout=10,
        read_buffer_init_size=1024,
        backlog=4096,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"picows bench server on {args.host}:{args.port} pid {os.getpid()}", flush=True)
    async with server:
        await stop.wait()
    RedisConn.closing = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", default="bench:")
    parser.add_argument(
        "--batch", action="store_true", help="coalesce: one write per socket per loop iteration"
    )
    args = parser.parse_args(argv)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
