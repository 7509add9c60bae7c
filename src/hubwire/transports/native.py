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
* hub paths are admitted by the server's checks (auth, tokens, 404/409,
  through :class:`NativeGate`) exactly as on the ASGI path; frames are parsed
  by the sans-I/O :class:`~hubwire.protocol.websocket.ServerWebSocket` and
  outbound writes go through :class:`~hubwire.transports.direct.DirectSink`;
* an idle connection owns no task: inbound data starts a short-lived task
  that drains it, and reading pauses while that work is backed up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import logging
from typing import Any, Protocol
from urllib.parse import unquote

from ..connections.application import ConnectionApplication
from ..connections.connection import Connection, RequestInfo
from ..connections.inbox import Inbox
from ..connections.manager import ConnectionManager
from ..protocol.websocket import (
    CLOSE_INTERNAL_ERROR,
    CloseReceived,
    DataReceived,
    PingReceived,
    ServerWebSocket,
    negotiate_deflate,
)
from .direct import DirectSink, compression_stats

__all__ = ["CheckedWebSocketProtocol", "NativeGate", "NativeWebSocketProtocol"]

log = logging.getLogger("hubwire.websocket")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 16 * 1024
#: pongs are dropped while more than this waits unsent (a ping flood from a client that does not read)
_PONG_BACKLOG = 64 * 1024
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


class NativeGate(Protocol):
    """What native serving needs from the application: routes, admission, the connection manager.

    The server's HTTP dispatcher implements it and the ASGI app exposes it as
    ``native_gate``, so this module never imports the server.
    """

    connections: ConnectionManager

    def route(self, path: str) -> ConnectionApplication | None: ...

    async def admit_websocket(
        self, endpoint: ConnectionApplication, request: RequestInfo
    ) -> Connection | tuple[int, str]: ...

    async def ensure_started(self) -> None: ...

    def begin_drain(self) -> None: ...


def _find_gate(app: Any) -> NativeGate | None:
    """The gate of a hubwire app, possibly wrapped in middlewares that keep it as ``.app``."""
    for _ in range(10):
        gate = getattr(app, "native_gate", None)
        if gate is not None:
            return gate  # type: ignore[no-any-return]
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


@functools.lru_cache(maxsize=8)
def _proxy_headers_for(trusted: str) -> Any:
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    async def keep_scope(scope: Any, receive: Any, send: Any) -> None:
        """The middleware rewrites the scope in place, then calls this."""

    return ProxyHeadersMiddleware(keep_scope, trusted_hosts=trusted)


def _proxy_headers(trusted: str | list[str]) -> Any:
    """uvicorn's ProxyHeadersMiddleware for ``--forwarded-allow-ips``, built once per value."""
    return _proxy_headers_for(trusted if isinstance(trusted, str) else ",".join(trusted))


async def _no_receive() -> Any:  # pragma: no cover - the middleware never receives
    raise RuntimeError("no body")


