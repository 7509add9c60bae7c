"""Load generator worker: many raw WebSocket clients in one uvloop process.

Started by bench/run.py (``python -m bench.loadgen``) and driven over stdin/stdout, one JSON command
per line in, one JSON answer per line out. Not a client library: a hand-written WebSocket client on
asyncio protocols (HTTP upgrade, masked frames out, unmasked frames in, pong on ping), speaking

- ``signalr``: SignalR JSON over a negotiate-less WebSocket (skipNegotiation): handshake
  ``{"protocol":"json","version":1}\\x1e``, invocations ``Broadcast`` / ``GroupBroadcast`` /
  ``JoinGroup`` / ``ConnectionId``, deliveries ``{"type":1,"target":"broadcast","arguments":[p]}``;
- ``sio``: Socket.IO over Engine.IO v4 on a raw WebSocket (``/socket.io/?EIO=4&transport=websocket``):
  ``0{...}`` open, send ``40``, get ``40{...}``, events ``42["broadcast",p]``, ``2`` ping / ``3`` pong.

With ``deflate`` (the connect command's option) a client offers permessage-deflate
(``permessage-deflate; client_max_window_bits``, what browsers send) and inflates compressed frames
with one decompressor per socket kept across messages (what a server that keeps its context needs;
for one that does not, it decodes the same, and a message that ends the DEFLATE stream starts a
new decompressor). Every worker counts the bytes it reads from its sockets
(``wire_bytes``: what travelled, compressed or not) and the compressed messages it inflated.

Every broadcast payload is 200 ASCII bytes: phase (3 digits), sequence id (10), send time
(``time.monotonic_ns()``, 20 digits; CLOCK_MONOTONIC is one clock for every process of the machine),
then padding (``BroadcastData``, the deflate phase: the 33-byte marker alone, followed by a second
argument of ~1 KB of realistic JSON, :func:`make_data`). A receiving client parses those, so each
delivery gives its latency, and a per-client bitmap of sequence ids counts distinct deliveries and
duplicates.

Many small rooms (``rooms_send``): client i is a member of room ``i // size``; one member per room
sends ``GroupBroadcast(room, payload)`` at a fixed rate, and the payload carries the room (8 digits
after the send time), so a client counts a message of another room as unexpected and keeps its
bitmap per room sequence number (small: a room's own messages only).

Commands (see ``Worker.handle``): ``connect``, ``join``, ``ids``, ``begin``, ``send``, ``rooms_send``,
``end``, ``counters``, ``close``, ``quit``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import resource
import socket
import sys
import time
import zlib
from array import array
from typing import Any

RS = b"\x1e"
PAYLOAD_LEN = 200
PAD_TEXT = "x" * (PAYLOAD_LEN - 33)
SIGNALR_HANDSHAKE = b'{"protocol":"json","version":1}' + RS
IP_BIND_ADDRESS_NO_PORT = 24
#: client sockets are bound to these loopback sources (the connect picks a free port per 4-tuple),
#: so tens of thousands of connections and TIME_WAITs from earlier phases never run out of ports
SOURCE_ADDRESSES = [f"127.0.0.{i}" for i in range(2, 18)]
#: quantile points of the latency sample returned per worker (merged by the runner)
LATENCY_POINTS = 5000


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_payload(phase: int, seq: int) -> str:
    return f"{phase % 1000:03d}{seq:010d}{time.monotonic_ns():020d}" + PAD_TEXT


ROOM_PAD_TEXT = PAD_TEXT[8:]


def make_room_payload(phase: int, seq: int, room: int) -> str:
    """A rooms-phase payload: ``seq`` counts the room's own messages; the room follows the send time."""
    return f"{phase % 1000:03d}{seq:010d}{time.monotonic_ns():020d}{room:08d}" + ROOM_PAD_TEXT


#: what a browser offers
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"


