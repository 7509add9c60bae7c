"""HubServer inside web frameworks, served by a real uvicorn (in-process, free loopback port).

* mounted in Starlette (``Mount("/hubs", app=server)``) and FastAPI (``app.mount("/hubs", server)``):
  negotiate and the WebSocket go through the mount path;
* wrapping FastAPI (``HubServer(app=fastapi_app)``): hub paths served, everything else (HTTP,
  WebSocket, lifespan) forwarded;
* a hub context used from a FastAPI route handler reaches connected clients (send and client results).

The serving mode (``HUBWIRE_SERVING``, as for the suites that start ``hubwire run``) picks uvicorn's
WebSocket implementation: ``native`` runs uvicorn with hubwire's protocol
(``ws=hubwire.transports.native:NativeWebSocketProtocol``), ``asgi`` with uvicorn's own. Each test
asserts which implementation answered the hub's upgrade: hubwire's native protocol answers hub paths
itself when the HubServer is the app uvicorn runs (wrapping FastAPI); a HubServer mounted inside
another app is not found by it, so its upgrades are handed to uvicorn's implementation (served
through ASGI) in both modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, WebSocket
from pysignalr.client import SignalRClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from hubwire import Hub, HubException, HubServer
from hubwire.transports.native import NativeWebSocketProtocol

from .conftest import free_port
from .pyclients import stop_pysignalr
from .rawhub import RawHub, open_ws

WAIT = 10.0
SERVING = os.environ.get("HUBWIRE_SERVING", "native")
assert SERVING in ("native", "asgi"), SERVING
#: uvicorn's WebSocket implementation in this serving mode: hubwire's native protocol, or uvicorn's own
WS_IMPLEMENTATION: Any = NativeWebSocketProtocol if SERVING == "native" else "auto"


def served_natively(hub: RawHub) -> bool:
    """Did hubwire's native protocol answer this upgrade? It writes a bare 101; uvicorn's own
    implementations add ``Server`` and ``Date`` headers."""
    headers = hub.ws.response.headers if hub.ws.response is not None else {}
    return "server" not in headers and "date" not in headers


class ChatHub(Hub):
    async def echo(self, message: str) -> str:
        return message

    async def get_connection_id(self) -> str:
        return self.context.connection_id

    async def broadcast(self, text: str) -> None:
        await self.clients.all.send("Receive", text)


@contextlib.asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn on a free 127.0.0.1 port; yield its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws=WS_IMPLEMENTATION,
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        async with asyncio.timeout(WAIT):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn exited before starting")
                await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, WAIT)  # an error of uvicorn's is raised here
        except TimeoutError:
            raise AssertionError(f"uvicorn did not shut down within {WAIT} s") from None


async def negotiated_hub(base: str, hub_path: str, protocol: str = "json") -> tuple[RawHub, dict[str, Any]]:
    """Negotiate (v1) through ``hub_path``, then open the WebSocket with the token."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        response = await http.post(f"{base}{hub_path}/negotiate?negotiateVersion=1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["negotiateVersion"] == 1
    assert body["availableTransports"][0]["transport"] == "WebSockets"
    hub = await RawHub.open(base, path=hub_path, protocol=protocol, query=f"id={body['connectionToken']}")
    return hub, body


def new_hub_server(**kwargs: Any) -> HubServer:
    server = HubServer(**kwargs)
    server.add_hub("/chat", ChatHub)
    return server


async def plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("plain route")


# ------------------------------------------------------------------------------------------------
# mounted
# ------------------------------------------------------------------------------------------------


def starlette_app() -> Starlette:
    hubs = new_hub_server()
    return Starlette(
        routes=[Route("/plain", plain), Mount("/hubs", app=hubs)],
        lifespan=hubs.lifespan,
    )


def fastapi_mounted_app() -> FastAPI:
    hubs = new_hub_server()
    app = FastAPI(lifespan=hubs.lifespan)

    @app.get("/plain")
    async def plain_route() -> dict[str, str]:
        return {"route": "fastapi"}

    app.mount("/hubs", hubs)
    return app


