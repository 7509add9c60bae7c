"""Server-Sent Events transport: a streaming GET carries server->client bytes; POSTs carry the rest.

The response is a never-ending ``text/event-stream``. Its first bytes are an
SSE comment (``:\\r\\n``) flushed at once, because some browsers only fire
``open`` once data arrived and the JS client waits for ``open`` before it
sends the handshake. After that the single writer loop drains the
connection's outbox and writes whatever piled up as **one** event, each line
as ``data: <line>\\r\\n`` plus a closing ``\\r\\n`` (ASP.NET's formatter, byte
for byte). SSE is text-only, which is why a MessagePack handshake is refused
on it (the hub layer reads the transport's declared features).

The connection ends when the client closes the request or the application
closes the outbox; either way the connection manager ends it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, TransportFeatures
from ..connections.manager import ConnectionManager
from ..http import Receive, Send
from .guard import SlowConsumerGuard
from .httpbase import http_state, wait_disconnect

__all__ = ["FEATURES", "SSE_HEADERS", "format_event", "serve_sse"]

#: text only: a MessagePack handshake is refused on it
FEATURES = TransportFeatures("ServerSentEvents", binary=False)

log = logging.getLogger("hubwire.sse")

#: response headers of the event stream (ASP.NET's; ``identity`` keeps compressing proxies off it)
SSE_HEADERS = (
    ("content-type", "text/event-stream"),
    ("cache-control", "no-cache,no-store"),
    ("pragma", "no-cache"),
    ("content-encoding", "identity"),
    ("x-accel-buffering", "no"),
)


def format_event(payload: bytes) -> bytes:
    """One SSE event for ``payload``: every line prefixed with ``data: ``, CRLF line ends, blank line.

    A ``\\r`` before a ``\\n`` inside the payload is dropped (the line end
    becomes CRLF); a line consisting of a lone ``\\r`` is kept as-is, as in
    ASP.NET's ``ServerSentEventsMessageFormatter``.
    """
    if b"\n" not in payload:
        return b"data: " + payload + b"\r\n\r\n"
    out = bytearray()
    for line in payload.split(b"\n"):
        if len(line) > 1 and line.endswith(b"\r"):
            line = line[:-1]
        out += b"data: " + line + b"\r\n"
    out += b"\r\n"
    return bytes(out)


async def serve_sse(
    manager: ConnectionManager,
    endpoint: ConnectionApplication,
    conn: Connection,
    receive: Receive,
    send: Send,
    headers: list[tuple[str, str]],
) -> None:
    """Stream the connection's outbound bytes as events until either side ends it."""
    state = http_state(conn)
    raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (*SSE_HEADERS, *headers)]
    client_gone = asyncio.Event()
    error: BaseException | None = None

    async def watch() -> None:
        try:
            await wait_disconnect(receive)
        finally:
            client_gone.set()
            conn.outbox.close()

    watcher = asyncio.get_running_loop().create_task(watch())
    close_timeout = endpoint.options.websocket_close_timeout
    guard = SlowConsumerGuard(conn, send, close_timeout, client_gone)
    try:
        await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
        await send({"type": "http.response.body", "body": b":\r\n", "more_body": True})
        await state.start(endpoint, conn)
        while True:
            chunks = await conn.outbox.take()
            if chunks is None:
                break
            payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if payload:
                await send({"type": "http.response.body", "body": format_event(payload), "more_body": True})
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the application failed to start, or the socket is gone
        log.debug("SSE stream of %s failed: %s", conn.connection_id, exc)
        error = exc
    finally:
        conn.outbox.close()
        if not client_gone.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    send({"type": "http.response.body", "body": b"", "more_body": False}),
                    close_timeout,
                )
        guard.cancel()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await manager.end(conn, state.error or error)
