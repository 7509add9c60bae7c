"""One Redis connection that subscribes and publishes at once (RESP3), against real redis-servers.

On a single Redis (and Sentinel) each instance's backplane link publishes on its subscriber's
connection, so Redis writes a publish's reply and the instance's own copy of the message in one
write. That connection's replies come in the order of its commands, except that an (un)subscribe
is answered by pushes, or by one error reply when Redis refuses it: each test here fails when a
refusal, a PONG or a push is taken for the answer to a publish. A Redis without RESP3 keeps a
publisher connection of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.backplane.bus import RedisBus
from hubwire.backplane.deployment import NodeSettings
from hubwire.backplane.resp import RespConnection

from .conftest import RedisServer

NAME = "resp3-bus"


def _ours(url: str) -> dict[str, list[dict[str, Any]]]:
    """Our connections on Redis, by role (CLIENT LIST: name, resp)."""
    with redis.Redis.from_url(url, protocol=2) as r:  # RESP2: also where HELLO is refused
        clients = r.client_list()
    return {role: [c for c in clients if c.get("name") == f"{NAME}-{role}"] for role in ("sub", "pub")}


async def test_the_subscriber_connection_publishes(private_redis: RedisServer) -> None:
    """One connection per instance (RESP3, no publisher of its own); a message published reaches
    this instance's handler and another subscriber, and its receiver count comes back."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    got: asyncio.Queue[bytes] = asyncio.Queue()
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: got.put_nowait(data))
        with redis.Redis.from_url(private_redis.url) as other:
            listener = other.pubsub()
            listener.subscribe("room:1")
            assert listener.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
            receivers = bus.publish("room:1", b"hello", want_receivers=True)
            assert receivers is not None
            assert await asyncio.wait_for(receivers, 5) == 2
            assert await asyncio.wait_for(got.get(), 5) == b"hello"
            message = listener.get_message(timeout=5)
            assert message is not None and message["data"] == b"hello"
            listener.close()
        assert bus.healthy
        roles = _ours(private_redis.url)
        assert len(roles["sub"]) == 1 and roles["sub"][0]["resp"] == "3", roles
        assert roles["pub"] == [], roles
        # a burst: every publish answered once, in order, and delivered once here
        futures = [bus.publish("room:1", f"m{i}".encode(), want_receivers=True) for i in range(500)]
        assert await asyncio.wait_for(asyncio.gather(*futures), 10) == [1] * 500  # type: ignore[arg-type]
        seen = [await asyncio.wait_for(got.get(), 5) for _ in range(500)]
        assert seen == [f"m{i}".encode() for i in range(500)]
    finally:
        await bus.close()


async def test_a_redis_without_resp3_gets_a_publisher_connection() -> None:
    """HELLO renamed away (as on a Redis before 6.0): the link stays on RESP2 with a publisher
    connection of its own, and publishing and delivery work the same."""
    server = RedisServer(options=("--rename-command", "HELLO", ""))
    bus = RedisBus(server.url, name=NAME, max_backoff=0.2)
    got: asyncio.Queue[bytes] = asyncio.Queue()
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: got.put_nowait(data))
        receivers = bus.publish("room:1", b"hello", want_receivers=True)
        assert receivers is not None
        assert await asyncio.wait_for(receivers, 5) == 1
        assert await asyncio.wait_for(got.get(), 5) == b"hello"
        roles = _ours(server.url)
        assert [c["resp"] for c in roles["sub"]] == ["2"], roles
        assert [c["resp"] for c in roles["pub"]] == ["2"], roles
    finally:
        await bus.close()
        server.close()


ACL_USER = "hw"
ACL_PASSWORD = "secret"


def _ok_channels_only(server: RedisServer, *extra: str) -> str:
    """Create the ACL user that may use channels ``ok:*`` only (and the commands a link sends);
    its URL."""
    with redis.Redis.from_url(server.url) as admin:
        admin.execute_command(
            "ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "resetchannels", "&ok:*",
            "-@all", "+publish", "+subscribe", "+unsubscribe", "+ping", *extra,
        )  # fmt: skip
    return f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"


