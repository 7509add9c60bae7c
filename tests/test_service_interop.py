"""The interop contract (``interop-contract.md``) through an app server of the connection service.

One private ``redis-server``, one node (``tests/apps/service_interop.py``: what ``hubwire service``
serves, with the interop app's long-polling timings) and ``examples.interop.app`` as an app server in
service mode (``--service NODE``, a random access key). Clients negotiate at the app server and are
sent to the node (``/client/?hub=TestHub&<their query>``; ``/client/sse-lp/?hub=TestHub`` for
``/testhub-nowebsockets``). The official JS client follows the redirect and negotiates again at the
node; pysignalr and signalrcore open a WebSocket at the redirect's URL at once (no ``id``, the
redirect's token as bearer; ``signalr-protocol.md`` 1.4 and 8).

The same check scripts as ``tests/test_interop_node.py`` run here against the app server's URL (every
transport x hub protocol, and the once checks), and the PyPI clients do what
``tests/test_interop_python_clients.py`` has them do. The app server still serves what is not a hub:
``/echo`` (a raw connection), ``/generateJwtToken``, ``/redirect``, ``/bad-negotiate``,
``/disconnected/{id}`` and ``/clientresult/{id}`` (which reaches the connections this app server runs:
with one app server, all of them). Raw requests check what the clients do not show: a version-0
negotiate and ``id=<connectionId>`` at the node, the whole Close message of an oversized message,
the node's token checks, and that no side logged an unexpected traceback.

What the contract cannot mean in service mode (those checks do not run; the tests at the end check
what holds instead):

* ``skip_negotiation_*``: a negotiate-less WebSocket at the *app server's* hub path. An app server
  holds no client connection, so it refuses it (404); skipping negotiate works at the node's client
  path with the service's token, which is what pysignalr and signalrcore do here.
* ``expired_token_refused_at_upgrade``: the JS client shows the app's token at the app server's
  negotiate only; the WebSocket at the node carries the redirect's token (the factory runs once, not
  twice). The node refuses an expired, forged or other hub's token at the upgrade, and the redirect's
  token ends when the app's token does (so SSE and long polling still stop when it expires:
  ``expired_token_refused_mid_connection`` runs).
* signalrcore over SSE or long polling: after a redirect it opens them at the redirect's URL without a
  connection id (that takes the second negotiate it skips), as against Azure SignalR Service: a limit
  of the client. Over WebSockets it works.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import jwt
import pytest
import websockets
from examples.interop.app import generate_token
from signalrcore.types import HttpTransportType
from websockets.sync.client import connect as connect_sync

from hubwire.protocol.base import HubProtocol
from hubwire.protocol.json_protocol import JsonHubProtocol
from hubwire.protocol.messagepack_protocol import MessagePackHubProtocol
from hubwire.protocol.messages import CloseMessage, InvocationMessage
from hubwire.service.tokens import client_audience, client_token
from tests.conftest import RedisServer, ServerProcess
from tests.hwtools import unexpected_tracebacks
from tests.interop.raw import JSON_HANDSHAKE, RS, invocation, records
from tests.requirements import NODE_CLIENT, requires
from tests.test_interop_node import (
    COMBOS,
    HUB_CHECKS,
    INTEROP,
    NODE_TIMEOUT,
    ONCE_CHECKS,
    POLL_TIMEOUT,
    TRANSPORT_CHECKS,
    NodeRun,
    _check,
    _collect,
    _launch,
)
from tests.test_interop_python_clients import THROWN, pysignalr_hub, signalrcore_hub

#: checks of the scripts that cannot hold through an app server of the service (module docstring)
NOT_IN_SERVICE_MODE = frozenset(
    {"expired_token_refused_at_upgrade", "skip_negotiation_websockets", "skip_negotiation_reconnects"}
)
WAIT = 10.0


def hub_checks(transport: str) -> list[str]:
    return [n for n in (*HUB_CHECKS, *TRANSPORT_CHECKS[transport]) if n not in NOT_IN_SERVICE_MODE]


ONCE = [n for n in ONCE_CHECKS if n not in NOT_IN_SERVICE_MODE]


@dataclass
class Service:
    """The node and the app server of this module (and the key they share)."""

    key: str
    node: ServerProcess
    app: ServerProcess


def _redirect(app: str, path: str, query: str = "", token: str | None = None) -> tuple[str, str]:
    """The app server's negotiate answer for ``path``: the node URL and the service's token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    answer = httpx.post(f"{app}{path}/negotiate?negotiateVersion=1{query}", headers=headers, timeout=5)
    assert answer.status_code == 200, (answer.status_code, answer.text)
    body = answer.json()
    return str(body["url"]), str(body["accessToken"])


