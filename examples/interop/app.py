"""The interop test app: what a black-box suite needs to drive unmodified SignalR clients.

It mirrors the ASP.NET Core SignalR functional-test server (see
`the interop contract (`interop-contract.md`, kept with the project's shared notes)`): ``TestHub`` at ``/testhub`` (all
transports) and ``/testhub-nowebsockets`` (SSE and long polling),
``AuthorizedHub`` behind JWT at ``/authorizedhub``, a raw echo connection at
``/echo``, and the helper endpoints ``/generateJwtToken``,
``/clientresult/{id}``, ``/redirect...`` and ``/bad-negotiate...``.
Detailed errors are on and JSON payloads keep .NET's PascalCase names, so
error texts and objects are byte-for-byte what the upstream specs expect.

Run: ``hubwire run examples.interop.app:app --port 5000`` (see README.md).

Environment (for tests that must not wait 90 s):

* ``INTEROP_LONG_POLL_TIMEOUT`` - seconds before an idle poll is answered (default 90)
* ``INTEROP_DISCONNECT_TIMEOUT`` - seconds an inactive connection lives (default 15)
* ``INTEROP_KEEP_ALIVE_INTERVAL`` - seconds of silence before the server pings (default 15)
* ``INTEROP_JWT_KEY`` - the HS256 signing key (a fixed test key by default)

Beyond the contract it serves a browser page (``/browser``, with the client
bundles from ``node_modules``, no CDN) and ``GET /disconnected/{id}``: how
many times ``on_disconnected`` ran for that connection, so tests can check
"exactly once".
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import jwt
import msgspec
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from hubwire import Hub, HubException, HubOptions, HubServer, authorize
from hubwire.auth import NAME_IDENTIFIER, JwtBearerAuthenticator
from hubwire.http import Receive, Scope, Send

HERE = Path(__file__).resolve().parent
NODE_MODULES = Path(os.environ.get("INTEROP_NODE_MODULES", HERE.parent.parent / "node_modules"))
BUNDLES = {
    "signalr.js": NODE_MODULES / "@microsoft" / "signalr" / "dist" / "browser" / "signalr.js",
    "signalr-protocol-msgpack.js": NODE_MODULES
    / "@microsoft"
    / "signalr-protocol-msgpack"
    / "dist"
    / "browser"
    / "signalr-protocol-msgpack.js",
}

JWT_KEY = os.environ.get("INTEROP_JWT_KEY", "hubwire-interop-test-key-0123456789abcdef")
#: lifetime of tokens from /generateJwtToken (the contract asks for at least 60 s)
TOKEN_LIFETIME = 600


# -- .NET-named exceptions: detailed error texts carry the exception's type name -----------------


class InvalidOperationException(Exception):
    """Thrown by ``ThrowException``; the client sees ``InvalidOperationException: <message>``."""


# -- payload types (PascalCase field names travel as-is, as with .NET's "no naming policy") -------


class CustomObject(msgspec.Struct):
    """``{Name, Value}`` as the upstream specs send it."""

    Name: str
    Value: int


class ComplexObject(msgspec.Struct):
    """The "different types" object: bytes, timestamps and GUIDs must round-trip in both protocols."""

    String: str
    IntArray: list[int]
    ByteArray: bytes
    Guid: uuid.UUID
    DateTime: datetime


#: connection id -> how many times on_disconnected ran (bounded; oldest forgotten first)
DISCONNECTS: OrderedDict[str, int] = OrderedDict()
_MAX_DISCONNECTS = 10_000


def _record_disconnect(connection_id: str) -> None:
    DISCONNECTS[connection_id] = DISCONNECTS.get(connection_id, 0) + 1
    DISCONNECTS.move_to_end(connection_id)
    while len(DISCONNECTS) > _MAX_DISCONNECTS:
        DISCONNECTS.popitem(last=False)


class TestClient(Protocol):
    """What ``TestHub`` (and ``/clientresult/{id}``) call on a client."""

    async def message(self, message: str) -> None: ...

    async def custom_object(self, obj: CustomObject) -> None: ...

    async def stream_canceled(self) -> None: ...

    async def result(self) -> int:
        """A client result: ``/clientresult/{id}`` answers with it."""
        ...


class TestHub(Hub):
    """The upstream functional tests' ``TestHub``."""

    __test__ = False  # not a pytest test class
    client_methods = TestClient

    async def on_disconnected(self, exception: BaseException | None) -> None:
        _record_disconnect(self.context.connection_id)

    async def echo(self, message: str) -> str:
        return message

    async def get_caller_connection_id(self) -> str:
        return self.context.connection_id

    async def get_num_redirects(self) -> int:
        request = self.context.request
        raw = request.query_param("numRedirects") if request else None
        return int(raw) if raw else 0

    async def throw_exception(self, message: str) -> None:
        raise InvalidOperationException(message)

    async def invoke_with_string(self, message: str) -> None:
        await self.clients.caller.send("Message", message)

    async def send_custom_object(self, obj: CustomObject) -> None:
        await self.clients.caller.send("CustomObject", obj)

    async def stream(self) -> AsyncIterator[str]:
        for item in ("a", "b", "c"):
            yield item

    async def infinite_stream(self) -> AsyncIterator[str]:
        try:
            await asyncio.Event().wait()  # never yields; only a cancel ends it
            yield ""  # pragma: no cover - unreachable, makes this a stream
        except asyncio.CancelledError:
            await self.clients.caller.send("StreamCanceled")
            raise

    async def streaming_concat(self, stream: AsyncIterator[str]) -> str:
        return "".join([item async for item in stream])

    async def empty_stream(self) -> AsyncIterator[int]:
        return
        yield  # pragma: no cover - makes this a stream

    async def stream_throw_exception(self, message: str) -> AsyncIterator[str]:
        raise InvalidOperationException(message)
        yield  # pragma: no cover - makes this a stream

    async def get_active_transport_name(self) -> str | None:
        return self.context.transport

    async def get_header(self, name: str) -> str | None:
        request = self.context.request
        return request.header(name) if request else None

    async def get_content_type_header(self) -> str | None:
        return await self.get_header("Content-Type")

    async def get_cookie(self, name: str) -> str | None:
        return self.context.cookies.get(name)

    async def echo_complex_object(self, obj: ComplexObject) -> ComplexObject:
        return obj

    async def send_complex_object(self) -> ComplexObject:
        return ComplexObject(
            String="hello world",
            IntArray=[1, 2, 3],
            ByteArray=b"\x01\x02\x03",
            Guid=uuid.UUID("00010203-0405-0607-0706-050403020100"),
            DateTime=datetime(2000, 1, 1, tzinfo=UTC),
        )


