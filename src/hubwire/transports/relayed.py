"""SSE and long polling without sticky sessions: relay requests to the instance holding the connection.

An SSE or long-polling connection lives on the instance that started its
transport (the *owner*: the SSE GET or the first poll landed there). With a
backplane that has a :class:`~hubwire.backplane.relay.Relay`, the owner
listens for relayed requests of that connection, and any other instance that
receives a poll, a POST or a DELETE for it forwards the request and answers
with the owner's reply. The owner answers relayed requests with the very same
HTTP handlers as local ones (a captured ``send``), so status codes, poll
replacement, ordering of POSTs and the DELETE semantics are identical.

A second SSE stream for a connection that is streaming elsewhere gets
``409``, as it would on the owner.

What crosses the backplane is only what the owner needs: the method, the
connection id, the ``Accept`` and ``Content-Type`` values, the body, and the
user the relaying instance authenticated (identifier and claims). Never the
request's cookies, authorization header, query string, access token or
connection token: the relaying instance authenticates the request and checks
the connection token itself, and the owner knows its connection's token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, Principal, RequestInfo
from ..connections.manager import ConnectionManager
from ..http import BodyTooLarge, ClientGone, Message, Receive, Scope, Send, read_body, respond
from ..protocol import texts
from .httpbase import post_limit, refuse_draining, wait_disconnect

__all__ = [
    "LOCAL_ONLY",
    "RELAYED_USER",
    "Answer",
    "HttpHandler",
    "RelayHandler",
    "RelayedCall",
    "Reply",
    "RequestRelay",
    "forward",
    "serve_relayed",
]

#: a relayed reply: status, body, response headers
Reply = tuple[int, bytes, list[tuple[str, str]]]
#: the HTTP handler of a path: answers a request exactly as if it had arrived here
HttpHandler = Callable[[ConnectionApplication, Scope, Receive, Send], Awaitable[None]]


def _settled(delivered: bool) -> None:
    """Settling an answer that needs no confirmation."""


@dataclass(slots=True)
class Answer:
    """The owner's reply to a relayed request, as the relaying instance gets it.

    ``settle`` must be called once the reply was written to the client (True) or could not be
    (False): a long poll's data is committed by the owner only then, and queued again otherwise.
    """

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    settle: Callable[[bool], None] = _settled


class RelayedCall(Protocol):
    """The owner's side of one relayed request."""

    #: resolved when the relaying instance's client went away (its poll must take nothing)
    gone: asyncio.Future[None]

    async def deliver(self, reply: Reply) -> bool:
        """Send ``reply`` now; True once the relaying instance wrote it to its client."""


#: the owner's handler of a connection's relayed requests: payload -> reply
RelayHandler = Callable[[bytes, RelayedCall], Awaitable[Reply]]


class RequestRelay(Protocol):
    """Request/reply to the instance that holds a connection (the Redis backplane provides one)."""

    async def serve(self, connection_id: str, handler: RelayHandler) -> None:
        """Answer relayed requests for a connection held here."""

    def stop_serving(self, connection_id: str) -> None:
        """Stop answering for a connection that ended here."""

    def set_keys(self, keys: tuple[bytes, ...]) -> None:
        """Seal relay messages with the app's token keys (the first seals, any opens)."""

    @property
    def available(self) -> bool:
        """False while the backplane is unreachable (a relayed request could not be answered)."""

    async def holder(self, connection_id: str) -> str | None:
        """The instance that started ``connection_id`` (None: none did); raises when unknown."""

    async def request(
        self, connection_id: str, payload: bytes, timeout: float, gone: asyncio.Future[Any] | None = None
    ) -> Answer | None:
        """Relay ``payload`` to the holder of ``connection_id``.

        None when nobody answers (or ``gone`` resolved first: the client left); a 404 answer when
        the holder is known to be dead (its lease expired).
        """


log = logging.getLogger("hubwire.relay")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
#: scope key marking a request that must be answered here, never relayed again
LOCAL_ONLY = "hubwire.local_only"
#: scope key of a relayed request: the user the relaying instance authenticated (or None)
RELAYED_USER = "hubwire.relayed_user"
#: extra time a relayed poll may take beyond the poll timeout
_SLACK = 10.0
#: how long a relayed poll still waits for its holder's answer once this instance is about to exit.
#: Why: its empty answer must not reach a client that connected a moment ago and is waiting for
#: its handshake response (the JS client parses an empty *binary* poll body as the handshake
#: response, and fails); the handshake is sent right after the first poll, so within this grace
#: the holder's answer, the handshake response, comes through instead
_STOP_GRACE = 2.0


