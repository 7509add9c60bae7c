"""Origins, connection-start claims and input after a failure, on live servers (both serving modes).

* WebSocket upgrades follow ``cors_origins`` (browsers open WebSockets from any page without CORS);
  ``"*"`` never goes with credentials;
* a connection start is claimed in Redis for as long as its token can start it, and a start that
  cannot be recorded (Redis unreachable) is refused with 503 and a clear text;
* a connection that failed takes no more input: POSTs after a refused handshake get 404.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import RedisServer, ServerProcess
from tests.hwtools import stats
from tests.rawhub import RS, RawHub, ws_url
from tests.test_websocket_conformance import RawSocket, frame

SERVING = ["native", "asgi"]


def _start(request: pytest.FixtureRequest, app: str, *args: str) -> ServerProcess:
    proc = ServerProcess(app, args=list(args))
    request.addfinalizer(proc.close)
    return proc


async def _ws_status(url: str, origin: str | None) -> int:
    """101 when the upgrade was accepted, else the refusal's HTTP status."""
    headers = {"Origin": origin} if origin else {}
    try:
        async with connect(url, additional_headers=headers, open_timeout=10, close_timeout=1):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize("serving", SERVING)
async def test_websocket_origins_follow_cors_origins(request: pytest.FixtureRequest, serving: str) -> None:
    restricted = _start(request, "tests.interop.apps:restricted", "--serving", serving)
    url = ws_url(restricted.url, "/echo")
    assert await _ws_status(url, "http://evil.example") == 403
    assert await _ws_status(url, "http://allowed.example") == 101
    assert await _ws_status(url, None) == 101  # not a browser: no Origin, nothing to check
    wildcard = _start(request, "tests.interop.apps:wildcard", "--serving", serving)
    assert await _ws_status(ws_url(wildcard.url, "/echo"), "http://any.example") == 101