@authorize()
class AuthorizedHub(Hub):
    """``[Authorize]``: negotiate and every transport request need a valid JWT."""

    async def echo(self, message: str) -> str:
        return message


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


options = HubOptions(
    enable_detailed_errors=True,
    maximum_receive_message_size=32768,
    long_poll_timeout=_float_env("INTEROP_LONG_POLL_TIMEOUT", 90.0),
    disconnect_timeout=_float_env("INTEROP_DISCONNECT_TIMEOUT", 15.0),
    keep_alive_interval=_float_env("INTEROP_KEEP_ALIVE_INTERVAL", 15.0),
)


def local_origin(origin: str) -> bool:
    """The test pages come from this machine (``localhost`` while the hubs are ``127.0.0.1``):
    those origins may use the hubs with credentials, as ASP.NET's test app allows them."""
    return urlparse(origin).hostname in ("localhost", "127.0.0.1", "::1")


server = HubServer(options, authenticator=JwtBearerAuthenticator(JWT_KEY), cors_origins=local_origin)
server.add_hub("/testhub", TestHub)
server.add_hub("/testhub-nowebsockets", TestHub, transports=("ServerSentEvents", "LongPolling"))
server.add_hub("/authorizedhub", AuthorizedHub)
server.add_connection_handler("/echo", lambda conn, data: conn.write(data))


# -- helper endpoints (plain HTTP, matched case-insensitively like ASP.NET routes) ---------------

_redirects = itertools.count(1)


def generate_token(
    lifetime: float = TOKEN_LIFETIME, key: str = JWT_KEY, user: str = "testuser", **claims: Any
) -> str:
    """A compact HS256 JWT (``/generateJwtToken`` returns one for ``testuser``); tests mint others."""
    now = int(time.time())
    payload = {NAME_IDENTIFIER: user, "iat": now, "nbf": now - 300, "exp": now + int(lifetime), **claims}
    return jwt.encode(payload, key, algorithm="HS256")


async def _client_result(connection_id: str) -> Response:
    try:
        client = server.hub_context(TestHub).clients.client(connection_id)
        value: Any = await client.invoke("Result", timeout=30)
    except HubException as exc:
        return PlainTextResponse(str(exc))
    return PlainTextResponse(str(value))


async def _web(scope: Scope, receive: Receive, send: Send) -> None:
    """Everything that is not a hub path."""
    if scope["type"] != "http":
        return
    request = Request(scope, receive)
    path = scope["path"]
    low = path.lower().rstrip("/")
    response: Response
    if low == "/generatejwttoken":
        response = PlainTextResponse(generate_token())
    elif low.startswith("/clientresult/"):
        response = await _client_result(path.rstrip("/").rsplit("/", 1)[1])
    elif low.startswith("/redirect"):
        base = request.query_params.get("baseUrl", "")
        response = JSONResponse({"url": f"{base}/testHub?numRedirects={next(_redirects)}"})
    elif low.startswith("/bad-negotiate"):
        response = PlainTextResponse("Some response from server", status_code=400)
    elif low.startswith("/disconnected/"):
        response = PlainTextResponse(str(DISCONNECTS.get(path.rstrip("/").rsplit("/", 1)[1], 0)))
    elif low in ("", "/browser", "/browser/index.html"):
        response = FileResponse(HERE / "static" / "index.html", media_type="text/html")
    elif low.startswith("/lib/") and low[5:] in BUNDLES:
        response = FileResponse(BUNDLES[low[5:]], media_type="text/javascript")
    else:
        response = PlainTextResponse("Not Found", status_code=404)
    await response(scope, receive, send)


#: browser pages on other origins use the helper endpoints too (the hubs have their own CORS)
web = CORSMiddleware(
    _web, allow_origin_regex=".*", allow_credentials=True, allow_methods=["*"], allow_headers=["*"]
)
server.app = web
app = server
