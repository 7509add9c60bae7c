"""Native WebSocket serving for hub paths: hubwire speaks RFC 6455 itself, inside uvicorn.

Why: a WebSocket served through ASGI costs two tasks, an ASGI queue, the
websockets state machine and copies of the request per connection (~28 KB per
idle connection here), and every outbound frame goes through an ``await
send(...)``. For hub paths none of that is needed: inbound bytes are a plain
stream for the hub protocol, outbound records are pre-framed once per
broadcast. This protocol class plugs into uvicorn as its WebSocket
implementation (``hubwire run`` does it; under plain uvicorn pass
``--ws hubwire.transports.native:NativeWebSocketProtocol``):

* uvicorn still parses HTTP and hands over the upgrade request; every other
  WebSocket path (e.g. a FastAPI WebSocket route) is handed to uvicorn's own
  implementation unchanged, so apps keep all of ASGI;
* hub paths are admitted by :meth:`HubServer.admit_websocket` (auth, tokens,
  404/409) exactly as on the ASGI path, then frames are parsed here and
  outbound writes go through :class:`~hubwire.transports.direct.DirectSink`;
* an idle connection owns no task: inbound data starts a short-lived task
  that drains it, and reading pauses while that work is backed up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import struct
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from websockets.utils import apply_mask

from ..connection import Connection, RequestInfo
from .direct import DirectSink

if TYPE_CHECKING:
    from ..dispatcher import ConnectionApplication
    from ..server import HubServer

__all__ = ["CheckedWebSocketProtocol", "NativeWebSocketProtocol"]

log = logging.getLogger("hubwire.websocket")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 16 * 1024
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
#: what uvicorn's WebSocket implementation (the websockets library) accepts in a request head
_HANDOVER_MAX_LINE = 8192 - 2
_HANDOVER_MAX_HEADERS = 128
_STATUS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

_REQUEST, _OPEN, _CLOSED = 0, 1, 2


def _find_server(app: Any) -> HubServer | None:
    from ..server import HubServer

    for _ in range(10):
        if isinstance(app, HubServer):
            return app
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


def _close_frame(code: int, reason: str = "") -> bytes:
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class NativeWebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection on a hub path (or a hand-over to uvicorn's protocol)."""

    #: serve hub paths here; False hands every upgrade to uvicorn (after the request checks)
    serve_hubs = True

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.transport: asyncio.Transport | None = None
        self.close_sent = False
        self._stage = _REQUEST
        self._buf = bytearray()
        self._server: HubServer | None = None
        self._endpoint: ConnectionApplication | None = None
        self._conn: Connection | None = None
        self._inbox: deque[bytes] | None = None
        self._inbox_bytes = 0
        self._pump: asyncio.Task[None] | None = None
        self._paused = False
        self._in_message = False
        self._max_frame = 1024 * 1024
        self._close_timer: asyncio.TimerHandle | None = None
        #: a close frame was received or a protocol error seen: read no further frames
        self._closing = False
        self._error: BaseException | None = None
        #: uvicorn's protocol that serves a non-hub path after the hand-over
        self._other: Any = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server_state.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._other is not None:  # handed over (uvicorn may set us back as the protocol)
            self._other.data_received(data)
            return
        if self._stage == _OPEN:
            self._buf += data
            self._read_frames()
        elif self._stage == _REQUEST:
            self._buf += data
            self._read_request()

    def eof_received(self) -> bool | None:
        if self._other is not None:
            result: bool | None = self._other.eof_received()
            return result
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._other is not None:
            self._other.connection_lost(exc)
            return
        self.server_state.connections.discard(self)
        stage, self._stage = self._stage, _CLOSED
        self.transport = None
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._inbox:
            self._inbox.clear()
        conn = self._conn
        if stage == _OPEN and conn is not None and self._server is not None and self._endpoint is not None:
            conn.outbox.sink = None
            conn.outbox.close()
            task = asyncio.get_running_loop().create_task(
                self._server.connection_ended(self._endpoint, conn, self._error or exc)
            )
            self._server._tasks.add(task)
            task.add_done_callback(self._server._tasks.discard)

    def pause_writing(self) -> None:  # the slow-consumer bound is enforced on write
        if self._other is not None:
            self._other.pause_writing()

    def resume_writing(self) -> None:
        if self._other is not None:
            self._other.resume_writing()

    def shutdown(self) -> None:
        """uvicorn is stopping: ask the client to reconnect elsewhere (SignalR Close, then 1012)."""
        if self._stage == _OPEN and self._conn is not None and self._endpoint is not None:
            self._endpoint.server_closing(self._conn)
        elif self.transport is not None:
            self.transport.close()

    # -- handshake ---------------------------------------------------------------------------------

    def _read_request(self) -> None:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > _MAX_HEAD:
                self._reply(400, "Request header too large")
            return
        head = bytes(self._buf[:end]).decode("latin-1")
        rest = bytes(self._buf[end + 4 :])
        lines = head.split("\r\n")
        try:
            method, target, _ = lines[0].split(" ", 2)
        except ValueError:
            self._reply(400, "Bad request line")
            return
        raw_headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                raw_headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
        path, _, query = target.partition("?")
        if _has_body(raw_headers):
            # uvicorn's implementation would neither answer nor close such a request
            self._reply(400, "A WebSocket upgrade request has no body")
            return
        server = _find_server(self.config.loaded_app) if self.serve_hubs else None
        endpoint = server.route(unquote(path)) if server is not None and method == "GET" else None
        if server is None or endpoint is None:
            too_long = any(len(line) > _HANDOVER_MAX_LINE for line in lines)
            if too_long or len(lines) - 1 > _HANDOVER_MAX_HEADERS:
                # uvicorn's implementation would queue its 431 and never send it
                self._reply(431, "Request header fields too large")
                return
            self._hand_over()
            return
        self._server, self._endpoint = server, endpoint
        self._buf = bytearray(rest)
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        scope = {
            "path": unquote(path),
            "query_string": query.encode("latin-1"),
            "headers": raw_headers,
            "scheme": "wss" if transport.get_extra_info("sslcontext") else "ws",
            "client": transport.get_extra_info("peername"),
        }
        task = asyncio.get_running_loop().create_task(self._admit(RequestInfo.from_scope(scope)))
        server._tasks.add(task)
        task.add_done_callback(server._tasks.discard)

    def _hand_over(self) -> None:
        """Not a hub path: let uvicorn's own WebSocket implementation serve it."""
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

        other = WebSocketsSansIOProtocol(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        self.server_state.connections.discard(self)
        transport, self.transport, self._stage = self.transport, None, _CLOSED
        assert transport is not None
        other.connection_made(transport)
        # uvicorn sets this protocol on the transport after the request bytes were handed to it
        # (that is, after this returns), so keep forwarding to the new protocol as well
        self._other = other
        other.data_received(bytes(self._buf))
        transport.set_protocol(other)

    async def _admit(self, request: RequestInfo) -> None:
        server, endpoint = self._server, self._endpoint
        assert server is not None and endpoint is not None
        headers = request.headers
        key = headers.get("sec-websocket-key")
        if (
            "websocket" not in headers.get("upgrade", "").lower()
            or headers.get("sec-websocket-version") != "13"
            or not key
        ):
            self._reply(400, "Invalid WebSocket upgrade request")
            return
        if not server._started:
            await server.startup()
        try:
            admitted = await server.admit_websocket(endpoint, request)
        except Exception:
            log.exception("WebSocket admission failed")
            admitted = (500, "")
        if self.transport is None:  # the client went away meanwhile
            if isinstance(admitted, Connection):
                admitted.transport_active = False
                server.connections.remove(admitted)
            return
        if isinstance(admitted, tuple):
            self._reply(admitted[0], admitted[1])
            return
        conn = self._conn = admitted
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest()).decode()
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n\r\n"
            ).encode("latin-1")
        )
        self._stage = _OPEN
        size = server.options.maximum_receive_message_size
        self._max_frame = max(4 * size, 64 * 1024) if size is not None else 16 * 1024 * 1024
        conn.outbox.sink = DirectSink(self, conn)
        try:
            await endpoint.on_connect(conn)
        except Exception as exc:
            log.exception("on_connect failed for %s", conn.connection_id)
            self._error = exc
            self._fail(1011)
            return
        if self.transport is not None:
            self.transport.resume_reading()
            if self._buf:
                self._read_frames()

    def _reply(self, status: int, body: str) -> None:
        transport = self.transport
        if transport is None:
            return
        payload = body.encode()
        transport.write(
            (
                f"HTTP/1.1 {status} {_STATUS.get(status, 'Error')}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            + payload
        )
        self._stage = _CLOSED
        transport.close()

    # -- frames ------------------------------------------------------------------------------------

    def _read_frames(self) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2 and not self._closing:
            b0, b1 = buf[pos], buf[pos + 1]
            opcode = b0 & 0x0F
            if b0 & 0x70 or not b1 & 0x80:  # reserved bits (no extension) or an unmasked client frame
                self._fail(1002)
                return
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if length > self._max_frame:
                self._fail(1009)
                return
            end = pos + head + 4 + length
            if size < end:
                break
            mask = bytes(buf[pos + head : pos + head + 4])
            payload = apply_mask(bytes(buf[pos + head + 4 : end]), mask) if length else b""
            pos = end
            fin = b0 & 0x80
            if opcode in (1, 2):
                if self._in_message:
                    self._fail(1002)
                    return
                self._in_message = not fin
                if payload:
                    self._deliver(payload)
            elif opcode == 0:
                if not self._in_message:
                    self._fail(1002)
                    return
                self._in_message = not fin
                if payload:
                    self._deliver(payload)
            elif opcode >= 8:
                if not fin or length > 125:
                    self._fail(1002)
                    return
                if opcode == 8:
                    self._on_close(payload)
                    return
                if opcode == 9 and self.transport is not None and not self.close_sent:
                    self.transport.write(bytes((0x8A, len(payload))) + payload)
            else:
                self._fail(1002)
                return
        if pos:
            del buf[:pos]

    def _deliver(self, data: bytes) -> None:
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(data)
        self._inbox_bytes += len(data)
        if self._inbox_bytes > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        endpoint, conn, inbox = self._endpoint, self._conn, self._inbox
        assert endpoint is not None and conn is not None and inbox is not None
        try:
            while inbox and self._stage == _OPEN and not self._closing:
                data = inbox.popleft()
                self._inbox_bytes -= len(data)
                if self._paused and self._inbox_bytes < _LOW_WATER and self.transport is not None:
                    self._paused = False
                    self.transport.resume_reading()
                await endpoint.on_receive(conn, data)
        except Exception as exc:
            log.exception("connection %s failed while receiving", conn.connection_id)
            self._error = exc
            conn.abort("receive failed")
        finally:
            self._pump = None
            if self._inbox is not None and not self._inbox:
                self._inbox = None

    def _on_close(self, payload: bytes) -> None:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1000
        transport = self.transport
        if transport is None:
            return
        if not self.close_sent:
            self.close_sent = True
            reply = code if code in (1000, 1001) or 3000 <= code < 5000 else 1000
            transport.write(_close_frame(reply))
        self._closing = True
        transport.close()

    def _fail(self, code: int) -> None:
        """Protocol violation: close with ``code`` and drop the connection."""
        self._closing = True
        transport = self.transport
        if transport is None:
            return
        if not self.close_sent:
            self.close_sent = True
            transport.write(_close_frame(code))
        transport.close()

    # -- called by DirectSink when the application closes the connection -------------------------

    def app_closed(self) -> None:
        """The outbox was closed and flushed: send our close frame, wait for the peer's, then drop."""
        transport = self.transport
        if transport is None or self.close_sent:
            return
        self.close_sent = True
        transport.write(_close_frame(1000))
        timeout = self._server.options.websocket_close_timeout if self._server else 5.0
        self._close_timer = asyncio.get_running_loop().call_later(timeout, self._force_close)

    def _force_close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.abort()


class CheckedWebSocketProtocol(NativeWebSocketProtocol):
    """The ASGI serving mode: uvicorn's WebSocket implementation for every path, hub paths included,
    behind the request checks uvicorn's own implementation lacks (an upgrade with a body is
    answered 400 instead of being left hanging)."""

    serve_hubs = False