async def test_a_refused_subscribe_between_publishes_takes_no_publish_reply() -> None:
    """An ACL user may use ``ok:*`` only. On one connection, pipelined: a subscribe, publishes, a
    subscribe Redis refuses (NOPERM: one error reply), a PING, an unsubscribe of a channel never
    subscribed (a push all the same), a publish Redis refuses. Each publish gets its own reply,
    the refusal and the PONG go to the pushes, in order."""
    server = RedisServer()
    try:
        _ok_channels_only(server)
        pushes: list[list[Any]] = []
        node = NodeSettings(port=server.port, username=ACL_USER, password=ACL_PASSWORD)
        conn = await RespConnection.open(node, on_push=pushes.append, resp3=True)
        try:
            assert conn.resp3
            conn.write_commands([(b"SUBSCRIBE", b"ok:a", b"ok:b")], expect_replies=False)
            first = conn.write_commands([(b"PUBLISH", b"ok:a", b"1")])
            conn.write_commands([(b"SUBSCRIBE", b"no:x")], expect_replies=False)
            second = conn.write_commands([(b"PUBLISH", b"ok:b", b"2")])
            conn.write_commands([(b"PING",), (b"UNSUBSCRIBE", b"ok:never")], expect_replies=False)
            third = conn.write_commands([(b"PUBLISH", b"ok:a", b"3"), (b"PUBLISH", b"no:y", b"4")])
            results = await asyncio.wait_for(
                asyncio.gather(*first, *second, *third, return_exceptions=True), 5
            )
            assert results[:3] == [1, 1, 1], results
            assert "NOPERM" in str(results[3]), results
            assert [p[0] for p in pushes] == [
                b"subscribe", b"subscribe", b"message", b"error", b"message", b"pong", b"unsubscribe",
                b"message",
            ], pushes  # fmt: skip
            assert b"NOPERM" in pushes[3][1]
            assert [p[2] for p in pushes if p[0] == b"message"] == [b"1", b"2", b"3"]
            # and the connection goes on answering in order
            assert await asyncio.wait_for(conn.command(b"PUBLISH", b"ok:b", b"5"), 5) == 1
        finally:
            conn.abort()
    finally:
        server.close()


# -- the same routing on any byte stream: arbitrary commands, answers, stray pushes and read splits --


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _push(*items: bytes) -> bytes:
    return b">%d\r\n" % len(items) + b"".join(_bulk(i) for i in items)


_command = st.one_of(
    st.tuples(st.just("publish"), st.integers(0, 9), st.booleans()),  # receivers, refused
    st.tuples(st.just("subscribe"), st.integers(1, 3), st.booleans()),  # channels, refused
    st.tuples(st.just("unsubscribe"), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("ping"), st.just(0), st.booleans()),  # refused: LOADING, still its answer
)


@settings(max_examples=300, deadline=None)
@given(
    commands=st.lists(_command, min_size=1, max_size=12),
    strays=st.lists(st.integers(0, 30), max_size=6),
    cuts=st.lists(st.integers(1, 400), max_size=8),
)
def test_replies_and_pushes_are_routed_on_any_stream(
    commands: list[tuple[str, int, bool]], strays: list[int], cuts: list[int]
) -> None:
    """Redis's answers to a pipeline of publishes, (un)subscribes and PINGs, with messages pushed
    in between and the stream cut anywhere: each publish's future gets its own answer; pushes,
    refusals of (un)subscribes and PONGs reach ``on_push`` in order."""
    asyncio.run(_route(commands, strays, cuts))


