"""Long polling without sticky sessions: a POST is answered 200 only when its bytes reach the
connection's application.

A connection negotiated on one instance is started by whichever instance its first poll lands on;
the negotiating instance keeps an unstarted copy of it. A POST landing there while no instance
answers the connection's relay channel used to be put in that copy's "sent before the start"
buffer and answered 200, although the application runs elsewhere (or nowhere any more): its bytes
were lost, and a handshake sent that way was cancelled 15 s later. And a draining instance answered
a first poll it was relaying with an empty 200 when its drain finished meanwhile, so the client
took its connection for started and sent its handshake to an unstarted copy.

Real processes on a private redis-server, raw HTTP requests in a chosen order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import redis.asyncio as aioredis

from tests.conftest import RedisServer, ServerProcess

APP = "examples.interop.app:app"
HUB = "/testhub"
RS = "\x1e"
HANDSHAKE = json.dumps({"protocol": "json", "version": 1}) + RS


def _instances(request: pytest.FixtureRequest, redis: RedisServer, count: int) -> list[ServerProcess]:
    args = ["--redis", redis.url, "--channel-prefix", "lp-relay:"]
    env = {"INTEROP_LONG_POLL_TIMEOUT": "3"}
    started = []
    for _ in range(count):
        server = ServerProcess(APP, env=env, args=args)
        request.addfinalizer(server.close)  # before the next start: a failed start leaks nothing
        started.append(server)
    return started


async def _negotiate(client: httpx.AsyncClient, url: str) -> str:
    response = await client.post(f"{url}{HUB}/negotiate?negotiateVersion=1")
    response.raise_for_status()
    token: str = response.json()["connectionToken"]
    return token


async def test_a_send_before_the_first_poll_reaches_the_instance_that_starts_the_connection(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    """Handshake POSTed to the negotiating instance before any poll, first poll on the other one:
    the handshake reaches the application, and its answer comes with the next poll."""
    negotiator, other = _instances(request, private_redis, 2)
    async with httpx.AsyncClient(timeout=15) as client:
        token = await _negotiate(client, negotiator.url)
        sent = await client.post(f"{negotiator.url}{HUB}?id={token}", content=HANDSHAKE)
        assert sent.status_code == 200, sent.text
        first = await client.get(f"{other.url}{HUB}?id={token}")
        assert first.status_code == 200, first.text
        polled = ""
        for _ in range(2):  # bounded: the answer is due in the first one, an empty one is a miss
            poll = await client.get(f"{other.url}{HUB}?id={token}")
            assert poll.status_code == 200, poll.text
            polled += poll.text
            if polled:
                break
        assert polled.startswith("{}" + RS), polled  # the handshake's answer: it was handled
        deleted = await client.delete(f"{other.url}{HUB}?id={token}")
        assert deleted.status_code == 202


async def test_a_send_for_a_connection_ended_elsewhere_is_refused(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    """Started and ended on the other instance: a POST to the negotiating instance is a 404, not
    a 200 for bytes no application gets."""
    negotiator, other = _instances(request, private_redis, 2)
    async with httpx.AsyncClient(timeout=15) as client:
        token = await _negotiate(client, negotiator.url)
        first = await client.get(f"{other.url}{HUB}?id={token}")
        assert first.status_code == 200, first.text
        deleted = await client.delete(f"{other.url}{HUB}?id={token}")
        assert deleted.status_code == 202
        sent = await client.post(f"{negotiator.url}{HUB}?id={token}", content=HANDSHAKE)
        assert sent.status_code == 404, (sent.status_code, sent.text)


async def test_a_first_poll_relayed_when_the_drain_ends_is_not_answered_as_started(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    """A first poll that a draining instance is relaying when its drain finishes gets 503 (the
    client starts again elsewhere), not the empty 200 a relayed poll of a started connection gets:
    the client would take the connection for started and send its handshake to nobody.

    Redis holds the relay's PUBLISH (``CLIENT PAUSE ... WRITE``) so that the drain finishes while
    the first poll is being relayed."""
    negotiator, draining = _instances(request, private_redis, 2)
    control = aioredis.Redis.from_url(private_redis.url)
    request.addfinalizer(lambda: asyncio.run(_unpause(private_redis.url)))
    async with httpx.AsyncClient(timeout=15) as client:
        token = await _negotiate(client, negotiator.url)
        await control.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
        try:
            poll = asyncio.create_task(client.get(f"{draining.url}{HUB}?id={token}"))
            await asyncio.sleep(0.5)  # the poll is relayed: its PUBLISH waits in Redis
            assert not poll.done()
            paused_at = time.monotonic()
            os.killpg(draining.proc.pid, signal.SIGTERM)  # nothing to drain: it finishes at once
            response = await asyncio.wait_for(poll, 10)
        finally:
            await control.execute_command("CLIENT", "UNPAUSE")
            await control.aclose()
        # answered before Redis let the PUBLISH through: it was the drain's answer
        assert time.monotonic() - paused_at < 3.0
        assert response.status_code == 503, (response.status_code, response.text)
        assert response.headers.get("connection") == "close"


async def test_a_relayed_poll_of_a_connection_just_started_still_gets_its_handshake_response(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    """A connection started a moment ago (its first poll answered) whose next poll is relayed by an
    instance that then stops: that instance does not end the poll empty at once, it waits a grace
    for the holder's answer, so the handshake the client sends meanwhile gets its response through
    it. Why: the official JS client parses an empty binary poll body as the handshake response
    and fails ("Message is incomplete"), as a MessagePack client did in a rolling restart."""
    holder, relaying = _instances(request, private_redis, 2)
    handshake = json.dumps({"protocol": "messagepack", "version": 1}) + RS
    async with httpx.AsyncClient(timeout=15) as client:
        token = await _negotiate(client, holder.url)
        first = await client.get(f"{holder.url}{HUB}?id={token}")  # starts it on the holder
        assert first.status_code == 200 and first.content == b""
        poll = asyncio.create_task(client.get(f"{relaying.url}{HUB}?id={token}"))
        await asyncio.sleep(0.5)  # relayed: waiting at the holder
        assert not poll.done()
        os.killpg(relaying.proc.pid, signal.SIGTERM)  # nothing to drain: it is about to exit at once
        await asyncio.sleep(0.5)
        assert not poll.done(), poll.result()  # not ended empty
        sent = await client.post(f"{holder.url}{HUB}?id={token}", content=handshake.encode())
        assert sent.status_code == 200, sent.text
        response = await asyncio.wait_for(poll, 10)
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.content == b"{}" + RS.encode()


async def _unpause(url: str) -> None:
    control = aioredis.Redis.from_url(url)
    try:
        await control.execute_command("CLIENT", "UNPAUSE")
    except Exception:
        pass  # the server is gone already
    finally:
        await control.aclose()
