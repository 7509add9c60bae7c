"""The backplane's Redis link against a real redis-server, in this process.

README: "the supervisor task is itself restarted if it ever dies". Here it really dies: the
subscriber task of a running :class:`~hubwire.backplane.bus.RedisBus` is cancelled (as anything
cancelling it by mistake would); the bus starts a new one, counts the restart, logs it, Redis sees
one subscriber connection of the bus (the old one closed), and delivery on the channels subscribed
before goes on.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis
import redis.asyncio as aioredis

from hubwire.backplane.bus import RedisBus

from .conftest import RedisServer, free_port
from .hwtools import wait_for

NAME = "issue11-bus"


def _our_subscribers(url: str) -> list[dict[str, object]]:
    with redis.Redis.from_url(url) as r:
        return [c for c in r.client_list() if c.get("name") == f"{NAME}-sub"]


async def test_subscriber_task_restarted_counted_and_delivering(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    received: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    await bus.start()
    try:
        await bus.subscribe("issue11:one", lambda channel, data: received.put_nowait((channel, data)))
        await bus.subscribe("issue11:two", lambda channel, data: received.put_nowait((channel, data)))
        assert bus.healthy
        bus.publish("issue11:one", b"before")
        assert await asyncio.wait_for(received.get(), 5) == (b"issue11:one", b"before")
        assert len(_our_subscribers(private_redis.url)) == 1

        (link,) = bus._links.values()  # one redis-server: one node
        first = link.sub_task
        assert first is not None and not first.done()
        with caplog.at_level(logging.ERROR, logger="hubwire.backplane"):
            first.cancel()

            async def restarted() -> bool:
                return link.sub_task is not first and bus.subscriber_connected

            await wait_for(restarted, 10, "a new subscriber task, connected")
        assert first.cancelled()
        assert bus.stats.subscriber_restarts == 1
        assert bus.health()["subscriber_restarts"] == 1
        assert any("subscriber task was cancelled; restarting it" in r.getMessage() for r in caplog.records)

        # Redis: one subscriber connection of ours (the dead task's was closed), both channels again
        async def one_subscriber() -> bool:
            return len(_our_subscribers(private_redis.url)) == 1

        await wait_for(one_subscriber, 5, "the old subscriber connection to be closed")
        with redis.Redis.from_url(private_redis.url) as r:
            subscribers = dict(r.pubsub_numsub("issue11:one", "issue11:two"))
        assert subscribers == {b"issue11:one": 1, b"issue11:two": 1}
        # delivery goes on, on every channel subscribed before the restart
        bus.publish("issue11:one", b"after")
        bus.publish("issue11:two", b"after too")
        got = {await asyncio.wait_for(received.get(), 5) for _ in range(2)}
        assert got == {(b"issue11:one", b"after"), (b"issue11:two", b"after too")}
        assert received.empty()
        assert bus.stats.subscriber_restarts == 1  # and nothing else restarted meanwhile
    finally:
        await bus.close()
    # a closed bus does not restart anything
    assert link.sub_task is not None and link.sub_task.done()
    assert bus.stats.subscriber_restarts == 1


# -- the data path's edges (a review of the per-node links found each of these; each test fails on it) --


async def _numsub(url: str, channel: str) -> int:
    async with aioredis.Redis.from_url(url) as r:
        return int(dict(await r.pubsub_numsub(channel))[channel.encode()])


async def test_a_channel_subscribed_while_the_rest_is_resubscribed_is_subscribed(
    private_redis: RedisServer,
) -> None:
    """20,000 channels take a moment to subscribe again after a reconnect; a group joined meanwhile
    must reach Redis too, not only the bus's table."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    await bus.start()
    try:
        for i in range(20_000):
            await bus.subscribe(f"many:{i}", lambda channel, data: None, wait=0)
        await wait_for(lambda: _async(bus.healthy), 10, "20,000 channels subscribed")
        (link,) = bus._links.values()
        old = link.sub
        async with aioredis.Redis.from_url(private_redis.url) as r:
            await r.client_kill_filter(_type="pubsub")
        deadline = asyncio.get_running_loop().time() + 10
        while link.sub is None or link.sub is old:  # the new connection, before it is confirmed
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        assert not link.sub_ready.is_set()
        got: asyncio.Queue[bytes] = asyncio.Queue()
        await bus.subscribe("late", lambda channel, data: got.put_nowait(data))
        await wait_for(lambda: _async(bus.healthy), 10, "the bus to be back")
        assert await _numsub(private_redis.url, "late") == 1
        bus.publish("late", b"hello")
        assert await asyncio.wait_for(got.get(), 5) == b"hello"
    finally:
        await bus.close()


