"""Soak: thousands of connections with churn, broadcasts and group sends; nothing may leak or be lost.

    python -m bench.soak --minutes 10 --connections 2000 --churn 100     # the long run (~10 min)
    python -m bench.soak --seconds 25 --connections 200 --churn 20       # what tests/test_soak.py runs

It starts a private ``redis-server`` (or uses ``--redis URL``) and one ``hubwire run
tests.apps.hardening:app`` on it (Redis backplane, native serving), then, from this process, keeps
``--connections`` raw WebSocket hub clients connected: every second ``--churn`` of them close and
as many new ones connect (each joins one of ``--groups`` groups by invocation). Meanwhile
``Broadcast(seq)`` goes to everyone ``--broadcast-rate`` times a second and ``Group(g, seq)`` to one
group after another ``--group-rate`` times a second (HTTP endpoints of the app).

A client must receive message *k* when it was ready (handshake answered, or group joined) before
*k* was sent and still connected ``GRACE`` seconds after the send completed; everything it must
receive and did not is *lost*; a message received twice or out of order counts as *disordered*.
The server's ``/debug/stats`` (RSS, tasks, connections, backplane subscriptions) is sampled every
few seconds; after the run every client closes and the server must be back to its baseline:
no connection, the tasks and subscriptions it started with (Redis' own count agrees).

Prints a JSON report; exits 1 when anything was lost or disordered, a client was dropped by the
server, or something leaked (RSS growth after warm-up is reported, and checked against
``--max-rss-growth-mb``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import contextlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
from websockets.utils import apply_mask

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.hardening:app"
PREFIX = "Soak:"
RS = b"\x1e"
HANDSHAKE = b'{"protocol":"json","version":1}' + RS
#: how long after a send completed a connected client must have received it
GRACE = 2.0
_decode = msgspec.json.Decoder().decode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    key = os.urandom(4)
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + key + apply_mask(payload, key)


# ------------------------------------------------------------------------------------------------
# what must be received
# ------------------------------------------------------------------------------------------------


@dataclass
class Sends:
    """Start and end times of the sends of one stream (broadcasts, or one group's messages)."""

    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)

    def due(self, ready: float, closed: float) -> tuple[int, int]:
        """The seqs (1-based, inclusive) a client ready at ``ready`` and closed at ``closed`` must get."""
        first = bisect.bisect_left(self.starts, ready) + 1
        last = bisect.bisect_right(self.ends, closed - GRACE)
        return first, last


class Track:
    """In-order receipt of one stream by one client: first, last and the gaps between them."""

    __slots__ = ("count", "disordered", "first", "gaps", "last")

    def __init__(self) -> None:
        self.first = 0
        self.last = 0
        self.count = 0
        self.gaps: list[int] = []
        self.disordered = 0

    def got(self, seq: int) -> None:
        self.count += 1
        if not self.first:
            self.first = self.last = seq
            return
        if seq <= self.last:
            self.disordered += 1
            return
        if seq > self.last + 1 and len(self.gaps) < 10_000:
            self.gaps.extend(range(self.last + 1, seq))
        self.last = seq

    def missing(self, first: int, last: int) -> int:
        """How many of ``first..last`` never arrived."""
        if last < first:
            return 0
        if not self.first:
            return last - first + 1
        lo, hi = max(first, self.first), min(last, self.last)
        inside = max(0, hi - lo + 1) - sum(1 for g in self.gaps if lo <= g <= hi)
        return (last - first + 1) - inside


