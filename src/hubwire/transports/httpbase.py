"""What Server-Sent Events and long polling share: per-connection HTTP state and the POST (send) side.

With SSE and long polling the client talks to the server over *separate*
HTTP requests (a GET that carries server->client bytes, POSTs that carry
client->server bytes), so a connection needs a little state that outlives any
single request: whether its application was started, a lock that keeps POST
bodies in order, and (long polling) the poll currently waiting. It lives in
the connection's ``transport_state``; the connection manager drops it when
the connection ends.
"""

from __future__ import annotations

import asyncio
import logging

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, RequestInfo
from ..connections.manager import ConnectionManager
from ..http import BodyTooLarge, ClientGone, Receive, Send, read_body, respond
from ..protocol import texts

__all__ = [
    "POST_BODY_FACTOR",
    "HttpConnectionState",
    "Poll",
    "handle_post",
    "http_state",
    "post_limit",
    "refuse_draining",
]

log = logging.getLogger("hubwire.http_transport")

#: how much larger than one hub message a POST body may be (the JS client batches queued messages)
POST_BODY_FACTOR = 4


class Poll:
    """One long-poll request in flight; :meth:`stop` ends it early with ``204``."""

    __slots__ = ("done", "stopped")

    def __init__(self) -> None:
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.done = asyncio.Event()

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)


class HttpConnectionState:
    """State of one SSE or long-polling connection that spans several HTTP requests.

    ``endpoint`` is set once the transport started the application (SSE GET
    or first poll); until then POSTed bytes wait in ``early`` (ASP.NET accepts
    a send before the transport starts, so we do too). ``error`` remembers why
    the application failed on POSTed input, to report it to ``on_disconnect``.
    """

    __slots__ = ("early", "endpoint", "error", "poll", "send_lock")

    def __init__(self) -> None:
        self.endpoint: ConnectionApplication | None = None
        self.send_lock = asyncio.Lock()
        self.early = bytearray()
        self.poll: Poll | None = None
        self.error: BaseException | None = None

    async def start(self, endpoint: ConnectionApplication, conn: Connection) -> None:
        """Run the application's ``on_connect`` and hand it whatever was POSTed before."""
        self.endpoint = endpoint
        conn.application = endpoint
        await endpoint.on_connect(conn)
        if self.early:
            data, self.early = bytes(self.early), bytearray()
            async with self.send_lock:
                await endpoint.on_receive(conn, data)


def http_state(conn: Connection) -> HttpConnectionState:
    """The SSE / long-polling state of ``conn`` (created on first use)."""
    state = conn.transport_state
    if not isinstance(state, HttpConnectionState):
        state = conn.transport_state = HttpConnectionState()
    return state


def post_limit(endpoint: ConnectionApplication) -> int | None:
    """Largest POST body accepted for ``endpoint``."""
    size = endpoint.max_receive_size()
    return None if size is None else size * POST_BODY_FACTOR


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client goes away (consumes the request body of a GET first)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def handle_post(
    manager: ConnectionManager,
    endpoint: ConnectionApplication,
    conn: Connection,
    request: RequestInfo,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    """``POST {hub}?id=...``: hand the body to the application, in order, and answer ``200``.

    The body is read whole (bounded by the endpoint's limit, ``413`` past it)
    before the application sees any of it, so a refused body never leaves half
    a message behind. POSTs of one connection are serialized: a second POST
    waits until the application has taken the first (back-pressure, as in
    ASP.NET).
    """
    if conn.transport_name == "WebSockets":
        await respond(send, 405, texts.POST_NOT_ALLOWED_ON_WEBSOCKETS.encode(), headers=headers)
        return
    if conn.outbox.closed:  # the connection is closing (failed, aborted): it takes no more input
        await respond(send, 404, texts.NO_CONNECTION.encode(), headers=headers)
        return
    limit = post_limit(endpoint)
    declared = _content_length(request)
    too_large = texts.REQUEST_BODY_TOO_LARGE.encode()
    if limit is not None and declared is not None and declared > limit:
        await respond(send, 413, too_large, headers=headers)
        return
    try:
        body = await read_body(receive, limit)
    except BodyTooLarge:
        await respond(send, 413, too_large, headers=headers)
        return
    except ClientGone:
        return  # nobody is left to answer; the bytes were never complete
    state = http_state(conn)
    async with state.send_lock:
        if not manager.is_live(conn):
            await respond(send, 404, b"", headers=headers)
            return
        if state.endpoint is None:
            if limit is not None and len(state.early) + len(body) > limit:
                await respond(send, 413, too_large, headers=headers)
                return
            state.early += body
        elif state.endpoint is not endpoint:
            # a token negotiated on another path: that connection does not exist here
            await respond(send, 404, texts.NO_CONNECTION.encode(), headers=headers)
            return
        elif body:
            try:
                await endpoint.on_receive(conn, body)
            except Exception as exc:  # the application failed on this input: end the connection
                log.exception("connection %s failed while receiving", conn.connection_id)
                state.error = exc
                conn.abort("receive failed")
    await respond(send, 200, b"", headers=headers)


def _content_length(request: RequestInfo) -> int | None:
    raw = request.header("content-length")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        return None


async def refuse_draining(send: Send, status: int, headers: list[tuple[str, str]]) -> None:
    """A draining instance turns a request away with ``Connection: close``: the client's retry
    opens a new TCP connection, which the load balancer sends to another instance (a kept-alive
    one would bring it back here)."""
    closing = [*headers, ("connection", "close"), ("retry-after", "1")]
    await respond(send, status, texts.SERVER_SHUTTING_DOWN.encode(), headers=closing)