async def _async(value: bool) -> bool:
    return value


async def test_a_busy_redis_is_waited_for_publishes_and_subscriptions() -> None:
    """A long script makes Redis answer BUSY: a publish waits and arrives once, a subscription made
    meanwhile is made again; nothing is dropped or refused for good."""
    server = RedisServer(options=("--busy-reply-threshold", "100"))
    bus = RedisBus(server.url, name=NAME, max_backoff=0.2)
    await bus.start()
    try:
        got: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
        await bus.subscribe("before", lambda channel, data: got.put_nowait((channel, data)))
        busy = aioredis.Redis.from_url(server.url)
        script = asyncio.ensure_future(busy.eval("while true do end", 0))
        await asyncio.sleep(0.4)  # past the threshold: Redis answers BUSY now
        receivers = bus.publish("before", b"during-busy", want_receivers=True)
        await bus.subscribe(
            "joined-during-busy", lambda channel, data: got.put_nowait((channel, data)), wait=1
        )
        await asyncio.sleep(0.5)
        async with aioredis.Redis.from_url(server.url) as admin:
            await admin.script_kill()
        await asyncio.gather(script, return_exceptions=True)
        await busy.aclose()
        assert receivers is not None and await asyncio.wait_for(receivers, 10) == 1
        assert await asyncio.wait_for(got.get(), 5) == (b"before", b"during-busy")

        async def subscribed() -> bool:  # asked again with a backoff (at most max_backoff apart)
            return await _numsub(server.url, "joined-during-busy") == 1

        await wait_for(subscribed, 10, "the subscription refused with BUSY to be made")
        bus.publish("joined-during-busy", b"after")
        assert await asyncio.wait_for(got.get(), 5) == (b"joined-during-busy", b"after")
        assert bus.stats.publish_errors == 0 and bus.stats.dropped == 0
    finally:
        await bus.close()
        server.close()


async def test_close_sends_what_is_queued_once(private_redis: RedisServer) -> None:
    received: list[bytes] = []
    async with aioredis.Redis.from_url(private_redis.url) as r:
        pubsub = r.pubsub()
        await pubsub.subscribe("closing")
        await pubsub.get_message(timeout=1)
        bus = RedisBus(private_redis.url, name=NAME)
        await bus.start()
        for i in range(3000):
            bus.publish("closing", b"%d" % i)
        await asyncio.sleep(0)  # the publisher has the first batch on the wire
        await asyncio.sleep(0)
        await bus.close()
        while len(received) < 3000:
            message = await pubsub.get_message(timeout=5)
            assert message is not None, f"only {len(received)} of 3000 arrived"
            if message["type"] == "message":
                received.append(message["data"])
        assert await pubsub.get_message(timeout=0.3) is None  # and nothing twice
        await pubsub.aclose()
    assert received == [b"%d" % i for i in range(3000)]
    assert bus.stats.published == 3000 and bus.buffered == 0


async def test_a_full_buffer_never_drops_a_message_already_written(private_redis: RedisServer) -> None:
    bus = RedisBus(private_redis.url, name=NAME, buffer_size=100)
    await bus.start()
    try:
        futures = [bus.publish("full", b"%d" % i, want_receivers=True) for i in range(100)]
        (link,) = bus._links.values()
        deadline = asyncio.get_running_loop().time() + 5
        while not any(item.inflight for item in link.queue):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0)
        futures.append(bus.publish("full", b"100", want_receivers=True))  # one too many
        results = await asyncio.gather(*[f for f in futures if f is not None], return_exceptions=True)
        written = [r for r in results[:100] if isinstance(r, int)]
        assert len(written) == 100, results[:100]  # every message on the wire was answered, not "dropped"
        assert isinstance(results[100], Exception) and bus.stats.dropped == 1
    finally:
        await bus.close()


