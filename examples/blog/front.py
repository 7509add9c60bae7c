"""A small round-robin front for the demo cluster: HTTP and WebSocket, no session affinity.

Every new HTTP request and every new WebSocket goes to the next instance in turn, so a SignalR
client negotiates on one instance and opens its WebSocket on another: hubwire needs no sticky
sessions (the connection token is signed with a key all instances share, and Server-Sent Events or
long-polling requests that reach another instance are relayed to the one holding the connection).
An instance that
refuses TCP connections is skipped, so stopping one shows clients reconnecting to the others.

This is a demo load balancer (uvicorn + httpx + websockets), not a production proxy: use your
platform's (a Kubernetes Service, nginx, a cloud load balancer) without session affinity.

Run: ``python -m examples.blog.front --port 8000 http://127.0.0.1:8001 http://127.0.0.1:8002 ...``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

log = logging.getLogger("blog.front")

Scope = dict[str, Any]
Message = dict[str, Any]

#: headers that describe one hop, never forwarded (RFC 9110 7.6.1)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
#: uvicorn writes its own
SKIP_RESPONSE = HOP_BY_HOP | {"date", "server"}
#: request headers a WebSocket handshake passes on to the instance
WS_FORWARD = frozenset({"authorization", "cookie", "user-agent", "origin", "x-requested-with"})
MAX_BODY = 1 << 20
CONNECT_TIMEOUT = 5.0
#: longer than SignalR's 90 s long poll; SSE keep-alives come every 15 s
READ_TIMEOUT = 120.0


class RoundRobinFront:
    """ASGI app forwarding each request and WebSocket to the next backend (``http://host:port``)."""

    def __init__(self, backends: Sequence[str]) -> None:
        if not backends:
            raise ValueError("at least one backend")
        self.backends = [b.rstrip("/") for b in backends]
        self._turn = itertools.count()
        self._http: httpx.AsyncClient | None = None

    def next_backends(self) -> list[str]:
        """All backends, starting with the next one in turn (the rest are fallbacks if it is down)."""
        start = next(self._turn) % len(self.backends)
        return self.backends[start:] + self.backends[:start]

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy_http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._proxy_websocket(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._http = httpx.AsyncClient(
                    timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT, pool=CONNECT_TIMEOUT),
                    limits=httpx.Limits(max_connections=1000, max_keepalive_connections=50),
                    follow_redirects=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._http is not None:
                    await self._http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _proxy_http(self, scope: Scope, receive: Any, send: Any) -> None:
        assert self._http is not None, "lifespan not started"
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > MAX_BODY:
                await _plain(send, 413, b"request body too large")
                return
            if not message.get("more_body"):
                break
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        client = scope.get("client")
        if client:
            headers.append(("x-forwarded-for", client[0]))
        target = scope.get("raw_path") or scope["path"].encode()
        path = target.decode("latin-1") + (
            f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
        )
        response: httpx.Response | None = None
        for backend in self.next_backends():
            request = self._http.build_request(
                scope["method"], backend + path, headers=headers, content=bytes(body)
            )
            try:
                response = await self._http.send(request, stream=True)
                break
            except httpx.ConnectError:
                log.warning("%s is down, trying the next instance", backend)
        if response is None:
            await _plain(send, 502, b"no instance is reachable")
            return
        try:
            out = [
                (k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in SKIP_RESPONSE
            ]
            out.append((b"x-served-by", urlsplit(str(request.url)).netloc.encode()))
            await send({"type": "http.response.start", "status": response.status_code, "headers": out})
            # stream the body (SSE, long polls) until it ends or the client goes away
            streaming = asyncio.ensure_future(self._stream_body(response, send))
            disconnect = asyncio.ensure_future(_wait_disconnect(receive))
            await asyncio.wait({streaming, disconnect}, return_when=asyncio.FIRST_COMPLETED)
            for task in (streaming, disconnect):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        finally:
            await response.aclose()

    @staticmethod
    async def _stream_body(response: httpx.Response, send: Any) -> None:
        try:
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:  # the instance went away mid-body
            log.warning("response from %s cut short: %r", response.request.url, exc)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- WebSocket ----------------------------------------------------------------------------------

    async def _proxy_websocket(self, scope: Scope, receive: Any, send: Any) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        forward = [(k, v) for k, v in headers if k.lower() in WS_FORWARD]
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope["path"] + (f"?{query}" if query else "")
        upstream: ClientConnection | None = None
        for backend in self.next_backends():
            url = backend.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + path
            try:
                upstream = await connect(
                    url,
                    additional_headers=forward,
                    subprotocols=scope.get("subprotocols") or None,
                    compression=None,
                    max_size=None,
                    ping_interval=None,  # SignalR has its own keep-alives
                    open_timeout=CONNECT_TIMEOUT,
                    user_agent_header=None,
                )
                break
            except InvalidStatus as exc:  # the instance refused it (401, 404...): pass its answer on
                await _deny(scope, send, exc.response.status_code, exc.response.body or b"")
                return
            except (OSError, TimeoutError) as exc:
                log.warning("%s is down (%r), trying the next instance", backend, exc)
        if upstream is None:
            await _deny(scope, send, 502, b"no instance is reachable")
            return
        async with upstream:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            pumps = {
                asyncio.ensure_future(_client_to_upstream(receive, upstream)),
                asyncio.ensure_future(_upstream_to_client(upstream, send)),
            }
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _client_to_upstream(receive: Any, upstream: ClientConnection) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            code = message.get("code", 1000)
            await upstream.close(code if _sendable(code) else 1000)
            return
        if message["type"] != "websocket.receive":
            continue
        try:
            if message.get("text") is not None:
                await upstream.send(message["text"])
            elif message.get("bytes") is not None:
                await upstream.send(message["bytes"])
        except ConnectionClosed:
            return


async def _upstream_to_client(upstream: ClientConnection, send: Any) -> None:
    try:
        async for data in upstream:
            if isinstance(data, str):
                await send({"type": "websocket.send", "text": data})
            else:
                await send({"type": "websocket.send", "bytes": data})
    except ConnectionClosed:
        pass
    code = upstream.close_code
    # 1005/1006 (no code, abnormal) cannot be sent: the instance vanished, tell the client 1011
    with contextlib.suppress(Exception):
        await send(
            {
                "type": "websocket.close",
                "code": code if code is not None and _sendable(code) else 1011,
                "reason": upstream.close_reason or "",
            }
        )


def _sendable(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _plain(send: Any, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _deny(scope: Scope, send: Any, status: int, body: bytes) -> None:
    """Refuse a WebSocket handshake with ``status`` (ASGI's denial-response extension when offered)."""
    if "websocket.http.response" in scope.get("extensions", {}):
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


def serve(backends: Sequence[str], host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the front with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(
        RoundRobinFront(backends),
        host=host,
        port=port,
        log_level="warning",
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.blog.front", description=__doc__.split("\n")[0])
    parser.add_argument("backends", nargs="+", help="instance URLs, e.g. http://127.0.0.1:8001")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="front: %(message)s")
    serve(args.backends, args.host, args.port)


if __name__ == "__main__":
    main()
