"""Stateful reconnect on one instance: a dropped WebSocket does not end the connection.

Real server processes (``tests.apps.stateful:app``) in both serving modes. The official JS client
(``tests/js/stateful.cjs``, ``withStatefulReconnect()`` and ``withAutomaticReconnect()``) runs
through a loopback TCP proxy (``tests.stateful_tools.CuttingProxy``) that cuts its connections
without a close handshake; a successful resume never calls ``onreconnecting`` / ``onreconnected``
(the JS client reconnects its transport inside ``HttpConnection`` and only falls back to the
automatic reconnect, with a new negotiate and connection id, when that fails). Raw clients
(``websockets``) check the wire: the Sequence and the replay, resent calls dropped, the Acks,
back-pressure, the user check, the window.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.conftest import ServerProcess
from tests.hwtools import options_env, wait_for
from tests.rawhub import RawHub, open_ws, ws_url
from tests.requirements import NODE_CLIENT, requires
from tests.stateful_tools import cuts_lose_nothing, cutting_proxy, node_client

APP = "tests.apps.stateful:app"
PUMPED = 100


@pytest.fixture(params=["native", "asgi"])
def serving(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _start(start_server: Any, serving: str, **options: Any) -> ServerProcess:
    server: ServerProcess = start_server(APP, env=options_env(**options), args=["--serving", serving])
    return server


@pytest.fixture
async def http_of() -> AsyncIterator[Callable[[ServerProcess], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(server: ServerProcess) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=server.url, timeout=5)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def _hub_stats(http: httpx.AsyncClient) -> dict[str, Any]:
    response = await http.get("/debug/stats")
    response.raise_for_status()
    hub: dict[str, Any] = response.json()["hubs"]["/hub"]
    return hub


async def _lifecycle(http: httpx.AsyncClient, connection_id: str) -> dict[str, Any]:
    entry: dict[str, Any] = (await http.get("/debug/lifecycle")).json().get(connection_id, {})
    return entry


async def _calls(http: httpx.AsyncClient, key: str) -> int:
    return int((await http.get("/debug/calls")).json().get(key, 0))


async def _until(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait (bounded) until ``check()`` (a value or an awaitable) is true."""

    async def probe() -> bool:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        return bool(value)

    await wait_for(probe, timeout, what, 0.05)


async def _negotiate(http: httpx.AsyncClient, query: str) -> dict[str, Any]:
    response = await http.post(f"/hub/negotiate?negotiateVersion=1&{query}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- the official JS client through a cutting proxy ------------------------------------------------


@requires(*NODE_CLIENT)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_js_client_keeps_every_message_across_cuts(
    start_server: Any, serving: str, protocol: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    async with (
        cutting_proxy(server.port) as proxy,
        node_client(f"{proxy.url}/hub?user=alice&group=g1", protocol) as client,
    ):
        ready = await client.wait_for("ready", 20)
        assert ready["features"]["reconnect"] is True  # the client runs stateful reconnect
        connection_id = ready["connectionId"]
        await cuts_lose_nothing(proxy, http, client, connection_id, PUMPED)
        stats = await _hub_stats(http)
        assert stats["resumed"] == 5, stats
        assert stats["replayed"] > 0, stats  # unacknowledged messages were sent again
        assert await _lifecycle(http, connection_id) == {"connected": 1, "disconnected": 0}

        # a call in flight over a cut runs once and its result still arrives
        call = await client.invoke("CountCall", "inflight", 1500)
        await _until(lambda: _calls(http, "inflight"), 10, "the call to start")
        assert proxy.cut() >= 1
        result = await client.wait_for("result", 20, lambda e: e["id"] == call)
        assert result.get("result") == 1, result
        assert await _calls(http, "inflight") == 1
        who = await client.invoke("Whoami")
        result = await client.wait_for("result", 10, lambda e: e["id"] == who)
        assert result["result"] == {"connectionId": connection_id, "user": "alice"}
        assert client.lifecycle_events() == []

        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)

    async def ended() -> bool:
        return (await _lifecycle(http, connection_id)).get("disconnected") == 1

    await _until(ended, 10, "on_disconnected after the client stopped")
    assert (await _lifecycle(http, connection_id))["connected"] == 1


@requires(*NODE_CLIENT)
async def test_js_client_without_stateful_reconnect_reconnects_as_before(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    async with (
        cutting_proxy(server.port) as proxy,
        node_client(f"{proxy.url}/hub?user=alice", "json", "plain") as client,
    ):
        ready = await client.wait_for("ready", 20)
        assert ready["features"]["reconnect"] is False
        first = ready["connectionId"]
        assert proxy.cut() >= 1
        await client.wait_for("reconnecting", 10)
        back = await client.wait_for("reconnected", 20)
        assert back["connectionId"] != first  # a new connection (new negotiate)

        async def ended() -> bool:
            return (await _lifecycle(http, first)).get("disconnected") == 1

        await _until(ended, 5, "the dropped connection to end at once (no disconnect window)")
        stats = await _hub_stats(http)
        assert stats["resumed"] == 0 and stats["suspended"] == 0, stats
        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)


@requires(*NODE_CLIENT)
async def test_js_client_back_after_the_window_gets_a_new_connection(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving, disconnect_timeout=1.5)
    http = http_of(server)
    async with (
        cutting_proxy(server.port) as proxy,
        node_client(f"{proxy.url}/hub?user=alice", "json") as client,
    ):
        first = (await client.wait_for("ready", 20))["connectionId"]
        proxy.refusing = True  # the resume fails, and so do the reconnect attempts, for a while
        assert proxy.cut() >= 1
        await client.wait_for("reconnecting", 10)

        async def ended() -> bool:
            return (await _lifecycle(http, first)).get("disconnected") == 1

        await _until(ended, 10, "the disconnect window to end the connection")
        proxy.refusing = False
        back = await client.wait_for("reconnected", 30)
        assert back["connectionId"] != first
        assert (await _lifecycle(http, first)) == {"connected": 1, "disconnected": 1, "error": "None"}
        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)


