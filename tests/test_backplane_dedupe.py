"""Exactly once over the Redis backplane, in-process: envelope ids, the dedupe window, the manager.

The real-process counterparts (Redis killed, Redis asleep) are in tests/test_outage_exactly_once.py.
Here a fake Redis fans each publish out to every manager subscribed to its channel, the sender's
included, and can hold messages back (an outage) or deliver them twice (the bus re-publishing a batch
whose answer was lost).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.backplane.dedupe import Deduplicator
from hubwire.backplane.redis import RedisBackplane, RedisHubLifetimeManager
from hubwire.protocol import JsonHubProtocol, MessagePackHubProtocol
from hubwire.protocol.backplane import RedisInvocation, decode_invocation, encode_invocation

from .test_backplane_protocol import JSON_SEND, MSGPACK_SEND, SEND_ALL

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


# -- the manager over a fake Redis --------------------------------------------------------------------


class FakeRedis:
    """Fans publishes out to every subscribed handler (the sender's too); holds them while down."""

    def __init__(self) -> None:
        self.up = True
        self.held: list[tuple[bytes, bytes]] = []
        self.sent: list[tuple[bytes, bytes]] = []
        self.handlers: list[dict[bytes, Callable[[bytes, bytes], None]]] = []

    def fan_out(self, channel: bytes, payload: bytes) -> None:
        for handlers in self.handlers:
            handler = handlers.get(channel)
            if handler is not None:
                handler(channel, payload)

    def flush(self) -> None:
        held, self.held = self.held, []
        for channel, payload in held:
            self.sent.append((channel, payload))
            self.fan_out(channel, payload)

    def replay(self) -> None:
        """Everything published so far, once more (the bus re-publishing what it was not sure of)."""
        for channel, payload in list(self.sent):
            self.fan_out(channel, payload)


class FakeBus:
    def __init__(self, redis: FakeRedis) -> None:
        self.redis = redis
        self.handlers: dict[bytes, Callable[[bytes, bytes], None]] = {}
        redis.handlers.append(self.handlers)

    def publish(
        self, channel: str, payload: bytes, want_receivers: bool = False, history: bool = False
    ) -> None:
        self.redis.held.append((channel.encode(), payload))
        if self.redis.up:
            self.redis.flush()

    async def subscribe(self, channel: str, handler: Callable[[bytes, bytes], None]) -> None:
        self.handlers[channel.encode()] = handler

    def unsubscribe(self, channel: str) -> None:
        self.handlers.pop(channel.encode(), None)


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


async def cluster(n: int) -> tuple[FakeRedis, list[RedisHubLifetimeManager]]:
    redis = FakeRedis()
    managers = []
    for _ in range(n):
        backplane = RedisBackplane("redis://127.0.0.1:1", ack_timeout=2)
        manager = RedisHubLifetimeManager(backplane, "Hub")
        manager.protocols = (JsonHubProtocol(), MessagePackHubProtocol())
        manager.bus = FakeBus(redis)  # type: ignore[assignment]
        for channel, handler in (
            (manager.channels.all, manager._on_all),
            (manager.channels.group_management, manager._on_group_command),
            (manager._ack_channel, manager._on_ack),
            (manager._return_channel, manager._on_return),
        ):
            await manager.bus.subscribe(channel, handler)
        managers.append(manager)
    return redis, managers


async def connect(manager: RedisHubLifetimeManager, cid: str, *, msgpack: bool = False) -> FakeConnection:
    protocol = MessagePackHubProtocol() if msgpack else JsonHubProtocol()
    conn = FakeConnection(cid, protocol, user=f"user-{cid}")
    await manager.on_connected(conn)  # type: ignore[arg-type]
    return conn


async def test_local_recipients_at_once_remote_after_and_each_once() -> None:
    redis, (a, b) = await cluster(2)
    a1, a2 = await connect(a, "a1"), await connect(a, "a2", msgpack=True)
    b1 = await connect(b, "b1", msgpack=True)
    await a._join_local(a1, "g")
    await b._join_local(b1, "g")
    redis.up = False
    await a.send_all("Message", ["all", "x1"])
    await a.send_all("Message", ["all", "x2"], exclude=["a2"])
    await a.send_groups(["g"], "Message", ["group", "x3"], exclude=["b1"])
    await a.send_users(["user-a2", "user-b1"], "Message", ["user", "x4"])
    await a.send_connections(["a2", "b1"], "Message", ["clients", "x5"])
    assert (a1.values(), a2.values(), b1.values()) == (["x1", "x2", "x3"], ["x1", "x4", "x5"], [])
    redis.up = True
    redis.flush()
    redis.replay()
    redis.replay()
    assert (a1.values(), a2.values(), b1.values()) == (
        ["x1", "x2", "x3"],
        ["x1", "x4", "x5"],
        ["x1", "x2", "x4", "x5"],
    )
    # five envelopes reached b (the group one too: b1 was excluded), each repeated twice; a drops its
    # own copies without looking them up
    assert b.duplicates_dropped == 10 and a.duplicates_dropped == 0


async def test_one_publish_per_group_each_with_its_own_number() -> None:
    """A member of two groups sent to together gets it twice (as in SignalR), not once."""
    redis, (a, b) = await cluster(2)
    b1 = await connect(b, "b1")
    await b._join_local(b1, "g1")
    await b._join_local(b1, "g2")
    await a.send_groups(["g1", "g2"], "Message", ["groups", "y"])
    redis.replay()
    assert b1.values() == ["y", "y"]


async def test_envelopes_without_an_id_are_delivered_as_before() -> None:
    redis, (a,) = await cluster(1)
    a1 = await connect(a, "a1")
    framed = {p.name: p.write_message(_message("z")) for p in a.protocols}
    a.bus.publish(a.channels.all, encode_invocation(RedisInvocation(framed)))
    redis.replay()  # a .NET server never repeats itself; if it did, its repeat would be delivered
    assert a1.values() == ["z", "z"]


async def test_a_repeated_group_command_does_not_undo_a_later_change() -> None:
    redis, (a, b) = await cluster(2)
    b1 = await connect(b, "b1")
    await a.add_to_group("b1", "room")
    assert b1.groups == {"room"}
    b._leave_local(b1, "room")  # the client left on its own instance
    redis.replay()  # a's add comes again
    await asyncio.sleep(0)  # the join (if any) runs in a task
    assert b1.groups == set()
    await a.remove_from_group("b1", "room")
    await b._join_local(b1, "room")
    redis.replay()
    assert b1.groups == {"room"}
    assert b.duplicates_dropped >= 2


def _message(value: str) -> Any:
    from hubwire.protocol.messages import InvocationMessage

    return InvocationMessage("Message", ["dotnet", value])
