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
from ..http import Receive, Scope, Send, abort_transport, close_frame_received
from ..protocol.base import TransferFormat
from .guard import SlowConsumerGuard

__all__ = ["FEATURES", "reject_websocket", "serve_websocket"]

log = logging.getLogger("hubwire.websocket")

#: a dropped WebSocket may be resumed (stateful reconnect), the only resumable transport as in ASP.NET
FEATURES = TransportFeatures("WebSockets", resumable=True)


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
        self,
        manager: ConnectionManager,
        endpoint: ConnectionApplication,
        conn: Connection,
        receive: Receive,
        send: Send,
    ) -> None:
        self.manager = manager
        self.endpoint = endpoint
        self.conn = conn
        #: the outbox epoch this request writes for (a resume elsewhere bumps it)
        self.epoch = conn.outbox.epoch
        #: stateful reconnect: the connection lives on without this request (suspended or resumed
        #: elsewhere), so this request neither closes nor ends it
        self.handoff = False
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
        clean = dropped = False
        try:
            while True:
                await self.room.wait()
                msg = await self.receive()
                kind = msg["type"]
                if kind == "websocket.disconnect":
                    clean = msg.get("code", 1005) in (1000, 1001)
                    dropped = not close_frame_received(self.receive, msg)
                    break
                if kind == "websocket.receive":
                    data = msg.get("bytes")
                    if data is None:
                        data = (msg.get("text") or "").encode("utf-8")
                    if data:
                        self.inbox.put(data)
        finally:
            self.client_closed.set()
            if self.handoff:
                pass  # resumed on another WebSocket: nothing here concerns the connection any more
            elif dropped and self.conn.resumable and self.error is None:
                self.suspend()
            elif clean and self.handler is not None and (self.inbox or self.handling):
                # a clean Close: what arrived before it is handled first (bounded), as in ASP.NET
                self.inbox.put(b"")  # the end mark
                self.draining = True
                timeout = self.endpoint.options.websocket_close_timeout
                self._give_up = asyncio.get_running_loop().call_later(timeout, self._stop_handling)
            else:
                self._stop_handling()  # the client vanished: nothing it sent still needs handling

    def suspend(self) -> None:
        """Stateful reconnect: the socket dropped; the connection waits for the client to resume it."""
        self.handoff = True
        self._stop_reading()
        self.manager.suspend(self.conn)

    def replaced(self) -> None:
        """A new WebSocket resumed the connection before this one noticed its socket was gone."""
        self.handoff = True
        self._stop_reading()
        abort_transport(self.send)

    def _stop_reading(self) -> None:
        """What arrived but was not handled is dropped (uncounted, the client sends it again)."""
        if self.handler is not None:
            self.handler.cancel()
        self.inbox.clear()

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
            chunks = await conn.outbox.take(self.epoch)
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
    resuming = conn.application is endpoint
    if message["type"] != "websocket.connect":
        # the client went away before the upgrade was accepted: as native serving does
        if resuming:
            manager.suspend(conn)
        else:
            manager.end_soon(conn)
        return
    await send({"type": "websocket.accept"})
    conn.application = endpoint
    ws = _AsgiWebSocket(manager, endpoint, conn, receive, send)
    conn.carrier = ws
    if resuming:  # stateful reconnect: a started connection on a new WebSocket
        await endpoint.on_resume(conn)
    else:
        await endpoint.on_connect(conn)
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
        if conn.resumable and ws.error is None and not ws.handoff:
            ws.suspend()
        else:
            ws.error = ws.error or exc
    finally:
        writing = False
        if conn.carrier is ws:
            conn.carrier = None
        if ws.handoff:
            guard.cancel()
            await _hand_off(ws, reader)
        else:
            await _close(manager, ws, reader, guard, close_code, dropped)


async def _close(
    manager: ConnectionManager,
    ws: _AsgiWebSocket,
    reader: asyncio.Task[None],
    guard: SlowConsumerGuard,
    close_code: int,
    dropped: bool,
) -> None:
    """The connection is over: close the WebSocket (bounded), stop the tasks, end the connection."""
    conn = ws.conn
    timeout = ws.endpoint.options.websocket_close_timeout
    conn.outbox.close()
    if not ws.client_closed.is_set() and not dropped:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.send({"type": "websocket.close", "code": close_code}), timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.client_closed.wait(), timeout)
    guard.cancel()
    handler = ws.handler
    assert handler is not None
    if ws.draining:  # the client closed cleanly: let what it sent before be handled (bounded)
        await asyncio.wait({handler}, timeout=timeout)
    for other in (reader, handler):
        other.cancel()
    for other in (reader, handler):
        with contextlib.suppress(asyncio.CancelledError):
            await other
    await manager.end(conn, ws.error)


async def _hand_off(ws: _AsgiWebSocket, reader: asyncio.Task[None]) -> None:
    """Stateful reconnect: the connection lives on elsewhere; end only this request's tasks."""
    if not ws.client_closed.is_set():
        abort_transport(ws.send)
    tasks = [task for task in (reader, ws.handler) if task is not None]
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