async def forward(
    manager: ConnectionManager,
    relay: RequestRelay,
    serve_http: HttpHandler,
    endpoint: ConnectionApplication,
    scope: Scope,
    request: RequestInfo,
    principal: Principal | None,
    receive: Receive,
    send: Send,
    token: str,
    cors: list[tuple[str, str]],
    stopping: asyncio.Event | None = None,
) -> bool:
    """Relay a request for a connection held by another instance; False when none holds it.

    Called when the token's connection was not started here (unknown here, or
    negotiated here but taken over elsewhere). A relayed request is answered
    with the owner's status, body and content type. A relayed poll still waiting
    :data:`_STOP_GRACE` after ``stopping`` was set (this instance drained and is about to
    exit) ends empty,
    as a poll that timed out, with ``Connection: close``, when its connection is started
    somewhere (else it is a first poll: 503); what the owner had for it stays queued there.
    A poll arriving after that gets 503 (it may be a first poll).
    """
    verified = manager.issuer.verify(token, check_age=False)
    if verified is None:
        return False
    if not relay.available:
        # nobody can be asked who holds it, and no start could be recorded: the client retries
        await respond(send, 503, texts.BACKPLANE_UNAVAILABLE.encode(), headers=cors)
        return True
    method = scope.get("method", "GET")
    body = b""
    if method == "POST":
        try:
            body = await read_body(receive, post_limit(endpoint))
        except BodyTooLarge:
            await respond(send, 413, texts.REQUEST_BODY_TOO_LARGE.encode(), headers=cors)
            return True
        except ClientGone:
            return True
    if method == "GET" and stopping is not None and stopping.is_set():
        # this instance is about to exit: the poll goes elsewhere (perhaps a first poll, which an
        # empty answer would wrongly confirm), over a new TCP connection
        await refuse_draining(send, 503, cors)
        return True
    payload = _encode_request(method, request, principal, body)
    timeout = endpoint.options.long_poll_timeout + _SLACK if method == "GET" else 30.0
    loop = asyncio.get_running_loop()
    # a poll ends when its client leaves, here as on the owner (a POST or DELETE is acted on anyway)
    gone = loop.create_task(_poll_ends(receive, stopping)) if method == "GET" else None
    try:
        answer = await relay.request(verified.connection_id, payload, timeout, gone)
        if gone is not None and gone.done() and not gone.cancelled():
            if answer is not None:
                answer.settle(False)  # what the owner had for this poll stays queued there
            if gone.result() == "stopping":
                await _end_stopped_poll(relay, verified.connection_id, answer is not None, send, cors)
            return True
    finally:
        if gone is not None:
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone
    if answer is None:
        local = manager.get(token)
        if method == "GET" or local is None:
            if method != "GET":
                await respond(send, 404, texts.NO_CONNECTION.encode(), headers=cors)
                return True
            return False  # nobody holds it: the caller may start it here
        # negotiated here, and no instance answers for it: handled here with the body already read
        # (the dispatcher accepts a POST only if no other instance started the connection)
        await serve_http(endpoint, {**scope, LOCAL_ONLY: True}, _replay(body), send)
        return True
    await _pass_on(answer, send, cors)
    return True


async def _end_stopped_poll(
    relay: RequestRelay, connection_id: str, answered: bool, send: Send, cors: list[tuple[str, str]]
) -> None:
    """This instance is about to exit while relaying a poll: end it, empty, when its connection is
    started elsewhere (the client polls again, elsewhere); else it may be a first poll, which an
    empty 200 would wrongly confirm (the client would send its handshake to a connection no
    instance serves): 503, and the client starts again."""
    started = answered
    if not started:
        try:
            started = await relay.holder(connection_id) is not None
        except Exception:  # Redis cannot tell: the poll may be a first one
            started = False
    if started:
        await respond(send, 200, b"", headers=[*cors, ("connection", "close")])
    else:
        await refuse_draining(send, 503, cors)


async def _pass_on(answer: Answer, send: Send, cors: list[tuple[str, str]]) -> None:
    """Answer the client with the owner's reply; the owner learns whether it got it."""
    content_type = next((v for k, v in answer.headers if k == "content-type"), None)
    extra = [(k, v) for k, v in answer.headers if k not in ("content-type", "content-length")]
    delivered = False
    try:
        await respond(send, answer.status, answer.body, content_type, [*extra, *_without(cors, extra)])
        delivered = True
    finally:
        answer.settle(delivered)


