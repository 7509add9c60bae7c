"""The PyPI SignalR clients against a real server: pysignalr 1.3.3 (asyncio) and signalrcore 1.0.2 (threads).

Both negotiate without ``negotiateVersion`` (version 0: the connection id doubles as the token) and
only use WebSockets. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from pysignalr.client import SignalRClient
from pysignalr.messages import CompletionMessage as PyCompletion
from pysignalr.protocol.json import JSONProtocol
from pysignalr.protocol.messagepack import MessagepackProtocol
from signalrcore.hub.base_hub_connection import BaseHubConnection
from signalrcore.hub.handlers import StreamHandler
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.messages.stream_invocation_message import StreamInvocationMessage
from signalrcore.types import HttpTransportType, HubProtocolEncoding

from tests.pyclients import stop_pysignalr, stop_signalrcore

from .conftest import ServerProcess

APP = "tests.apps.foundation:app"
WAIT = 10.0
PROTOCOLS = ["json", "messagepack"]
THROWN = "An unexpected error occurred invoking 'throw_hub_exception' on the server. HubException: {}"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(APP)
    yield proc
    proc.close()


# ------------------------------------------------------------------------------------------------
# pysignalr
# ------------------------------------------------------------------------------------------------


class PyClient:
    """A running pysignalr client plus the bits a test needs to observe it."""

    def __init__(self, client: SignalRClient) -> None:
        self.client = client
        self.errors: list[PyCompletion] = []

    async def invoke_raw(self, method: str, *args: Any) -> PyCompletion:
        done: asyncio.Future[PyCompletion] = asyncio.get_running_loop().create_future()

        async def on_completion(message: Any) -> None:
            if not done.done():
                done.set_result(message)

        await self.client.send(method, list(args), on_invocation=on_completion)
        return await asyncio.wait_for(done, WAIT)

    async def invoke(self, method: str, *args: Any) -> Any:
        message = await self.invoke_raw(method, *args)
        assert message.error is None, message
        return message.result


@contextlib.asynccontextmanager
async def pysignalr_client(
    server: ServerProcess, protocol: str, handlers: dict[str, Any] | None = None
) -> AsyncIterator[PyClient]:
    client = SignalRClient(
        f"{server.url}/hub",
        protocol=MessagepackProtocol() if protocol == "messagepack" else JSONProtocol(),
        retry_count=1,
        connection_timeout=int(WAIT),
    )
    wrapper = PyClient(client)
    opened = asyncio.Event()

    async def on_open() -> None:
        opened.set()

    async def on_error(message: Any) -> None:
        wrapper.errors.append(message)

    client.on_open(on_open)
    client.on_error(on_error)
    for name, handler in (handlers or {}).items():
        client.on(name, handler)
    task = asyncio.get_running_loop().create_task(client.run())
    try:
        await asyncio.wait_for(opened.wait(), WAIT)
        yield wrapper
    finally:
        await stop_pysignalr(task, WAIT)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_invoke_with_result(server: ServerProcess, protocol: str) -> None:
    async with pysignalr_client(server, protocol) as hub:
        assert await hub.invoke("echo", "hello") == "hello"
        assert await hub.invoke("add", 2, 40) == 42
        assert await hub.invoke("add_points", {"x": 1, "y": 2}, {"x": 10, "y": 20}) == {"x": 11, "y": 22}
        # method names are matched case-insensitively
        assert await hub.invoke("Echo", "case") == "case"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_uses_negotiate_v0(server: ServerProcess, protocol: str) -> None:
    async with pysignalr_client(server, protocol) as hub:
        connection_id = await hub.invoke("get_connection_id")
        assert isinstance(connection_id, str) and len(connection_id) == 22
        # v0: the transport's ?id= is the public connection id itself
        assert await hub.invoke("get_query", "id") == connection_id
        assert await hub.invoke("get_query", "negotiateVersion") is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_receives_server_messages(server: ServerProcess, protocol: str) -> None:
    received: asyncio.Queue[list[Any]] = asyncio.Queue()

    async def on_message(args: list[Any]) -> None:
        await received.put(args)

    async with pysignalr_client(server, protocol, {"Message": on_message}) as hub:
        await hub.invoke("send_to_all", "from hub")
        assert await asyncio.wait_for(received.get(), WAIT) == ["all", "from hub"]
        # a message sent from an HTTP handler of the app, outside any hub method
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.post(f"{server.url}/broadcast/from-http")
        assert response.status_code == 200
        assert await asyncio.wait_for(received.get(), WAIT) == ["http", "from-http"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_hub_errors(server: ServerProcess, protocol: str) -> None:
    async with pysignalr_client(server, protocol) as hub:
        message = await hub.invoke_raw("throw_hub_exception", "nope")
        assert message.error == THROWN.format("nope")
        message = await hub.invoke_raw("throw", "hidden")
        assert message.error == "An unexpected error occurred invoking 'throw' on the server."
        message = await hub.invoke_raw("no_such_method")
        assert message.error == "Unknown hub method 'no_such_method'"
        assert len(hub.errors) == 3
        # the connection is still usable
        assert await hub.invoke("echo", "alive") == "alive"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_server_stream(server: ServerProcess, protocol: str) -> None:
    items: list[Any] = []
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_next(item: Any) -> None:
        items.append(item)

    async def on_complete(message: Any) -> None:
        if not done.done():
            done.set_result(message)

    async with pysignalr_client(server, protocol) as hub:
        await hub.client.stream("counter", [4, 5], on_next=on_next, on_complete=on_complete)
        completion = await asyncio.wait_for(done, WAIT)
        assert completion.error is None
        assert items == [0, 1, 2, 3]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pysignalr_client_results(server: ServerProcess, protocol: str) -> None:
    async def result(args: list[Any]) -> Any:
        return 42

    async def fail(args: list[Any]) -> Any:
        raise ValueError("from callback")

    async with pysignalr_client(server, protocol, {"Result": result, "Fail": fail}) as hub:
        connection_id = await hub.invoke("get_connection_id")
        url = f"{server.url}/clientresult/{connection_id}"
        async with httpx.AsyncClient(timeout=WAIT) as http:
            ok = await http.get(url)
            failed = await http.get(url, params={"method": "Fail"})
            missing = await http.get(url, params={"method": "Nobody"})
        assert (ok.status_code, ok.text) == (200, "42")
        assert (failed.status_code, failed.text) == (200, "from callback")
        assert (missing.status_code, missing.text) == (200, "Client didn't provide a result.")


async def test_pysignalr_two_clients_see_each_other(server: ServerProcess) -> None:
    first: asyncio.Queue[list[Any]] = asyncio.Queue()
    second: asyncio.Queue[list[Any]] = asyncio.Queue()

    async def on_first(args: list[Any]) -> None:
        await first.put(args)

    async def on_second(args: list[Any]) -> None:
        await second.put(args)

    async with (
        pysignalr_client(server, "json", {"Message": on_first}) as a,
        pysignalr_client(server, "messagepack", {"Message": on_second}) as b,
    ):
        b_id = await b.invoke("get_connection_id")
        await a.invoke("send_to_client", b_id, "direct")
        assert await asyncio.wait_for(second.get(), WAIT) == ["client", "direct"]
        await a.invoke("send_to_others", "others")
        assert await asyncio.wait_for(second.get(), WAIT) == ["others", "others"]
        # the barrier: a send to everyone after those two; one connection's messages arrive in order,
        # so had either reached the sender, it would be in front of this one
        await a.invoke("send_to_all", "barrier")
        assert await asyncio.wait_for(first.get(), WAIT) == ["all", "barrier"]
        assert await asyncio.wait_for(second.get(), WAIT) == ["all", "barrier"]
        assert first.empty() and second.empty()


# ------------------------------------------------------------------------------------------------
# signalrcore (synchronous, callback threads)
# ------------------------------------------------------------------------------------------------


class CoreClient:
    def __init__(self, conn: BaseHubConnection) -> None:
        self.conn = conn
        self.errors: list[Any] = []
        self.messages: list[list[Any]] = []
        self.message_event = threading.Event()
        self.error_event = threading.Event()

    def on_error(self, message: Any) -> None:
        self.errors.append(message)
        self.error_event.set()

    def invoke_raw(self, method: str, *args: Any) -> Any:
        """Invoke and return the Completion (signalrcore hands failed ones to on_error only)."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def on_completion(message: Any) -> None:
            box["message"] = message
            done.set()

        invocation_id = self.conn.invoke(method, list(args), on_invocation=on_completion).invocation_id
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if done.wait(0.02):
                return box["message"]
            error = next((e for e in self.errors if e.invocation_id == invocation_id), None)
            if error is not None:
                return error
        raise AssertionError(f"no completion for {method}")

    def invoke(self, method: str, *args: Any) -> Any:
        message = self.invoke_raw(method, *args)
        assert not message.error, vars(message)
        return message.result

    def wait_messages(self, count: int) -> list[list[Any]]:
        deadline = time.monotonic() + WAIT
        while len(self.messages) < count and time.monotonic() < deadline:
            self.message_event.wait(0.05)
            self.message_event.clear()
        return list(self.messages)