def _wait_linked(app: str, timeout: float = 20.0) -> None:
    """Until both hubs answer a call through the node (the app server's links are up)."""
    deadline = time.monotonic() + timeout
    for path, token in (("/testhub", None), ("/authorizedhub", generate_token())):
        while True:
            try:
                url, access = _redirect(app, path, token=token)
                with connect_sync(
                    url.replace("http", "ws", 1), additional_headers={"Authorization": f"Bearer {access}"}
                ) as ws:
                    ws.send(JSON_HANDSHAKE.decode())
                    assert ws.recv(timeout=5) == "{}" + RS.decode()
                    ws.send(invocation("Echo", "up", invocation_id="1").decode())
                    if json.loads(str(ws.recv(timeout=5)).rstrip(RS.decode()))["result"] == "up":
                        break
            except (OSError, websockets.WebSocketException, AssertionError, TimeoutError, httpx.HTTPError):
                pass  # the node closes clients of a hub no app server is linked for yet
            assert time.monotonic() < deadline, f"{path}: the app server is not linked to the node"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    redis = RedisServer()
    key = secrets.token_urlsafe(32)
    env = {"HUBWIRE_SERVICE_ACCESS_KEY": key, "INTEROP_LONG_POLL_TIMEOUT": POLL_TIMEOUT}
    started: list[ServerProcess] = []
    try:
        node = ServerProcess(
            "tests.apps.service_interop:node",
            args=["--factory", "--redis", redis.url, "--channel-prefix", f"svcinterop{os.getpid()}:"],
            env=env,
        )
        started.append(node)
        app = ServerProcess("examples.interop.app:app", args=["--service", node.url], env=env)
        started.append(app)
        _wait_linked(app.url)
        yield Service(key, node, app)
    finally:
        for server in reversed(started):
            server.close()
        redis.close()


@pytest.fixture(scope="module")
def node_runs(service: Service) -> Iterator[dict[str, NodeRun]]:
    env = dict(os.environ, INTEROP_LONG_POLL_TIMEOUT=POLL_TIMEOUT)
    base = service.app.url  # the app server: every hub path there redirects to the node
    procs = {}
    try:
        for transport, protocol in COMBOS:
            args = [str(INTEROP / "hub-checks.cjs"), base, transport, protocol, *hub_checks(transport)]
            procs[f"{transport}/{protocol}"] = _launch(args, env)
        procs["once"] = _launch([str(INTEROP / "once-checks.cjs"), base, *ONCE], env)
        deadline = time.monotonic() + NODE_TIMEOUT
        runs = {label: _collect(label, proc, deadline) for label, proc in procs.items()}
        yield runs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


# -- the official JS client: the interop scripts through the redirect ------------------------------


@requires(*NODE_CLIENT)
@pytest.mark.parametrize(
    ("transport", "protocol", "name"),
    [(transport, protocol, name) for transport, protocol in COMBOS for name in hub_checks(transport)],
)
def test_hub(node_runs: dict[str, NodeRun], transport: str, protocol: str, name: str) -> None:
    _check(node_runs, f"{transport}/{protocol}", name)


@requires(*NODE_CLIENT)
@pytest.mark.parametrize("name", ONCE)
def test_once(node_runs: dict[str, NodeRun], name: str) -> None:
    _check(node_runs, "once", name)


@requires(*NODE_CLIENT)
def test_scripts_ran_exactly_the_service_mode_checks(node_runs: dict[str, NodeRun]) -> None:
    """Every check asked for reported, nothing else ran (a renamed check cannot drop out unseen)."""
    for label, run in node_runs.items():
        asked = set(ONCE) if label == "once" else set(hub_checks(label.split("/")[0]))
        assert set(run.results) == asked, (label, set(run.results) ^ asked, run.stderr[-2000:])
    known = set(ONCE_CHECKS) | {n for names in TRANSPORT_CHECKS.values() for n in names}
    assert NOT_IN_SERVICE_MODE.issubset(known), NOT_IN_SERVICE_MODE - known