@pytest.mark.parametrize("factory", [starlette_app, fastapi_mounted_app], ids=["starlette", "fastapi"])
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_mounted_hub(factory: Any, protocol: str) -> None:
    async with serve(factory()) as base:
        hub, body = await negotiated_hub(base, "/hubs/chat", protocol)
        # a mounted HubServer is out of the native protocol's sight: uvicorn's implementation serves it
        assert not served_natively(hub)
        assert await hub.invoke("echo", "through the mount") == "through the mount"
        assert await hub.invoke("get_connection_id") == body["connectionId"]
        # case-insensitive hub path, as ASP.NET routes
        other, _ = await negotiated_hub(base, "/hubs/Chat", protocol)
        await other.invoke("broadcast", "hello both")
        for client in (hub, other):
            message = await client.next_message()
            if protocol == "json":
                assert message == {"type": 1, "target": "Receive", "arguments": ["hello both"]}
            else:
                assert message[:5] == [1, {}, None, "Receive", ["hello both"]]
        async with httpx.AsyncClient(timeout=WAIT) as http:
            assert (await http.get(f"{base}/plain")).status_code == 200
            # nothing is served at the un-mounted hub path
            assert (await http.post(f"{base}/chat/negotiate")).status_code == 404
            # negotiate keeps its rules under a mount
            assert (await http.get(f"{base}/hubs/chat/negotiate")).status_code == 405
        await hub.close()
        await other.close()


async def test_mounted_hub_with_pysignalr() -> None:
    """A stock client only knows the full hub URL; negotiate and WebSocket both go through the mount."""
    async with serve(fastapi_mounted_app()) as base:
        client = SignalRClient(f"{base}/hubs/chat", retry_count=1, connection_timeout=int(WAIT))
        opened = asyncio.Event()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def on_open() -> None:
            opened.set()

        async def on_completion(message: Any) -> None:
            if not done.done():
                done.set_result(message)

        client.on_open(on_open)
        task = asyncio.get_running_loop().create_task(client.run())
        try:
            await asyncio.wait_for(opened.wait(), WAIT)
            await client.send("echo", ["py"], on_invocation=on_completion)
            message = await asyncio.wait_for(done, WAIT)
            assert (message.result, message.error) == ("py", None)
        finally:
            await stop_pysignalr(task, WAIT)


# ------------------------------------------------------------------------------------------------
# HubServer wrapping FastAPI, and hub contexts in route handlers
# ------------------------------------------------------------------------------------------------


def wrapped_fastapi() -> tuple[HubServer, FastAPI]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.started = True
        yield

    api = FastAPI(lifespan=lifespan)
    hubs = new_hub_server(app=api)
    api.state.started = False

    @api.get("/api/hello")
    async def hello() -> dict[str, Any]:
        return {"hello": "world", "started": api.state.started}

    @api.post("/api/notify/{text}")
    async def notify(text: str) -> dict[str, str]:
        await hubs.hub_context(ChatHub).clients.all.send("Notify", text)
        return {"sent": text}

    @api.post("/api/direct/{connection_id}/{text}")
    async def direct(connection_id: str, text: str) -> dict[str, str]:
        await hubs.hub_context(ChatHub).clients.client(connection_id).send("Notify", "direct", text)
        return {"sent": text}

    @api.get("/api/ask/{connection_id}")
    async def ask(connection_id: str) -> dict[str, Any]:
        try:
            answer = (
                await hubs.hub_context(ChatHub)
                .clients.client(connection_id)
                .invoke("Ask", "question", timeout=5)
            )
        except HubException as exc:
            return {"error": str(exc)}
        return {"answer": answer}

    @api.websocket("/api/ws")
    async def ws_echo(websocket: WebSocket) -> None:
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"fastapi says {text}")
        await websocket.close()

    return hubs, api