async def test_a_cluster_that_cannot_be_reached_is_retried_not_given_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    bus = RedisBus(f"redis+cluster://hw:pw@127.0.0.1:{port}", name=NAME, connect_timeout=0.3)
    with caplog.at_level(logging.ERROR, logger="hubwire.backplane"):
        await bus.start()
        try:
            await asyncio.sleep(1.5)
            assert bus._maintainer is not None and not bus._maintainer.done()
            assert not bus.healthy and bus.health()["layout_refreshes"] == 0
        finally:
            await bus.close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("cannot reach the Redis deployment at redis+cluster://hw:***@" in line for line in lines), (
        lines
    )
    assert not any(":pw@" in line for line in lines)


async def test_subscribes_of_one_loop_iteration_are_one_command(private_redis: RedisServer) -> None:
    """200 joins arriving together cost Redis one SUBSCRIBE command, not 200 (join bursts); an
    unsubscribe and a subscribe of the same channel in the same burst keep their order."""
    bus = RedisBus(private_redis.url, name=NAME)
    received: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    await bus.start()
    try:
        await bus.subscribe("burst:keep", lambda channel, data: None)
        (link,) = bus._links.values()
        with redis.Redis.from_url(private_redis.url) as r:
            r.config_resetstat()
        names = [f"burst:{i}" for i in range(200)]
        written: list[list[tuple[bytes, bytes]]] = []
        write = link._write_sub_commands

        def recording() -> None:
            written.append(list(link._sub_writes))
            write()

        link._write_sub_commands = recording  # type: ignore[method-assign]

        async def join(name: str) -> None:
            await bus.subscribe(name, lambda channel, data: received.put_nowait((channel, data)))

        async def leave_and_come_back() -> None:
            bus.unsubscribe("burst:keep")
            await bus.subscribe("burst:keep", lambda channel, data: received.put_nowait((channel, data)))

        # every task's first step runs in the same loop pass: one queue, one write
        await asyncio.wait_for(asyncio.gather(*(join(n) for n in names), leave_and_come_back()), 10)
        assert len(written) == 1
        assert written[0] == [(b"SUBSCRIBE", n.encode()) for n in names] + [
            (b"UNSUBSCRIBE", b"burst:keep"),
            (b"SUBSCRIBE", b"burst:keep"),
        ]
        with redis.Redis.from_url(private_redis.url) as r:
            stats = r.info("commandstats")
            assert stats["cmdstat_subscribe"]["calls"] == 2  # the 200, then burst:keep again
            assert stats["cmdstat_unsubscribe"]["calls"] == 1
            numsub = dict(r.pubsub_numsub(*names[:3], names[-1], "burst:keep"))
        assert set(numsub.values()) == {1}
        for name in (names[0], names[-1], "burst:keep"):
            bus.publish(name, b"x")
        got = {(await asyncio.wait_for(received.get(), 5))[0] for _ in range(3)}
        assert got == {names[0].encode(), names[-1].encode(), b"burst:keep"}
        assert not link._unsubscribing  # its reply came
    finally:
        await bus.close()


async def test_a_slot_move_notice_read_before_our_unsubscribe_is_written_leaves_nothing_counted(
    private_redis: RedisServer,
) -> None:
    """Redis's own unsubscribe notice (a slot moved, on a cluster) can be read between our
    unsubscribe's queueing and its write; a node that lost the slot answers that write with MOVED,
    not a notice. The notice must be taken as the answer then: a count left over would hide the
    channel's next move (it would stay in ``channels``, never subscribed again)."""
    bus = RedisBus(private_redis.url, name=NAME)
    await bus.start()
    try:
        await bus.subscribe("move:other", lambda channel, data: None)  # barriers wait on this link
        await bus.subscribe("move:k", lambda channel, data: None)
        (link,) = bus._links.values()
        bus.unsubscribe("move:k")  # queued
        link._on_push([b"unsubscribe", b"move:k", 0])  # the notice, read before the write
        link._write_sub_commands()  # the write (no answer would come from a cluster node)
        assert link._unsubscribing == {}
        # (one Redis answers the write with a notice too, unlike a cluster node: read it first)
        await bus.barrier(5)
        # the channel wanted again, then really moved: noticed (dropped, a refresh asked for)
        await bus.subscribe("move:k", lambda channel, data: None)
        await bus.barrier(5)
        assert link._unsubscribing == {} and b"move:k" in link.channels
        link._on_push([b"unsubscribe", b"move:k", 0])
        assert b"move:k" not in link.channels
    finally:
        await bus.close()


