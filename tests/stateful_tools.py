"""Helpers of the stateful reconnect tests: a TCP proxy that cuts connections, the Node client driver.

:class:`CuttingProxy` sits between a client and a server on loopback and can drop every
connection it carries at once without a WebSocket close handshake (what a flaky network or a
load balancer restart does), while accepting new ones (the client's resume). :class:`NodeClient`
drives ``tests/js/stateful.cjs`` (the official JS client) through stdin / stdout JSON lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "js" / "stateful.cjs"
NODE = shutil.which("node")


class _Pair:
    """One proxied connection: the client's side and the server's."""

    __slots__ = ("client", "server", "zombie")

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.zombie = False


class CuttingProxy:
    """A loopback TCP proxy to ``127.0.0.1:target`` that can cut every connection it carries."""

    def __init__(self, target: int) -> None:
        self.target = target
        #: round robin: each new connection goes to the next of these ports (a load balancer
        #: without sticky sessions); empty: every connection goes to ``target``
        self.rotation: list[int] = []
        self._turn = 0
        self.port = 0
        #: connections accepted so far (a resume shows up as one more)
        self.accepted = 0
        #: connections dropped by :meth:`cut`
        self.cuts = 0
        #: connections dropped because no target accepted them
        self.unplaced = 0
        #: refuse new connections (accept and drop them at once)
        self.refusing = False
        self._pairs: set[_Pair] = set()
        #: server sides left open by ``cut(server_side=False)``, closed with the proxy
        self._zombies: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _targets(self) -> list[int]:
        """Where one new connection may go, in order: the instance whose turn it is, then each
        other one once (a load balancer tries the next instance for this connection when one
        refuses, as nginx's ``proxy_next_upstream`` does).

        One turn per connection, taken before any await: connections accepted at the same time
        must not take turns from each other, or one of them could be sent to the same refusing
        instance again and again and be dropped although other instances were up.
        """
        if not self.rotation:
            return [self.target]
        first = self._turn % len(self.rotation)
        self._turn += 1
        return self.rotation[first:] + self.rotation[:first]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refusing:
            writer.transport.abort()
            return
        for port in self._targets():
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                continue  # refused (stopped, restarting): the next instance
        else:
            self.unplaced += 1
            writer.transport.abort()
            return
        pair = _Pair(writer, up_writer)
        self._pairs.add(pair)
        try:
            await asyncio.gather(self._pipe(pair, reader, up_writer), self._pipe(pair, up_reader, writer))
        finally:
            self._pairs.discard(pair)
            writer.transport.abort()
            if pair.zombie:
                self._zombies.append(up_writer)
            else:
                up_writer.transport.abort()

    @staticmethod
    async def _pipe(pair: _Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                if pair.zombie:
                    return  # the server side stays open and hears nothing more
                writer.write(data)
                await writer.drain()
        if not pair.zombie:
            # one side ended: pass on what it sent, then the end (as a load balancer does; an abort
            # would drop what is still buffered here, and the peer would see a reset instead)
            writer.close()
            with contextlib.suppress(OSError, ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 5)

    def cut(self, server_side: bool = True) -> int:
        """Drop every connection now with no close handshake; returns how many.

        ``server_side=False`` drops only the client's side and leaves the server's socket open
        and silent (a NAT or a load balancer that forgot the connection): the server does not
        notice, so the client's resume finds the connection still active.
        """
        pairs = list(self._pairs)
        for pair in pairs:
            pair.zombie = not server_side
            pair.client.transport.abort()
            if server_side:
                pair.server.transport.abort()
        self.cuts += len(pairs)
        return len(pairs)

    async def close(self) -> None:
        self.cut()
        for writer in self._zombies:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)


@contextlib.asynccontextmanager
async def cutting_proxy(target: int) -> AsyncIterator[CuttingProxy]:
    proxy = CuttingProxy(target)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


class NodeClient:
    """One official JS client (``tests/js/stateful.cjs``) and the events it printed."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._ids = 0

    async def next_event(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"no event from the Node client in {timeout} s; events: {self.events}"
            ) from None
        if not line:
            raise AssertionError(f"the Node client exited ({self.proc.returncode}); events: {self.events}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        assert event["event"] != "error", event
        return event

    async def wait_for(
        self, kind: str, timeout: float, match: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next_event(max(0.01, deadline - time.monotonic()))
            if event["event"] == kind and (match is None or match(event)):
                return event

    async def command(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command).encode() + b"\n")
        await self.proc.stdin.drain()

    async def invoke(self, method: str, *args: Any) -> int:
        """Start an invocation; its result comes as a ``result`` event with the returned id."""
        self._ids += 1
        await self.command(cmd="invoke", id=self._ids, method=method, args=list(args))
        return self._ids

    async def report(self, timeout: float = 10) -> dict[str, Any]:
        await self.command(cmd="report")
        return await self.wait_for("report", timeout)

    def lifecycle_events(self) -> list[dict[str, Any]]:
        """``reconnecting`` / ``reconnected`` / ``closed``: what a successful resume never shows."""
        return [e for e in self.events if e["event"] in ("reconnecting", "reconnected", "closed")]


@contextlib.asynccontextmanager
async def node_client(url: str, protocol: str, mode: str = "stateful") -> AsyncIterator[NodeClient]:
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(SCRIPT),
        url,
        protocol,
        mode,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield NodeClient(proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def pump_with_cuts(proxy: CuttingProxy, http: Any, connection_id: str, count: int) -> int:
    """Have the app (``tests.apps.stateful``, through ``http``) send ``count`` numbered messages
    (direct, group, all) over ~2 s while cutting the connection five times, alternating full cuts
    and client-side-only cuts (the server does not notice those: the resume replaces a transport
    it still holds). Returns the proxied connections cut (the WebSocket each time, plus the
    client's idle keep-alive HTTP connection of negotiate once)."""
    body = {"connectionId": connection_id, "group": "g1", "count": count, "intervalMs": 20}
    assert (await http.post("/pump", json=body)).status_code == 202
    cuts = 0
    for round_ in range(5):
        await asyncio.sleep(0.3)
        before = proxy.accepted
        cuts += proxy.cut(server_side=round_ % 2 == 0)
        # the client resumes at once through the proxy (one new connection)
        deadline = time.monotonic() + 10
        while not (proxy.accepted > before and proxy.open_connections > 0):
            assert time.monotonic() < deadline, "timed out waiting for the resume"
            await asyncio.sleep(0.02)
    return cuts


async def cuts_lose_nothing(
    proxy: CuttingProxy, http: Any, client: NodeClient, connection_id: str, count: int
) -> None:
    """:func:`pump_with_cuts`, then: every message arrived once and in order, on the same
    connection, which is connected, and the client's automatic reconnect never started (each
    cut was resumed)."""
    assert await pump_with_cuts(proxy, http, connection_id, count) >= 5
    deadline = time.monotonic() + 20
    while len((await client.report())["nums"]) < count:
        assert time.monotonic() < deadline, f"timed out waiting for the {count} messages"
        await asyncio.sleep(0.05)
    report = await client.report()
    assert [n for n, _ in report["nums"]] == list(range(count))  # all of them, in order, once
    assert report["connectionId"] == connection_id and report["state"] == "Connected"
    assert client.lifecycle_events() == []  # resumed: the automatic reconnect never started
