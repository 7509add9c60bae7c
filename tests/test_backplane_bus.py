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

from hubwire.backplane.bus import RedisBus

from .conftest import RedisServer
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
