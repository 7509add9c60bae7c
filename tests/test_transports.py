"""SSE, long polling and negotiate on the wire: status codes, bodies, headers and timing.

A real server process (the interop app plus ``tests/interop/apps.py``) with a short poll
timeout and disconnect timeout; raw httpx / websockets requests, so every byte the official
clients depend on (and hide) is checked against the digest (signalr-protocol.md sections 1-2).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import websockets

from hubwire import Hub, HubServer
from hubwire.transports.sse import format_event
from tests.conftest import ServerProcess
from tests.hwtools import APP as HARDENING_APP
from tests.hwtools import stats, wait_stats
from tests.interop.raw import (
    JSON_HANDSHAKE,
    MSGPACK_HANDSHAKE,
    SSE,
    SseReader,
    cancel,
    disconnects,
    event_payload,
    eventually,
    invocation,
    negotiate,
    poll,
    poll_records,
    post,
    records,
    start_long_polling,
)

POLL_TIMEOUT = 1.5
DISCONNECT_TIMEOUT = 2.0
ALL_TRANSPORTS = [
    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
    {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(
        "tests.interop.apps:app",
        env={
            "INTEROP_LONG_POLL_TIMEOUT": str(POLL_TIMEOUT),
            "INTEROP_DISCONNECT_TIMEOUT": str(DISCONNECT_TIMEOUT),
        },
    )
    yield proc
    proc.close()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def observed() -> Iterator[ServerProcess]:
    """The hardening app: its ``/debug/stats`` shows what the server holds, so a test can wait for a
    poll to be pending or for records to be queued instead of sleeping."""
    proc = ServerProcess(HARDENING_APP)
    yield proc
    proc.close()


@pytest.fixture
async def observed_client(observed: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=observed.url, timeout=10) as c:
        yield c


async def pending_poll(client: httpx.AsyncClient, url: str, token: str) -> asyncio.Task[httpx.Response]:
    """Start a long poll on the hardening app's ``/hub`` and return once the server holds it.

    A pending poll holds at least its HTTP request's task on the server; nothing else runs there.
    """
    base = (await stats(url))["tasks"]
    task = asyncio.create_task(poll(client, "/hub", token))
    await wait_stats(url, lambda s: s["tasks"] > base, 5, "the poll to be pending on the server")
    assert not task.done(), task.result()
    return task


def ws_url(server: ServerProcess, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


# -- negotiate ---------------------------------------------------------------------------------


async def test_negotiate_v1_lists_transports_in_client_order(client: httpx.AsyncClient) -> None:
    response = await client.post("/testhub/negotiate?negotiateVersion=1")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["negotiateVersion", "connectionId", "connectionToken", "availableTransports"]
    assert body["negotiateVersion"] == 1
    assert len(body["connectionId"]) == 22 and body["connectionToken"] != body["connectionId"]
    assert body["availableTransports"] == ALL_TRANSPORTS


async def test_negotiate_v0_without_version_has_no_token(client: httpx.AsyncClient) -> None:
    body = (await client.post("/testhub/negotiate")).json()
    assert body["negotiateVersion"] == 0 and "connectionToken" not in body
    # v0: the id is what the transport carries
    assert (await client.get(f"/testhub?id={body['connectionId']}")).status_code == 200


async def test_negotiate_query_keys_are_case_insensitive(client: httpx.AsyncClient) -> None:
    body = (await client.post("/testhub/negotiate?NEGOTIATEVERSION=1")).json()
    assert body["negotiateVersion"] == 1
    _, token = await negotiate(client)
    assert (await client.get(f"/testhub?ID={token}")).status_code == 200


async def test_negotiate_version_errors_are_200_json(client: httpx.AsyncClient) -> None:
    response = await client.post("/testhub/negotiate?negotiateVersion=abc")
    assert response.status_code == 200
    assert response.json() == {"error": "The client requested a non-integer protocol version."}
    assert (await client.post("/testhub/negotiate?negotiateVersion=7")).json()["negotiateVersion"] == 1


async def test_negotiate_other_methods_405_text(client: httpx.AsyncClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        response = await client.request(method, "/testhub/negotiate")
        assert response.status_code == 405, method
        assert response.headers["content-type"] == "text/plain"


async def test_negotiate_route_case_and_trailing_slash(client: httpx.AsyncClient) -> None:
    body = (await client.post("/TestHub/Negotiate/?negotiateVersion=1")).json()
    assert body["availableTransports"] == ALL_TRANSPORTS


async def test_negotiate_lists_only_enabled_transports(client: httpx.AsyncClient) -> None:
    body = (await client.post("/testhub-nowebsockets/negotiate?negotiateVersion=1")).json()
    assert [t["transport"] for t in body["availableTransports"]] == ["ServerSentEvents", "LongPolling"]
    body = (await client.post("/wsonly/negotiate?negotiateVersion=1")).json()
    assert [t["transport"] for t in body["availableTransports"]] == ["WebSockets"]


async def test_negotiate_redirect_hook(client: httpx.AsyncClient, server: ServerProcess) -> None:
    body = (await client.post("/redirected/negotiate?negotiateVersion=1")).json()
    assert body["url"] == f"{server.url}/target"
    assert body["availableTransports"] == [] and "connectionId" not in body
    # the token it hands out opens the [Authorize] target hub
    auth = {"Authorization": f"Bearer {body['accessToken']}"}
    assert (await client.post("/target/negotiate?negotiateVersion=1", headers=auth)).status_code == 200
    assert (await client.post("/target/negotiate?negotiateVersion=1")).status_code == 401


async def test_cors_preflight_and_echoed_origin(client: httpx.AsyncClient) -> None:
    origin = "http://localhost:1234"
    for path in ("/testhub/negotiate", "/testhub"):
        response = await client.options(
            path,
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "x-requested-with, x-signalr-user-agent",
            },
        )
        assert response.status_code == 204, path
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["access-control-allow-credentials"] == "true"
        assert "POST" in response.headers["access-control-allow-methods"]
        assert response.headers["access-control-allow-headers"] == "x-requested-with, x-signalr-user-agent"
        assert "content-length" not in response.headers
    response = await client.post("/testhub/negotiate?negotiateVersion=1", headers={"Origin": origin})
    assert response.headers["access-control-allow-origin"] == origin
    assert response.headers["access-control-allow-credentials"] == "true"
    # errors carry CORS headers too, so browser code can read the status
    response = await client.get("/testhub", headers={"Origin": origin})
    assert response.status_code == 400 and response.headers["access-control-allow-origin"] == origin
    # no Origin, no CORS headers
    assert "access-control-allow-origin" not in (await client.post("/testhub/negotiate")).headers


async def test_cors_off_by_default(start_server) -> None:  # type: ignore[no-untyped-def]
    plain = start_server("tests.interop.apps:plain")
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as c:
        response = await c.post("/echo/negotiate", headers={"Origin": "http://localhost:1"})
        assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
        preflight = await c.options("/echo/negotiate", headers={"Origin": "http://localhost:1"})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers


async def test_cors_restricted_origins(start_server) -> None:  # type: ignore[no-untyped-def]
    restricted = start_server("tests.interop.apps:restricted")
    async with httpx.AsyncClient(base_url=restricted.url, timeout=10) as c:
        allowed = await c.post("/echo/negotiate", headers={"Origin": "http://allowed.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://allowed.example"
        other = await c.post("/echo/negotiate", headers={"Origin": "http://evil.example"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        preflight = await c.options("/echo/negotiate", headers={"Origin": "http://evil.example"})
        assert preflight.status_code == 204 and "access-control-allow-origin" not in preflight.headers


# -- request dispatch on the hub path ------------------------------------------------------------


async def test_connection_id_required_400(client: httpx.AsyncClient) -> None:
    for method, headers in (("GET", SSE), ("GET", {}), ("POST", {}), ("DELETE", {})):
        response = await client.request(method, "/testhub", headers=headers)
        assert (response.status_code, response.text) == (400, "Connection ID required"), method
        assert response.headers["content-type"] == "text/plain"


async def test_unknown_connection_404(client: httpx.AsyncClient) -> None:
    for method, headers in (("GET", SSE), ("GET", {}), ("POST", {}), ("DELETE", {})):
        response = await client.request(method, "/testhub?id=nope", headers=headers)
        assert (response.status_code, response.text) == (404, "No Connection with that ID"), method


async def test_other_methods_405(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    for method in ("PUT", "PATCH", "HEAD"):
        response = await client.request(method, f"/testhub?id={token}")
        assert response.status_code == 405, method


async def test_websocket_only_hub_refuses_sse_and_long_polling(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client, "/wsonly")
    sse = await client.get(f"/wsonly?id={token}", headers=SSE)
    assert (sse.status_code, sse.text) == (
        404,
        "ServerSentEvents transport not supported by this end point type",
    )
    lp = await client.get(f"/wsonly?id={token}")
    assert (lp.status_code, lp.text) == (404, "LongPolling transport not supported by this end point type")


async def test_nowebsockets_hub_refuses_upgrade_404(server: ServerProcess, client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client, "/testhub-nowebsockets")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url(server, f"/testhub-nowebsockets?id={token}"), open_timeout=5):
            pass
    assert refused.value.response.status_code == 404
    assert refused.value.response.body == b"WebSockets transport not supported by this end point type"


async def test_transport_cannot_change_mid_connection(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    _, token = await start_long_polling(client)
    response = await client.get(f"/testhub?id={token}", headers=SSE)
    assert (response.status_code, response.text) == (400, "Cannot change transports mid-connection")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(ws_url(server, f"/testhub?id={token}"), open_timeout=5):
            pass
    assert refused.value.response.status_code == 400


async def test_post_to_websocket_connection_405(server: ServerProcess, client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    async with websockets.connect(ws_url(server, f"/testhub?id={token}"), open_timeout=5) as ws:
        await ws.send(JSON_HANDSHAKE.decode())
        assert await asyncio.wait_for(ws.recv(), 5) == "{}\x1e"
        response = await post(client, "/testhub", token, invocation("Echo", "x", invocation_id="1"))
        assert (response.status_code, response.text) == (
            405,
            "POST requests are not allowed for WebSocket connections.",
        )
        response = await client.delete(f"/testhub?id={token}")
        assert (response.status_code, response.text) == (
            400,
            "Cannot terminate this connection using the DELETE endpoint.",
        )


async def test_post_body_over_limit_413(client: httpx.AsyncClient) -> None:
    _, token = await start_long_polling(client)
    response = await post(client, "/testhub", token, b"x" * (4 * 32768 + 1))
    assert response.status_code == 413
    # the connection is untouched by a refused body
    assert (
        await post(client, "/testhub", token, invocation("Echo", "ok", invocation_id="1"))
    ).status_code == 200
    assert await poll_records(client, "/testhub", token) == [{"type": 3, "invocationId": "1", "result": "ok"}]


async def test_post_before_transport_is_delivered_on_start(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    assert (
        await post(client, "/testhub", token, JSON_HANDSHAKE + invocation("Echo", "early", invocation_id="1"))
    ).status_code == 200
    first = await poll(client, "/testhub", token)
    assert (first.status_code, first.content) == (200, b"")
    assert await poll_records(client, "/testhub", token, want=2) == [
        {},
        {"type": 3, "invocationId": "1", "result": "early"},
    ]


# -- Server-Sent Events ----------------------------------------------------------------------------


async def test_sse_headers_first_bytes_and_events(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    async with client.stream("GET", f"/testhub?id={token}", headers=SSE) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache,no-store"
        assert response.headers["pragma"] == "no-cache"
        assert response.headers["content-encoding"] == "identity"
        reader = SseReader(response)
        assert await reader.read_until(b":\r\n") == b":\r\n"
        sent = JSON_HANDSHAKE + invocation("Echo", "hi", invocation_id="1")
        reply = await post(client, "/testhub", token, sent)
        assert (reply.status_code, reply.content, reply.headers["content-type"]) == (200, b"", "text/plain")
        events = await reader.read_event()
        if events == b"data: {}\x1e\r\n\r\n":
            events += await reader.read_event()
        payload = b"".join(event_payload(e + b"\r\n\r\n") for e in events.split(b"\r\n\r\n") if e)
        assert records(payload) == [{}, {"type": 3, "invocationId": "1", "result": "hi"}]


async def test_sse_messagepack_handshake_refused(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    async with client.stream("GET", f"/testhub?id={token}", headers=SSE) as response:
        reader = SseReader(response)
        await reader.read_until(b":\r\n")
        await post(client, "/testhub", token, MSGPACK_HANDSHAKE)
        event = await reader.read_event()
        assert records(event_payload(event)) == [
            {
                "error": "Cannot use the 'messagepack' protocol on the current transport. "
                "The transport does not support 'Binary' transfer format."
            }
        ]
        assert await reader.at_end(), "the stream ends after a failed handshake"


async def test_sse_second_stream_409(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    async with client.stream("GET", f"/testhub?id={token}", headers=SSE) as response:
        await SseReader(response).read_until(b":\r\n")
        assert (await client.get(f"/testhub?id={token}", headers=SSE)).status_code == 409


async def test_sse_client_close_disconnects_once(client: httpx.AsyncClient) -> None:
    connection_id, token = await negotiate(client)
    async with client.stream("GET", f"/testhub?id={token}", headers=SSE) as response:
        reader = SseReader(response)
        await reader.read_until(b":\r\n")
        await post(client, "/testhub", token, JSON_HANDSHAKE)
        await reader.read_event()
    await eventually(lambda: _disconnected(client, connection_id), 5, "on_disconnected after SSE close")
    await asyncio.sleep(0.3)
    assert await disconnects(client, connection_id) == 1
    assert (await post(client, "/testhub", token, b"{}")).status_code == 404


async def test_sse_server_close_ends_stream(client: httpx.AsyncClient) -> None:
    connection_id, token = await negotiate(client)
    async with client.stream("GET", f"/testhub?id={token}", headers=SSE) as response:
        reader = SseReader(response)
        await reader.read_until(b":\r\n")
        await post(client, "/testhub", token, JSON_HANDSHAKE)
        await reader.read_event()
        await post(client, "/testhub", token, invocation("Echo", "x" * 40000, invocation_id="1"))
        close = records(event_payload(await reader.read_event()))
        assert close[0]["type"] == 7 and close[0]["allowReconnect"] is True
        assert close[0]["error"].startswith("Connection closed with an error.")
        assert await reader.at_end()
    await eventually(lambda: _disconnected(client, connection_id), 5, "on_disconnected after server close")


async def test_sse_event_format_multiline() -> None:
    assert format_event(b'{"a":1}\x1e') == b'data: {"a":1}\x1e\r\n\r\n'
    assert format_event(b"a\r\nb\nc") == b"data: a\r\ndata: b\r\ndata: c\r\n\r\n"
    assert format_event(b"a\n") == b"data: a\r\ndata: \r\n\r\n"
    assert format_event(b"\r\nx") == b"data: \r\r\ndata: x\r\n\r\n"  # a lone \r line is kept (ASP.NET)


async def test_sse_raw_echo_multiline_payload(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client, "/echo")
    async with client.stream("GET", f"/echo?id={token}", headers=SSE) as response:
        reader = SseReader(response)
        await reader.read_until(b":\r\n")
        await post(client, "/echo", token, b"line one\r\nline two")
        assert await reader.read_event() == b"data: line one\r\ndata: line two\r\n\r\n"


# -- long polling ----------------------------------------------------------------------------------


async def test_long_poll_first_poll_immediate_empty_200(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    started = time.monotonic()
    response = await poll(client, "/testhub", token)
    assert time.monotonic() - started < 1.0
    assert (response.status_code, response.content) == (200, b"")
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-length"] == "0"
    assert response.headers["cache-control"] == "no-cache, no-store"
    assert response.headers["pragma"] == "no-cache"
    assert response.headers["expires"] == "Thu, 01 Jan 1970 00:00:00 GMT"


async def test_long_poll_returns_everything_buffered(
    observed: ServerProcess, observed_client: httpx.AsyncClient
) -> None:
    _, token = await start_long_polling(observed_client, "/hub")
    queued = (await stats(observed.url))["messages_sent"]
    batch = b"".join(invocation("echo", str(i), invocation_id=str(i)) for i in range(5))
    assert (await post(observed_client, "/hub", token, batch)).status_code == 200
    # nobody polls meanwhile: the five completions wait in the connection's buffer
    await wait_stats(observed.url, lambda s: s["messages_sent"] == queued + 5, 5, "five completions queued")
    response = await poll(observed_client, "/hub", token)
    assert response.headers["content-type"] == "application/octet-stream"
    assert [r["result"] for r in records(response.content)] == ["0", "1", "2", "3", "4"]
    assert (await observed_client.delete(f"/hub?id={token}")).status_code == 202


async def test_long_poll_timeout_answers_empty_200(client: httpx.AsyncClient) -> None:
    _, token = await start_long_polling(client)
    started = time.monotonic()
    response = await poll(client, "/testhub", token)
    elapsed = time.monotonic() - started
    assert (response.status_code, response.content) == (200, b"")
    # never before the poll timeout; the upper bound only tells it apart from a poll nobody answers
    # (a loaded machine answers later, never sooner)
    assert POLL_TIMEOUT - 0.1 <= elapsed <= POLL_TIMEOUT + 5.0, elapsed
    # idle for longer than the poll timeout, the connection is still there
    assert (
        await post(client, "/testhub", token, invocation("Echo", "alive", invocation_id="9"))
    ).status_code == 200
    assert await poll_records(client, "/testhub", token) == [
        {"type": 3, "invocationId": "9", "result": "alive"}
    ]


async def test_long_poll_newer_poll_replaces_older_with_204(
    observed: ServerProcess, observed_client: httpx.AsyncClient
) -> None:
    client = observed_client
    _, token = await start_long_polling(client, "/hub")
    older = await pending_poll(client, observed.url, token)
    newer = asyncio.create_task(poll(client, "/hub", token))
    old_response = await asyncio.wait_for(older, 5)
    assert (old_response.status_code, old_response.content) == (204, b"")
    await post(client, "/hub", token, invocation("echo", "for the newer", invocation_id="1"))
    new_response = await asyncio.wait_for(newer, 5)
    assert records(new_response.content) == [{"type": 3, "invocationId": "1", "result": "for the newer"}]
    assert (await client.delete(f"/hub?id={token}")).status_code == 202


async def test_long_poll_delete_202_ends_pending_poll_204(
    client: httpx.AsyncClient, observed: ServerProcess, observed_client: httpx.AsyncClient
) -> None:
    connection_id, token = await start_long_polling(observed_client, "/hub")
    pending = await pending_poll(observed_client, observed.url, token)
    deleted = await observed_client.delete(f"/hub?id={token}")
    assert (deleted.status_code, deleted.content, deleted.headers["content-type"]) == (202, b"", "text/plain")
    response = await asyncio.wait_for(pending, 5)
    assert (response.status_code, response.content) == (204, b"")
    await wait_stats(observed.url, lambda s: s["connections"] == 0, 5, "the deleted connection's disposal")
    assert (await poll(observed_client, "/hub", token)).status_code == 404
    assert (await observed_client.delete(f"/hub?id={token}")).status_code == 404
    # and on the interop app, on_disconnected runs once for a DELETE
    connection_id, token = await start_long_polling(client)
    assert (await client.delete(f"/testhub?id={token}")).status_code == 202
    await eventually(lambda: _disconnected(client, connection_id), 5, "on_disconnected after DELETE")
    await asyncio.sleep(0.3)  # nothing may follow: a second on_disconnected would show up by now
    assert await disconnects(client, connection_id) == 1


async def test_long_poll_inactive_connection_disposed_after_disconnect_timeout(
    client: httpx.AsyncClient,
) -> None:
    connection_id, token = await start_long_polling(client)
    # one last poll (answered empty at the poll timeout): the server counts inactivity from its end,
    # which lies between these two instants
    before_last = time.monotonic()
    assert (await poll(client, "/testhub", token)).content == b""
    after_last = time.monotonic()
    await eventually(lambda: _disconnected(client, connection_id), DISCONNECT_TIMEOUT + 8, "disposal")
    disposed = time.monotonic()
    # never before the disconnect timeout (causal: measured from before the last poll was even sent);
    # then within the heartbeat's sweep (1 s) plus generous slack for a loaded machine
    assert disposed - before_last >= DISCONNECT_TIMEOUT, disposed - before_last
    assert disposed - after_last <= DISCONNECT_TIMEOUT + 5.0, disposed - after_last
    await asyncio.sleep(1.2)  # another heartbeat or two: still exactly once
    assert await disconnects(client, connection_id) == 1
    assert (await poll(client, "/testhub", token)).status_code == 404


async def test_long_poll_polling_keeps_connection_past_disconnect_timeout(client: httpx.AsyncClient) -> None:
    connection_id, token = await start_long_polling(client)
    deadline = time.monotonic() + DISCONNECT_TIMEOUT * 2
    while time.monotonic() < deadline:
        assert (await poll(client, "/testhub", token)).status_code == 200
    assert await disconnects(client, connection_id) == 0


async def test_long_poll_server_close_delivers_close_then_204(client: httpx.AsyncClient) -> None:
    connection_id, token = await start_long_polling(client)
    await post(client, "/testhub", token, invocation("Echo", "x" * 40000, invocation_id="1"))
    close = await poll_records(client, "/testhub", token)
    assert close[0]["type"] == 7 and close[0]["error"].startswith("Connection closed with an error.")
    response = await poll(client, "/testhub", token)
    assert (response.status_code, response.content) == (204, b"")
    await eventually(lambda: _disconnected(client, connection_id), 5, "on_disconnected after server close")
    assert await disconnects(client, connection_id) == 1


async def test_long_poll_request_is_the_first_poll(client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client)
    first = await client.get(f"/testhub?id={token}&numRedirects=7", headers={"X-Which": "first"})
    assert first.status_code == 200
    await post(client, "/testhub", token, JSON_HANDSHAKE)
    assert await poll_records(client, "/testhub", token) == [{}]
    await post(client, "/testhub", token, invocation("GetHeader", "x-which", invocation_id="1"))
    await post(client, "/testhub", token, invocation("GetNumRedirects", invocation_id="2"))
    later = await client.get(f"/testhub?id={token}&numRedirects=1", headers={"X-Which": "later"})
    got = records(later.content)
    if len(got) < 2:
        got += await poll_records(client, "/testhub", token)
    assert {r["invocationId"]: r["result"] for r in got} == {"1": "first", "2": 7}


async def test_long_poll_stream_cancel_in_same_post(client: httpx.AsyncClient) -> None:
    _, token = await start_long_polling(client)
    body = invocation("InfiniteStream", invocation_id="5", stream=True) + cancel("5")
    assert (await post(client, "/testhub", token, body)).status_code == 200
    got = await poll_records(client, "/testhub", token, want=2)
    assert {"type": 1, "target": "StreamCanceled", "arguments": []} in got
    assert {"type": 3, "invocationId": "5"} in got


async def test_websocket_stream_cancel_in_same_frame(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    _, token = await negotiate(client)
    async with websockets.connect(ws_url(server, f"/testhub?id={token}"), open_timeout=5) as ws:
        await ws.send(JSON_HANDSHAKE.decode())
        assert await asyncio.wait_for(ws.recv(), 5) == "{}\x1e"
        await ws.send((invocation("InfiniteStream", invocation_id="5", stream=True) + cancel("5")).decode())
        got: list[dict[str, object]] = []
        while len(got) < 2:
            got += records((await asyncio.wait_for(ws.recv(), 5)).encode())
        assert {"type": 1, "target": "StreamCanceled", "arguments": []} in got
        assert {"type": 3, "invocationId": "5"} in got


async def _disconnected(client: httpx.AsyncClient, connection_id: str) -> bool:
    return await disconnects(client, connection_id) > 0


# -- process shutdown ------------------------------------------------------------------------------


async def test_sigterm_ends_sse_streams_and_polls_promptly(start_server) -> None:  # type: ignore[no-untyped-def]
    """uvicorn waits for open responses before shutting down (an event stream never ends by itself,
    so it would wait forever); ``hubwire run`` ends ours first, inviting the clients to reconnect."""
    proc = start_server(HARDENING_APP)
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as c:
        _, sse_token = await negotiate(c, "/hub")
        _, lp_token = await start_long_polling(c, "/hub")
        async with c.stream("GET", f"/hub?id={sse_token}", headers=SSE) as response:
            reader = SseReader(response)
            await reader.read_until(b":\r\n")
            await post(c, "/hub", sse_token, JSON_HANDSHAKE)
            await reader.read_event()
            waiting = await pending_poll(c, proc.url, lp_token)
            started = time.monotonic()
            proc.proc.send_signal(signal.SIGTERM)
            close = records(event_payload(await reader.read_event()))
            assert close == [{"type": 7, "allowReconnect": True}]
            assert await reader.at_end()
            polled = await asyncio.wait_for(waiting, 5)
            assert records(polled.content) == [{"type": 7, "allowReconnect": True}]
        await asyncio.to_thread(proc.proc.wait, 10)
        # promptly: well within the 10 s bound above (the hub's own shutdown takes under a second)
        assert time.monotonic() - started < 8.0


def test_unknown_transport_name_refused() -> None:
    server = HubServer()
    with pytest.raises(ValueError, match="unknown transport"):
        server.add_hub("/x", Hub, transports=("WebSocket",))
    endpoint = server.add_hub("/y", Hub, transports=("LongPolling", "WebSockets"))
    assert endpoint.transports == ("WebSockets", "LongPolling")  # always in negotiate order


async def test_keep_alive_pings_over_sse_but_never_over_long_polling(start_server) -> None:  # type: ignore[no-untyped-def]
    proc = start_server(
        "examples.interop.app:app",
        env={"INTEROP_KEEP_ALIVE_INTERVAL": "0.5", "INTEROP_LONG_POLL_TIMEOUT": "2.5"},
    )
    async with httpx.AsyncClient(base_url=proc.url, timeout=10) as c:
        _, lp_token = await start_long_polling(c)
        _, sse_token = await negotiate(c)
        async with c.stream("GET", f"/testhub?id={sse_token}", headers=SSE) as response:
            reader = SseReader(response)
            await reader.read_until(b":\r\n")
            await post(c, "/testhub", sse_token, JSON_HANDSHAKE)
            assert records(event_payload(await reader.read_event())) == [{}]
            # idle: the heartbeat pings the SSE client ...
            assert records(event_payload(await reader.read_event(timeout=4))) == [{"type": 6}]
            # ... but an idle long poll just times out empty (the transport is its own keep-alive)
            idle = await poll(c, "/testhub", lp_token)
            assert (idle.status_code, idle.content) == (200, b"")