@contextlib.contextmanager
def signalrcore_client(server: ServerProcess, protocol: str) -> Iterator[CoreClient]:
    builder = HubConnectionBuilder().with_url(
        f"{server.url}/hub", options={"transport": HttpTransportType.web_sockets}
    )
    if protocol == "messagepack":
        builder = builder.with_hub_protocol(HubProtocolEncoding.binary)
    conn = builder.build()
    client = CoreClient(conn)
    opened = threading.Event()
    conn.on_open(opened.set)
    conn.on_error(client.on_error)

    def on_message(args: list[Any]) -> None:
        client.messages.append(args)
        client.message_event.set()

    conn.on("Message", on_message)
    conn.start()
    try:
        assert opened.wait(WAIT), "signalrcore did not connect"
        yield client
    finally:
        stop_signalrcore(conn, WAIT)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_signalrcore_invoke_with_result(server: ServerProcess, protocol: str) -> None:
    with signalrcore_client(server, protocol) as hub:
        assert hub.invoke("echo", "hello") == "hello"
        assert hub.invoke("add", 20, 22) == 42
        assert hub.invoke("nothing") is None
        connection_id = hub.invoke("get_connection_id")
        assert len(connection_id) == 22
        # negotiate v0: id == connection id on the WebSocket URL
        assert hub.invoke("get_query", "id") == connection_id


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_signalrcore_receives_server_messages(server: ServerProcess, protocol: str) -> None:
    with signalrcore_client(server, protocol) as hub:
        hub.invoke("send_to_caller", "Message", "to me")
        assert hub.wait_messages(1) == [["to me"]]
        hub.invoke("send_to_all", "everyone")
        assert hub.wait_messages(2) == [["to me"], ["all", "everyone"]]
        with httpx.Client(timeout=WAIT) as http:
            assert http.post(f"{server.url}/broadcast/from-http").status_code == 200
        assert hub.wait_messages(3)[2] == ["http", "from-http"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_signalrcore_hub_error(server: ServerProcess, protocol: str) -> None:
    with signalrcore_client(server, protocol) as hub:
        message = hub.invoke_raw("throw_hub_exception", "bad")
        assert message.error == THROWN.format("bad")
        assert hub.invoke("echo", "alive") == "alive"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_signalrcore_server_stream(server: ServerProcess, protocol: str) -> None:
    items: list[Any] = []
    done = threading.Event()
    box: dict[str, Any] = {}

    def on_complete(message: Any) -> None:
        box["complete"] = message
        done.set()

    def on_error(message: Any) -> None:
        box["error"] = message
        done.set()

    with signalrcore_client(server, protocol) as hub:
        # conn.stream() sends the invocation before it returns the handler to subscribe to, so the
        # first items can arrive before any callback is set (a race in signalrcore); do what it does
        # in the safe order instead.
        conn = hub.conn
        handler = StreamHandler("counter", "stream-1")
        handler.subscribe({"next": items.append, "complete": on_complete, "error": on_error})
        conn.stream_handlers["stream-1"].append(handler)
        conn.transport.send(StreamInvocationMessage("stream-1", "counter", [3, 5], headers=conn.headers))
        assert done.wait(WAIT)
        assert "error" not in box
        assert items == [0, 1, 2]