# -- raw clients: the wire -----------------------------------------------------------------------


def _kind(message: Any) -> int:
    return RawHub.kind(message)


def _sequence_id(message: Any) -> int:
    return int(message[1] if isinstance(message, list) else message["sequenceId"])


def _ack(hub: RawHub, sequence_id: int) -> Any:
    return [8, sequence_id] if hub.binary else {"type": 8, "sequenceId": sequence_id}


def _sequence(hub: RawHub, sequence_id: int) -> Any:
    return [9, sequence_id] if hub.binary else {"type": 9, "sequenceId": sequence_id}


async def _open(server: ServerProcess, token: str, protocol: str, user: str | None = "alice") -> RawHub:
    query = f"id={token}&group=g" + (f"&user={user}" if user else "")
    return RawHub(await open_ws(ws_url(server.url, "/hub", query)), protocol)


async def _connect(
    server: ServerProcess,
    http: httpx.AsyncClient,
    protocol: str = "json",
    version: int = 2,
    stateful: bool = True,
) -> tuple[RawHub, str, str]:
    negotiated = await _negotiate(http, "user=alice" + ("&useStatefulReconnect=true" if stateful else ""))
    token = negotiated["connectionToken"]
    hub = await _open(server, token, protocol)
    assert await hub.handshake(protocol, version) == {}
    return hub, negotiated["connectionId"], token


async def _drop(hub: RawHub) -> None:
    """Drop the TCP connection: no WebSocket close handshake."""
    transport = hub.ws.transport
    transport.abort()


async def _suspended(http: httpx.AsyncClient, count: int = 1) -> None:
    async def check() -> bool:
        return bool((await _hub_stats(http))["suspended"] == count)

    await _until(check, 10, f"{count} suspended connection(s)")