async def _route(commands: list[tuple[str, int, bool]], strays: list[int], cuts: list[int]) -> None:
    pushes: list[list[Any]] = []
    conn = RespConnection(on_push=pushes.append)
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    conn.resp3 = True
    futures: list[tuple[asyncio.Future[Any], int, bool]] = []
    stream: list[bytes] = []
    want_pushes: list[list[bytes]] = []
    for index, (kind, number, refused) in enumerate(commands):
        if index in strays:  # a message pushed between two answers
            stream.append(_push(b"message", b"elsewhere", b"%d" % index))
            want_pushes.append([b"message", b"elsewhere", b"%d" % index])
        if kind == "publish":
            (future,) = conn.write_commands([(b"PUBLISH", b"c", b"x")])
            futures.append((future, number, refused))
            stream.append(b"-NOPERM no\r\n" if refused else b":%d\r\n" % number)
        elif kind == "ping":
            conn.write_commands([(b"PING",)], expect_replies=False)
            stream.append(b"-LOADING x\r\n" if refused else b"+PONG\r\n")
            want_pushes.append([b"pong", b""])
        else:
            channels = [b"ch%d" % i for i in range(number)]
            conn.write_commands([(kind.upper().encode(), *channels)], expect_replies=False)
            if refused:
                stream.append(b"-NOPERM no\r\n")
                want_pushes.append([b"error", b"NOPERM no"])
            else:
                for count, channel in enumerate(channels):
                    stream.append(b">3\r\n" + _bulk(kind.encode()) + _bulk(channel) + b":%d\r\n" % count)
                    want_pushes.append([kind.encode(), channel, count])  # type: ignore[list-item]
    data = b"".join(stream)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(points):
        conn.data_received(data[start:end])
    assert [list(p) for p in pushes] == want_pushes
    for future, number, refused in futures:
        assert future.done()
        if refused:
            assert "NOPERM" in str(future.exception())
        else:
            assert future.result() == number
    assert not conn._pending  # every answer was consumed by its own command


async def test_a_refused_channel_does_not_stop_the_link_after_a_reconnect() -> None:
    """An ACL user may use ``ok:*`` only and a hub asked for ``no:x`` too. After the connection is
    killed, the re-subscription asks for both in one SUBSCRIBE, which Redis refuses as a whole: the
    link must not start over forever. It asks again channel by channel, ``ok:a`` is subscribed
    again, and publishing (on that connection) goes on."""
    server = RedisServer()
    try:
        url = _ok_channels_only(server, "+client|setname")
        bus = RedisBus(url, name=NAME, max_backoff=0.2)
        got: asyncio.Queue[bytes] = asyncio.Queue()
        await bus.start()
        try:
            await bus.subscribe("ok:a", lambda channel, data: got.put_nowait(data))
            await bus.subscribe("no:x", lambda channel, data: None, wait=0)
            first = bus.publish("ok:a", b"before", want_receivers=True)
            assert first is not None and await asyncio.wait_for(first, 5) == 1
            assert await asyncio.wait_for(got.get(), 5) == b"before"
            (link,) = bus._links.values()
            old = link.sub
            with redis.Redis.from_url(server.url) as admin:
                assert admin.client_kill_filter(_type="pubsub") == 1
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while not (link.sub is not old and bus.subscriber_connected and bus.publisher_connected):
                assert loop.time() < deadline, "the link did not come back"
                await asyncio.sleep(0.05)
            after = bus.publish("ok:a", b"after", want_receivers=True)
            assert after is not None and await asyncio.wait_for(after, 5) == 1
            assert await asyncio.wait_for(got.get(), 5) == b"after"
            assert bus.stats.subscriber_reconnects == 1
        finally:
            await bus.close()
    finally:
        server.close()


