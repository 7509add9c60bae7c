"""Behaviour the single owner of connection lifetime guarantees, on live servers in both serving modes.

* no hub method starts after ``on_disconnected`` (a call queued behind a held invocation slot used to
  run after it in native mode);
* a hub's own ``maximum_receive_message_size`` bounds its WebSocket frames in native mode too (the
  server-wide value used to close such connections with 1009);
* one hub served at two paths with different protocols is delivered to in each protocol over the
  Redis backplane (the manager used to keep only the last path's protocols).
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import RedisServer, ServerProcess
from tests.hwtools import wait_for, wait_stats
from tests.rawhub import RS, RawHub

APP = "tests.apps.structure:app"
SERVING = ["native", "asgi"]


def _start(request: pytest.FixtureRequest, serving: str, *args: str) -> ServerProcess:
    proc = ServerProcess(APP, args=["--serving", serving, *args])
    request.addfinalizer(proc.close)
    return proc


async def _events(url: str) -> list[list[str]]:
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        response = await client.get("/debug/events")
        response.raise_for_status()
        result: list[list[str]] = response.json()
        return result


@pytest.mark.parametrize("serving", SERVING)
async def test_no_hub_method_starts_after_on_disconnected(
    request: pytest.FixtureRequest, serving: str
) -> None:
    server = _start(request, serving)
    hub = await RawHub.open(server.url)
    me = await hub.invoke("echo", "first")
    assert me == "first"
    (cid,) = {e[1] for e in await _events(server.url)}
    # an upload that never completes holds the only invocation slot; the echo behind it waits
    held = {"type": 1, "invocationId": "u", "target": "upload_sum", "arguments": [], "streamIds": ["s"]}
    waiting = {"type": 1, "invocationId": "e", "target": "echo", "arguments": ["queued"]}
    await hub.send_raw(json.dumps(held) + RS + json.dumps(waiting) + RS)
    await wait_stats(server.url, lambda s: s["hubs"]["/hub"]["running_tasks"] == 1, 5, "the upload to run")
    hub.ws.transport.abort()  # vanish without a close
    # the connection is gone and every task of the hub is over (the upload ended by the disconnect)
    await wait_stats(
        server.url,
        lambda s: s["connections"] == 0 and s["hubs"]["/hub"]["running_tasks"] == 0,
        5,
        "the connection to be disposed with no hub task left",
    )
    mine = [e[0] + ":" + e[2] for e in await _events(server.url) if e[1] == cid]
    assert mine == ["echo:first", "disconnected:"]
    assert "Traceback" not in server.output()


@pytest.mark.parametrize("serving", SERVING)
async def test_a_hubs_own_message_size_bounds_its_frames(
    request: pytest.FixtureRequest, serving: str
) -> None:
    server = _start(request, serving)
    big = "x" * (300 * 1024)  # over 4x the server-wide 32 KB, under the path's 512 KB
    hub = await RawHub.open(server.url, "/big")
    assert await hub.invoke("length", big) == len(big)
    await hub.close()
    # the default path keeps the server-wide limit: the same message ends that connection
    small = await RawHub.open(server.url, "/hub")
    with contextlib.suppress(ConnectionClosed):  # the server may close before the send completes
        await small.send_raw(json.dumps({"type": 1, "target": "length", "arguments": [big]}) + RS)
        await small.expect_closed()
    assert small.ws.protocol.close_rcvd is not None


@pytest.mark.parametrize("backplane", ["memory", "redis"])
async def test_one_hub_at_two_paths_reaches_both_protocols(
    request: pytest.FixtureRequest, backplane: str, redis_server: RedisServer
) -> None:
    args = ["--redis", redis_server.url, "--channel-prefix", "two-paths:"] if backplane == "redis" else []
    server = _start(request, "native", *args)
    mp = await RawHub.open(server.url, "/mp", "messagepack")
    js = await RawHub.open(server.url, "/js", "json")
    assert await mp.invoke("ping") == "pong"
    assert await js.invoke("ping") == "pong"
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        (await client.post("/broadcast/hello")).raise_for_status()
    got = {"mp": await mp.next_message(timeout=5), "js": await js.next_message(timeout=5)}
    assert got["mp"][:2] == [1, {}] and got["mp"][3:5] == ["Msg", ["hello"]]
    assert got["js"] == {"type": 1, "target": "Msg", "arguments": ["hello"]}
    await asyncio.gather(mp.close(), js.close())


@pytest.mark.parametrize("serving", SERVING)
async def test_messages_before_a_clean_close_are_processed(
    request: pytest.FixtureRequest, serving: str
) -> None:
    """What a client sent before its Close frame runs (as in ASP.NET), then on_disconnected: here an
    echo queued behind a slow call (the one invocation slot) when the Close arrives."""
    server = _start(request, serving)
    hub = await RawHub.open(server.url)
    cid = await hub.invoke("whoami")
    slow = {"type": 1, "invocationId": "s", "target": "slow", "arguments": [300]}
    echo = {"type": 1, "invocationId": "e", "target": "echo", "arguments": ["before close"]}
    await hub.send_raw(json.dumps(slow) + RS + json.dumps(echo) + RS)
    await hub.ws.close()  # a clean Close (1000) right behind them

    async def disconnected() -> bool:
        return any(e[0] == "disconnected" and e[1] == cid for e in await _events(server.url))

    await wait_for(disconnected, 10, "on_disconnected")
    mine = [e[0] + ":" + e[2] for e in await _events(server.url) if e[1] == cid]
    assert mine == ["slow:", "echo:before close", "disconnected:"]
    assert "Traceback" not in server.output()


async def test_asgi_mode_bounds_websocket_messages_by_the_hubs_limits(request: pytest.FixtureRequest) -> None:
    """uvicorn's own WebSocket implementation buffered up to 16 MiB per message for any client; it is
    bounded by the hubs' largest message (here the /big path's 512 KB, times four) like native mode."""
    server = _start(request, "asgi")
    hub = await RawHub.open(server.url, "/hub")
    with contextlib.suppress(ConnectionClosed):  # the server may close before the send completes
        await hub.send_raw("x" * (3 * 1024 * 1024))
        await hub.expect_closed()
    assert hub.ws.protocol.close_rcvd is not None and hub.ws.protocol.close_rcvd.code == 1009