def make_data(seq: int) -> list[dict[str, Any]]:
    """About 1 KB of realistic JSON for broadcast ``seq``: chat-like objects, repeated keys, values
    that change from one broadcast to the next (ids, users, times, texts)."""
    base = seq * 7
    return [
        {
            "id": base + i,
            "user": f"user{(base + i) % 97}",
            "channel": "general",
            "text": f"message {base + i} about topic {(base + i) % 13}",
            "ts": 1_700_000_000_000 + (base + i) * 1013,
            "read": (base + i) % 3 == 0,
            "reactions": {"like": (base + i) % 5, "laugh": (base + i) % 2},
        }
        for i in range(7)
    ]


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client-to-server frame (FIN set, masked as RFC 6455 requires)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if n:
        key = (mask * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")
    return header + mask + payload


class Phase:
    """Counters of the phase in progress (one per worker)."""

    def __init__(self, phase_id: int = -1, expected: int = 0, record_latency: bool = True) -> None:
        self.id = phase_id
        self.expected = expected  # local clients that must get every sequence id
        self.record_latency = record_latency
        self.got: array[int] = array("l")  # distinct member deliveries per sequence id
        self.complete_upto = 0  # every seq below this has all its expected deliveries
        self.deliveries = 0
        self.dups = 0
        self.unexpected = 0
        self.stale = 0
        self.latencies: array[int] = array("q")
        #: rooms phase: members are every client, each expecting its own room's messages only
        self.rooms = False
        self.room_distinct = 0
        self.first_ns = 0
        self.last_ns = 0
        self.progress = asyncio.Event()

    def advance(self) -> None:
        got, expected, i = self.got, self.expected, self.complete_upto
        n = len(got)
        while i < n and got[i] >= expected:
            i += 1
        if i != self.complete_upto:
            self.complete_upto = i
            self.progress.set()


class Client(asyncio.Protocol):
    """One WebSocket client. ``kind`` is ``signalr`` or ``sio``."""

    __slots__ = (
        "buf",
        "completions",
        "conn_id",
        "deflate",
        "drain",
        "host",
        "idx",
        "inflater",
        "kind",
        "member",
        "path",
        "ready",
        "room",
        "seen",
        "state",
        "transport",
        "worker",
    )

    def __init__(
        self, worker: Worker, idx: int, kind: str, host: str, path: str, drain: bool, deflate: bool = False
    ) -> None:
        self.worker = worker
        self.deflate = deflate
        #: permessage-deflate was negotiated: the socket's decompressor
        self.inflater: Any = None
        self.idx = idx
        self.kind = kind
        self.host = host
        self.path = path
        self.drain = drain
        self.state = 0  # 0 upgrading, 1 hub/engine.io handshake, 2 ready, 3 closed
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seen = bytearray()
        self.member = True
        self.room = -1
        self.completions: dict[str, asyncio.Future[Any]] = {}
        self.conn_id: str | None = None

    # -- transport ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop: not an asyncio.Transport
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            + (f"Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n" if self.deflate else "")
            + "\r\n"
        )
        transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != 3:
            self.state = 3
            self.worker.lost_connections += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost during handshake: {exc}"))
        for fut in self.completions.values():
            if not fut.done():
                fut.set_exception(ConnectionError("connection lost"))
        self.completions.clear()

    def send_text(self, data: bytes) -> None:
        if self.transport is not None and self.state != 3:
            self.transport.write(masked_frame(data))

    def close(self) -> None:
        if self.state == 3 or self.transport is None:
            return
        self.state = 3
        with contextlib.suppress(Exception):
            self.transport.write(masked_frame(b"\x03\xe8", 0x8))
        self.transport.close()

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why))
        if self.transport is not None:
            self.transport.abort()

    # -- inbound -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.worker.wire_bytes += len(data)
        buf = self.buf + data if self.buf else data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            status = buf[: buf.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.fail(f"upgrade refused: {status.decode('latin-1')}")
                return
            if self.deflate:
                self.negotiate(buf[:end])
            buf = buf[end + 4 :]
            self.state = 1
            if self.kind == "signalr":
                self.send_text(SIGNALR_HANDSHAKE)
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            size = b1 & 0x7F
            if size == 126:
                if n - pos < 4:
                    break
                size = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif size == 127:
                if n - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            else:
                start = pos + 2
            end = start + size
            if end > n:
                break
            op = buf[pos] & 0x0F
            compressed = buf[pos] & 0x40
            pos = end
            if compressed and (op == 1 or op == 2):
                message = self.inflate(buf[start:end])
                if message is None:
                    return
                if self.kind == "signalr":
                    self.on_signalr(message, now)
                else:
                    self.on_sio(message, now)
            elif op == 1 or op == 2:
                if self.drain and self.state == 2:
                    w = self.worker
                    w.drained_bytes += size
                    w.drained_records += buf.count(b'"broadcast"', start, end)
                elif self.kind == "signalr":
                    self.on_signalr(buf[start:end], now)
                else:
                    self.on_sio(buf[start:end], now)
            elif op == 9:
                if self.transport is not None:
                    self.transport.write(masked_frame(buf[start:end], 0xA))
            elif op == 8:
                self.close()
                return
            elif op == 0:
                self.worker.protocol_errors += 1  # no server sends fragmented messages this small
        self.buf = buf[pos:] if pos < n else b""

    def negotiate(self, head: bytes) -> None:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-extensions" and b"permessage-deflate" in value:
                self.inflater = zlib.decompressobj(-15)
                self.worker.negotiated += 1

    def inflate(self, payload: bytes) -> bytes | None:
        """A compressed message (RFC 7692: the stripped empty block appended back)."""
        if self.inflater is None:
            self.worker.protocol_errors += 1  # RSV1 without the extension
            self.fail("compressed frame without permessage-deflate")
            return None
        inflater = self.inflater
        self.worker.inflated += 1
        data: bytes = inflater.decompress(payload + _TAIL)
        if inflater.eof:  # a final DEFLATE block: the next message is a stream of its own
            self.inflater = zlib.decompressobj(-15)
        return data

    def deliver(self, payload: bytes, j: int, now: int) -> None:
        """A broadcast payload starting at ``payload[j]``."""
        w = self.worker
        ph = w.phase
        if ph.rooms:
            self.deliver_room(payload, j, now)
            return
        try:
            pid = int(payload[j : j + 3])
            seq = int(payload[j + 3 : j + 13])
            sent = int(payload[j + 13 : j + 33])
        except ValueError:
            w.protocol_errors += 1
            return
        if pid != ph.id:
            ph.stale += 1
            return
        ph.deliveries += 1
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 256 - len(seen)))
        if seen[seq]:
            ph.dups += 1
            return
        seen[seq] = 1
        if not self.member:
            ph.unexpected += 1
            return
        if ph.record_latency:
            ph.latencies.append(now - sent)
        if not ph.first_ns:
            ph.first_ns = now
        ph.last_ns = now
        got = ph.got
        if seq >= len(got):  # a worker that does not send learns of sequence ids as they come
            got.extend([0] * (seq + 1 - len(got)))
        got[seq] += 1
        if seq == ph.complete_upto and got[seq] >= ph.expected:
            ph.advance()

    def deliver_room(self, payload: bytes, j: int, now: int) -> None:
        """A rooms-phase payload: counted against this client's room and the room's sequence."""
        ph = self.worker.phase
        try:
            pid = int(payload[j : j + 3])
            seq = int(payload[j + 3 : j + 13])
            sent = int(payload[j + 13 : j + 33])
            room = int(payload[j + 33 : j + 41])
        except ValueError:
            self.worker.protocol_errors += 1
            return
        if pid != ph.id:
            ph.stale += 1
            return
        ph.deliveries += 1
        if room != self.room:
            ph.unexpected += 1
            return
        seen = self.seen
        if seq >= len(seen):
            seen.extend(bytes(seq + 16 - len(seen)))
        if seen[seq]:
            ph.dups += 1
            return
        seen[seq] = 1
        ph.room_distinct += 1
        ph.latencies.append(now - sent)
        if not ph.first_ns:
            ph.first_ns = now
        ph.last_ns = now

    def on_signalr(self, frame: bytes, now: int) -> None:
        for rec in frame.split(RS):
            if not rec:
                continue
            if self.state == 2:
                if b'"broadcast"' in rec:
                    i = rec.find(b'"arguments"')
                    if i >= 0:
                        j = rec.find(b'"', i + 11) + 1
                        if j > 0:
                            self.deliver(rec, j, now)
                            continue
                msg = json.loads(rec)
                kind = msg.get("type")
                if kind == 3:
                    fut = self.completions.pop(str(msg.get("invocationId")), None)
                    if fut is not None and not fut.done():
                        if "error" in msg:
                            fut.set_exception(RuntimeError(msg["error"]))
                        else:
                            fut.set_result(msg.get("result"))
                elif kind == 7:
                    self.close()
                # type 6 (ping) and anything else: nothing to do
            else:  # the handshake answer: {} or {"error": ...}
                msg = json.loads(rec)
                if msg.get("error"):
                    self.fail(f"handshake refused: {msg['error']}")
                    return
                self.state = 2
                if not self.ready.done():
                    self.ready.set_result(None)

    def on_sio(self, frame: bytes, now: int) -> None:
        if frame.startswith(b"42"):
            i = frame.find(b'"broadcast"')
            if i >= 0:
                j = frame.find(b'"', i + 11) + 1
                if j > 0:
                    self.deliver(frame, j, now)
            return
        if frame == b"2":
            self.send_text(b"3")
        elif frame.startswith(b"43"):
            k = 2
            while k < len(frame) and 48 <= frame[k] <= 57:
                k += 1
            fut = self.completions.pop(frame[2:k].decode(), None)
            if fut is not None and not fut.done():
                fut.set_result(json.loads(frame[k:]) if k < len(frame) else None)
        elif frame.startswith(b"40"):
            self.state = 2
            if not self.ready.done():
                self.ready.set_result(None)
        elif frame.startswith(b"0"):
            self.send_text(b"40")
        elif frame.startswith(b"44"):
            self.fail(f"socket.io connect refused: {frame[:200]!r}")
        elif frame == b"1":
            self.close()

    # -- outbound ----------------------------------------------------------------------------------

    def invoke_nowait(self, target: str, args: list[Any]) -> None:
        """Call a hub method / emit an event, no answer wanted."""
        if self.kind == "signalr":
            msg = {"type": 1, "target": target, "arguments": args}
            self.send_text(json.dumps(msg, separators=(",", ":")).encode() + RS)
        else:
            self.send_text(b"42" + json.dumps([SIO_EVENTS[target], *args], separators=(",", ":")).encode())

    async def invoke(self, target: str, args: list[Any], timeout: float) -> Any:
        """Call and wait for the completion / acknowledgement."""
        w = self.worker
        w.invocation_ids += 1
        iid = str(w.invocation_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.completions[iid] = fut
        if self.kind == "signalr":
            msg = {"type": 1, "invocationId": iid, "target": target, "arguments": args}
            self.send_text(json.dumps(msg, separators=(",", ":")).encode() + RS)
        else:
            body = json.dumps([SIO_EVENTS[target], *args], separators=(",", ":")).encode()
            self.send_text(b"42" + iid.encode() + body)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self.completions.pop(iid, None)


#: SignalR hub method -> Socket.IO event of the bench servers
SIO_EVENTS = {
    "Broadcast": "broadcast",
    "BroadcastData": "broadcast_data",
    "JoinGroup": "join",
    "GroupBroadcast": "group_broadcast",
}


def group_of(index: int, rule: dict[str, Any]) -> str | None:
    """Which group the client with this global index joins under ``rule`` (None: none)."""
    kind = rule.get("kind", "half")
    if kind == "half":  # clients alternate instances, so every other pair = half of each instance
        return str(rule.get("name", "g")) if (index // 2) % 2 == 0 else None
    if kind == "mod":
        return f"{rule.get('name', 's')}{index % int(rule['modulus'])}"
    if kind == "block":  # rooms of ``size`` consecutive clients: half on each instance when even
        return f"{rule.get('name', 'r')}{index // int(rule['size'])}"
    raise ValueError(f"unknown group rule {kind!r}")


def quantile_points(values: array[int], points: int = LATENCY_POINTS) -> list[int]:
    if not values:
        return []
    ordered = sorted(values)
    n = len(ordered)
    if n <= points:
        return ordered
    return [ordered[min(n - 1, (k * n) // points)] for k in range(points)]


class Worker:
    def __init__(self, worker_id: int) -> None:
        self.worker_id = worker_id
        self.clients: list[Client] = []
        self.phase = Phase()
        self.lost_connections = 0
        self.protocol_errors = 0
        self.invocation_ids = 0
        self.drained_bytes = 0
        self.drained_records = 0
        self.connect_errors: list[str] = []
        #: bytes read from the sockets since the phase began, compressed messages inflated,
        #: sockets that negotiated permessage-deflate
        self.wire_bytes = 0
        self.inflated = 0
        self.negotiated = 0

    # -- commands ----------------------------------------------------------------------------------

    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd["cmd"]
        if name == "connect":
            return await self.connect(cmd)
        if name == "join":
            return await self.join(cmd)
        if name == "ids":
            return await self.ids(cmd)
        if name == "begin":
            return self.begin(cmd)
        if name == "send":
            return await self.send(cmd)
        if name == "rooms_send":
            return await self.rooms_send(cmd)
        if name == "end":
            return await self.end(cmd)
        if name == "drain":
            for c in self.clients:
                c.drain = bool(cmd["on"])
            return {"drain": bool(cmd["on"])}
        if name == "counters":
            return {
                "clients": len(self.clients),
                "open": sum(1 for c in self.clients if c.state == 2),
                "lost_connections": self.lost_connections,
                "protocol_errors": self.protocol_errors,
                "drained_records": self.drained_records,
                "drained_bytes": self.drained_bytes,
            }
        if name == "close":
            n = len(self.clients)
            for c in self.clients:
                c.close()
            self.clients = []
            await asyncio.sleep(0.2)
            self.lost_connections = 0
            return {"closed": n}
        raise ValueError(f"unknown command {name!r}")

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Open ``count`` clients, global indices ``first..``; client i goes to targets[i % len]."""
        kind = cmd["kind"]
        targets = cmd["targets"]
        first, count = int(cmd["first"]), int(cmd["count"])
        concurrency = max(1, int(cmd.get("concurrency", 200)))
        timeout = float(cmd.get("timeout", 20.0))
        user = bool(cmd.get("user"))
        drain = bool(cmd.get("drain"))
        deflate = bool(cmd.get("deflate"))
        negotiated0 = self.negotiated
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        ok = failed = 0
        errors: list[str] = []
        opened: list[Client] = []

        async def one(i: int) -> None:
            nonlocal ok, failed
            host, port, path = targets[i % len(targets)]
            if user:
                path += ("&" if "?" in path else "?") + f"user=u{i}"
            async with sem:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                owned = False
                try:
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                    sock.bind((SOURCE_ADDRESSES[i % len(SOURCE_ADDRESSES)], 0))
                    await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout)
                    _, client = await loop.create_connection(
                        lambda: Client(self, i, kind, f"{host}:{port}", path, drain, deflate), sock=sock
                    )
                    owned = True
                    opened.append(client)
                    await asyncio.wait_for(asyncio.shield(client.ready), timeout)
                    ok += 1
                except Exception as exc:
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")
                    if not owned:
                        sock.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(first, first + count)))
        seconds = time.perf_counter() - t0
        for c in opened:
            if c.state == 2:
                self.clients.append(c)
            else:
                c.close()
        self.clients.sort(key=lambda c: c.idx)
        negotiated = self.negotiated - negotiated0
        return {"ok": ok, "failed": failed, "seconds": seconds, "errors": errors, "negotiated": negotiated}

    async def join(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Each client joins the group ``group_of`` gives it; returns once every join completed."""
        rule = cmd["rule"]
        timeout = float(cmd.get("timeout", 30.0))
        sem = asyncio.Semaphore(int(cmd.get("concurrency", 200)))
        joined = failed = 0
        errors: list[str] = []

        async def one(c: Client, group: str) -> None:
            nonlocal joined, failed
            async with sem:
                try:
                    await c.invoke("JoinGroup", [group], timeout)
                    joined += 1
                except Exception as exc:
                    failed += 1
                    if len(errors) < 5:
                        errors.append(f"{type(exc).__name__}: {exc}")

        jobs = []
        for c in self.clients:
            group = group_of(c.idx, rule)
            if group is not None:
                jobs.append(one(c, group))
        t0 = time.perf_counter()
        await asyncio.gather(*jobs)
        return {"joined": joined, "failed": failed, "seconds": time.perf_counter() - t0, "errors": errors}

    async def ids(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Connection ids of every client (SignalR ``ConnectionId()``), keyed by global index."""
        sem = asyncio.Semaphore(200)
        out: dict[str, str] = {}

        async def one(c: Client) -> None:
            async with sem:
                out[str(c.idx)] = await c.invoke("ConnectionId", [], 30.0)

        await asyncio.gather(*(one(c) for c in self.clients))
        return {"ids": out}

    def begin(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Reset counters for a phase; ``rule`` (optional) limits the expected receivers to one group."""
        rule = cmd.get("rule")
        group = cmd.get("group")
        members = 0
        for c in self.clients:
            c.seen = bytearray()
            c.member = rule is None or group_of(c.idx, rule) == group
            members += c.member
        self.phase = Phase(int(cmd["phase"]), members, bool(cmd.get("latency", True)))
        rooms = cmd.get("rooms")
        if rooms:
            size = int(rooms["size"])
            self.phase.rooms = True
            for c in self.clients:
                c.room = c.idx // size
        self.protocol_errors = 0
        self.wire_bytes = self.inflated = 0
        return {"members": members, "clients": len(self.clients)}

    async def send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Send broadcasts from a few clients (alternating instances).

        Closed loop (``window``): at most that many broadcasts not yet delivered to every local
        member. Open loop (``rate``): broadcasts per second on a fixed schedule. Stops after
        ``duration`` seconds or ``count`` broadcasts, whichever comes first.
        """
        ph = self.phase
        duration = float(cmd["duration"])
        count = int(cmd.get("count") or 1 << 40)
        window = cmd.get("window")
        rate = cmd.get("rate")
        stall_timeout = float(cmd.get("stall_timeout", 5.0))
        target = cmd.get("target", "Broadcast")
        group = cmd.get("group")
        n_senders = max(1, int(cmd.get("senders", 8)))
        senders = [c for c in self.clients if c.state == 2][: max(2, n_senders)]
        if not senders:
            return {"sent": 0, "seconds": 0.0, "stalls": 0, "error": "no open client to send from"}
        # interleave senders of both instances (client i is on instance i % 2)
        senders.sort(key=lambda c: (c.idx // 2, c.idx % 2))
        sent = stalls = 0
        t0 = time.monotonic()
        deadline = t0 + duration
        while sent < count:
            now = time.monotonic()
            if now >= deadline:
                break
            if rate:
                due = t0 + sent / float(rate)
                if due > now:
                    await asyncio.sleep(min(due - now, deadline - now))
                    continue
            elif window and sent - ph.complete_upto >= int(window):
                ph.progress.clear()
                try:
                    await asyncio.wait_for(ph.progress.wait(), min(stall_timeout, deadline - now + 0.01))
                except TimeoutError:
                    if time.monotonic() < deadline:
                        stalls += 1  # give up on the oldest: counted lost at the end
                        ph.complete_upto += 1
                        ph.advance()
                continue
            payload = make_payload(ph.id, sent)
            if len(ph.got) <= sent:
                ph.got.append(0)
            client = senders[sent % len(senders)]
            if target == "GroupBroadcast":
                client.invoke_nowait("GroupBroadcast", [group, payload])
            elif target == "BroadcastData":
                client.invoke_nowait("BroadcastData", [payload[:33], make_data(sent)])
            else:
                client.invoke_nowait("Broadcast", [payload])
            sent += 1
            if window and sent % 64 == 0:
                await asyncio.sleep(0)  # let deliveries in even when the window never fills
        return {"sent": sent, "seconds": time.monotonic() - t0, "stalls": stalls}

    async def rooms_send(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Each room whose sender is here sends ``rate`` messages/s for ``duration`` seconds.

        The sender of room g is its member ``g * size + g % 2`` (client i is on instance i % 2, so
        the rooms' senders alternate instances). Open loop on one fixed schedule: message k goes to
        the k-th local room round-robin, at ``t0 + k / (rooms * rate)``, so every room sends at the
        rate, the rooms' sends evenly staggered. Answers how many each room sent.
        """
        ph = self.phase
        size = int(cmd["size"])
        name = str(cmd.get("name", "r"))
        rate = float(cmd["rate"])
        duration = float(cmd["duration"])
        by_idx = {c.idx: c for c in self.clients if c.state == 2}
        rooms: list[tuple[int, Client, str]] = []
        first_room = min(by_idx) // size if by_idx else 0
        last_room = max(by_idx) // size if by_idx else -1
        for g in range(first_room, last_room + 1):
            sender = by_idx.get(g * size + (g % 2 if size > 1 else 0))
            if sender is not None:
                rooms.append((g, sender, f"{name}{g}"))
        if not rooms:
            return {"sent": 0, "seconds": 0.0, "by_room": {}}
        total_rate = len(rooms) * rate
        n_rooms = len(rooms)
        sent = 0
        t0 = time.monotonic()
        deadline = t0 + duration
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            due = t0 + sent / total_rate
            if due > now:
                await asyncio.sleep(min(due - now, deadline - now))
                continue
            g, client, group = rooms[sent % n_rooms]
            client.invoke_nowait("GroupBroadcast", [group, make_room_payload(ph.id, sent // n_rooms, g)])
            sent += 1
            if sent % 64 == 0:
                await asyncio.sleep(0)  # deliveries come in while a late schedule catches up
        per, extra = divmod(sent, n_rooms)
        by_room = {str(g): per + (1 if k < extra else 0) for k, (g, _, _) in enumerate(rooms)}
        return {"sent": sent, "seconds": time.monotonic() - t0, "by_room": by_room}

    async def end(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Wait (bounded) until every member got all ``sent`` broadcasts, then report the phase."""
        ph = self.phase
        sent = int(cmd["sent"])
        deadline = time.monotonic() + float(cmd.get("drain_timeout", 10.0))
        members = ph.expected
        # rooms: the runner says how many deliveries this worker's clients are owed
        wanted = int(cmd["expected"]) if ph.rooms else members * sent
        while time.monotonic() < deadline:
            distinct = ph.room_distinct if ph.rooms else self.distinct(sent)
            if distinct >= wanted:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(float(cmd.get("settle", 0.2)))  # late duplicates / strays
        distinct = ph.room_distinct if ph.rooms else self.distinct(sent)
        return {
            "members": members,
            "deliveries": ph.deliveries,
            "distinct": distinct,
            "lost": wanted - distinct,
            "dups": ph.dups,
            "unexpected": ph.unexpected,
            "stale": ph.stale,
            "first_ns": ph.first_ns,
            "last_ns": ph.last_ns,
            "latency_count": len(ph.latencies),
            # the last delivery's latency: one broadcast's time from send to its last receipt
            "latency_max_ns": max(ph.latencies, default=0),
            "latency_points": quantile_points(ph.latencies),
            "lost_connections": self.lost_connections,
            "protocol_errors": self.protocol_errors,
            "wire_bytes": self.wire_bytes,
            "inflated": self.inflated,
        }

    def distinct(self, sent: int) -> int:
        got = self.phase.got
        return sum(got[i] for i in range(min(sent, len(got))))


async def serve(worker_id: int) -> None:
    worker = Worker(worker_id)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    out.write(json.dumps({"ready": True, "pid": os.getpid(), "nofile": raise_nofile()}) + "\n")
    out.flush()
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            for c in worker.clients:
                c.close()
            await asyncio.sleep(0.1)
            break
        try:
            answer = await worker.handle(cmd)
        except Exception as exc:
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main() -> None:
    import uvloop

    worker_id = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    uvloop.run(serve(worker_id))


if __name__ == "__main__":
    main()