async def test_a_wildcard_never_goes_with_credentials(request: pytest.FixtureRequest) -> None:
    wildcard = _start(request, "tests.interop.apps:wildcard")
    async with httpx.AsyncClient(base_url=wildcard.url, timeout=10) as client:
        origin = {"Origin": "http://any.example"}
        negotiate = await client.post("/echo/negotiate?negotiateVersion=1", headers=origin)
        preflight = await client.options(
            "/echo/negotiate", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
    for response in (negotiate, preflight):
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers


async def test_connection_starts_are_claimed_for_the_token_lifetime_and_need_redis(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    prefix = "claims:"
    a = _start(request, "tests.apps.structure:app", "--redis", private_redis.url, "--channel-prefix", prefix)
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        first = (await client.post("/hub/negotiate?negotiateVersion=1")).json()
        second = (await client.post("/hub/negotiate?negotiateVersion=1")).json()
    hub = await RawHub.open(a.url, query=f"id={first['connectionToken']}")
    assert await hub.invoke("echo", "claimed") == "claimed"
    redis = aioredis.Redis.from_url(private_redis.url)
    try:
        ttl = await redis.ttl(f"{prefix}hubwire:internal:claim:{first['connectionId']}")
    finally:
        await redis.aclose()
    # tokens start connections for disconnect_timeout (15 s) + 15 s; the claim outlives that
    assert 30 < ttl <= 40
    await hub.close()
    private_redis.kill()
    status = await _ws_status(ws_url(a.url, "/hub", f"id={second['connectionToken']}"), None)
    assert status == 503
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        refused = await client.get(
            f"/hub?id={second['connectionToken']}", headers={"Accept": "text/event-stream"}
        )
    assert refused.status_code == 503
    assert refused.text == "Cannot start the connection now: the backplane is unreachable. Try again."


async def test_a_failed_connection_takes_no_more_input(request: pytest.FixtureRequest) -> None:
    server = _start(request, "tests.apps.structure:app")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        token = (await client.post("/hub/negotiate?negotiateVersion=1")).json()["connectionToken"]
        url = f"/hub?id={token}"
        first_poll = await client.get(url)
        assert first_poll.status_code == 200
        bad = json.dumps({"protocol": "nope", "version": 1}) + RS
        assert (await client.post(url, content=bad)).status_code == 200
        reply = await client.get(url)  # the handshake refusal
        assert "The protocol 'nope' is not supported." in reply.text
        more = await client.post(url, content="x" * 10_000)
        assert more.status_code == 404


async def test_per_connection_limits(request: pytest.FixtureRequest) -> None:
    server = _start(request, "tests.apps.structure:app")
    hub = await RawHub.open(server.url, "/limited")
    assert [await hub.invoke("join", g) for g in ("a", "b", "c", "a")] == [
        "ok"
    ] * 4  # "a" again is no new one
    assert await hub.invoke("join", "d") == "error: The connection is already in 3 groups, the most allowed."
    assert await hub.invoke("join", "x" * 11) == "error: Group names are limited to 10 characters."
    for stream_id in ("s1", "s2"):
        await hub.send({"type": 4, "invocationId": stream_id, "target": "ticks", "arguments": []})
    await hub.send({"type": 4, "invocationId": "s3", "target": "ticks", "arguments": []})
    while True:  # the third stream is refused; the two running ones keep streaming
        message = await hub.next_message()
        if message.get("invocationId") == "s3":
            break
    assert message == {
        "type": 3,
        "invocationId": "s3",
        "error": "Failed to invoke 'ticks' because the connection already runs 2 streams, the most allowed.",
    }
    await hub.send({"type": 5, "invocationId": "s1"})  # cancel one: once it completed, a new one may start
    while (await hub.next_message()) != {"type": 3, "invocationId": "s1"}:
        pass
    await hub.send({"type": 4, "invocationId": "s4", "target": "ticks", "arguments": []})
    while True:
        message = await hub.next_message()
        if message.get("invocationId") == "s4":
            break
    assert message == {"type": 2, "invocationId": "s4", "item": 0}
    await hub.close()


@pytest.mark.parametrize("serving", SERVING)
async def test_a_raw_websocket_closes_with_1000_in_both_modes(
    request: pytest.FixtureRequest, serving: str
) -> None:
    """A plain WebSocket to a raw endpoint (no negotiate): the client's Close(1000) is answered with
    1000 in native and in ASGI serving mode alike."""
    server = _start(request, "tests.interop.apps:plain", "--serving", serving)
    async with connect(ws_url(server.url, "/echo"), open_timeout=10, close_timeout=5) as ws:
        await ws.send("message")
        assert await ws.recv() == "message"
        await ws.close(1000)
    assert ws.protocol.close_rcvd is not None and ws.protocol.close_rcvd.code == 1000


@pytest.mark.parametrize("serving", SERVING)
async def test_input_after_a_failed_handshake_is_not_kept(
    request: pytest.FixtureRequest, serving: str
) -> None:
    """100 MB sent after a refused handshake: none of it is buffered or parsed again (it used to be
    appended and rescanned, quadratically). A raw socket keeps sending after the server's Close."""
    server = _start(request, "tests.apps.structure:app", "--serving", serving)
    ws = await RawSocket.open(server.port, "/hub")
    await ws.send(frame(1, json.dumps({"protocol": "nope", "version": 1}).encode() + RS.encode()))
    opcode, reply = await ws.frame()
    assert opcode == 1 and b"The protocol 'nope' is not supported." in reply
    before = (await stats(server.url))["rss_bytes"]
    chunk = frame(1, b"x" * (64 * 1024)) * 16  # 1 MB of frames per write
    sent = 0
    try:
        while sent < 100 * 1024 * 1024:
            ws.writer.write(chunk)
            await asyncio.wait_for(ws.writer.drain(), 5)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass  # the server dropped the connection after its close timeout, or stopped reading
    after = (await stats(server.url))["rss_bytes"]
    await ws.aclose()
    assert sent > 10 * 1024 * 1024, sent  # the server did take the input (and dropped it)
    assert after - before < 4 * 1024 * 1024, (before, after, sent)
