"""Long-polling transport: GET polls carry server->client bytes, POSTs the rest, DELETE closes.

Semantics (ASP.NET Core's, which the clients are written against):

* The **first** poll starts the application and is answered at once with
  ``200`` and an empty ``application/octet-stream`` body; the JS client
  requires exactly that before it sends the handshake. Its request is the
  connection's "HTTP request" for hub code.
* A later poll waits for outbound bytes and answers ``200`` with *everything*
  queued (many records in one body), or an empty ``200`` after the poll
  timeout (90 s by default) so proxies never see a request hang forever.
* ``204`` means "stop polling": the connection is closing, or a newer poll
  of the same connection replaced this one (already-written data counts as
  delivered, unsent data stays queued for the newer poll).
* ``DELETE`` ends the connection (``202``); the waiting poll ends with ``204``.
* Between polls the connection is *inactive*; the server heartbeat disposes
  it after the disconnect timeout and the application's ``on_disconnect``
  runs then (see :meth:`HubServer.connection_ended`).

The poll reuses the outbox design: hub code appends synchronously and the one
waiting poll drains ``take_nowait()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from ..connection import Connection
from ..dispatcher import ConnectionApplication
from ..http import Receive, Send, respond
from .httpbase import HttpConnectionState, Poll, wait_disconnect

if TYPE_CHECKING:
    from ..server import HubServer

__all__ = ["NO_CACHE_HEADERS", "handle_delete", "serve_poll"]

log = logging.getLogger("hubwire.longpolling")

#: every poll response carries these (ASP.NET's), so no cache between client and server keeps a poll
NO_CACHE_HEADERS = (
    ("cache-control", "no-cache, no-store"),
    ("pragma", "no-cache"),
    ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
)

#: how long a newer poll waits for the one it replaces to finish writing
_REPLACE_WAIT = 5.0


async def serve_poll(
    server: HubServer,
    endpoint: ConnectionApplication,
    conn: Connection,
    state: HttpConnectionState,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
    poll_timeout: float,
) -> None:
    """Answer one poll (the caller has already checked id, transport and authorization)."""
    all_headers = [*NO_CACHE_HEADERS, *headers]
    if state.endpoint is None:
        # first poll: start the application and answer at once so the client may send
        conn.inactive_since = None
        try:
            await state.start(endpoint, conn)
        except Exception as exc:
            log.exception("starting connection %s failed", conn.connection_id)
            state.error = exc
            conn.abort("start failed")
        await respond(send, 200, b"", "application/octet-stream", all_headers)
        _mark_inactive(server, conn)
        return
    previous = state.poll
    if previous is not None:
        previous.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(previous.done.wait(), _REPLACE_WAIT)
    if not server.is_live(conn):
        await respond(send, 404, b"No Connection with that ID", headers=headers)
        return
    poll = Poll()
    state.poll = poll
    conn.inactive_since = None
    try:
        await _wait_and_answer(server, endpoint, conn, state, poll, receive, send, all_headers, poll_timeout)
    finally:
        poll.done.set()
        if state.poll is poll:
            state.poll = None
            _mark_inactive(server, conn)


def _mark_inactive(server: HubServer, conn: Connection) -> None:
    if server.is_live(conn):
        conn.inactive_since = time.monotonic()


async def _wait_and_answer(
    server: HubServer,
    endpoint: ConnectionApplication,
    conn: Connection,
    state: HttpConnectionState,
    poll: Poll,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
    poll_timeout: float,
) -> None:
    outbox = conn.outbox
    loop = asyncio.get_running_loop()
    readable = loop.create_task(outbox.wait_readable(poll_timeout))
    gone = loop.create_task(wait_disconnect(receive))
    waited: set[asyncio.Future[Any]] = {readable, gone, poll.stopped}
    try:
        await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (readable, gone):
            task.cancel()
        await asyncio.gather(readable, gone, return_exceptions=True)
    if poll.stopped.done():
        # replaced by a newer poll, or the client DELETEd the connection
        await respond(send, 204, b"", headers=headers)
        return
    if gone.done() and not gone.cancelled():
        return  # the client went away; queued bytes wait for its next poll
    if not readable.cancelled() and readable.exception() is None and not readable.result():
        await respond(send, 200, b"", headers=headers)  # poll timeout: the client polls again
        return
    chunks = outbox.take_nowait()
    if chunks:
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        await respond(send, 200, body, "application/octet-stream", headers)
        return
    if outbox.closed:
        # the application is done and everything was delivered: stop polling, dispose
        await respond(send, 204, b"", headers=headers)
        await server.connection_ended(endpoint, conn, state.error)
        return
    await respond(send, 200, b"", headers=headers)  # woken without data (should not happen)


async def handle_delete(
    server: HubServer,
    conn: Connection,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    """``DELETE {hub}?id=...``: the client ends a long-polling connection (``202``)."""
    if conn.transport_name != "LongPolling":
        await respond(
            send, 400, b"Cannot terminate this connection using the DELETE endpoint.", headers=headers
        )
        return
    state = server.http_state(conn)
    if state.poll is not None:
        state.poll.stop()  # before the abort below wakes it, so it answers 204 and not the data
    conn.abort("client closed")
    if state.endpoint is not None:
        server.spawn(server.connection_ended(state.endpoint, conn, state.error))
    await respond(send, 202, b"", headers=headers)
