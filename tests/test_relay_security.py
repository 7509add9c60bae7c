"""What crosses Redis when SSE / long-polling requests are relayed to the instance holding the connection.

The instance that receives a request authenticates it and checks its connection token itself; only what
the owner needs crosses Redis, sealed with the app's key. A Redis ``MONITOR`` running through relayed
SSE and long-polling sessions (JWT in the header and in the query, a cookie) must show none of the
credentials or tokens, and a relay message not sealed by the app is refused.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis

from tests.conftest import RedisServer, ServerProcess

APP = "examples.interop.app:app"
HUB = "/authorizedhub"
RS = "\x1e"
HANDSHAKE = json.dumps({"protocol": "json", "version": 1}) + RS


def _invocation(invocation_id: str, message: str) -> str:
    return (
        json.dumps({"type": 1, "invocationId": invocation_id, "target": "Echo", "arguments": [message]}) + RS
    )


class Monitor:
    """Every command Redis executes while it runs (``MONITOR``)."""

    def __init__(self, url: str) -> None:
        self.client = aioredis.Redis.from_url(url)
        self.lines: list[str] = []
        self.task: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()

    async def _run(self) -> None:
        async with self.client.monitor() as monitor:
            self.ready.set()
            async for command in monitor.listen():
                self.lines.append(str(command.get("command", "")))

    async def __aenter__(self) -> Monitor:
        self.task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        await asyncio.sleep(0.2)  # let the last commands arrive
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.aclose()


async def _negotiate(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> str:
    response = await client.post(f"{url}{HUB}/negotiate?negotiateVersion=1", headers=headers)
    response.raise_for_status()
    token: str = response.json()["connectionToken"]
    return token


async def _sse_session(
    client: httpx.AsyncClient, owner: str, other: str, jwt: str, cookie: str
) -> tuple[list[str], str]:
    """Stream from the owner, send (handshake, an echo) through the other instance."""
    headers = {"Authorization": f"Bearer {jwt}", "Cookie": cookie}
    token = await _negotiate(client, owner, headers)
    events: asyncio.Queue[str] = asyncio.Queue()
    stream_headers = {**headers, "Accept": "text/event-stream"}

    async def read() -> None:
        async with client.stream("GET", f"{owner}{HUB}?id={token}", headers=stream_headers) as response:
            assert response.status_code == 200
            await events.put(":open")
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    await events.put(line[6:])

    reader = asyncio.create_task(read())
    try:
        assert await asyncio.wait_for(events.get(), 10) == ":open"
        url = f"{other}{HUB}?id={token}&access_token={jwt}"  # the JWT in the query as well
        for body in (HANDSHAKE, _invocation("1", "sse-secret-free")):
            response = await client.post(url, content=body, headers={"Cookie": cookie})
            assert response.status_code == 200, response.text
        received = [await asyncio.wait_for(events.get(), 10) for _ in range(2)]
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    return received, token


async def _long_polling_session(
    client: httpx.AsyncClient, owner: str, other: str, jwt: str, cookie: str
) -> tuple[list[str], str]:
    """The first poll on the owner; POSTs, later polls and the DELETE through the other instance."""
    headers = {"Authorization": f"Bearer {jwt}", "Cookie": cookie}
    token = await _negotiate(client, owner, headers)
    first = await client.get(f"{owner}{HUB}?id={token}", headers=headers)
    assert first.status_code == 200
    relayed = f"{other}{HUB}?id={token}&access_token={jwt}"
    received: list[str] = []
    for body in (HANDSHAKE, _invocation("1", "lp-secret-free")):
        response = await client.post(relayed, content=body, headers={"Cookie": cookie})
        assert response.status_code == 200, response.text
        poll = await client.get(relayed, headers={"Cookie": cookie})
        assert poll.status_code == 200, poll.text
        received.append(poll.text)
    deleted = await client.delete(relayed, headers={"Cookie": cookie})
    assert deleted.status_code == 202
    return received, token


async def test_relayed_requests_put_no_credentials_on_redis(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    args = ["--redis", private_redis.url, "--channel-prefix", "relay-secrets:"]
    env = {"INTEROP_LONG_POLL_TIMEOUT": "5"}
    owner = ServerProcess(APP, env=env, args=args)
    request.addfinalizer(owner.close)  # before the next start: a failed start must not leak this one
    other = ServerProcess(APP, env=env, args=args)
    request.addfinalizer(other.close)
    cookie_value = f"cookie-{uuid.uuid4().hex}"
    cookie = f"session={cookie_value}"
    async with httpx.AsyncClient(timeout=15) as client:
        jwt = (await client.get(f"{owner.url}/generateJwtToken")).text
        async with Monitor(private_redis.url) as monitor:
            sse, sse_token = await _sse_session(client, owner.url, other.url, jwt, cookie)
            lp, lp_token = await _long_polling_session(client, owner.url, other.url, jwt, cookie)
    assert sse[0] == "{}" and '"result":"sse-secret-free"' in sse[1].replace(" ", "")
    assert lp[0].startswith("{}") and '"result":"lp-secret-free"' in lp[1].replace(" ", "")
    seen = "\n".join(monitor.lines)
    assert "hubwire:internal:transport:" in seen  # requests really were relayed through Redis
    for secret in (jwt, cookie_value, sse_token, lp_token, "Bearer", "access_token", "authorization"):
        assert secret.lower() not in seen.lower(), f"{secret[:20]}... crossed Redis"


async def test_a_relay_message_not_sealed_by_the_app_is_refused(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    args = ["--redis", private_redis.url, "--channel-prefix", "relay-forged:"]
    env = {"INTEROP_LONG_POLL_TIMEOUT": "5"}
    owner = ServerProcess(APP, env=env, args=args)
    request.addfinalizer(owner.close)
    async with httpx.AsyncClient(timeout=15) as client:
        jwt = (await client.get(f"{owner.url}/generateJwtToken")).text
        headers = {"Authorization": f"Bearer {jwt}"}
        response = await client.post(f"{owner.url}{HUB}/negotiate?negotiateVersion=1", headers=headers)
        body = response.json()
        connection_id = body["connectionId"]
        first = await client.get(f"{owner.url}{HUB}?id={body['connectionToken']}", headers=headers)
        assert first.status_code == 200
    redis = aioredis.Redis.from_url(private_redis.url)
    try:
        channel = f"relay-forged:hubwire:internal:transport:{connection_id}"
        payload = msgspec.msgpack.encode(["DELETE", "", "", b"", None])
        unsealed = msgspec.msgpack.encode(["r1", "relay-forged:hubwire:internal:reply:x", 0, payload])
        forged = msgspec.msgpack.encode([unsealed, b"\0" * 32])
        assert await redis.publish(channel, forged) == 1  # the owner listens, and ignores it
        await asyncio.sleep(0.5)
    finally:
        await redis.aclose()
    assert "not sealed by this app" in owner.output()
    async with httpx.AsyncClient(timeout=15) as client:  # the connection was not deleted
        poll = await client.post(
            f"{owner.url}{HUB}?id={body['connectionToken']}", content=HANDSHAKE, headers=headers
        )
        assert poll.status_code == 200
