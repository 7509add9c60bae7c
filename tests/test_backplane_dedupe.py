"""Exactly once over the Redis backplane, in-process: envelope ids, the dedupe window, the manager.

The hubwire-process counterparts (Redis killed, Redis asleep) are in tests/test_outage_exactly_once.py.
Here the managers of two instances run in one process against a private ``redis-server``: it is
killed and started again (an outage), and what was published is published once more (what the bus
does with a batch whose answer was lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.backplane.dedupe import Deduplicator
from hubwire.backplane.redis import RedisBackplane, RedisHubLifetimeManager
from hubwire.protocol import JsonHubProtocol, MessagePackHubProtocol
from hubwire.protocol.backplane import RedisInvocation, decode_invocation, encode_invocation

from .conftest import RedisServer
from .test_backplane_protocol import JSON_SEND, MSGPACK_SEND, SEND_ALL
from .test_scaleout import new_prefix

# -- envelope ---------------------------------------------------------------------------------------


def test_send_envelope_with_id_is_dotnet_readable() -> None:
    """[excluded, sers, nil, nil, origin, seq]: .NET reads slots 3-4 as null (an ordinary send) and
    ignores the rest; its first two elements are byte for byte what .NET writes."""
    sers = {"json": JSON_SEND, "messagepack": MSGPACK_SEND}
    encoded = encode_invocation(RedisInvocation(sers, origin="web1_ab", seq=300))
    assert encoded[0] == 0x96  # fixarray(6)
    assert encoded[1:].startswith(SEND_ALL[1:])  # same excluded ids and serializations as .NET
    assert encoded[len(SEND_ALL) :] == bytes.fromhex("c0 c0 a7") + b"web1_ab" + bytes.fromhex("cd 01 2c")
    raw = msgspec.msgpack.decode(encoded)
    assert raw[2] is None and raw[3] is None  # what ReadInvocation reads when length > 3
    inv = decode_invocation(encoded)
    assert (inv.origin, inv.seq, inv.invocation_id, inv.return_channel) == ("web1_ab", 300, None, None)
    assert inv.serializations == sers and inv.excluded == []


def test_client_result_envelope_with_id() -> None:
    inv = RedisInvocation({"json": JSON_SEND}, ["x"], "id22", "chan", origin="o", seq=1)
    assert msgspec.msgpack.decode(encode_invocation(inv)) == [
        ["x"],
        {"json": JSON_SEND},
        "id22",
        "chan",
        "o",
        1,
    ]
    assert decode_invocation(encode_invocation(inv)) == inv


def test_envelopes_without_an_id_keep_dotnet_bytes() -> None:
    assert encode_invocation(RedisInvocation({"json": JSON_SEND, "messagepack": MSGPACK_SEND})) == SEND_ALL
    inv = decode_invocation(SEND_ALL)
    assert inv.origin is None and inv.seq is None


@pytest.mark.parametrize("tail", [["o", True], ["o", "1"], [1, 1], ["o", 1.0], ["o"]])
def test_malformed_ids_are_ignored(tail: list[Any]) -> None:
    inv = decode_invocation(msgspec.msgpack.encode([[], {"json": JSON_SEND}, None, None, *tail]))
    assert inv.origin is None and inv.seq is None


# -- the window -------------------------------------------------------------------------------------

ORIGINS = st.sampled_from(["a", "b", "c"])


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(ORIGINS, st.integers(min_value=-3, max_value=40), st.integers(min_value=0, max_value=3)),
        max_size=300,
    )
)
def test_window_drops_exactly_the_repeats_within_it(steps: list[tuple[str, int, int]]) -> None:
    """Streams that move forward with gaps, step back, repeat and jump far (a small window, 64).

    A first occurrence is never dropped; a repeat of a number no more than ``window`` below the
    highest seen from its origin is always dropped (beyond that the window may forget it)."""
    window = 64
    dedupe = Deduplicator(window)
    seen: dict[str, set[int]] = {}
    highest: dict[str, int] = {}
    position = dict.fromkeys(["a", "b", "c"], 1000)
    for origin, move, kind in steps:
        if kind == 0:  # forward, possibly with a gap
            seq = position[origin] = position[origin] + move
        elif kind == 1:  # a repeat or a late one, a little behind
            seq = position[origin] - move
        elif kind == 2:  # far behind: may be outside the window
            seq = position[origin] - move * 20
        else:  # a jump far ahead (an instance that sent much on channels we do not hear)
            seq = position[origin] = position[origin] + move * 100
        first = dedupe.first_time(origin, seq)
        repeat = seq in seen.setdefault(origin, set())
        if not repeat:
            assert first, f"first occurrence of {origin}:{seq} dropped"
        elif seq >= highest.get(origin, seq) - window:
            assert not first, f"repeat of {origin}:{seq} within the window delivered"
        seen[origin].add(seq)
        highest[origin] = max(highest.get(origin, seq), seq)
    assert dedupe.duplicates <= sum(1 for _ in steps)


def test_window_memory_is_bounded_per_origin() -> None:
    dedupe = Deduplicator()
    for seq in range(1, 300_000, 3):
        assert dedupe.first_time("o", seq)
    window = dedupe._origins["o"]
    assert len(window.bits) == 2 * 65_536 // 8  # 16 KiB, whatever the stream
    last = 299_998
    assert not dedupe.first_time("o", last - 65_535)  # seen (≡ 1 mod 3), a window below the last
    assert dedupe.first_time("o", 3)  # long gone: accepted (at least once), counted
    assert dedupe.too_old == 1


def test_dotnet_ids_that_wrap_are_accepted() -> None:
    """.NET's group-command ids are Int32 and wrap to negative numbers: never taken for repeats."""
    dedupe = Deduplicator()
    assert dedupe.first_time("dotnet", 2**31 - 1)
    assert all(dedupe.first_time("dotnet", -(2**31) + i) for i in range(100))