async def test_writes_held_by_redis_keep_the_connection() -> None:
    """``CLIENT PAUSE 4500 WRITE`` (what FAILOVER and managed services' maintenance do): Redis holds
    a publish, and the PINGs behind it on the same connection, while it answers a PING elsewhere.
    The watchdog notices the silence, but its probe publishes too and is held too: the
    connection and its subscriptions are kept, the publish arrives after the pause."""
    server = RedisServer()
    bus = RedisBus(server.url, name=NAME, max_backoff=0.2)
    got: list[bytes] = []
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: got.append(data))
        with redis.Redis.from_url(server.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", "4500", "WRITE")
        loop = asyncio.get_running_loop()
        paused = loop.time()
        held = bus.publish("room:1", b"held", want_receivers=True)
        assert held is not None and await asyncio.wait_for(held, 10) == 1
        assert loop.time() - paused > 4.0  # answered once the pause ended
        await asyncio.sleep(0.5)
        assert bus.stats.stalls_detected >= 1  # the silence was noticed
        assert bus.stats.subscriber_reconnects == 0 and bus.stats.publisher_reconnects == 0
        assert got == [b"held"] and bus.healthy  # once: the probe published nothing to it
    finally:
        await bus.close()
        server.close()


async def test_the_publisher_connects_on_its_own_while_the_subscriber_is_not_ready_then_shares_again(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscriber connection is killed and its replacement (2,000 channels to subscribe again)
    is not ready within the connect timeout: the publisher does not wait for it, it publishes on a
    connection of its own, and goes back to the subscriber's connection once that is ready (not
    counted as a reconnect: nothing was lost). Every publish is answered and delivered once.

    The replacement's connect is held back by a second: how long subscribing many channels
    takes depends on the machine (60,000 once took less than the 0.2 s connect timeout here)."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2, connect_timeout=0.2)
    got: list[bytes] = []
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: got.append(data))
        await asyncio.gather(*(bus.subscribe(f"many:{i}", lambda channel, data: None) for i in range(2_000)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not bus.healthy:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        (link,) = bus._links.values()
        assert link.pub is link.sub
        reconnects = bus.stats.publisher_reconnects
        real_open = RespConnection.open.__func__  # type: ignore[attr-defined]

        async def slow_subscriber(cls: type[RespConnection], *args: Any, **kwargs: Any) -> RespConnection:
            if str(kwargs.get("name", "")).endswith("-sub"):
                await asyncio.sleep(1.0)
            return await real_open(cls, *args, **kwargs)  # type: ignore[no-any-return]

        monkeypatch.setattr(RespConnection, "open", classmethod(slow_subscriber))
        with redis.Redis.from_url(private_redis.url) as admin:
            assert admin.client_kill_filter(_type="pubsub") == 1
        own = False
        sent: list[asyncio.Future[int]] = []
        deadline = loop.time() + 30
        while not (own and link.pub is link.sub and bus.healthy):  # own connection, then shared again
            assert loop.time() < deadline, (own, link.pub, link.sub)
            own = own or (link.pub is not None and link.pub is not link.sub)
            future = bus.publish("room:1", b"%d" % len(sent), want_receivers=True)
            assert future is not None
            sent.append(future)
            await asyncio.sleep(0.01)
        answers = await asyncio.wait_for(asyncio.gather(*sent), 10)
        assert all(isinstance(n, int) for n in answers)
        assert await bus.barrier(5)
        assert sorted(got, key=int) == [b"%d" % i for i in range(len(sent)) if answers[i] == 1]
        assert len(set(got)) == len(got)
        # the kill was one reconnect (the own connection); going back to share was not another
        assert bus.stats.publisher_reconnects == reconnects + 1
        assert _ours(private_redis.url)["pub"] == []
    finally:
        await bus.close()


async def test_the_shared_connection_killed_under_a_burst_loses_nothing(private_redis: RedisServer) -> None:
    """``CLIENT KILL TYPE pubsub`` in the middle of 3,000 publishes on the shared connection: the
    connection comes back, what Redis had not answered is published again once the connection
    is subscribed again, and every message reaches the handler (a repeat is possible here: the
    hub layer drops it by its id)."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    got: list[bytes] = []
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: got.append(data))
        sent: list[asyncio.Future[int]] = []
        for i in range(3_000):
            future = bus.publish("room:1", b"%d" % i, want_receivers=True)
            assert future is not None
            sent.append(future)
            if i == 1_000:
                await asyncio.sleep(0.005)  # some are written and in flight now
                with redis.Redis.from_url(private_redis.url) as admin:
                    assert admin.client_kill_filter(_type="pubsub") == 1
            elif i % 100 == 0:
                await asyncio.sleep(0)
        answers = await asyncio.wait_for(asyncio.gather(*sent), 20)
        assert all(isinstance(n, int) for n in answers)
        assert bus.stats.subscriber_reconnects == 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not bus.healthy:
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        assert await bus.barrier(5)
        # on the shared connection the publisher publishes again only once the subscriber is
        # subscribed again: every message had this instance as its receiver, and reached it
        assert answers == [1] * 3_000
        assert {int(x) for x in got} == set(range(3_000))
        assert bus.stats.publisher_reconnects >= 1
    finally:
        await bus.close()


async def test_what_is_queued_goes_out_in_one_batch(private_redis: RedisServer) -> None:
    """5,000 messages queued in one event-loop pass are published in one pipelined write.

    Why it matters: one batch is in flight at a time, so on a loaded instance (slow answers)
    a small batch cap was the publishing rate: at 1,000 per batch an overloaded bench machine fell
    behind its own sends, filled the buffer and dropped messages (bench/RESULTS.md)."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    await bus.start()
    try:
        await bus.subscribe("room:1", lambda channel, data: None)
        (link,) = bus._links.values()
        conn = link.pub
        assert conn is not None
        batches: list[int] = []
        write = conn.write_commands

        def counting(commands: Any, expect_replies: bool = True) -> Any:
            if expect_replies:
                batches.append(len(commands))
            return write(commands, expect_replies)

        conn.write_commands = counting  # type: ignore[method-assign]
        sent = [bus.publish("room:1", b"x" * 100, want_receivers=True) for _ in range(5_000)]
        answers = await asyncio.wait_for(asyncio.gather(*sent), 10)  # type: ignore[arg-type]
        assert answers == [1] * 5_000
        assert batches == [5_000], batches
    finally:
        await bus.close()


async def test_subscriptions_wait_for_their_confirmation_or_their_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A burst of subscriptions (a room's members joining at once) shares one timeout timer: each
    returns when Redis confirms its channel; one Redis refuses (the ACL allows ``ok:*`` only) ends
    at the timeout with a warning; one whose caller is cancelled meanwhile is simply gone."""
    server = RedisServer()
    try:
        url = _ok_channels_only(server, "+client|setname")
        bus = RedisBus(url, name=NAME, max_backoff=0.2)
        await bus.start()
        try:
            loop = asyncio.get_running_loop()
            with caplog.at_level(logging.WARNING, logger="hubwire.backplane"):
                allowed = [
                    loop.create_task(bus.subscribe(f"ok:{i}", lambda channel, data: None, wait=1.0))
                    for i in range(200)
                ]
                # (a longer timeout than the allowed ones': the SUBSCRIBE of the whole burst is
                # refused for these two, and the link asks again channel by channel first)
                refused = loop.create_task(bus.subscribe("no:x", lambda channel, data: None, wait=3.0))
                cancelled = loop.create_task(bus.subscribe("no:y", lambda channel, data: None, wait=3.0))
                started = loop.time()
                await asyncio.wait_for(asyncio.gather(*allowed), 5)
                assert not refused.done()  # the allowed ones did not wait for the timer
                cancelled.cancel()
                await asyncio.wait_for(refused, 5)
                assert loop.time() - started >= 2.9
                with pytest.raises(asyncio.CancelledError):
                    await cancelled
            warned = [r.getMessage() for r in caplog.records if "not confirmed yet" in r.getMessage()]
            assert warned == ["subscription to no:x not confirmed yet; it is asked again until it is"]
            assert not bus._confirmations.get(b"no:x") and not bus._confirmations.get(b"no:y")
            assert not bus._expiring  # each batch closed after its loop pass
            first = bus.publish("ok:7", b"x", want_receivers=True)
            assert first is not None and await asyncio.wait_for(first, 5) == 1  # subscribed indeed
        finally:
            await bus.close()
    finally:
        server.close()


def test_a_subscriber_after_a_long_loop_pass_still_has_its_timeout() -> None:
    """uvloop runs due timers before the callbacks already queued. A burst's timer that fires
    after a pass longer than the timeout must not leave a subscriber of the next pass in the
    burst it just ended (that one would wait for a confirmation that never comes, here a
    channel the ACL refuses, without a bound)."""
    import time

    import uvloop

    server = RedisServer()
    try:
        url = _ok_channels_only(server, "+client|setname")

        async def scenario() -> None:
            bus = RedisBus(url, name=NAME, max_backoff=0.2)
            await bus.start()
            try:
                loop = asyncio.get_running_loop()
                late: list[asyncio.Task[None]] = []

                def start_late() -> None:  # queued ahead of the first subscriber's step
                    late.append(loop.create_task(bus.subscribe("no:late", lambda c, d: None, wait=0.05)))

                loop.call_soon(start_late)
                first = loop.create_task(bus.subscribe("no:first", lambda c, d: None, wait=0.05))
                loop.call_soon(time.sleep, 0.2)  # a pass longer than the timeout
                await asyncio.wait_for(first, 5)
                await asyncio.wait_for(late[0], 5)  # ended by a timer of its own
            finally:
                await bus.close()

        uvloop.run(scenario())
    finally:
        server.close()
