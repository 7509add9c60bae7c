"""The PyPI SignalR clients against the interop app: pysignalr 1.3.3 and signalrcore 1.0.2.

pysignalr speaks WebSockets only; signalrcore also has SSE and long-polling transports, so it is
the Python check that those work for a client other than the JS one. Both negotiate with version
0, both follow a negotiate redirect by opening a WebSocket straight to the ``url`` with the
``accessToken`` as bearer (the ``negotiate_redirect`` hook is built for that). Every wait is
bounded.

Known client limits (not tested, nothing a server can do about them): signalrcore's long-polling
GETs carry no ``Authorization`` header (so its long polling cannot reach an ``[Authorize]`` hub),
and its binary long-polling client fails in its constructor (so MessagePack over long polling is
not possible with it). pysignalr applies ``access_token_factory`` only at the hub handshake, after
negotiate and the upgrade, so the tests give it the token as a static ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from examples.interop.app import generate_token
from pysignalr.client import SignalRClient
from pysignalr.protocol.json import JSONProtocol
from pysignalr.protocol.messagepack import MessagepackProtocol
from signalrcore.hub.base_hub_connection import BaseHubConnection
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.types import HttpTransportType, HubProtocolEncoding

from tests.conftest import ServerProcess
from tests.pyclients import stop_pysignalr, stop_signalrcore

WAIT = 10.0
THROWN = (
    "An unexpected error occurred invoking '{}' on the server. InvalidOperationException: An error occurred."
)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("tests.interop.apps:app")
    yield proc
    proc.close()


# -- pysignalr --------------------------------------------------------------------------------------


class PyHub:
    """A connected pysignalr client: invoke and get the Completion."""

    def __init__(self, client: SignalRClient) -> None:
        self.client = client

    async def call(self, method: str, *args: Any) -> Any:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_completion(message: Any) -> None:
            if not done.done():
                done.set_result(message)

        await self.client.send(method, list(args), on_invocation=on_completion)
        return await asyncio.wait_for(done, WAIT)


@contextlib.asynccontextmanager
async def pysignalr_hub(url: str, protocol: str = "json", token: str | None = None) -> AsyncIterator[PyHub]:
    client = SignalRClient(
        url,
        protocol=MessagepackProtocol() if protocol == "messagepack" else JSONProtocol(),
        # pysignalr 1.3.3 calls access_token_factory only after negotiate and the upgrade (at the hub
        # handshake), too late for an [Authorize] hub; a static header reaches every request
        headers={"Authorization": f"Bearer {token}"} if token else None,
        retry_count=1,
        connection_timeout=int(WAIT),
    )
    opened = asyncio.Event()

    async def on_open() -> None:
        opened.set()

    async def on_error(message: Any) -> None:
        """pysignalr needs an error callback, or an error Completion ends its connection."""

    client.on_open(on_open)
    client.on_error(on_error)
    task = asyncio.get_running_loop().create_task(client.run())
    try:
        waiter = asyncio.get_running_loop().create_task(opened.wait())
        await asyncio.wait({waiter, task}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if task.done():
            task.result()  # raises the client's connect error
        assert opened.is_set(), "pysignalr did not connect"
        yield PyHub(client)
    finally:
        await stop_pysignalr(task, WAIT)


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_pysignalr_testhub(server: ServerProcess, protocol: str) -> None:
    async with pysignalr_hub(f"{server.url}/testhub", protocol) as hub:
        assert (await hub.call("Echo", "hello 世界")).result == "hello 世界"
        assert (await hub.call("GetActiveTransportName")).result == "WebSockets"
        connection_id = (await hub.call("GetCallerConnectionId")).result
        assert isinstance(connection_id, str) and len(connection_id) == 22
        assert (await hub.call("ThrowException", "An error occurred.")).error == THROWN.format(
            "ThrowException"
        )
        assert (await hub.call("Nope")).error == "Unknown hub method 'Nope'"


async def test_pysignalr_authorized_hub_with_token(server: ServerProcess) -> None:
    async with pysignalr_hub(f"{server.url}/authorizedhub", token=generate_token()) as hub:
        assert (await hub.call("Echo", "authorized")).result == "authorized"


async def test_pysignalr_authorized_hub_refuses_bad_tokens(server: ServerProcess) -> None:
    for token in (None, generate_token(lifetime=-60), generate_token(key="x" * 32)):
        with pytest.raises(Exception):  # noqa: B017 - pysignalr wraps the 401 in its own error types
            async with pysignalr_hub(f"{server.url}/authorizedhub", token=token):
                pass


async def test_pysignalr_follows_negotiate_redirect(server: ServerProcess) -> None:
    async with pysignalr_hub(f"{server.url}/redirected") as hub:
        # /redirected sent it to the [Authorize] /target hub with a token for user "redirected"
        assert (await hub.call("WhoAmI")).result == "redirected"


# -- signalrcore ------------------------------------------------------------------------------------


class CoreHub:
    """A connected signalrcore client (thread based): invoke and get the Completion."""

    def __init__(self, conn: BaseHubConnection) -> None:
        self.conn = conn
        self.errors: list[Any] = []

    def call(self, method: str, *args: Any) -> Any:
        done = threading.Event()
        box: dict[str, Any] = {}

        def on_completion(message: Any) -> None:
            box["message"] = message
            done.set()

        invocation_id = self.conn.send(method, list(args), on_invocation=on_completion).invocation_id
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if done.wait(0.02):
                return box["message"]
            # signalrcore hands failed completions to on_error only
            error = next((e for e in self.errors if getattr(e, "invocation_id", None) == invocation_id), None)
            if error is not None:
                return error
        raise AssertionError(f"no completion for {method}")


@contextlib.contextmanager
def signalrcore_hub(
    url: str, transport: HttpTransportType, protocol: str = "json", token: Callable[[], str] | None = None
) -> Iterator[CoreHub]:
    options: dict[str, Any] = {"transport": transport}
    if token is not None:
        options["access_token_factory"] = token
    builder = HubConnectionBuilder().with_url(url, options=options)
    if protocol == "messagepack":
        builder = builder.with_hub_protocol(HubProtocolEncoding.binary)
    conn = builder.build()
    hub = CoreHub(conn)
    opened = threading.Event()
    conn.on_open(opened.set)
    conn.on_error(hub.errors.append)
    conn.start()
    try:
        assert opened.wait(WAIT), "signalrcore did not connect"
        yield hub
    finally:
        stop_signalrcore(conn, WAIT)


CORE_RUNS = [
    (HttpTransportType.web_sockets, "json"),
    (HttpTransportType.web_sockets, "messagepack"),
    (HttpTransportType.server_sent_events, "json"),
    (HttpTransportType.long_polling, "json"),
]


@pytest.mark.parametrize(("transport", "protocol"), CORE_RUNS, ids=lambda v: getattr(v, "value", v))
def test_signalrcore_testhub(server: ServerProcess, transport: HttpTransportType, protocol: str) -> None:
    with signalrcore_hub(f"{server.url}/testhub", transport, protocol) as hub:
        assert hub.call("Echo", "hello 世界").result == "hello 世界"
        assert hub.call("GetActiveTransportName").result == transport.value
        assert hub.call("ThrowException", "An error occurred.").error == THROWN.format("ThrowException")


@pytest.mark.parametrize(
    "transport", [HttpTransportType.web_sockets, HttpTransportType.server_sent_events], ids=lambda v: v.value
)
def test_signalrcore_authorized_hub_with_token(server: ServerProcess, transport: HttpTransportType) -> None:
    with signalrcore_hub(f"{server.url}/authorizedhub", transport, token=generate_token) as hub:
        assert hub.call("Echo", "authorized").result == "authorized"


def test_signalrcore_follows_negotiate_redirect(server: ServerProcess) -> None:
    with signalrcore_hub(f"{server.url}/redirected", HttpTransportType.web_sockets) as hub:
        assert hub.call("WhoAmI").result == "redirected"