def test_origins_not_heard_from_are_forgotten() -> None:
    now = [0.0]
    dedupe = Deduplicator(forget_after=60.0, max_origins=3, clock=lambda: now[0])
    for origin in ("a", "b", "c"):
        assert dedupe.first_time(origin, 1)
    now[0] = 50.0
    assert not dedupe.first_time("a", 1)  # heard at 50
    now[0] = 80.0
    assert dedupe.first_time("a", 2)  # the sweep at 75 forgot b and c (silent since 0)
    assert len(dedupe) == 1
    # at most max_origins: the least recently heard goes first
    for i, origin in enumerate(("d", "e", "f"), 1):
        now[0] = 80.0 + i
        dedupe.first_time(origin, 1)
    assert len(dedupe) == 3 and not dedupe.first_time("e", 1) and dedupe.first_time("a", 2)


# -- the manager over a real Redis --------------------------------------------------------------------


class Wire:
    """Every message published under a prefix, as Redis delivered it, to publish once more: what
    the bus does with a batch whose answer it lost (it cannot know whether Redis took it)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.prefix = prefix
        self.seen: list[tuple[bytes, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.pubsub.psubscribe(f"{self.prefix}*")
        async with asyncio.timeout(5):  # until Redis confirms: later publishes are seen
            while (await self.pubsub.get_message(timeout=1.0)) is None:
                pass
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        while True:
            try:
                message = await self.pubsub.get_message(timeout=1.0)
            except aioredis.ConnectionError:  # Redis was killed (an outage test): nothing more to see
                return
            if message is not None and message["type"] == "pmessage":
                self.seen.append((message["channel"], message["data"]))

    async def replay(self, count: int) -> None:
        """The first ``count`` messages seen, once more (the wire sees its own copies too)."""
        for channel, data in self.seen[:count]:
            await self.client.publish(channel, data)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.client.aclose()


class FakeOutbox:
    #: no stateful reconnect (no replay, journal or move tags)
    replay = None
    journal = None
    tags = None

    def __init__(self) -> None:
        self.got: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.got.append(data)


class FakeConnection:
    """What the manager needs of a hub connection (its outbox keeps what it was sent)."""

    def __init__(self, cid: str, protocol: Any, user: str | None = None) -> None:
        self.connection_id = cid
        self.protocol = protocol
        self.protocol_name = protocol.name
        self.user_identifier = user
        self.outbox = FakeOutbox()
        self.groups: set[str] = set()
        self.max_groups: int | None = None
        self.max_group_name_length = 1024

    def values(self) -> list[str]:
        """The second argument of each Message received (the tests send ("Message", kind, value))."""
        out = []
        for data in self.outbox.got:
            message = self.protocol.parse_all(data)[0]
            out.append(message.arguments[1])
        return out


@contextlib.asynccontextmanager
async def cluster(url: str, n: int) -> AsyncIterator[tuple[Wire, list[RedisHubLifetimeManager]]]:
    """``n`` instances' managers of one hub on the Redis at ``url`` (a prefix of their own)."""
    prefix = new_prefix("dedupe")
    wire = Wire(url, prefix)
    await wire.start()
    backplanes: list[RedisBackplane] = []
    managers: list[RedisHubLifetimeManager] = []
    try:
        for _ in range(n):
            backplane = RedisBackplane(url, prefix, ack_timeout=5)
            backplanes.append(backplane)
            await backplane.start()
            manager = backplane.create_manager("Hub")
            assert isinstance(manager, RedisHubLifetimeManager)
            manager.protocols = (JsonHubProtocol(), MessagePackHubProtocol())
            await manager.start()
            managers.append(manager)
        yield wire, managers
    finally:
        for manager in managers:
            await manager.close()
        for backplane in backplanes:
            await backplane.close()
        await wire.close()


