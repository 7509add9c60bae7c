"""WebSocket transport over ASGI.

Inbound frames (text or binary) are a plain byte stream for the application.
Outbound, the single writer loop drains the connection's outbox and sends
everything that piled up as **one** frame: Text for text protocols, Binary for
binary ones. Records are only ever appended whole, so a frame never carries
part of a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING

from ..connection import Connection
from ..dispatcher import ConnectionApplication
from ..http import Receive, Scope, Send, abort_transport
from ..protocol.base import TransferFormat

if TYPE_CHECKING:
    from ..server import HubServer

__all__ = ["reject_websocket", "serve_websocket"]

log = logging.getLogger("hubwire.websocket")

#: inbound bytes waiting for the application before reading pauses, and where it resumes
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


async def reject_websocket(scope: Scope, receive: Receive, send: Send, status: int, body: str = "") -> None:
    """Refuse an upgrade with an HTTP status (when the server supports it), else a plain close."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        payload = body.encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(payload)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": payload})
    else:
        await send({"type": "websocket.close", "code": 1008})


async def serve_websocket(
    server: HubServer,
    endpoint: ConnectionApplication,
    conn: Connection,
    receive: Receive,
    send: Send,
) -> None:
    """Accept the upgrade and run the connection until either side ends it (ASGI serving mode)."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await endpoint.on_connect(conn)
    client_closed = asyncio.Event()
    error: BaseException | None = None

    # Reading and handling are apart, as in native mode: the application may hold its input back
    # for long (an invocation waiting for the slot a running one holds, a full upload buffer), and
    # a disconnect must still end the connection at once. Up to _HIGH_WATER bytes wait in between;
    # past it reading pauses (back-pressure), below _LOW_WATER it resumes.
    inbox: deque[bytes] = deque()
    inbox_bytes = 0
    arrived = asyncio.Event()
    room = asyncio.Event()
    room.set()

    async def read_loop() -> None:
        nonlocal inbox_bytes
        try:
            while True:
                await room.wait()
                msg = await receive()
                kind = msg["type"]
                if kind == "websocket.disconnect":
                    break
                if kind == "websocket.receive":
                    data = msg.get("bytes")
                    if data is None:
                        data = (msg.get("text") or "").encode("utf-8")
                    if data:
                        inbox.append(data)
                        inbox_bytes += len(data)
                        arrived.set()
                        if inbox_bytes > _HIGH_WATER:
                            room.clear()
        finally:
            client_closed.set()
            handler.cancel()  # the client is gone: nothing it sent still needs handling
            conn.outbox.close()

    async def handle_loop() -> None:
        nonlocal inbox_bytes, error
        try:
            while True:
                while not inbox:
                    arrived.clear()
                    await arrived.wait()
                data = inbox.popleft()
                inbox_bytes -= len(data)
                if inbox_bytes < _LOW_WATER:
                    room.set()
                await endpoint.on_receive(conn, data)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the application failed on this input: end the connection
            log.exception("connection %s failed while receiving", conn.connection_id)
            error = exc
            conn.outbox.close()

    loop = asyncio.get_running_loop()
    handler = loop.create_task(handle_loop())
    reader = loop.create_task(read_loop())
    close_code = 1000
    task = asyncio.current_task()
    dropped = writing = False
    force: asyncio.TimerHandle | None = None

    def drop() -> None:
        # the close handshake did not finish: the client stopped reading, so the writer is stuck
        # in send() behind a full socket buffer. Drop the socket (uvicorn exposes its transport
        # behind send); failing that, cancel the stuck send.
        nonlocal dropped
        if client_closed.is_set() or abort_transport(send):
            return
        if writing and task is not None:  # the closing steps below are bounded by timeouts already
            dropped = True
            task.cancel()

    def overflow() -> None:
        nonlocal force
        conn.close_slow(f"{conn.outbox.buffered} bytes unsent")
        force = loop.call_later(server.options.websocket_close_timeout, drop)

    conn.outbox.on_overflow = overflow
    writing = True
    try:
        while True:
            chunks = await conn.outbox.take()
            if chunks is None:
                break
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if conn.transfer_format is TransferFormat.BINARY:
                await send({"type": "websocket.send", "bytes": data})
            else:
                await send({"type": "websocket.send", "text": data.decode("utf-8")})
    except asyncio.CancelledError:
        if not dropped or task is None:
            raise
        task.uncancel()
        error = error or ConnectionError("slow consumer")
    except UnicodeDecodeError:
        close_code = 1011
    except Exception as exc:  # the socket is gone (OSError, disconnect errors of the server)
        log.debug("send to %s failed: %s", conn.connection_id, exc)
        error = error or exc
    finally:
        writing = False
        conn.outbox.close()
        timeout = server.options.websocket_close_timeout
        if not client_closed.is_set() and not dropped:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(send({"type": "websocket.close", "code": close_code}), timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client_closed.wait(), timeout)
        if force is not None:
            force.cancel()
        reader.cancel()
        handler.cancel()
        for task in (reader, handler):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await server.connection_ended(endpoint, conn, error)

