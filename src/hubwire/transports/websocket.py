"""WebSocket transport over ASGI (the ASGI serving mode, and any ASGI server but hubwire's own).

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

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, TransportFeatures
from ..connections.inbox import Inbox
from ..connections.manager import ConnectionManager
from ..http import Receive, Scope, Send
from ..protocol.base import TransferFormat
from .guard import SlowConsumerGuard

__all__ = ["FEATURES", "reject_websocket", "serve_websocket"]

log = logging.getLogger("hubwire.websocket")

FEATURES = TransportFeatures("WebSockets")


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


class _AsgiWebSocket:
    """One connection's reader, handler and writer over an ASGI ``receive`` / ``send`` pair.

    Reading and handling are apart, as in native mode: the application may hold
    its input back for long, and a disconnect must still end the connection at
    once, so the reader fills an :class:`~hubwire.connections.inbox.Inbox` that
    the handler drains.
    """

    def __init__(
        self, endpoint: ConnectionApplication, conn: Connection, receive: Receive, send: Send
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.receive = receive
        self.send = send
        self.client_closed = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.inbox = Inbox(self.room.clear, self.room.set)
        self.error: BaseException | None = None
        self.handler: asyncio.Task[None] | None = None
        #: the handler is inside the application with a chunk
        self.handling = False
        #: the client closed cleanly and what it sent before is being handled
        self.draining = False
        self._give_up: asyncio.TimerHandle | None = None

    async def read_loop(self) -> None:
        clean = False
        try:
            while True:
                await self.room.wait()
                msg = await self.receive()
                kind = msg["type"]
                if kind == "websocket.disconnect":
                    clean = msg.get("code", 1005) in (1000, 1001)
                    break
                if kind == "websocket.receive":
                    data = msg.get("bytes")
                    if data is None:
                        data = (msg.get("text") or "").encode("utf-8")
                    if data:
                        self.inbox.put(data)
        finally:
            self.client_closed.set()
            if clean and self.handler is not None and (self.inbox or self.handling):
                # a clean Close: what arrived before it is handled first (bounded), as in ASP.NET
                self.inbox.put(b"")  # the end mark
                self.draining = True
                timeout = self.endpoint.options.websocket_close_timeout
                self._give_up = asyncio.get_running_loop().call_later(timeout, self._stop_handling)
            else:
                self._stop_handling()  # the client vanished: nothing it sent still needs handling

    def _stop_handling(self) -> None:
        if self.handler is not None:
            self.handler.cancel()
        self.inbox.clear()
        self.conn.outbox.close()

    async def handle_loop(self) -> None:
        try:
            while True:
                data = await self.inbox.get()
                if not data:  # the end mark after a clean Close: everything before it was handled
                    if self._give_up is not None:
                        self._give_up.cancel()
                    self.conn.outbox.close()
                    return
                self.handling = True
                await self.endpoint.on_receive(self.conn, data)
                self.handling = False
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # the application failed on this input: end the connection
            log.exception("connection %s failed while receiving", self.conn.connection_id)
            self.error = exc
            self.conn.outbox.close()

    async def write_loop(self) -> int:
        """Send what the outbox holds until it closes; returns the close code to send."""
        conn = self.conn
        while True:
            chunks = await conn.outbox.take()
            if chunks is None:
                return 1000
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            if conn.transfer_format is TransferFormat.BINARY:  # known once the application chose
                await self.send({"type": "websocket.send", "bytes": data})
            else:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    return 1011
                await self.send({"type": "websocket.send", "text": text})


async def serve_websocket(
    manager: ConnectionManager,
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
    conn.application = endpoint
    await endpoint.on_connect(conn)
    ws = _AsgiWebSocket(endpoint, conn, receive, send)
    loop = asyncio.get_running_loop()
    ws.handler = loop.create_task(ws.handle_loop())
    reader = loop.create_task(ws.read_loop())
    task = asyncio.current_task()
    dropped = writing = False

    def cancel_stuck_send() -> None:
        # no transport to drop: cancel the send the writer is stuck in (the closing steps below
        # are bounded by timeouts already)
        nonlocal dropped
        if writing and task is not None:
            dropped = True
            task.cancel()

    timeout = endpoint.options.websocket_close_timeout
    guard = SlowConsumerGuard(conn, send, timeout, ws.client_closed, cancel_stuck_send)
    close_code = 1000
    writing = True
    try:
        close_code = await ws.write_loop()
    except asyncio.CancelledError:
        if not dropped or task is None:
            raise
        task.uncancel()
        ws.error = ws.error or ConnectionError("slow consumer")
    except Exception as exc:  # the socket is gone (OSError, disconnect errors of the server)
        log.debug("send to %s failed: %s", conn.connection_id, exc)
        ws.error = ws.error or exc
    finally:
        writing = False
        conn.outbox.close()
        if not ws.client_closed.is_set() and not dropped:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(send({"type": "websocket.close", "code": close_code}), timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ws.client_closed.wait(), timeout)
        guard.cancel()
        if ws.draining:  # the client closed cleanly: let what it sent before be handled (bounded)
            await asyncio.wait({ws.handler}, timeout=timeout)
        for other in (reader, ws.handler):
            other.cancel()
        for other in (reader, ws.handler):
            with contextlib.suppress(asyncio.CancelledError):
                await other
        await manager.end(conn, ws.error)