async def connect(manager: RedisHubLifetimeManager, cid: str, *, msgpack: bool = False) -> FakeConnection:
    protocol = MessagePackHubProtocol() if msgpack else JsonHubProtocol()
    conn = FakeConnection(cid, protocol, user=f"user-{cid}")
    await manager.on_connected(conn)  # type: ignore[arg-type]
    return conn


async def until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_local_recipients_at_once_remote_after_an_outage_each_once(private_redis: RedisServer) -> None:
    """Redis down: an instance's own clients get its sends at once; the others' get them once
    Redis is back (the bus publishes what it buffered), each once."""
    async with cluster(private_redis.url, 2) as (_, (a, b)):
        a1, a2 = await connect(a, "a1"), await connect(a, "a2", msgpack=True)
        b1 = await connect(b, "b1", msgpack=True)
        await a._join_local(a1, "g")  # type: ignore[arg-type]
        await b._join_local(b1, "g")  # type: ignore[arg-type]
        private_redis.kill()
        await a.send_all("Message", ["all", "x1"])
        await a.send_all("Message", ["all", "x2"], exclude=["a2"])
        await a.send_groups(["g"], "Message", ["group", "x3"], exclude=["b1"])
        await a.send_users(["user-a2", "user-b1"], "Message", ["user", "x4"])
        await a.send_connections(["a2", "b1"], "Message", ["clients", "x5"])
        assert (a1.values(), a2.values(), b1.values()) == (["x1", "x2", "x3"], ["x1", "x4", "x5"], [])
        private_redis.start()
        await until(lambda: len(b1.values()) >= 4, "the buffered sends to reach the other instance")
        await asyncio.sleep(0.5)  # (a repeat would come by now)
        assert (a1.values(), a2.values(), b1.values()) == (
            ["x1", "x2", "x3"],
            ["x1", "x4", "x5"],
            ["x1", "x2", "x4", "x5"],
        )


