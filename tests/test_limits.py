"""Limits and policies of HubOptions against live servers; each test fails if its limit is not enforced.

* ``max_connections``: negotiate answers 503, an upgrade without a local connection is refused 503;
* ``max_invocations_per_second``: calls over the token bucket fail with ``RATE_LIMITED``, off by default;
* ``stream_buffer_capacity``: an upload nobody reads stops the connection's reader after 10 items;
* ``max_buffered_bytes``: a client that stops reading (raw socket, tiny receive buffer) is closed as a
  slow consumer in both serving modes, while other clients keep receiving every broadcast; a burst
  written in one go to clients that do read is not mistaken for a slow consumer.

(The 32 KB message limit, the handshake timeout and one invocation at a time are covered by
tests/test_bad_input.py and tests/test_keepalive.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from hubwire.hubs import RATE_LIMITED

from .conftest import ServerProcess
from .hwtools import (
    APP,
    SLOW_WEBSOCKET_DROPPED_WITHIN,
    negotiate,
    options_env,
    raw_hub_socket,
    read_head,
    socket_closed_by_peer,
    stats,
    wait_stats,
)
from .rawhub import RS, RawHub, open_ws, ws_url

SERVING = ["native", "asgi"]


def _server(request: pytest.FixtureRequest, serving: str = "native", **options: object) -> ServerProcess:
    proc = ServerProcess(APP, env=options_env(**options), args=["--serving", serving])
    request.addfinalizer(proc.close)
    return proc


def _assert_clean_log(server: ServerProcess) -> None:
    assert "Traceback" not in server.output(), server.output()[-3000:]


# ------------------------------------------------------------------------------------------------
# maximum connections per instance
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SERVING)
def capped(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    yield _server(request, request.param, max_connections=3)


async def test_max_connections(capped: ServerProcess) -> None:
    url = capped.url
    tokens = []
    for _ in range(3):
        response = await negotiate(url)
        assert response.status_code == 200
        tokens.append(response.json()["connectionToken"])
    # the fourth is refused: negotiate and an upgrade that would create a connection here
    refused = await negotiate(url)
    assert refused.status_code == 503
    assert refused.headers.get("retry-after") == "1"
    with pytest.raises(InvalidStatus) as err:
        await open_ws(ws_url(url))  # skipNegotiation
    assert err.value.response.status_code == 503
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:  # SSE / long polling too
        assert (await client.get("/hub", params={"id": "x" * 22})).status_code == 503
    # connections negotiated before the limit was reached are served
    hubs = [await RawHub.open(url, query=f"id={token}") for token in tokens]
    for hub in hubs:
        assert await hub.invoke("echo", "in") == "in"
    # one leaves: room for one more
    await hubs[0].close()
    await wait_stats(url, lambda s: s["connections"] == 2, 10, "the closed connection to be disposed")
    again = await negotiate(url)
    assert again.status_code == 200
    late = await RawHub.open(url, query=f"id={again.json()['connectionToken']}")
    assert await late.invoke("echo", "late") == "late"
    current = await stats(url)
    assert current["refused"]["max_connections"] >= 3
    for hub in [*hubs[1:], late]:
        await hub.close()
    _assert_clean_log(capped)


# ------------------------------------------------------------------------------------------------
# invocation rate limit
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(request: pytest.FixtureRequest) -> ServerProcess:
    return _server(request, max_invocations_per_second=5, invocation_burst=5)


@pytest.fixture(scope="module")
def default_server(request: pytest.FixtureRequest) -> ServerProcess:
    return _server(request)


async def _burst(hub: RawHub, count: int, target: str = "echo") -> tuple[int, list[str]]:
    """Send ``count`` calls in one frame; (successes, error texts)."""
    frame = "".join(str(hub.encode(hub.invocation(target, [i], f"r{i}"))) for i in range(count))
    await hub.send_raw(frame)
    ok, errors = 0, []
    seen: set[str] = set()
    while len(seen) < count:
        message = await hub.next_message()
        if message.get("type") != 3 or not str(message.get("invocationId", "")).startswith("r"):
            continue
        seen.add(message["invocationId"])
        if "error" in message:
            errors.append(message["error"])
        else:
            ok += 1
    return ok, errors


async def test_rate_limit(limited: ServerProcess) -> None:
    hub = await RawHub.open(limited.url)
    started = time.monotonic()
    ok, errors = await _burst(hub, 20)
    elapsed = time.monotonic() - started
    # the burst, plus what refilled (5/s) while they were processed: a loaded machine allows more
    assert 5 <= ok <= 5 + 5 * elapsed, (ok, elapsed, errors)
    assert errors == [RATE_LIMITED.format(target="echo")] * (20 - ok)
    assert errors[0] == "Failed to invoke 'echo' because the invocation rate limit was exceeded."
    # a streaming call over the limit is refused the same way
    await hub.send({"type": 4, "invocationId": "s1", "target": "counter", "arguments": [2]})
    message = await hub.next_message()
    assert message == {"type": 3, "invocationId": "s1", "error": RATE_LIMITED.format(target="counter")}
    # the bucket refills: calls within the rate all succeed
    await asyncio.sleep(1.2)
    for i in range(8):
        assert await hub.invoke("echo", i) == i
        await asyncio.sleep(0.25)  # 4 per second < 5
    # the connection is still healthy and other connections have their own bucket
    other = await RawHub.open(limited.url)
    ok_other, _ = await _burst(other, 5)
    assert ok_other == 5
    current = await stats(limited.url)
    assert current["hubs"]["/hub"]["rate_limited"] >= 15
    await hub.close()
    await other.close()


async def test_no_rate_limit_by_default(default_server: ServerProcess) -> None:
    hub = await RawHub.open(default_server.url)
    ok, errors = await _burst(hub, 50)
    assert (ok, errors) == (50, [])
    await hub.close()


# ------------------------------------------------------------------------------------------------
# upload stream buffer: back-pressure on the connection
# ------------------------------------------------------------------------------------------------


async def _upload_then_stream(url: str, items: int, hold_ms: int) -> tuple[float, bool, int]:
    """Start an upload nobody reads for ``hold_ms``, send ``items`` items, then a stream invocation.

    Returns how long the stream invocation took to answer, whether it answered before the upload
    completed, and the upload's sum.
    """
    hub = await RawHub.open(url)
    frames = [
        json.dumps(
            {
                "type": 1,
                "invocationId": "u",
                "target": "hold_upload",
                "arguments": [hold_ms],
                "streamIds": ["s"],
            }
        )
        + RS,
        *(json.dumps({"type": 2, "invocationId": "s", "item": i}) + RS for i in range(items)),
        json.dumps({"type": 3, "invocationId": "s"}) + RS,
        json.dumps({"type": 4, "invocationId": "c", "target": "counter", "arguments": [1]}) + RS,
    ]
    start = time.monotonic()
    await hub.send_raw("".join(frames))
    answered: float | None = None
    total: int | None = None
    first = False
    while answered is None or total is None:
        message = await hub.next_message()
        if message.get("invocationId") == "c" and answered is None:
            answered = time.monotonic() - start
            first = total is None
        if message.get("invocationId") == "u" and message.get("type") == 3:
            total = message["result"]
    await hub.close()
    return answered, first, total


async def test_upload_stream_buffer_applies_back_pressure(default_server: ServerProcess) -> None:
    # within the buffer (10 items): the connection keeps reading, so the stream call is answered
    # while the upload is still held (for 2 s: the longest the hub method sleeps)
    _, before_upload, total = await _upload_then_stream(default_server.url, 5, 2000)
    assert total == sum(range(5))
    assert before_upload, "the stream call waited for the held upload although the buffer had room"
    # past it: the reader waits until the hub method reads (after its 1.5 s hold), so the stream
    # call cannot be answered sooner (a lower bound: a loaded machine only makes it later)
    held, _, total = await _upload_then_stream(default_server.url, 40, 1500)
    assert total == sum(range(40))
    assert held >= 1.4, held


# ------------------------------------------------------------------------------------------------
# slow consumers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=SERVING)
def blaster(request: pytest.FixtureRequest) -> ServerProcess:
    return _server(request, request.param, websocket_close_timeout=1)


async def _count_blasts(hub: RawHub, expected: int, timeout: float) -> int:
    got = 0
    async with asyncio.timeout(timeout):
        while got < expected:
            message = await hub.next_message()
            if message.get("target") == "Blast":
                got += 1
    return got


async def test_slow_consumer_is_closed_others_keep_receiving(blaster: ServerProcess) -> None:
    url = blaster.url
    before = (await stats(url))["slow_consumer_closes"]
    fast = [await RawHub.open(url) for _ in range(3)]
    slow = raw_hub_socket(blaster.port, rcvbuf=4096)  # never reads again
    await wait_stats(url, lambda s: s["hub_connections"] == 4, 5, "four hub connections")
    rounds, per_round = 30, 10
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def broadcast() -> None:
            for _ in range(rounds):  # 30 x 10 x 20 KB = 6 MB to each client, 20 rounds a second
                response = await client.post("/blast", params={"count": per_round, "size": 20000})
                assert response.status_code == 200
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(broadcast())
        counts = await asyncio.gather(*(_count_blasts(h, rounds * per_round, 20) for h in fast))
        await sender
    elapsed = time.monotonic() - start
    assert counts == [rounds * per_round] * 3
    assert elapsed < 15, elapsed  # the slow client did not stall the others
    after = await wait_stats(url, lambda s: s["hub_connections"] == 3, 10, "the slow consumer to be closed")
    assert after["slow_consumer_closes"] == before + 1
    assert socket_closed_by_peer(slow, SLOW_WEBSOCKET_DROPPED_WITHIN)
    slow.close()
    assert "closing slow consumer" in blaster.output()
    # the others are still served
    for hub in fast:
        assert await hub.invoke("echo", "still") == "still"
        await hub.close()
    _assert_clean_log(blaster)


async def test_burst_to_readers_is_not_a_slow_consumer(blaster: ServerProcess) -> None:
    url = blaster.url
    before = (await stats(url))["slow_consumer_closes"]
    hubs = [await RawHub.open(url) for _ in range(3)]
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        # 6 MB to every client from one synchronous loop of sends: far over the 1 MB bound at once
        response = await client.post("/blast", params={"count": 300, "size": 20000})
        assert response.status_code == 200
    counts = await asyncio.gather(*(_count_blasts(h, 300, 20) for h in hubs))
    assert counts == [300] * 3
    for hub in hubs:
        assert await hub.invoke("echo", "fine") == "fine"
        await hub.close()
    assert (await stats(url))["slow_consumer_closes"] == before


@pytest.mark.parametrize("blaster", ["native"], indirect=True)
async def test_slow_server_sent_events_client_is_closed(blaster: ServerProcess) -> None:
    """The same policy for an SSE stream whose client stops reading (plain HTTP, served the same way
    in both modes: one serving mode only)."""
    url = blaster.url
    before = (await stats(url))["slow_consumer_closes"]
    fast = await RawHub.open(url)
    token = (await negotiate(url)).json()["connectionToken"]
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", blaster.port))
    slow.sendall(f"GET /hub?id={token} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    status, _ = read_head(slow)
    assert status == 200
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        handshake = b'{"protocol":"json","version":1}\x1e'
        assert (await client.post("/hub", params={"id": token}, content=handshake)).status_code == 200
        await wait_stats(url, lambda s: s["hub_connections"] == 2, 5, "the SSE connection")

        async def broadcast() -> None:
            for _ in range(30):
                assert (await client.post("/blast", params={"count": 10, "size": 20000})).status_code == 200
                await asyncio.sleep(0.05)

        sender = asyncio.create_task(broadcast())
        assert await _count_blasts(fast, 300, 20) == 300
        await sender
    after = await wait_stats(url, lambda s: s["hub_connections"] == 1, 10, "the slow SSE client to be closed")
    assert after["slow_consumer_closes"] == before + 1
    assert after["connections"] == 1
    assert socket_closed_by_peer(slow, 10)
    slow.close()
    assert await fast.invoke("echo", "still") == "still"
    await fast.close()
    _assert_clean_log(blaster)


@pytest.mark.parametrize("serving", SERVING)
async def test_disconnect_while_reading_is_held_back(request: pytest.FixtureRequest, serving: str) -> None:
    """A client that leaves while its connection's reading waits (an upload it never completes holds
    the invocation slot, so its next call waits) is disposed at once, not at the next keep-alive."""
    server = _server(request, serving)
    hub = await RawHub.open(server.url)
    held = (
        json.dumps(
            {"type": 1, "invocationId": "u", "target": "upload_sum", "arguments": [], "streamIds": ["s"]}
        )
        + RS
    )
    waiting = json.dumps({"type": 1, "invocationId": "e", "target": "echo", "arguments": ["x"]}) + RS
    await hub.send_raw(held + waiting)
    await wait_stats(server.url, lambda s: s["hubs"]["/hub"]["running_tasks"] == 1, 5, "the upload to run")
    hub.ws.transport.abort()  # vanish without a close
    # both together: the upload task ends a loop pass or two after the connection leaves the registry
    await wait_stats(
        server.url,
        lambda s: s["connections"] == 0 and s["hubs"]["/hub"]["running_tasks"] == 0,
        3,
        "the connection to be disposed with no hub task left",
    )
    _assert_clean_log(server)


async def test_upload_stream_id_in_use_is_refused(default_server: ServerProcess) -> None:
    """A second upload on a stream id that is still streaming would orphan the first (its method would
    wait for items forever, holding the invocation slot): it is refused instead."""
    hub = await RawHub.open(default_server.url)

    def upload(invocation_id: str) -> str:
        return (
            json.dumps(
                {
                    "type": 1,
                    "invocationId": invocation_id,
                    "target": "upload_sum",
                    "arguments": [],
                    "streamIds": ["s"],
                }
            )
            + RS
        )

    items = "".join(json.dumps({"type": 2, "invocationId": "s", "item": i}) + RS for i in (1, 2, 3))
    await hub.send_raw(
        upload("first") + upload("second") + items + json.dumps({"type": 3, "invocationId": "s"}) + RS
    )
    results = {}
    while len(results) < 2:
        message = await hub.next_message()
        if message.get("type") == 3:
            results[message["invocationId"]] = message
    assert results["second"] == {
        "type": 3,
        "invocationId": "second",
        "error": "Stream ID 's' is already in use.",
    }
    assert results["first"] == {"type": 3, "invocationId": "first", "result": 6}
    assert await hub.invoke("echo", "free") == "free"  # the slot was released
    await hub.close()