async def test_negotiate_grants_stateful_reconnect_only_when_asked_and_allowed(
    start_server: Any, http_of: Any
) -> None:
    server = _start(start_server, "native")
    http = http_of(server)
    plain = await http.post("/hub/negotiate?negotiateVersion=1")
    assert "useStatefulReconnect" not in plain.json() and len(plain.json()["connectionToken"]) == 48
    asked = await http.post("/hub/negotiate?negotiateVersion=1&useStatefulReconnect=true")
    assert asked.text.startswith('{"useStatefulReconnect":true,"negotiateVersion":1,')  # as .NET writes it
    assert len(asked.json()["connectionToken"]) == 50  # the signed flag: another instance knows too
    shouted = await http.post("/hub/negotiate?NEGOTIATEVERSION=1&USESTATEFULRECONNECT=True")
    assert shouted.json()["useStatefulReconnect"] is True
    for query in (
        "useStatefulReconnect=false",
        "useStatefulReconnect=1",
        "negotiateVersion=0&useStatefulReconnect=true",
    ):
        body = (await http.post(f"/hub/negotiate?{query}")).json()
        assert "useStatefulReconnect" not in body, (query, body)
    off = _start(start_server, "native", allow_stateful_reconnect=False)
    body = (await http_of(off).post("/hub/negotiate?negotiateVersion=1&useStatefulReconnect=true")).json()
    assert "useStatefulReconnect" not in body


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_resume_sends_sequence_and_replay_and_drops_resent_calls(
    start_server: Any, serving: str, protocol: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http, protocol)
    completion = await hub.invoke_raw("CountCall", "raw", 0)  # client message 1, server message 1
    assert _kind(completion) == 3
    await _drop(hub)  # before any Ack either way
    await _suspended(http)
    assert await _lifecycle(http, connection_id) == {"connected": 1, "disconnected": 0}

    again = await _open(server, token, protocol)
    sequence = await again.next_message()
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 1, sequence  # the first unacked message
    assert await again.next_message() == completion  # the replay: the same message, once
    await again.send(_sequence(again, 1))  # the client's side: its message 1 again
    await again.send(again.invocation("CountCall", ["raw", 0], "1"))
    await again.send(again.invocation("CountCall", ["raw", 0], "2"))  # message 2: new
    second = await again.next_message()
    assert _kind(second) == 3 and (second[2] if again.binary else second["invocationId"]) == "2", second
    assert await _calls(http, "raw") == 2  # message 1 ran once, message 2 once
    # the server acknowledges what it handled (within about a second; on the new transport it may
    # first acknowledge message 1 again, in case that Ack was lost with the old one)
    ack = await again.next_message(timeout=5)
    if _kind(ack) == 8 and _sequence_id(ack) == 1:
        ack = await again.next_message(timeout=5)
    assert _kind(ack) == 8 and _sequence_id(ack) == 2, ack
    stats = await _hub_stats(http)
    assert stats["resumed"] == 1 and stats["replayed"] == 1 and stats["resent_dropped"] == 1, stats
    assert stats["suspended"] == 0
    # its Ack trims the server's buffer: a resume now replays nothing and announces the next id
    await again.send(_ack(again, 2))
    await asyncio.sleep(0.2)
    await _drop(again)
    await _suspended(http)
    third = await _open(server, token, protocol)
    sequence = await third.next_message()
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 3, sequence
    await third.send(_sequence(third, 3))
    assert await third.invoke("Echo", "still here") == "still here"
    await third.close()


async def test_resume_replaces_a_transport_the_server_still_holds(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http)
    assert await hub.invoke("Echo", 1) == 1
    again = await _open(server, token, "json")  # the first socket is still open: replaced
    sequence = await again.next_message()
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 1
    assert await again.next_message() == {"type": 3, "invocationId": "1", "result": 1}  # the replay
    await hub.expect_closed(10)  # the server dropped the old socket
    await again.send(_sequence(again, 2))
    assert await again.invoke("Echo", 2) == 2
    stats = await _hub_stats(http)
    assert stats["resumed"] == 1 and stats["connected"] == 1, stats
    assert await _lifecycle(http, connection_id) == {"connected": 1, "disconnected": 0}
    await again.close()


async def test_resume_by_another_user_is_refused(start_server: Any, serving: str, http_of: Any) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http)
    await _drop(hub)
    await _suspended(http)
    for user, status in (("bob", 403), (None, 401)):
        with pytest.raises(InvalidStatus) as refused:
            await _open(server, token, "json", user=user)
        assert refused.value.response.status_code == status, user
    again = await _open(server, token, "json", user="alice")
    assert _kind(await again.next_message()) == 9
    await again.send(_sequence(again, 1))
    assert await again.invoke("Whoami") == {"connectionId": connection_id, "user": "alice"}
    await again.close()


async def test_client_sequence_past_what_it_sent_is_a_protocol_error(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http)
    await _drop(hub)
    await _suspended(http)
    again = await _open(server, token, "json")
    assert _kind(await again.next_message()) == 9
    await again.send(_sequence(again, 5))  # the server received nothing: 1 is the most it allows
    close = await again.expect_close_message()
    assert close == {"type": 7, "error": "Connection closed with an error.", "allowReconnect": True}

    async def ended() -> bool:
        return (await _lifecycle(http, connection_id)).get("disconnected") == 1

    await _until(ended, 10, "the connection to end")