async def _no_send(message: Any) -> None:  # pragma: no cover - the middleware never sends
    raise RuntimeError("no response")


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
        self._stage = _REQUEST
        self._buf = bytearray()
        self._gate: NativeGate | None = None
        self._endpoint: ConnectionApplication | None = None
        self._conn: Connection | None = None
        self._ws: ServerWebSocket | None = None
        #: our Close frame went out: no data frame may follow (read by the direct sink per flush)
        self.close_sent = False
        #: inbound data waiting for the application (created on demand: an idle connection has none)
        self._inbox: Inbox | None = None
        self._pump: asyncio.Task[None] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
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
        elif self._stage == _OPEN:
            assert self._ws is not None
            self._ws.receive_data(data)
            self._process()
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
        pump = self._pump
        # a client that closed cleanly (a Close frame) gets what it sent before processed, as in
        # ASP.NET; one that vanished does not (nothing it sent still needs handling)
        drain = pump is not None and self._ws is not None and self._ws.close_received
        if not drain:
            if self._inbox is not None:
                self._inbox.clear()
            if pump is not None:
                pump.cancel()
        conn = self._conn
        if stage == _OPEN and conn is not None and self._gate is not None:
            conn.outbox.sink = None
            if conn.carrier is self:
                conn.carrier = None
            if drain and pump is not None:
                self._gate.connections.tasks.spawn(self._end_after(pump, conn, exc), name="drain then end")
            elif conn.resumable and self._error is None and not self._closing_handshake():
                # stateful reconnect: dropped without a close handshake, the client may come back
                self._gate.connections.suspend(conn)
            else:
                self._gate.connections.end_soon(conn, self._error or exc)

    def _closing_handshake(self) -> bool:
        """A Close frame went either way: the WebSocket ended on purpose, not by a dropped socket."""
        ws = self._ws
        return ws is not None and (ws.close_received or ws.close_sent)

    def replaced(self) -> None:
        """Stateful reconnect: a new WebSocket resumed this connection before this one noticed
        its socket was gone. Stop serving it (what was received but not handled is dropped:
        the client resends it) and drop the socket; the connection lives on."""
        self._conn = None
        self._stage = _CLOSED
        if self._inbox is not None:
            self._inbox.clear()
        if self._pump is not None:
            self._pump.cancel()
        if self.transport is not None:
            self.transport.abort()

    async def _end_after(self, pump: asyncio.Task[None], conn: Connection, exc: Exception | None) -> None:
        """End ``conn`` once what arrived before the client's Close was handled (bounded)."""
        assert self._gate is not None and self._endpoint is not None
        timeout = self._endpoint.options.websocket_close_timeout
        try:
            await asyncio.wait_for(asyncio.shield(pump), timeout)
        except TimeoutError:
            pump.cancel()
        except Exception:  # the pump logs its own failures
            pass
        await self._gate.connections.end(conn, self._error or exc)

    def pause_writing(self) -> None:  # the slow-consumer bound is enforced on write
        if self._other is not None:
            self._other.pause_writing()

    def resume_writing(self) -> None:
        if self._other is not None:
            self._other.resume_writing()

    def shutdown(self) -> None:
        """uvicorn is stopping: start the server's drain, which lets this connection go when it
        can (a Close with reconnect allowed once its calls finished, or - stateful reconnect
        over a backplane - a dropped socket the client resumes elsewhere)."""
        if self._stage != _CLOSED and self._gate is not None:
            self._gate.begin_drain()  # one being admitted is refused (503) or, if resuming, drained
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
        gate = _find_gate(self.config.loaded_app) if self.serve_hubs else None
        endpoint = gate.route(unquote(path)) if gate is not None and method == "GET" else None
        if gate is None or endpoint is None:
            too_long = any(len(line) > _HANDOVER_MAX_LINE for line in lines)
            if too_long or len(lines) - 1 > _HANDOVER_MAX_HEADERS:
                # uvicorn's implementation would queue its 431 and never send it
                self._reply(431, "Request header fields too large")
                return
            self._hand_over()
            return
        self._gate, self._endpoint = gate, endpoint
        self._buf = bytearray(rest)
        transport = self.transport
        assert transport is not None
        transport.pause_reading()
        root_path = getattr(self.config, "root_path", "")
        scope = {
            "type": "websocket",
            "path": root_path + unquote(path),  # as uvicorn's own protocols give it (ASGI serving)
            "root_path": root_path,
            "query_string": query.encode("latin-1"),
            "headers": raw_headers,
            "scheme": "wss" if transport.get_extra_info("sslcontext") else "ws",
            "client": transport.get_extra_info("peername"),
        }
        gate.connections.tasks.spawn(self._admit(scope), name="admit websocket")

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

    async def _admit(self, scope: dict[str, Any]) -> None:
        gate, endpoint = self._gate, self._endpoint
        assert gate is not None and endpoint is not None
        if getattr(self.config, "proxy_headers", False):
            # uvicorn --proxy-headers: the client and scheme a trusted proxy forwarded, as uvicorn's
            # own middleware sets them for every other request
            await _proxy_headers(self.config.forwarded_allow_ips)(scope, _no_receive, _no_send)
        request = RequestInfo.from_scope(scope)
        headers = request.headers
        key = headers.get("sec-websocket-key")
        if (
            "websocket" not in headers.get("upgrade", "").lower()
            or headers.get("sec-websocket-version") != "13"
            or not key
        ):
            self._reply(400, "Invalid WebSocket upgrade request")
            return
        await gate.ensure_started()
        try:
            admitted = await gate.admit_websocket(endpoint, request)
        except Exception:
            log.exception("WebSocket admission failed")
            admitted = (500, "")
        resuming = isinstance(admitted, Connection) and admitted.application is endpoint
        if self.transport is None:  # the client went away meanwhile
            if resuming:
                assert isinstance(admitted, Connection)
                gate.connections.suspend(admitted)
            elif isinstance(admitted, Connection):
                gate.connections.end_soon(admitted)
            return
        if isinstance(admitted, tuple):
            self._reply(admitted[0], admitted[1])
            return
        self._open(endpoint, admitted, key, headers.get("sec-websocket-extensions"))
        try:
            if resuming:  # stateful reconnect: a started connection on a new WebSocket
                await endpoint.on_resume(admitted)
            else:
                await endpoint.on_connect(admitted)
        except Exception as exc:
            log.exception("on_connect failed for %s", admitted.connection_id)
            self._error = exc
            assert self._ws is not None
            self._ws.fail(CLOSE_INTERNAL_ERROR)
            self._process()
            return
        if self.transport is not None:
            self.transport.resume_reading()
            if self._buf:
                rest, self._buf = bytes(self._buf), bytearray()
                self.data_received(rest)

    def _open(
        self, endpoint: ConnectionApplication, conn: Connection, key: str, extensions: str | None
    ) -> None:
        """Answer 101 and start framing: the endpoint's own message size bounds a frame (and an
        inflated message); permessage-deflate if the client offered it and the options allow."""
        assert self.transport is not None
        accept = base64.b64encode(hashlib.sha1(key.encode("latin-1") + _GUID).digest()).decode()
        options = endpoint.options
        deflate = negotiate_deflate(extensions) if options.websocket_compression else None
        extra = f"Sec-WebSocket-Extensions: {deflate[0]}\r\n" if deflate is not None else ""
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept}\r\n{extra}\r\n"
            ).encode("latin-1")
        )
        self._conn = conn
        self._stage = _OPEN
        size = endpoint.max_receive_size()
        max_frame = max(4 * size, 64 * 1024) if size is not None else 16 * 1024 * 1024
        self._ws = ServerWebSocket(
            max_frame,
            validate_utf8=endpoint.validate_text,
            deflate=deflate[1] if deflate is not None else None,
        )
        conn.application = endpoint
        threshold = options.websocket_compression_threshold if deflate is not None else None
        conn.outbox.sink = DirectSink(self, conn, threshold)
        conn.carrier = self

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

    def _process(self) -> None:
        """Act on what the sans-I/O side parsed: deliver data, answer pings, close."""
        ws, transport = self._ws, self.transport
        assert ws is not None
        for event in ws.events_received():
            if isinstance(event, DataReceived):
                self._deliver(event.payload)
            elif isinstance(event, PingReceived):
                if transport is not None and transport.get_write_buffer_size() <= _PONG_BACKLOG:
                    ws.send_pong(event.payload)
            elif isinstance(event, CloseReceived):
                log.debug("client closed %s with %s", self._conn, event.code)
        if ws.compressed_received:
            compression_stats.inflated += ws.compressed_received
            ws.compressed_received = 0
        out = ws.data_to_send()
        self.close_sent = ws.close_sent
        if transport is None:
            return
        if out:
            transport.write(out)
        if ws.closing:
            transport.close()

    def _deliver(self, data: bytes) -> None:
        inbox = self._inbox
        if inbox is None:
            transport = self.transport
            assert transport is not None
            inbox = self._inbox = Inbox(transport.pause_reading, transport.resume_reading)
        inbox.put(data)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        endpoint, conn, inbox = self._endpoint, self._conn, self._inbox
        assert endpoint is not None and conn is not None and inbox is not None
        try:
            while True:  # after a clean Close too: what arrived before it is still handled
                data = inbox.get_nowait()
                if data is None:
                    break
                await endpoint.on_receive(conn, data)
        except Exception as exc:
            log.exception("connection %s failed while receiving", conn.connection_id)
            self._error = exc
            conn.abort("receive failed")
        finally:
            self._pump = None
            if self._inbox is inbox and not inbox:
                self._inbox = None  # drained: an idle connection keeps no inbox

    # -- called by DirectSink when the application closes the connection -------------------------

    def app_closed(self) -> None:
        """The outbox was closed and flushed: send our close frame, wait for the peer's, then drop."""
        transport, ws = self.transport, self._ws
        if transport is None or ws is None or ws.close_sent:
            return
        ws.send_close()
        self.close_sent = True
        transport.write(ws.data_to_send())
        endpoint = self._endpoint
        timeout = endpoint.options.websocket_close_timeout if endpoint is not None else 5.0
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