# ------------------------------------------------------------------------------------------------
# the clients
# ------------------------------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One raw WebSocket hub client (JSON protocol); no task of its own once connected."""

    def __init__(self, soak: Soak, index: int, group: str) -> None:
        self.soak = soak
        self.index = index
        self.group = group
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.records = bytearray()
        self.upgraded = False
        self.ready_at = 0.0  # handshake answered
        self.joined_at = 0.0  # group joined
        self.closing = False
        self.lost_connection = False
        self.broadcasts = Track()
        self.group_track = Track()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(  # type: ignore[attr-defined]
            (
                f"GET /hub HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.lost_connection = True
            self.soak.dropped(self)
        for future in (self.opened, self.joined):
            if not future.done():
                future.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self.buf[:12])
            del self.buf[: end + 4]
            if b" 101" not in status:
                self.opened.set_exception(ConnectionError(f"upgrade refused: {status!r}"))
                return
            self.upgraded = True
            assert self.transport is not None
            self.transport.write(_masked(HANDSHAKE))
        self._frames()

    def _frames(self) -> None:
        buf = self.buf
        pos = 0
        while len(buf) - pos >= 2:
            opcode = buf[pos] & 0x0F
            size = buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if len(buf) - pos < head + size:
                break
            payload = buf[pos + head : pos + head + size]
            pos += head + size
            if opcode in (0x0, 0x1, 0x2):
                self.records += payload
            elif opcode == 0x8 and self.transport is not None and not self.closing:
                self.soak.dropped(self)
                self.lost_connection = True
                self.closing = True
                self.transport.close()
        if pos:
            del buf[:pos]
        self._records()

    def _records(self) -> None:
        data = self.records
        start = 0
        now = time.monotonic()
        while True:
            end = data.find(RS, start)
            if end < 0:
                break
            record = bytes(data[start:end])
            start = end + 1
            if not self.ready_at:
                self.ready_at = now  # the handshake response
                if record != b"{}":
                    self.opened.set_exception(ConnectionError(f"handshake refused: {record!r}"))
                    continue
                self.opened.set_result(None)
                continue
            message = _decode(record)
            kind = message.get("type")
            if kind == 1:
                target = message.get("target")
                args = message["arguments"]
                if target == "Broadcast":
                    self.broadcasts.got(args[0])
                    self.soak.deliveries += 1
                elif target == "Group":
                    if args[0] == self.group:
                        self.group_track.got(args[1])
                    else:
                        self.soak.strays += 1
                    self.soak.deliveries += 1
            elif kind == 3 and message.get("invocationId") == "j":
                self.joined_at = now
                if not self.joined.done():
                    self.joined.set_result(None)
            elif kind == 7 and not self.closing:
                self.soak.dropped(self)
                self.lost_connection = True
        if start:
            del data[:start]

    def join(self) -> None:
        assert self.transport is not None
        call = {"type": 1, "invocationId": "j", "target": "join_group", "arguments": [self.group]}
        self.transport.write(_masked(msgspec.json.encode(call) + RS))

    def close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.write(_masked((1000).to_bytes(2, "big"), 0x8))
            self.transport.close()


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, url: str, port: int) -> None:
        self.args = args
        self.url = url
        self.port = port
        self.groups = [f"g{i}" for i in range(args.groups)]
        self.clients: dict[int, Client] = {}
        self.next_index = 0
        self.broadcast_sends = Sends()
        self.group_sends = {g: Sends() for g in self.groups}
        self.deliveries = 0
        self.expected = 0
        #: deliveries the sends actually made were addressed to: the clients connected (for a group
        #: send, its members) when each send started; what is due is this minus the clients that
        #: joined during a send or left within GRACE after it
        self.addressed = 0
        #: churn cycles run (one client retired, one opened)
        self.churned = 0
        self.lost = 0
        self.disordered = 0
        self.strays = 0
        self.drops = 0
        self.connect_failures = 0
        self.connects = 0
        self.disconnects = 0
        self.samples: list[dict[str, Any]] = []
        self.running = True
        self.sources = [f"127.0.0.{i}" for i in range(2, 12)]
        self.lost_examples: list[dict[str, Any]] = []
        self.sample_errors = 0

    def dropped(self, client: Client) -> None:
        self.drops += 1

    async def open_client(self) -> Client | None:
        index = self.next_index
        self.next_index += 1
        group = self.groups[index % len(self.groups)]
        loop = asyncio.get_running_loop()
        client = Client(self, index, group)
        try:
            async with asyncio.timeout(10):
                await loop.create_connection(
                    lambda: client,
                    "127.0.0.1",
                    self.port,
                    local_addr=(random.choice(self.sources), 0),
                )
                await client.opened
                client.join()
                await client.joined
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.connect_failures += 1
            if self.connect_failures <= 5:
                print(f"connect failed: {exc!r}", file=sys.stderr)
            client.close()
            return None
        self.clients[index] = client
        self.connects += 1
        return client

    def retire(self, client: Client, closed_at: float) -> None:
        """Account for what ``client`` should have received, then close it."""
        first, last = self.broadcast_sends.due(client.ready_at, closed_at)
        self._account(client, client.broadcasts, first, last, "broadcast")
        sends = self.group_sends[client.group]
        first, last = sends.due(client.joined_at, closed_at)
        self._account(client, client.group_track, first, last, "group")
        self.disordered += client.broadcasts.disordered + client.group_track.disordered
        self.clients.pop(client.index, None)
        client.close()
        self.disconnects += 1

    def _account(self, client: Client, track: Track, first: int, last: int, kind: str) -> None:
        if last >= first:
            self.expected += last - first + 1
        missing = track.missing(first, last)
        if missing:
            self.lost += missing
            if len(self.lost_examples) < 10:
                self.lost_examples.append(
                    {
                        "client": client.index,
                        "kind": kind,
                        "due": [first, last],
                        "missing": missing,
                        "got": [track.first, track.last],
                        "gaps": track.gaps[:20],
                    }
                )

    async def sender(self, http: httpx.AsyncClient) -> None:
        """Broadcasts and group sends at their rates, each timed (start, end)."""
        b_interval = 1.0 / self.args.broadcast_rate if self.args.broadcast_rate else None
        g_interval = 1.0 / self.args.group_rate if self.args.group_rate else None
        next_b = next_g = time.monotonic()
        group_turn = 0
        group_seq = dict.fromkeys(self.groups, 0)
        while self.running:
            now = time.monotonic()
            if b_interval is not None and now >= next_b:
                seq = len(self.broadcast_sends.starts) + 1
                self.addressed += len(self.clients)
                start = time.monotonic()
                response = await http.post(f"/broadcast/{seq}")
                response.raise_for_status()
                self.broadcast_sends.starts.append(start)
                self.broadcast_sends.ends.append(time.monotonic())
                next_b += b_interval
            if g_interval is not None and now >= next_g:
                group = self.groups[group_turn % len(self.groups)]
                group_turn += 1
                seq = group_seq[group] + 1
                self.addressed += sum(1 for c in self.clients.values() if c.group == group)
                start = time.monotonic()
                response = await http.post(f"/group/{group}/{seq}")
                response.raise_for_status()
                group_seq[group] = seq
                self.group_sends[group].starts.append(start)
                self.group_sends[group].ends.append(time.monotonic())
                next_g += g_interval
            await asyncio.sleep(max(0.0, min(next_b, next_g) - time.monotonic()))

    async def churn(self) -> None:
        """Close the oldest-but-random clients and open as many new ones, ``--churn`` a second."""
        interval = 1.0 / self.args.churn
        due = time.monotonic()
        pending: set[asyncio.Task[Any]] = set()
        while self.running:
            due += interval
            if self.clients:
                victim = self.clients[random.choice(list(self.clients))]
                self.retire(victim, time.monotonic())
            task = asyncio.get_running_loop().create_task(self.open_client())
            self.churned += 1
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
        if pending:
            await asyncio.wait(pending, timeout=15)

    async def sample(self, http: httpx.AsyncClient, started: float) -> None:
        while self.running:
            try:
                await self._sample(http, started)
            except (httpx.HTTPError, ValueError, KeyError) as exc:  # one missed sample is no reason to stop
                self.sample_errors += 1
                print(f"stats sample failed: {exc!r}", file=sys.stderr, flush=True)
            await asyncio.sleep(self.args.sample_interval)

    async def _sample(self, http: httpx.AsyncClient, started: float) -> dict[str, Any]:
        stats = (await http.get("/debug/stats")).json()
        sample = {
            "t": round(time.monotonic() - started, 1),
            "rss_mb": round(stats["rss_bytes"] / 2**20, 1),
            "tasks": stats["tasks"],
            "connections": stats["connections"],
            "hub_connections": stats["hub_connections"],
            "subscriptions": stats["subscriptions"],
            "clients": len(self.clients),
            "deliveries": self.deliveries,
        }
        self.samples.append(sample)
        if self.args.verbose:
            print(json.dumps(sample), file=sys.stderr, flush=True)
        return sample


