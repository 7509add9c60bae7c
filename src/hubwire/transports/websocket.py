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
from typing import TYPE_CHECKING

from ..connection import Connection
from ..dispatcher import ConnectionApplication
from ..http import Message, Receive, Scope, Send, abort_transport
from ..protocol.base import TransferFormat

if TYPE_CHECKING:
    from ..server import HubServer

__all__ = ["reject_websocket", "serve_websocket"]

log = logging.getLogger("hubwire.websocket")


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

    async def read_loop() -> None:
        # The next message is always requested before the application handles the current one:
        # the application may hold reading back for long (an invocation waiting for the busy slot,
        # a full upload buffer), and a disconnect arriving meanwhile must end the connection now.
        nonlocal error
        me = asyncio.current_task()
        busy = False

        def watch(future: asyncio.Future[Message]) -> None:
            if not busy or me is None or future.cancelled() or future.exception() is not None:
                return
            if future.result()["type"] == "websocket.disconnect":
                me.cancel()

        def request_next() -> asyncio.Future[Message]:
            future = asyncio.ensure_future(receive())
            future.add_done_callback(watch)
            return future

        upcoming = request_next()
        try:
            while True:
                msg = await upcoming
                kind = msg["type"]
                if kind == "websocket.disconnect":
                    break
                upcoming = request_next()
                if kind == "websocket.receive":
                    data = msg.get("bytes")
                    if data is None:
                        data = (msg.get("text") or "").encode("utf-8")
                    if data:
                        busy = True
                        await endpoint.on_receive(conn, data)
                        busy = False
        except asyncio.CancelledError:
            if not busy:
                raise  # cancelled from outside; when busy it was watch(): the client left
        except Exception as exc:  # the application failed on this input: end the connection
            log.exception("connection %s failed while receiving", conn.connection_id)
            error = exc
        finally:
            if not upcoming.done():
                upcoming.cancel()
            client_closed.set()
            conn.outbox.close()

    loop = asyncio.get_running_loop()
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
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await server.connection_ended(endpoint, conn, error)