async def test_window_expiry_runs_on_disconnected_once(start_server: Any, serving: str, http_of: Any) -> None:
    server = _start(start_server, serving, disconnect_timeout=1.5)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http)
    dropped = time.monotonic()
    await _drop(hub)
    await _suspended(http)
    assert await _lifecycle(http, connection_id) == {"connected": 1, "disconnected": 0}

    async def ended() -> bool:
        return (await _lifecycle(http, connection_id)).get("disconnected") == 1

    await _until(ended, 10, "the window to expire")
    assert time.monotonic() - dropped >= 1.5
    with pytest.raises(InvalidStatus) as refused:
        await _open(server, token, "json")
    assert refused.value.response.status_code == 404
    await asyncio.sleep(1.5)  # more sweeps: still once
    assert await _lifecycle(http, connection_id) == {"connected": 1, "disconnected": 1, "error": "None"}


async def test_version_1_handshake_keeps_todays_behaviour(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving)
    http = http_of(server)
    for stateful in (True, False):  # negotiated or not: version 1 leaves it off
        hub, connection_id, token = await _connect(server, http, version=1, stateful=stateful)
        with pytest.raises(InvalidStatus) as refused:
            await _open(server, token, "json")
        assert refused.value.response.status_code == 409
        await _drop(hub)

        async def ended(cid: str = connection_id) -> bool:
            return (await _lifecycle(http, cid)).get("disconnected") == 1

        await _until(ended, 5, "the dropped connection to end at once")
        with pytest.raises(InvalidStatus) as gone:
            await _open(server, token, "json")
        assert gone.value.response.status_code == 404
    # a version 2 handshake on a connection negotiate did not grant it is not resumable either
    hub, _, token = await _connect(server, http, version=2, stateful=False)
    with pytest.raises(InvalidStatus) as refused:
        await _open(server, token, "json")
    assert refused.value.response.status_code == 409
    await hub.close()


async def test_unacknowledged_bytes_hold_further_messages_until_acks(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving, stateful_reconnect_buffer_size=10_000)
    http = http_of(server)
    hub, connection_id, _ = await _connect(server, http)
    body = {"connectionId": connection_id, "group": "g", "count": 30, "size": 1000}
    assert (await http.post("/pump", json=body)).status_code == 202
    got: list[int] = []

    async def receive_until_quiet() -> None:
        while True:
            try:
                message = await hub.next_message(timeout=1.5)
            except TimeoutError:
                return
            if _kind(message) == 1:
                got.append(message["arguments"][0])

    await receive_until_quiet()
    # a message goes out while at most 10,000 bytes are unacknowledged: of ~1,045 bytes each, the
    # 10th crosses the limit and the rest wait for an Ack
    assert got == list(range(10)), got
    await hub.send(_ack(hub, 10))
    await receive_until_quiet()
    assert got == list(range(20)), got
    await hub.send(_ack(hub, 20))
    await receive_until_quiet()
    assert got == list(range(30)), got
    await hub.close()


async def test_client_that_never_acks_is_closed_within_bounds(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving, stateful_reconnect_buffer_size=10_000, max_buffered_bytes=50_000)
    http = http_of(server)
    hub, connection_id, _ = await _connect(server, http)
    body = {"connectionId": connection_id, "group": "g", "count": 200, "size": 1000}
    assert (await http.post("/pump", json=body)).status_code == 202
    await hub.expect_closed(10)  # held bytes passed 50,000: closed as a slow consumer

    async def ended() -> bool:
        return (await _lifecycle(http, connection_id)).get("disconnected") == 1

    await _until(ended, 10, "the connection to end")
    stats = (await http.get("/debug/stats")).json()
    assert stats["slow_consumer_closes"] == 1, stats


async def test_suspended_connection_that_overflows_ends(
    start_server: Any, serving: str, http_of: Any
) -> None:
    server = _start(start_server, serving, stateful_reconnect_buffer_size=10_000, max_buffered_bytes=50_000)
    http = http_of(server)
    hub, connection_id, token = await _connect(server, http)
    await _drop(hub)
    await _suspended(http)
    body = {"connectionId": connection_id, "group": "g", "count": 200, "size": 1000}
    assert (await http.post("/pump", json=body)).status_code == 202

    async def ended() -> bool:
        return (await _lifecycle(http, connection_id)).get("disconnected") == 1

    await _until(ended, 5, "the overflowing suspended connection to end (well before the 15 s window)")
    with pytest.raises(InvalidStatus) as gone:
        await _open(server, token, "json")
    assert gone.value.response.status_code == 404