async def run(args: argparse.Namespace, url: str, port: int, redis_url: str) -> dict[str, Any]:
    soak = Soak(args, url, port)
    # idle keep-alive connections are dropped here before uvicorn's 5 s keep-alive timeout closes them
    # (reusing one the server is closing fails with "Server disconnected without sending a response")
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
        baseline = (await http.get("/debug/stats")).json()
        started = time.monotonic()
        # ramp up
        batch = max(1, args.connections // 10)
        while len(soak.clients) < args.connections:
            need = min(batch, args.connections - len(soak.clients))
            await asyncio.gather(*(soak.open_client() for _ in range(need)))
            if soak.connect_failures > args.connections:
                raise RuntimeError("cannot connect clients")
        ramp = time.monotonic() - started
        duration = args.seconds if args.seconds else args.minutes * 60
        warmup = min(60.0, duration * 0.2)
        tasks = [
            asyncio.create_task(soak.sender(http)),
            asyncio.create_task(soak.churn()),
            asyncio.create_task(soak.sample(http, started)),
        ]
        await asyncio.sleep(warmup)
        rss_after_warmup = (await soak._sample(http, started))["rss_mb"]
        await asyncio.sleep(max(0.0, duration - warmup))
        soak.running = False
        await asyncio.wait(tasks, timeout=30)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.sleep(GRACE + 1.0)  # the last sends arrive
        at_end = await soak._sample(http, started)
        closed_at = time.monotonic()
        for client in list(soak.clients.values()):
            soak.retire(client, closed_at)
        # back to the baseline: no connection, the tasks and subscriptions the server started with
        deadline = time.monotonic() + 30
        while True:
            after = (await http.get("/debug/stats")).json()
            clean = (
                after["connections"] == 0
                and after["hub_connections"] == 0
                and after["tasks"] <= baseline["tasks"]
                and after["subscriptions"] == baseline["subscriptions"]
            )
            if clean or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    redis_subscriptions = _redis_subscriptions(redis_url)
    rss = [s["rss_mb"] for s in soak.samples]
    report = {
        "duration_s": round(time.monotonic() - started, 1),
        "ramp_s": round(ramp, 1),
        "connections": args.connections,
        "churn_per_s": args.churn,
        "connects": soak.connects,
        "disconnects": soak.disconnects,
        "connect_failures": soak.connect_failures,
        "dropped_by_server": soak.drops,
        "broadcasts_sent": len(soak.broadcast_sends.starts),
        "group_sends": sum(len(s.starts) for s in soak.group_sends.values()),
        "deliveries": soak.deliveries,
        "due": soak.expected,
        "addressed": soak.addressed,
        "churn_cycles": soak.churned,
        "lost": soak.lost,
        "lost_examples": soak.lost_examples,
        "disordered": soak.disordered,
        "strays": soak.strays,
        "rss_mb": {
            "baseline": round(baseline["rss_bytes"] / 2**20, 1),
            "after_warmup": rss_after_warmup,
            "end": at_end["rss_mb"],
            "max": max(rss),
            "after_close": round(after["rss_bytes"] / 2**20, 1),
        },
        "tasks": {
            "baseline": baseline["tasks"],
            "peak": max(s["tasks"] for s in soak.samples),
            "after_close": after["tasks"],
        },
        "subscriptions": {
            "baseline": baseline["subscriptions"],
            "after_close": after["subscriptions"],
            "redis_after_close": redis_subscriptions,
        },
        "server_connections_after_close": after["connections"],
        "slow_consumer_closes": after["slow_consumer_closes"],
        "samples": soak.samples if args.samples else len(soak.samples),
        "sample_errors": soak.sample_errors,
    }
    growth = report["rss_mb"]["end"] - rss_after_warmup
    report["rss_growth_after_warmup_mb"] = round(growth, 1)
    problems = []
    if soak.lost:
        problems.append(f"{soak.lost} deliveries lost")
    if soak.disordered:
        problems.append(f"{soak.disordered} deliveries disordered")
    if soak.strays:
        problems.append(f"{soak.strays} group messages to non-members")
    if soak.drops:
        problems.append(f"{soak.drops} clients dropped by the server")
    if soak.connect_failures:
        problems.append(f"{soak.connect_failures} connects failed")
    if after["connections"] or after["hub_connections"]:
        problems.append("connections left on the server")
    if after["tasks"] > baseline["tasks"]:
        problems.append(f"tasks leaked: {baseline['tasks']} -> {after['tasks']}")
    if (
        after["subscriptions"] != baseline["subscriptions"]
        or redis_subscriptions != baseline["subscriptions"]
    ):
        problems.append("subscriptions leaked")
    if growth > args.max_rss_growth_mb:
        problems.append(f"RSS grew {growth:.1f} MB after warm-up")
    report["problems"] = problems
    return report


def _redis_subscriptions(url: str) -> int:
    """Subscriptions of this run's prefix as Redis counts them (PUBSUB CHANNELS + NUMSUB)."""
    import redis

    with redis.Redis.from_url(url) as r:
        channels = r.pubsub_channels(f"{PREFIX}*")
        if not channels:
            return 0
        return sum(n for _, n in r.pubsub_numsub(*channels))


@contextlib.contextmanager
def _processes(args: argparse.Namespace) -> Any:
    """A private redis-server (unless --redis) and the hub server; both killed on the way out."""
    started: list[subprocess.Popen[bytes]] = []
    logdir = tempfile.mkdtemp(prefix="hubwire-soak-")
    try:
        redis_url = args.redis
        if not redis_url:
            exe = shutil.which("redis-server")
            if exe is None:
                raise SystemExit("redis-server is not installed (or pass --redis URL)")
            redis_port = _free_port()
            proc = subprocess.Popen(
                [
                    exe,
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    logdir,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            started.append(proc)
            _wait_port(redis_port, proc)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        port = args.port or _free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
        log_path = Path(logdir) / "server.log"
        with open(log_path, "wb") as log_file:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hubwire.cli",
                    "run",
                    APP,
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                    "--redis",
                    redis_url,
                    "--channel-prefix",
                    PREFIX,
                    "--serving",
                    args.serving,
                ],
                cwd=ROOT,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(server)
        _wait_port(port, server)
        yield f"http://127.0.0.1:{port}", port, redis_url, log_path
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        if not args.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=0.0, help="overrides --minutes")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--churn", type=float, default=100.0, help="connects (and disconnects) per second")
    parser.add_argument("--broadcast-rate", type=float, default=10.0, help="broadcasts per second")
    parser.add_argument("--group-rate", type=float, default=20.0, help="group sends per second")
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--serving", choices=("native", "asgi"), default="native")
    parser.add_argument("--redis", help="use this Redis instead of a private redis-server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sample-interval", type=float, default=5.0)
    parser.add_argument("--max-rss-growth-mb", type=float, default=20.0)
    parser.add_argument("--samples", action="store_true", help="include every stats sample in the report")
    parser.add_argument("--keep-logs", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print samples while running")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections * 2 + 1000
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    with _processes(args) as (url, port, redis_url, log_path):
        report = asyncio.run(run(args, url, port, redis_url))
        text = log_path.read_text(errors="replace")
        report["server_log_tracebacks"] = text.count("Traceback")
        if report["server_log_tracebacks"]:
            report["problems"].append("tracebacks in the server log")
            print(text[-5000:], file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
