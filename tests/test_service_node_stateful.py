"""A node's stateful reconnect, in process: a real :class:`ServiceClients` with one app-server link
whose writer the test controls (it reads nothing: the link falls behind), and one stateful client
connection whose bytes the test feeds. What the multi-process suite cannot make happen on cue."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from hubwire import HubOptions
from hubwire.connections.connection import Connection, Principal, RequestInfo
from hubwire.hubs.lifetime import HubLifetimeManager, InMemoryLifetimeManager
from hubwire.protocol.json_protocol import JsonHubProtocol
from hubwire.protocol.service import ConnectionData, ServiceFrameParser
from hubwire.service.node import HOLD_LIMIT, NodeLink, ServiceClients
from hubwire.transports.websocket import FEATURES

HANDSHAKE = b'{"protocol":"json","version":2}\x1e'


def _manager(name: str) -> tuple[HubLifetimeManager, Awaitable[None]]:
    manager = InMemoryLifetimeManager()
    manager.protocols = (JsonHubProtocol(),)

    async def started() -> None:
        return None

    return manager, started()


class Node:
    def __init__(self) -> None:
        self.clients = ServiceClients(HubOptions(), {"json": JsonHubProtocol()}, _manager)
        self.to_app: list[bytes] = []

        async def write(data: bytes) -> None:
            self.to_app.append(data)

        self.link = NodeLink("app-a", "chat", write)

    async def start(self) -> Connection:
        hub = await self.clients.hub("chat")
        hub.links.append(self.link)
        conn = Connection("c1", "c1", 1, Principal("alice", {}), None, stateful=True)
        conn.features = FEATURES
        conn._request = RequestInfo("/client/", {}, {"hub": "chat"}, {})
        await self.clients.on_connect(conn)
        await self.clients.on_receive(conn, HANDSHAKE)
        self.clients.on_frame(self.link, ConnectionData("c1", b"{}\x1e"))  # the app server accepts
        return conn

    def frames_for_app(self) -> list[Any]:
        parser = ServiceFrameParser()
        data = b"".join(self.link.out._frames)
        return [f for m in self.link.out.messages(data) for f in parser.feed(m)]


def call(i: int, size: int = 0) -> bytes:
    return b'{"type":1,"invocationId":"%d","target":"Echo","arguments":["%s"]}\x1e' % (i, b"x" * size)


async def test_acks_are_read_while_the_app_server_is_behind() -> None:
    """The link to the app server full: the client's calls wait at the node (bounded), and its
    Acks still trim what the node keeps for it, so it is not taken for a slow consumer."""
    node = Node()
    conn = await node.start()
    replay = conn.outbox.replay
    assert replay is not None
    for i in range(1, 6):  # numbered messages to the client, not acknowledged yet
        conn.write(b'{"type":1,"target":"Num","arguments":[%d]}\x1e' % i)
    assert replay.kept == 5
    node.link.out.writable.clear()  # the app server is behind
    receiving = asyncio.ensure_future(node.clients.on_receive(conn, call(1, 1000)))
    await asyncio.sleep(0)
    assert receiving.done()  # held, not waiting: the next input is read
    await asyncio.wait_for(node.clients.on_receive(conn, b'{"type":8,"sequenceId":5}\x1e'), 5)
    assert replay.kept == 0  # acknowledged although the call still waits
    assert not any(b"Echo" in getattr(f, "payload", b"") for f in node.frames_for_app())
    node.link.out.writable.set()
    await asyncio.sleep(0.01)
    forwarded = [f.payload for f in node.frames_for_app() if isinstance(f, ConnectionData)]
    assert forwarded[-1] == call(1, 1000)  # then the call goes on, once


async def test_past_the_bound_a_client_waits_for_its_app_server() -> None:
    node = Node()
    conn = await node.start()
    node.link.out.writable.clear()
    size = 30_000
    each = len(call(0, size))
    held = HOLD_LIMIT // each  # these wait at the node, the client's next input is read
    async with asyncio.timeout(5):
        for i in range(held):
            await node.clients.on_receive(conn, call(i, size))
    blocked = asyncio.ensure_future(node.clients.on_receive(conn, call(held, size)))
    await asyncio.sleep(0.01)
    assert not blocked.done()  # past the bound: back-pressure
    node.link.out.writable.set()
    await asyncio.wait_for(blocked, 5)
    count = held + 1
    forwarded = [f.payload for f in node.frames_for_app() if isinstance(f, ConnectionData)]
    calls = [p for p in forwarded if b"Echo" in p]
    assert len(calls) == count and calls == sorted(calls, key=lambda p: int(p.split(b'"')[5]))


async def test_a_resume_drops_what_waited_and_the_resent_copy_runs_once() -> None:
    node = Node()
    conn = await node.start()
    node.link.out.writable.clear()
    async with asyncio.timeout(5):
        await node.clients.on_receive(conn, call(1))  # waits for the app server
        conn.outbox.detach()  # the WebSocket dropped; the client comes back
        await node.clients.on_resume(conn)
        await node.clients.on_receive(conn, b'{"type":9,"sequenceId":1}\x1e' + call(1))
    node.link.out.writable.set()
    await asyncio.sleep(0.01)
    forwarded = [f.payload for f in node.frames_for_app() if isinstance(f, ConnectionData)]
    assert [p for p in forwarded if b"Echo" in p] == [call(1)]


async def test_a_message_the_node_cannot_read_closes_a_stateful_client() -> None:
    """Past it the numbering could not go on (its Acks would be wrong): closed as a hub server
    closes it, reconnect allowed, nothing of it passed on."""
    node = Node()
    conn = await node.start()
    async with asyncio.timeout(5):
        await node.clients.on_receive(conn, call(1, HubOptions().maximum_receive_message_size))
    assert conn.outbox.closed
    written = b"".join(conn.outbox.take_nowait())
    assert b'{"type":7,"error":"Connection closed with an error.","allowReconnect":true}' in written
    assert not any(b"Echo" in getattr(f, "payload", b"") for f in node.frames_for_app())