async def test_subscribes_queued_for_a_connection_that_dies_are_made_on_the_next(
    private_redis: RedisServer,
) -> None:
    """The subscriber connection dies between a burst's queueing and its write: the next connection
    subscribes to every channel still wanted (not the one dropped), and no unsubscribe is left
    counted as awaiting its reply (it would be taken for Redis's own slot-move notice later)."""
    bus = RedisBus(private_redis.url, name=NAME, max_backoff=0.2)
    received: asyncio.Queue[tuple[bytes, bytes]] = asyncio.Queue()
    await bus.start()
    try:
        await bus.subscribe("gone:dropped", lambda channel, data: None)
        (link,) = bus._links.values()
        first = link.sub
        assert first is not None
        names = [f"gone:{i}" for i in range(50)]
        joins = [
            asyncio.ensure_future(bus.subscribe(n, lambda c, d: received.put_nowait((c, d)))) for n in names
        ]
        await asyncio.sleep(0)  # the subscribes are queued, not written
        bus.unsubscribe("gone:dropped")
        assert link._sub_writes and link._unsubscribing == {b"gone:dropped": 1}
        first.abort()
        await asyncio.wait_for(asyncio.gather(*joins), 10)

        async def resubscribed() -> bool:
            return link.sub is not first and bus.subscriber_connected

        await wait_for(resubscribed, 10, "a new subscriber connection")
        assert link._unsubscribing == {}
        with redis.Redis.from_url(private_redis.url) as r:
            numsub = dict(r.pubsub_numsub(*names, "gone:dropped"))
        assert numsub == {**{n.encode(): 1 for n in names}, b"gone:dropped": 0}
        bus.publish(names[-1], b"after")
        assert await asyncio.wait_for(received.get(), 5) == (names[-1].encode(), b"after")
    finally:
        await bus.close()


async def test_what_redis_sent_before_taking_an_unsubscribe_still_reaches_the_handler(
    private_redis: RedisServer,
) -> None:
    """A message Redis pushed before it processed our UNSUBSCRIBE reaches the channel's handler
    (which knows the connection or group is gone here and says so: a relayed request for a
    connection that just ended gets its 404 at once instead of its sender waiting out a timeout),
    and once Redis answered the UNSUBSCRIBE nothing of the channel is kept."""
    bus = RedisBus(private_redis.url, name=NAME)
    got: list[tuple[bytes, bytes]] = []
    await bus.start()
    try:
        await bus.subscribe("leaving:x", lambda channel, data: got.append((channel, data)))
        await bus.subscribe("leaving:other", lambda channel, data: None)  # barriers wait on this link
        bus.unsubscribe("leaving:x")  # queued: written at the end of this loop pass
        with redis.Redis.from_url(private_redis.url) as r:
            assert r.publish("leaving:x", b"before") == 1  # (blocking: Redis takes it first)
        assert not bus.is_subscribed("leaving:x")
        await bus.barrier(5)  # the push, then the UNSUBSCRIBE's answer, were read
        assert got == [(b"leaving:x", b"before")]
        assert bus._leaving == {}
        with redis.Redis.from_url(private_redis.url) as r:
            assert r.publish("leaving:x", b"after") == 0
        # a component that is closing asks for nothing after its unsubscribe
        await bus.subscribe("leaving:y", lambda channel, data: got.append((channel, data)))
        bus.unsubscribe("leaving:y", linger=False)
        with redis.Redis.from_url(private_redis.url) as r:
            assert r.publish("leaving:y", b"before") == 1
        await bus.barrier(5)
        assert got == [(b"leaving:x", b"before")]
        assert bus._leaving == {}
    finally:
        await bus.close()
