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
* A poll whose client went away takes nothing; one whose response cannot be
  written (a relayed poll whose relaying instance did not confirm delivery)
  puts what it took back, first in the queue.
* ``DELETE`` ends the connection (``202``); the waiting poll ends with ``204``.
* Between polls the connection is *inactive*; the server heartbeat disposes
  it after the disconnect timeout and the application's ``on_disconnect``
  runs then (see :meth:`ConnectionManager.end`).

The poll reuses the outbox design: hub code appends synchronously and the one
waiting poll drains ``take_nowait()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, TransportFeatures
from ..connections.manager import ConnectionManager
from ..http import Receive, Send, respond
from ..protocol import texts
from .httpbase import HttpConnectionState, Poll, http_state, wait_disconnect

__all__ = ["FEATURES", "NO_CACHE_HEADERS", "handle_delete", "serve_poll"]

#: the polls themselves show the client is there: no keep-alive pings on long polling
FEATURES = TransportFeatures("LongPolling", inherent_keep_alive=True)

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
    manager: ConnectionManager,
    endpoint: ConnectionApplication,
    conn: Connection,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    """Answer one poll (the caller has already checked id, transport and authorization)."""
    all_headers = [*NO_CACHE_HEADERS, *headers]
    state = http_state(conn)
    if state.endpoint is None:
        # first poll: start the application and answer at once so the client may send
        manager.mark_active(conn)
        try:
            await state.start(endpoint, conn)
        except Exception as exc:
            log.exception("starting connection %s failed", conn.connection_id)
            state.error = exc
            conn.abort("start failed")
        await respond(send, 200, b"", "application/octet-stream", all_headers)
        manager.mark_inactive(conn)
        return
    previous = state.poll
    if previous is not None:
        previous.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(previous.done.wait(), _REPLACE_WAIT)
    if not manager.is_live(conn):
        await respond(send, 404, texts.NO_CONNECTION.encode(), headers=headers)
        return
    poll = Poll()
    state.poll = poll
    manager.mark_active(conn)
    try:
        await _wait_and_answer(manager, conn, state, poll, receive, send, all_headers)
    finally:
        poll.done.set()
        if state.poll is poll:
            state.poll = None
            manager.mark_inactive(conn)


async def _wait_and_answer(
    manager: ConnectionManager,
    conn: Connection,
    state: HttpConnectionState,
    poll: Poll,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    outbox = conn.outbox
    loop = asyncio.get_running_loop()
    assert state.endpoint is not None  # set by the first poll
    poll_timeout = state.endpoint.options.long_poll_timeout
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
        try:
            await respond(send, 200, body, "application/octet-stream", headers)
        except Exception as exc:  # the client is gone (a relayed poll's, say): the next poll gets them
            log.debug("poll of %s not delivered (%s); its data stays queued", conn.connection_id, exc)
            outbox.put_back(chunks)
        return
    if outbox.closed:
        # the application is done and everything was delivered: stop polling, dispose
        await respond(send, 204, b"", headers=headers)
        await manager.end(conn, state.error)
        return
    await respond(send, 200, b"", headers=headers)  # woken without data (should not happen)


async def handle_delete(
    manager: ConnectionManager,
    conn: Connection,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    """``DELETE {hub}?id=...``: the client ends a long-polling connection (``202``)."""
    if conn.transport_name != FEATURES.name:
        await respond(send, 400, texts.DELETE_NOT_ALLOWED.encode(), headers=headers)
        return
    state = http_state(conn)
    if state.poll is not None:
        state.poll.stop()  # before the abort below wakes it, so it answers 204 and not the data
    conn.abort("client closed")
    if state.endpoint is not None:
        manager.end_soon(conn, state.error)
    await respond(send, 202, b"", headers=headers)