async def test_hubserver_forwards_other_paths_to_fastapi() -> None:
    hubs, _ = wrapped_fastapi()
    async with serve(hubs) as base:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            hello = await http.get(f"{base}/api/hello")
            assert hello.status_code == 200
            # FastAPI's lifespan ran through HubServer's lifespan
            assert hello.json() == {"hello": "world", "started": True}
            missing = await http.get(f"{base}/api/missing")
            assert missing.status_code == 404
            assert missing.json() == {"detail": "Not Found"}
        # WebSockets that are not hub paths are forwarded as well
        ws = await open_ws(base.replace("http", "ws", 1) + "/api/ws")
        await ws.send("hi")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "fastapi says hi"
        await ws.close()
        assert ws.response is not None and ws.response.headers["server"] == "uvicorn"  # uvicorn's own
        # and the hub still works on its own path, natively in native mode
        hub, _ = await negotiated_hub(base, "/chat")
        assert served_natively(hub) == (SERVING == "native")
        assert await hub.invoke("echo", "hub") == "hub"
        await hub.close()


async def test_hub_context_from_fastapi_route() -> None:
    hubs, _ = wrapped_fastapi()
    async with serve(hubs) as base:
        json_hub, _ = await negotiated_hub(base, "/chat")
        msgpack_hub, body = await negotiated_hub(base, "/chat", "messagepack")
        assert served_natively(json_hub) == served_natively(msgpack_hub) == (SERVING == "native")
        async with httpx.AsyncClient(timeout=WAIT) as http:
            response = await http.post(f"{base}/api/notify/hello")
            assert response.json() == {"sent": "hello"}
            assert await json_hub.next_message() == {"type": 1, "target": "Notify", "arguments": ["hello"]}
            assert (await msgpack_hub.next_message())[:5] == [1, {}, None, "Notify", ["hello"]]

            # one connection only
            await http.post(f"{base}/api/direct/{body['connectionId']}/only-you")
            assert (await msgpack_hub.next_message())[:5] == [1, {}, None, "Notify", ["direct", "only-you"]]
            assert await json_hub.invoke("echo", "nothing else came") == "nothing else came"

            # a client result requested from the route handler
            ask = asyncio.get_running_loop().create_task(http.get(f"{base}/api/ask/{body['connectionId']}"))
            invocation = await msgpack_hub.next_message()
            assert invocation[0] == 1 and invocation[3] == "Ask" and invocation[4] == ["question"]
            invocation_id = invocation[2]
            assert isinstance(invocation_id, str) and invocation_id
            await msgpack_hub.send([3, {}, invocation_id, 3, 42])
            answer = await asyncio.wait_for(ask, WAIT)
            assert answer.json() == {"answer": 42}

            # and a client that answers with an error
            json_id = await json_hub.invoke("get_connection_id")
            ask = asyncio.get_running_loop().create_task(http.get(f"{base}/api/ask/{json_id}"))
            invocation = await json_hub.next_message()
            assert invocation["target"] == "Ask"
            await json_hub.send({"type": 3, "invocationId": invocation["invocationId"], "error": "no idea"})
            answer = await asyncio.wait_for(ask, WAIT)
            assert answer.json() == {"error": "no idea"}
        await json_hub.close()
        await msgpack_hub.close()


async def test_hub_context_from_mounted_fastapi_route() -> None:
    """The same when FastAPI is the outer app and the hubs are mounted inside it."""
    hubs = new_hub_server()
    app = FastAPI(lifespan=hubs.lifespan)

    @app.post("/notify/{text}")
    async def notify(text: str) -> dict[str, str]:
        await hubs.hub_context(ChatHub).clients.all.send("Notify", text)
        return {"sent": text}

    app.mount("/hubs", hubs)
    async with serve(app) as base:
        hub, _ = await negotiated_hub(base, "/hubs/chat")
        assert not served_natively(hub)  # mounted: uvicorn's implementation in both modes
        async with httpx.AsyncClient(timeout=WAIT) as http:
            assert (await http.post(f"{base}/notify/mounted")).status_code == 200
        assert await hub.next_message() == {"type": 1, "target": "Notify", "arguments": ["mounted"]}
        await hub.close()