# -- the PyPI clients: a WebSocket straight to the redirect's URL -----------------------------------


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_pysignalr_testhub(service: Service, protocol: str) -> None:
    async with pysignalr_hub(f"{service.app.url}/testhub?numRedirects=7", protocol) as hub:
        assert (await hub.call("Echo", "hello 世界")).result == "hello 世界"
        assert (await hub.call("GetActiveTransportName")).result == "WebSockets"
        assert (await hub.call("GetNumRedirects")).result == 7  # the client's query reached the hub
        connection_id = (await hub.call("GetCallerConnectionId")).result
        assert isinstance(connection_id, str) and len(connection_id) == 22
        assert (await hub.call("ThrowException", "An error occurred.")).error == THROWN.format(
            "ThrowException"
        )
        assert (await hub.call("Nope")).error == "Unknown hub method 'Nope'"


async def test_pysignalr_authorized_hub_with_token(service: Service) -> None:
    async with pysignalr_hub(f"{service.app.url}/authorizedhub", token=generate_token()) as hub:
        assert (await hub.call("Echo", "authorized")).result == "authorized"


async def test_pysignalr_authorized_hub_refuses_bad_tokens(service: Service) -> None:
    for token in (None, generate_token(lifetime=-60), generate_token(key="x" * 32)):
        with pytest.raises(Exception):  # noqa: B017 - pysignalr wraps the 401 in its own error types
            async with pysignalr_hub(f"{service.app.url}/authorizedhub", token=token):
                pass


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
def test_signalrcore_testhub(service: Service, protocol: str) -> None:
    with signalrcore_hub(f"{service.app.url}/testhub", HttpTransportType.web_sockets, protocol) as hub:
        assert hub.call("Echo", "hello 世界").result == "hello 世界"
        assert hub.call("GetActiveTransportName").result == "WebSockets"
        assert hub.call("ThrowException", "An error occurred.").error == THROWN.format("ThrowException")


def test_signalrcore_authorized_hub_with_token(service: Service) -> None:
    url = f"{service.app.url}/authorizedhub"
    with signalrcore_hub(url, HttpTransportType.web_sockets, token=generate_token) as hub:
        assert hub.call("Echo", "authorized").result == "authorized"


# -- what service mode makes of the rest of the contract --------------------------------------------


async def test_negotiate_version_0_redirect_then_long_polling_at_the_node(service: Service) -> None:
    """A version-0 negotiate (no ``negotiateVersion``) is redirected; at the node it gets a
    ``connectionId`` and no ``connectionToken``, and the transport takes ``id=<connectionId>``."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        answer = (await http.post(f"{service.app.url}/testHub/negotiate?numRedirects=3")).json()
        assert set(answer) == {"negotiateVersion", "url", "accessToken", "availableTransports"}, answer
        assert answer["negotiateVersion"] == 0 and answer["url"].startswith(f"{service.node.url}/client/")
        auth = {"Authorization": f"Bearer {answer['accessToken']}"}
        url: str = answer["url"]
        base, _, query = url.partition("?")
        negotiated = (await http.post(f"{base.rstrip('/')}/negotiate?{query}", headers=auth)).json()
        assert negotiated["negotiateVersion"] == 0 and "connectionToken" not in negotiated, negotiated
        transport = f"{url}&id={negotiated['connectionId']}"
        first = await http.get(transport, headers=auth)
        assert (first.status_code, first.content) == (200, b"")
        assert (await http.post(transport, content=JSON_HANDSHAKE, headers=auth)).status_code == 200
        assert records((await http.get(transport, headers=auth)).content) == [{}]
        calls = [("GetNumRedirects", 3), ("GetCallerConnectionId", negotiated["connectionId"])]
        calls.append(("GetActiveTransportName", "LongPolling"))
        body = b"".join(invocation(m, invocation_id=str(i)) for i, (m, _) in enumerate(calls))
        assert (await http.post(transport, content=body, headers=auth)).status_code == 200
        got: list[dict[str, object]] = []
        deadline = time.monotonic() + WAIT
        while len(got) < len(calls) and time.monotonic() < deadline:
            got += records((await http.get(transport, headers=auth)).content)
        assert {m["invocationId"]: m["result"] for m in got} == {
            str(i): want for i, (_, want) in enumerate(calls)
        }
        assert (await http.delete(transport, headers=auth)).status_code == 202


async def test_negotiate_less_websocket_is_refused_by_the_app_server_and_served_by_the_node(
    service: Service,
) -> None:
    """skipNegotiation at the app server's hub path: 404 (it holds no client). At the node's client
    path with the service's token (here as ``access_token``, as browsers send it) it connects."""
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"{service.app.url.replace('http', 'ws', 1)}/testhub"):
            pass
    assert refused.value.response.status_code == 404
    url, token = _redirect(service.app.url, "/testhub")
    async with websockets.connect(f"{url.replace('http', 'ws', 1)}&access_token={token}") as ws:
        await ws.send(JSON_HANDSHAKE.decode())
        assert records(str(await ws.recv()).encode()) == [{}]
        await ws.send(invocation("GetActiveTransportName", invocation_id="1").decode())
        assert records(str(await ws.recv()).encode())[0]["result"] == "WebSockets"


