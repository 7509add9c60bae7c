"""Stateful reconnect through the connection service: the node holds the client's numbering.

Real processes: a private ``redis-server``, one node (``hubwire service``) and
``tests.apps.stateful:app`` as an app server linked to it. Clients negotiate at the app server,
which sends them to the node through a loopback TCP proxy (``HUBWIRE_SERVICE_CLIENT_URLS``) that
cuts their WebSockets without a close handshake, as a flaky network does; the app server's link to
the node is direct and never cut. The official JS client (``withStatefulReconnect()``) resumes on
the node, which replays what the client had not acknowledged and drops the calls it resends: the
app server sees one connection, never a reconnect.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RedisServer, ServerProcess
from tests.hwtools import options_env
from tests.rawhub import RawHub, open_ws, ws_url
from tests.requirements import NODE_CLIENT, requires
from tests.stateful_tools import cuts_lose_nothing, cutting_proxy, node_client
from tests.test_scaleout import new_prefix

KEY = "service-stateful-access-key-0123456789abcdef"
APP = "tests.apps.stateful:app"
PUMPED = 100


@pytest.fixture
def node(private_redis: RedisServer) -> Iterator[ServerProcess]:
    args = ["--redis", private_redis.url, "--channel-prefix", new_prefix("svc-stateful")]
    server = ServerProcess("", args=args, env={"HUBWIRE_SERVICE_ACCESS_KEY": KEY}, command="service")
    try:
        yield server
    finally:
        server.close()


async def until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def node_counter(node: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient(timeout=5) as http:
        text = (await http.get(f"{node.url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"no {name} on the node")


@requires(*NODE_CLIENT)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_js_client_resumes_on_its_node_and_keeps_every_message(
    node: ServerProcess, protocol: str
) -> None:
    async with cutting_proxy(node.port) as proxy:
        env = {
            "HUBWIRE_SERVICE_ACCESS_KEY": KEY,
            "HUBWIRE_SERVICE_URLS": node.url,
            "HUBWIRE_SERVICE_CLIENT_URLS": proxy.url,
        }
        app = ServerProcess(APP, env=env)
        try:
            async with (
                httpx.AsyncClient(base_url=app.url, timeout=5) as http,
                node_client(f"{app.url}/hub?user=alice&group=g1", protocol) as client,
            ):
                ready = await client.wait_for("ready", 30)
                assert ready["features"]["reconnect"] is True  # the node granted stateful reconnect
                connection_id = ready["connectionId"]
                await cuts_lose_nothing(proxy, http, client, connection_id, PUMPED)
                assert await node_counter(node, "hubwire_service_resumed_total") == 5
                assert await node_counter(node, "hubwire_service_replayed_total") > 0

                # a call in flight over a cut runs once on the app server and its result arrives
                call = await client.invoke("CountCall", "inflight", 1500)

                async def started() -> bool:
                    return int((await http.get("/debug/calls")).json().get("inflight", 0)) == 1

                await until(started, 10, "the call to start")
                assert proxy.cut() >= 1
                result = await client.wait_for("result", 20, lambda e: e["id"] == call)
                assert result.get("result") == 1, result
                assert int((await http.get("/debug/calls")).json()["inflight"]) == 1
                who = await client.invoke("Whoami")
                result = await client.wait_for("result", 10, lambda e: e["id"] == who)
                assert result["result"] == {"connectionId": connection_id, "user": "alice"}
                assert client.lifecycle_events() == []
                lifecycle = (await http.get("/debug/lifecycle")).json()[connection_id]
                assert lifecycle == {"connected": 1, "disconnected": 0}  # the app server saw one connection

                await client.command(cmd="stop")
                await client.wait_for("stopped", 10)

                async def ended() -> bool:
                    return (await http.get("/debug/lifecycle")).json()[connection_id]["disconnected"] == 1

                await until(ended, 10, "on_disconnected after the client stopped")
        finally:
            app.close()


async def test_a_resumed_client_whose_sequence_names_unsent_messages_is_closed(node: ServerProcess) -> None:
    """As a hub server does: the node closes it with the protocol's error, reconnect allowed, and
    the app server behind it runs on_disconnected (it saw neither the Sequence nor the drop)."""
    env = {"HUBWIRE_SERVICE_ACCESS_KEY": KEY, "HUBWIRE_SERVICE_URLS": node.url}
    app = ServerProcess(APP, env=env)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            hub, connection_id, url = await _raw_stateful(app, http)

            async def connected() -> bool:
                lifecycle = (await http.get(f"{app.url}/debug/lifecycle")).json()
                return lifecycle.get(connection_id) == {"connected": 1, "disconnected": 0}

            await until(connected, 10, "the app server's on_connected")
            hub.ws.transport.abort()  # dropped without a close handshake: the node keeps it
            await asyncio.sleep(0.3)
            again = RawHub(await open_ws(url), "json")
            assert RawHub.kind(await again.next_message()) == 9  # the node's Sequence
            await again.send({"type": 9, "sequenceId": 5})  # the node received nothing: 1 at most
            await closed_with_error_then_ended(again, http, app, connection_id)
    finally:
        app.close()


async def closed_with_error_then_ended(
    hub: RawHub, http: httpx.AsyncClient, app: ServerProcess, connection_id: str
) -> None:
    """The node closed the client as a hub server would, and the app server ran on_disconnected."""
    close = await hub.expect_close_message()
    assert close == {"type": 7, "error": "Connection closed with an error.", "allowReconnect": True}

    async def ended() -> bool:
        entry = (await http.get(f"{app.url}/debug/lifecycle")).json().get(connection_id, {})
        return (entry.get("connected"), entry.get("disconnected")) == (1, 1)

    await until(ended, 10, "on_disconnected on the app server")


async def _raw_stateful(app: ServerProcess, http: httpx.AsyncClient) -> tuple[RawHub, str, str]:
    """A raw v2 client sent to the node by the app server's negotiate; its connection id and the
    URL it resumes at."""
    redirect = (await http.post(f"{app.url}/hub/negotiate?negotiateVersion=1&user=alice")).json()
    base, query = redirect["url"].split("?", 1)
    auth = {"Authorization": f"Bearer {redirect['accessToken']}"}
    negotiate = f"{base.rstrip('/')}/negotiate?{query}&negotiateVersion=1&useStatefulReconnect=true"
    negotiated = (await http.post(negotiate, headers=auth)).json()
    assert negotiated["useStatefulReconnect"] is True
    token = negotiated["connectionToken"]
    url = ws_url(base.rstrip("/"), "/", f"{query}&id={token}&access_token={redirect['accessToken']}")
    hub = RawHub(await open_ws(url), "json")
    assert await hub.handshake("json", 2) == {}
    return hub, negotiated["connectionId"], url


async def test_a_stateful_client_sending_a_message_past_the_limit_is_closed(node: ServerProcess) -> None:
    """The node reads a stateful client's messages (it numbers them): one it cannot read - here
    one past its 32 KB limit, although the app server would take it - closes the client with the
    protocol's error (passed on unread, it would break the numbering), and the app server, which
    never saw it, runs on_disconnected."""
    env = {
        "HUBWIRE_SERVICE_ACCESS_KEY": KEY,
        "HUBWIRE_SERVICE_URLS": node.url,
        **options_env(maximum_receive_message_size=1_000_000),
    }
    app = ServerProcess(APP, env=env)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            hub, connection_id, _ = await _raw_stateful(app, http)
            await hub.send({"type": 1, "invocationId": "1", "target": "Echo", "arguments": ["x" * 40_000]})
            await closed_with_error_then_ended(hub, http, app, connection_id)
    finally:
        app.close()