async def _poll_ends(receive: Receive, stopping: asyncio.Event | None) -> str:
    """``"gone"`` when the client leaves, ``"stopping"`` when this instance is about to exit (and
    the holder did not answer within :data:`_STOP_GRACE` after that)."""
    waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(wait_disconnect(receive))]
    if stopping is not None:
        waits.append(asyncio.ensure_future(_stopped_for(stopping, _STOP_GRACE)))
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    return "gone" if waits[0] in done else "stopping"


async def _stopped_for(stopping: asyncio.Event, grace: float) -> None:
    await stopping.wait()
    await asyncio.sleep(grace)


def _encode_request(method: str, request: RequestInfo, principal: Principal | None, body: bytes) -> bytes:
    accept, content_type = request.header("accept") or "", request.header("content-type") or ""
    user = None if principal is None else [principal.identifier, principal.claims]
    try:
        return _encoder.encode([method, accept, content_type, body, user])
    except (TypeError, ValueError, msgspec.EncodeError):  # claims msgpack cannot carry: the id only
        user = None if principal is None else [principal.identifier, {}]
        return _encoder.encode([method, accept, content_type, body, user])


def _decode_request(payload: bytes) -> tuple[str, str, str, bytes, Principal | None] | None:
    try:
        method, accept, content_type, body, user = _decoder.decode(payload)[:5]
    except (msgspec.DecodeError, TypeError, ValueError):
        return None
    if not all(isinstance(v, str) for v in (method, accept, content_type)) or not isinstance(body, bytes):
        return None
    principal = None
    if isinstance(user, list) and len(user) == 2 and isinstance(user[1], dict):
        identifier = user[0] if isinstance(user[0], str) else None
        principal = Principal(identifier, user[1])
    return method, accept, content_type, body, principal


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _without(cors: list[tuple[str, str]], present: list[tuple[str, str]]) -> list[tuple[str, str]]:
    names = {k for k, _ in present}
    return [(k, v) for k, v in cors if k not in names]


async def serve_relayed(
    relay: RequestRelay, serve_http: HttpHandler, endpoint: ConnectionApplication, conn: Connection
) -> None:
    """Answer relayed requests for ``conn``, which this instance now holds.

    At most ``max_relayed_requests_per_connection`` at once (each holds a task and its body until
    answered); more get 429.
    """
    in_flight = 0
    limit = endpoint.options.max_relayed_requests_per_connection

    async def handle(payload: bytes, call: RelayedCall) -> Reply:
        nonlocal in_flight
        if in_flight >= limit:
            return 429, b"Too many requests in flight for this connection.", []
        in_flight += 1
        try:
            return await _handle(payload, call)
        finally:
            in_flight -= 1

    async def _handle(payload: bytes, call: RelayedCall) -> Reply:
        decoded = _decode_request(payload)
        if decoded is None:
            return 400, b"", []
        method, accept, content_type, body, principal = decoded
        if method == "GET" and "text/event-stream" in accept.lower():
            # a second event stream while this one streams
            return 409, b"", []
        headers = [("accept", accept), ("content-type", content_type), ("content-length", str(len(body)))]
        scope: dict[str, Any] = {
            "type": "http",
            "method": method,
            "path": "",
            "root_path": "",
            # the token is this instance's own knowledge; it never crossed the backplane
            "query_string": b"id=" + conn.token.encode("ascii"),
            "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
            "client": None,
            "scheme": "http",
            LOCAL_ONLY: True,
            RELAYED_USER: principal,
        }
        return await _capture(serve_http, endpoint, scope, body, call)

    await relay.serve(conn.connection_id, handle)


async def _capture(
    serve_http: HttpHandler, endpoint: ConnectionApplication, scope: Scope, body: bytes, call: RelayedCall
) -> Reply:
    """Run the ordinary HTTP handler on a relayed request and collect its response.

    The request "disconnects" when the relaying instance's client went away. A poll's data is
    delivered from inside ``send``: if the relaying instance does not confirm that its client got
    it, ``send`` raises :class:`ClientGone` and the poll puts the data back in the queue.
    """
    delivered = False
    poll = scope.get("method") == "GET"

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.shield(call.gone)  # the relaying instance keeps the real client
        return {"type": "http.disconnect"}

    status = 500
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = int(message["status"])
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            final = poll and status == 200 and not message.get("more_body")
            if final and any(chunks) and not await call.deliver((status, b"".join(chunks), headers)):
                raise ClientGone("the relaying instance's client did not get the poll's data")

    await serve_http(endpoint, scope, receive, send)
    return status, b"".join(chunks), headers