async def test_node_refuses_a_bad_service_token_at_every_request(service: Service) -> None:
    """What the app's token is to the app server, the service's token is to the node: missing,
    expired, forged or another hub's -> 401 with an empty body, at negotiate and at the upgrade."""
    node = service.node.url
    audience = client_audience(node, "TestHub")
    bad = {
        "missing": None,
        "expired": client_token(service.key, audience, None, lifetime=-60),
        "forged": client_token(secrets.token_urlsafe(32), audience, None),
        "other hub": client_token(service.key, client_audience(node, "AuthorizedHub"), None),
    }
    async with httpx.AsyncClient(timeout=WAIT) as http:
        for why, token in bad.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            negotiate = f"{node}/client/negotiate?hub=TestHub&negotiateVersion=1"
            answer = await http.post(negotiate, headers=headers)
            assert (answer.status_code, answer.content) == (401, b""), why
            with pytest.raises(websockets.InvalidStatus) as refused:
                ws_url = f"{node.replace('http', 'ws', 1)}/client/?hub=TestHub"
                async with websockets.connect(ws_url, additional_headers=headers):
                    pass
            assert refused.value.response.status_code == 401, why


def test_the_service_token_ends_with_the_app_token(service: Service) -> None:
    """The redirect's token expires when the app's own token does (or after its hour, if sooner)."""
    app_token = generate_token(lifetime=120)
    _, access = _redirect(service.app.url, "/authorizedhub", token=app_token)
    app_exp = jwt.decode(app_token, options={"verify_signature": False})["exp"]
    assert jwt.decode(access, options={"verify_signature": False})["exp"] == app_exp
    _, anonymous = _redirect(service.app.url, "/testhub")
    lifetime = jwt.decode(anonymous, options={"verify_signature": False})["exp"] - time.time()
    assert 3500 < lifetime <= 3600


#: interop-contract.md 4: the Close message of a hub message over 32768 bytes (detailed errors on)
TOO_LARGE_CLOSE = CloseMessage(
    "Connection closed with an error. InvalidDataException: The maximum message size of 32768B was "
    "exceeded. The message size can be configured in AddHubOptions.",
    allow_reconnect=True,
)


@pytest.mark.parametrize("protocol", [JsonHubProtocol(), MessagePackHubProtocol()], ids=lambda p: p.name)
async def test_message_too_large_closes_with_the_contract_s_close_message(
    service: Service, protocol: HubProtocol
) -> None:
    """Over 32768 bytes through the node: the app server's Close message reaches the client whole
    (ASP.NET's text, reconnect allowed), and then the connection ends."""
    url, token = _redirect(service.app.url, "/testhub")
    headers = {"Authorization": f"Bearer {token}"}
    async with websockets.connect(url.replace("http", "ws", 1), additional_headers=headers) as ws:
        await ws.send(f'{{"protocol":"{protocol.name}","version":1}}\x1e')
        # the handshake answer comes in the protocol's frames (Text for JSON, Binary for MessagePack)
        assert await ws.recv() == ("{}\x1e" if protocol.name == "json" else b"{}\x1e")
        await ws.send(protocol.write_message(InvocationMessage("Echo", ["x" * 40000], "1")))
        received = b""
        async with asyncio.timeout(WAIT):
            async for frame in ws:  # until the node closes the WebSocket
                received += frame if isinstance(frame, bytes) else frame.encode()
    assert protocol.parse_all(received) == [TOO_LARGE_CLOSE]


@requires(*NODE_CLIENT)
def test_no_unexpected_tracebacks(service: Service, node_runs: dict[str, NodeRun]) -> None:
    """After every client above (this test comes last): the node logged no traceback, the app
    server only its hub's own (``ThrowException`` and ``StreamThrowException`` raise on purpose)."""
    assert unexpected_tracebacks(service.node.output()) == []
    assert unexpected_tracebacks(service.app.output(), ("InvalidOperationException",)) == []