async def test_envelopes_published_again_are_delivered_once(redis_server: RedisServer) -> None:
    """Every envelope published twice more: the receiving instance drops each repeat; the sending
    one drops its own copies without looking them up."""
    async with cluster(redis_server.url, 2) as (wire, (a, b)):
        a1 = await connect(a, "a1")
        b1 = await connect(b, "b1", msgpack=True)
        await b._join_local(b1, "g")  # type: ignore[arg-type]
        await a.send_all("Message", ["all", "x1"])
        await a.send_groups(["g"], "Message", ["group", "x2"])
        await a.send_users(["user-b1"], "Message", ["user", "x3"])
        await a.send_connections(["b1"], "Message", ["clients", "x4"])
        await until(lambda: len(b1.values()) == 4, "the sends to reach the other instance")
        await until(lambda: len(wire.seen) >= 4, "the wire to see them")
        seen = len(wire.seen)
        await wire.replay(seen)
        await wire.replay(seen)
        await until(lambda: b.duplicates_dropped == 2 * seen, "every repeat to be dropped")
        await asyncio.sleep(0.2)
        assert (a1.values(), b1.values()) == (["x1"], ["x1", "x2", "x3", "x4"])
        assert a.duplicates_dropped == 0


async def test_one_publish_per_group_each_with_its_own_number(redis_server: RedisServer) -> None:
    """A member of two groups sent to together gets it twice (as in SignalR), not once."""
    async with cluster(redis_server.url, 2) as (wire, (a, b)):
        b1 = await connect(b, "b1")
        await b._join_local(b1, "g1")  # type: ignore[arg-type]
        await b._join_local(b1, "g2")  # type: ignore[arg-type]
        await a.send_groups(["g1", "g2"], "Message", ["groups", "y"])
        await until(lambda: b1.values() == ["y", "y"], "both group sends")
        await until(lambda: len(wire.seen) >= 2, "the wire to see them")
        await wire.replay(2)
        await until(lambda: b.duplicates_dropped == 2, "the repeats to be dropped")
        assert b1.values() == ["y", "y"]


async def test_envelopes_without_an_id_are_delivered_as_before(redis_server: RedisServer) -> None:
    """A .NET server's envelope (no id) is delivered each time it comes."""
    async with cluster(redis_server.url, 1) as (_, (a,)):
        a1 = await connect(a, "a1")
        framed = {p.name: p.write_message(_message("z")) for p in a.protocols}
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            for _ in range(2):  # a .NET server never repeats itself; if it did, its repeat is delivered
                await raw.publish(a.channels.all, encode_invocation(RedisInvocation(framed)))
        finally:
            await raw.aclose()
        await until(lambda: a1.values() == ["z", "z"], "both envelopes")


async def test_a_repeated_group_command_does_not_undo_a_later_change(redis_server: RedisServer) -> None:
    async with cluster(redis_server.url, 2) as (wire, (a, b)):
        b1 = await connect(b, "b1")
        await a.add_to_group("b1", "room")  # acknowledged by b: it is done
        assert b1.groups == {"room"}
        b._leave_local(b1, "room")  # type: ignore[arg-type] # the client left on its own instance
        dropped = b.duplicates_dropped
        await wire.replay(len(wire.seen))  # a's add comes again (and b's ack of it)
        await until(lambda: b.duplicates_dropped > dropped, "the repeated add to be dropped")
        await asyncio.sleep(0.2)  # (a join, if any, runs in a task)
        assert b1.groups == set()
        await a.remove_from_group("b1", "room")
        await b._join_local(b1, "room")  # type: ignore[arg-type]
        dropped = b.duplicates_dropped
        await until(lambda: len(wire.seen) >= 6, "the wire to see the remove")
        await wire.replay(len(wire.seen))  # the add and the remove again
        await until(lambda: b.duplicates_dropped >= dropped + 2, "the repeated commands to be dropped")
        await asyncio.sleep(0.2)
        assert b1.groups == {"room"}


def _message(value: str) -> Any:
    from hubwire.protocol.messages import InvocationMessage

    return InvocationMessage("Message", ["dotnet", value])
