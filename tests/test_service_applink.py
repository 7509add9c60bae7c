"""An app server's side of a link, in process: waking, parking and ending linked connections.

The node is this test: it hands frames to a real :class:`AppLink` (with a real hub handler, lifetime
manager and connection manager) in the order a node could send them, and reads what the link queued
for it. The orders here are the narrow ones - a client leaving while its hub state is still on its
way back, the link lost right after - that the multi-process suites (``test_service.py``) reach only
by chance. Each checks that hub code's ``on_disconnected`` runs exactly once and nothing of the
connection is left behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from hubwire import Hub, HubOptions
from hubwire.connections.manager import ConnectionManager
from hubwire.hubs.handler import HubConnectionHandler
from hubwire.protocol.json_protocol import JsonHubProtocol
from hubwire.protocol.service import (
    ACK_OK,
    Ack,
    CloseConnection,
    ConnectionData,
    GroupCommand,
    MultiConnectionData,
    OpenConnection,
    ServiceFrame,
    ServiceFrameParser,
)
from hubwire.service.applink import FRESH_GRACE, INBOX_LIMIT, AppLink, ServiceLifetimeManager, ServiceLinks

HANDSHAKE = b'{"protocol":"json","version":1}\x1e'
PING = b'{"type":6}\x1e'

#: what the hub saw, in order: (event, connection id)
EVENTS: list[tuple[str, str]] = []
#: when set, on_connected waits for it
GATE: asyncio.Event | None = None
#: client results asked from on_connected's background task: values or errors
RESULTS: list[Any] = []
#: on_connected asks the client for a result in a background task (as hub code must)
ASK_IN_BACKGROUND = False
#: on_connected starts this with (hub) in a background task, if set
LATER: Callable[[Hub], Any] | None = None


class Chat(Hub):
    async def on_connected(self) -> None:
        cid = self.context.connection_id
        EVENTS.append(("connected", cid))
        if ASK_IN_BACKGROUND:
            clients = self.clients

            async def ask() -> None:
                try:
                    RESULTS.append(await clients.client(cid).invoke("GetName", timeout=5))
                except Exception as exc:
                    RESULTS.append(exc)

            asyncio.get_running_loop().create_task(ask())
        if LATER is not None:
            asyncio.get_running_loop().create_task(LATER(self))
        if GATE is not None:
            await GATE.wait()

    async def on_disconnected(self, exception: BaseException | None) -> None:
        EVENTS.append(("disconnected", self.context.connection_id))

    async def echo(self, value: str) -> str:
        return value


class Setup:
    """One link (not connected to anything: its frames are kept in ``link.out``)."""

    def __init__(self, awake_max: int = 1000) -> None:
        self.links = ServiceLinks(["http://node.invalid"], "k" * 40)
        self.links.awake_max = awake_max
        self.manager = ServiceLifetimeManager(self.links, "chat")
        protocol = JsonHubProtocol()
        self.manager.protocols = (protocol,)
        self.handler = HubConnectionHandler(Chat, self.manager, [protocol], HubOptions(), ["WebSockets"])
        self.connections = ConnectionManager()
        self.links.bind(self.connections)
        self.link = AppLink(self.links, "http://node.invalid", "chat", self.handler)
        self.link._ws = object()  # type: ignore[assignment] # "linked": frames are queued
        self.links.links["chat"] = [self.link]
        self.link.ready.set()

    async def frame(self, frame: ServiceFrame) -> None:
        await self.link._on_frame(frame)

    async def connect(self, cid: str) -> None:
        await self.frame(OpenConnection(cid, None, {}, {}, {}))
        await self.frame(ConnectionData(cid, HANDSHAKE))

    async def parked(self, cid: str) -> None:
        """``cid`` connected and parked (new connections are, once their handshake is handled)."""
        await self.connect(cid)
        await until(lambda: cid in self.link.parked, f"{cid} to be parked")

    def sent(self) -> list[ServiceFrame]:
        parser = ServiceFrameParser()
        return [
            f for data in self.link.out.messages(b"".join(self.link.out._frames)) for f in parser.feed(data)
        ]

    def leftovers(self, cid: str) -> list[str]:
        """Where ``cid`` is still known (nothing, once it ended)."""
        places = {
            "connection manager": any(c.connection_id == cid for c in self.connections.connections()),
            "hub handler": cid in self.handler.connected,
            "lifetime manager": cid in self.manager.local,
            "link": cid in self.link.conns or cid in self.link.parked or cid in self.link._restoring,
            "inbox": cid in self.link._inbox,
        }
        return [k for k, v in places.items() if v]


async def until(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def ran(cid: str) -> list[str]:
    return [event for event, who in EVENTS if who == cid]


@pytest.fixture(autouse=True)
def _fresh_hub() -> Any:
    global GATE, ASK_IN_BACKGROUND, LATER
    EVENTS.clear()
    RESULTS.clear()
    GATE, ASK_IN_BACKGROUND, LATER = None, False, None
    yield
    GATE, ASK_IN_BACKGROUND, LATER = None, False, None


async def test_new_connections_are_parked_after_a_grace_and_woken_whole() -> None:
    s = Setup()
    await s.connect("c1")
    await asyncio.sleep(FRESH_GRACE / 5)
    assert "c1" in s.link.conns  # not in the same moment: what on_connected started runs first
    await until(lambda: "c1" in s.link.parked, "c1 to be parked")
    await s.frame(
        ConnectionData("c1", b'{"type":1,"invocationId":"1","target":"echo","arguments":["hi"]}\x1e')
    )
    await until(
        lambda: any(isinstance(f, ConnectionData) and b'"result":"hi"' in f.payload for f in s.sent()),
        "the echo",
    )
    assert ran("c1") == ["connected"]  # woken, not connected again


async def test_a_client_leaving_while_on_connected_runs_then_the_link_lost_ends_once() -> None:
    global GATE
    GATE = asyncio.Event()
    s = Setup()
    await s.connect("c1")
    await until(lambda: ran("c1") == ["connected"], "on_connected")
    await s.frame(CloseConnection("c1", "the client left"))
    await s.link._lost()
    GATE.set()
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("c1"), "c1 forgotten")
    await asyncio.sleep(0.05)
    assert ran("c1") == ["connected", "disconnected"]


@pytest.mark.parametrize("lost", [False, True])
async def test_a_parked_client_leaving_ends_once_even_when_the_link_goes_too(lost: bool) -> None:
    s = Setup()
    await s.parked("c1")
    await s.frame(CloseConnection("c1", "the client left"))
    if lost:
        await s.link._lost()
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("c1"), "c1 forgotten")


async def test_a_connection_woken_as_its_link_is_lost_ends_once() -> None:
    s = Setup()
    await s.parked("c1")
    await s.frame(ConnectionData("c1", PING))  # wakes it: its hub state comes back in its turn
    await s.link._lost()
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("c1"), "c1 forgotten")


async def test_a_connection_woken_by_too_much_input_is_closed_and_ends_once() -> None:
    s = Setup()
    await s.parked("c1")
    burst = PING * (INBOX_LIMIT // len(PING) // 4)
    for _ in range(8):  # more than the bound waits before its hub state is even back
        await s.frame(ConnectionData("c1", burst))
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("c1"), "c1 forgotten")
    assert any(isinstance(f, CloseConnection) and f.connection_id == "c1" for f in s.sent())


async def test_past_the_awake_bound_the_least_recent_are_parked_and_all_end_once() -> None:
    s = Setup(awake_max=50)
    ids = [f"c{i}" for i in range(600)]
    for cid in ids:
        await s.connect(cid)
        await s.frame(ConnectionData(cid, PING))  # busy: each wakes or stays awake
    await until(lambda: not s.link._inbox, "the input handled")
    await until(lambda: len(s.link.conns) <= 50, "the awake bound")
    assert len(s.link.conns) + len(s.link.parked) == 600
    await s.link._lost()
    await until(lambda: sum(1 for e, _ in EVENTS if e == "disconnected") == 600, "every on_disconnected")
    assert all(ran(cid) == ["connected", "disconnected"] for cid in ids)
    assert not any(s.leftovers(cid) for cid in ids)


async def test_a_client_result_asked_from_on_connected_reaches_the_client() -> None:
    """Hub code asks the new client for a result from a task on_connected started: the call goes
    out to the client and its answer comes back (no "disconnected" from a connection parked under
    it)."""
    global ASK_IN_BACKGROUND
    ASK_IN_BACKGROUND = True
    s = Setup()
    await s.connect("c1")

    def invocation_id() -> str | None:
        for f in s.sent():
            if isinstance(f, ConnectionData) and b'"target":"GetName"' in f.payload:
                return f.payload.split(b'"invocationId":"')[1].split(b'"')[0].decode()
        return None

    await until(lambda: invocation_id() is not None or bool(RESULTS), "the call to the client")
    assert not RESULTS, RESULTS
    answer = f'{{"type":3,"invocationId":"{invocation_id()}","result":"ada"}}\x1e'.encode()
    await s.frame(ConnectionData("c1", answer))
    await until(lambda: bool(RESULTS), "the result")
    assert RESULTS == ["ada"]


async def test_a_crashed_move_left_by_its_client_then_its_link_lost_during_on_connected_ends_once() -> None:
    """Moved here after its app server died (on_connected runs again), the client gone before its
    state is back, the link lost while on_connected still runs: on_disconnected runs after it."""
    global GATE
    GATE = asyncio.Event()
    s = Setup()
    state = {"protocol": "json", "version": 1, "groups": [], "items": b"\x80", "crashed": True}
    await s.frame(OpenConnection("m1", None, {}, {}, {"migrated": state}))
    await s.frame(CloseConnection("m1", "the client left"))
    await until(lambda: ran("m1") == ["connected"], "on_connected of the moved connection")
    await s.link._lost()
    GATE.set()
    await until(lambda: ran("m1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("m1"), "m1 forgotten")


async def test_hub_code_holding_a_parked_connection_still_writes_to_it_and_closes_it() -> None:
    """A task on_connected started, still running after the connection was parked: what it sends
    the caller reaches the client, and aborting the context closes the connection (once)."""
    global LATER

    async def later(hub: Hub) -> None:
        caller, context = hub.clients.caller, hub.context
        await until(lambda: "c1" in s.link.parked, "c1 to be parked")
        await caller.send("Welcome", "hi")
        context.abort()

    LATER = later
    s = Setup()
    await s.connect("c1")

    def welcomed() -> bool:
        return any(
            isinstance(f, ConnectionData | MultiConnectionData) and b"Welcome" in bytes(_payload(f))
            for f in s.sent()
        )

    await until(welcomed, "the welcome to go to the node")
    await until(lambda: any(isinstance(f, CloseConnection) for f in s.sent()), "the close to go to the node")
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.leftovers("c1"), "c1 forgotten")


def _payload(frame: Any) -> bytes:
    if isinstance(frame, ConnectionData):
        return frame.payload
    return b"".join(frame.payloads.values())


async def test_group_changes_around_a_park_are_in_the_woken_connection() -> None:
    """A group change waiting for the node's Ack keeps the connection awake; one made while it is
    parked goes into its record: woken, its context has both groups."""
    global LATER

    async def join(hub: Hub) -> None:
        await hub.groups.add(hub.context.connection_id, "early")

    LATER = join
    s = Setup()
    await s.connect("c1")

    def command(group: str) -> GroupCommand | None:
        return next((f for f in s.sent() if isinstance(f, GroupCommand) and f.group == group), None)

    await until(lambda: command("early") is not None, "the first group change")
    await asyncio.sleep(FRESH_GRACE * 2)
    assert "c1" in s.link.conns  # not parked while its Ack is due
    early = command("early")
    assert early is not None
    await s.frame(Ack(early.ack_id, ACK_OK))
    await until(lambda: "c1" in s.link.parked, "c1 to be parked")
    late = asyncio.ensure_future(s.manager.add_to_group("c1", "late"))
    await until(lambda: command("late") is not None, "the second group change")
    second = command("late")
    assert second is not None
    await s.frame(Ack(second.ack_id, ACK_OK))
    await late
    await s.frame(ConnectionData("c1", PING))  # wakes it
    await until(lambda: "c1" in s.handler.connected, "c1 woken")
    assert s.handler.connected["c1"].groups == {"early", "late"}


async def test_a_link_lost_while_it_waited_for_room_drops_its_input_quietly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = Setup()
    await s.connect("c1")
    await until(lambda: "c1" in s.handler.connected, "the handshake")
    s.link.out.writable.clear()  # the node is behind
    await s.frame(ConnectionData("c1", PING))
    await asyncio.sleep(0.05)
    await s.link._lost()
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    await until(lambda: not s.link._inbox, "its work done")
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


async def test_a_group_change_acknowledged_while_a_woken_connection_restores_is_kept() -> None:
    s = Setup()
    await s.parked("c1")
    change = asyncio.ensure_future(s.manager.add_to_group("c1", "g"))

    def command() -> GroupCommand | None:
        return next((f for f in s.sent() if isinstance(f, GroupCommand) and f.group == "g"), None)

    await until(lambda: command() is not None, "the group change")
    s.link.out.writable.clear()  # the node is behind: the woken connection's restore waits
    await s.frame(ConnectionData("c1", PING))
    await asyncio.sleep(0.05)
    sent = command()
    assert sent is not None
    await s.frame(Ack(sent.ack_id, ACK_OK))
    await change
    s.link.out.writable.set()
    await until(lambda: "c1" in s.handler.connected, "c1 woken")
    assert s.handler.connected["c1"].groups == {"g"}


async def test_objects_of_an_ended_connection_held_by_hub_code_send_nothing() -> None:
    global LATER
    held: dict[str, Any] = {}

    async def keep(hub: Hub) -> None:
        held["caller"], held["context"] = hub.clients.caller, hub.context

    LATER = keep
    s = Setup()
    await s.parked("c1")
    await s.frame(CloseConnection("c1", "the client left"))
    await until(lambda: ran("c1") == ["connected", "disconnected"], "on_disconnected")
    before = len(s.sent())
    for i in range(3):
        await held["caller"].send("Tick", i)
    held["context"].abort()
    await asyncio.sleep(0.05)
    assert s.sent()[before:] == []
    assert ran("c1") == ["connected", "disconnected"]
