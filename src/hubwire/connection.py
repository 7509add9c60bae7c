"""Connection layer: one logical client connection, independent of transport and hub protocol.

A :class:`Connection` is "a byte stream in, a byte stream out". Transports
(WebSockets, SSE, long polling) move bytes; the application on top (a hub, or a
raw handler such as an echo endpoint) parses them. Outbound bytes go through an
:class:`Outbox`: writing to it is a synchronous append, so a broadcast touching
thousands of connections does no awaiting and creates no task per recipient;
each transport drains its outbox in its own single writer loop, coalescing
whatever piled up into one frame / event / poll response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from .protocol.base import TransferFormat
from .tokens import TokenIssuer

__all__ = [
    "Connection",
    "ConnectionLayerStats",
    "ConnectionManager",
    "Outbox",
    "Principal",
    "RequestInfo",
    "stats",
]

log = logging.getLogger("hubwire.connection")


@dataclass(slots=True)
class Principal:
    """An authenticated user: the claims of their token and the id used by ``clients.user()``."""

    identifier: str | None
    claims: dict[str, Any] = field(default_factory=dict)

    def has_role(self, role: str) -> bool:
        """True when the ``role``/``roles`` claim (string or list) contains ``role``."""
        for key in ("role", "roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"):
            value = self.claims.get(key)
            if value == role or (isinstance(value, list) and role in value):
                return True
        return False


class RequestInfo:
    """The HTTP request that opened a transport: headers, query string, cookies.

    Header names are stored lower-case; query keys keep their case but
    :meth:`query_param` looks them up case-insensitively, as ASP.NET does.
    """

    __slots__ = ("client", "cookies", "headers", "path", "query", "scheme")

    def __init__(
        self,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        cookies: Mapping[str, str],
        scheme: str = "http",
        client: tuple[str, int] | None = None,
    ) -> None:
        self.path = path
        self.headers = dict(headers)
        self.query = dict(query)
        self.cookies = dict(cookies)
        self.scheme = scheme
        self.client = client

    @classmethod
    def from_scope(cls, scope: Mapping[str, Any]) -> RequestInfo:
        """Build from an ASGI ``http`` or ``websocket`` scope."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope.get("headers", ()):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        cookies: dict[str, str] = {}
        if "cookie" in headers:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except Exception:  # malformed cookie header: treat as no cookies
                jar = SimpleCookie()
            cookies = {k: morsel.value for k, morsel in jar.items()}
        client = scope.get("client")
        return cls(
            scope.get("path", ""),
            headers,
            query,
            cookies,
            scope.get("scheme", "http"),
            tuple(client) if client else None,
        )

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name, or None."""
        return self.headers.get(name.lower())

    def query_param(self, name: str) -> str | None:
        """A query parameter by case-insensitive name, or None."""
        if name in self.query:
            return self.query[name]
        lowered = name.lower()
        for key, value in self.query.items():
            if key.lower() == lowered:
                return value
        return None


class ConnectionLayerStats:
    """Process-wide counters of the connection layer (exported as metrics)."""

    __slots__ = ("slow_consumer_closes",)

    def __init__(self) -> None:
        self.slow_consumer_closes = 0


#: the process's connection-layer counters
stats = ConnectionLayerStats()


#: outboxes with a sink and unsent records, flushed together at the end of the loop iteration
_dirty: list[Outbox] = []


def _flush_dirty() -> None:
    """Hand every dirty outbox's records to its sink; one frame memo for the whole pass.

    A broadcast leaves the same bytes object in many outboxes, so the sink
    frames it once and writes the same frame to every socket.
    """
    batch = _dirty[:]
    _dirty.clear()
    memo: dict[int, tuple[bytes, bytes]] = {}
    for outbox in batch:
        sink = outbox.sink
        outbox.dirty = False
        if sink is not None and outbox._chunks:
            sink.flush(outbox, memo)


class Outbox:
    """Outbound bytes of one connection, drained by the transport's single writer loop.

    ``write`` never awaits: it appends and wakes the writer if it is idle.
    ``max_buffered`` bounds memory for slow consumers: once more than that many
    bytes wait while the writer is stuck sending earlier ones (or, for long
    polling, no poll is waiting), ``on_overflow`` is called and the owner closes
    the connection instead of growing without bound.
    """

    __slots__ = (
        "_chunks",
        "_closed",
        "_waiter",
        "_woken",
        "buffered",
        "dirty",
        "max_buffered",
        "on_overflow",
        "sent",
        "sent_bytes",
        "sink",
        "wrote",
    )

    def __init__(self, max_buffered: int | None = None) -> None:
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        #: the writer was woken and will take everything queued at its next step
        self._woken = False
        self._closed = False
        self.buffered = 0
        self.max_buffered = max_buffered
        self.on_overflow: Any = None
        #: set on every write; the heartbeat clears it to decide when a keep-alive ping is due
        self.wrote = False
        #: native mode: writes go to this sink once per loop iteration instead of the writer loop
        self.sink: Any = None
        self.dirty = False
        #: records and bytes queued so far (metrics: plain ints, summed at scrape time)
        self.sent = 0
        self.sent_bytes = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        """Queue bytes for the transport (dropped silently once the outbox is closed)."""
        if self._closed:
            return
        self._chunks.append(data)
        size = len(data)
        self.buffered += size
        self.sent += 1
        self.sent_bytes += size
        self.wrote = True
        if self.sink is not None:
            if not self.dirty:
                # native mode: flushed once per loop iteration, all dirty sockets in one pass
                self.dirty = True
                _dirty.append(self)
                if len(_dirty) == 1:
                    asyncio.get_running_loop().call_soon(_flush_dirty)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True
        # over the bound while the writer is busy (blocked sending earlier bytes to a client that
        # does not read) or absent (no long poll waiting): a slow consumer. Bytes written while
        # the writer is about to take them anyway (one burst) do not count.
        if (
            self.max_buffered is not None
            and self.buffered > self.max_buffered
            and not self._woken
            and self.on_overflow
        ):
            callback, self.on_overflow = self.on_overflow, None
            callback()

    def close(self) -> None:
        """No more writes; the writer drains what is queued, then sees the end."""
        sink = self.sink
        if sink is not None and not self._closed:
            if self._chunks:
                sink.flush(self)
            self._closed = True
            sink.closed()
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_nowait(self) -> list[bytes]:
        """Everything queued right now (possibly nothing)."""
        chunks = self._chunks
        self._chunks = []
        self.buffered = 0
        self._woken = False
        return chunks

    async def take(self) -> list[bytes] | None:
        """Wait for queued bytes and return them all; None once closed and drained."""
        while not self._chunks:
            if self._closed:
                return None
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        return self.take_nowait()

    async def wait_readable(self, timeout: float | None) -> bool:
        """Wait until something is queued or the outbox closes; False on timeout."""
        if self._chunks or self._closed:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            if self._waiter is waiter:
                self._waiter = None
            return False
        return True


class Connection:
    """One logical connection (what negotiate creates and a transport then carries).

    Holds the public ``connection_id``, the secret ``token`` that authorises
    transport requests, the request that opened the transport, the user, and
    the outbound :class:`Outbox`. ``items`` is free for the application.
    """

    def __init__(
        self,
        connection_id: str,
        token: str,
        negotiate_version: int,
        principal: Principal | None = None,
        max_buffered: int | None = None,
    ) -> None:
        self.connection_id = connection_id
        self.token = token
        self.negotiate_version = negotiate_version
        self.principal = principal
        self.outbox = Outbox(max_buffered)
        self.outbox.on_overflow = self._overflow
        self.transport_name: str | None = None
        self.transfer_format = TransferFormat.TEXT
        self._request: RequestInfo | None = None
        self.items: dict[Any, Any] = {}
        self.created = time.monotonic()
        #: time the connection last had no transport request in flight (None = active)
        self.inactive_since: float | None = self.created
        self.transport_active = False
        self.closed = asyncio.Event()
        self.abort_reason: str | None = None
        self.application_state: Any = None

    @property
    def request(self) -> RequestInfo | None:
        """The request that opened the transport, as hub code sees it.

        Its ``id`` query parameter is the connection id, never the secret
        token the client sent there (negotiate v1), so hub code cannot leak it.
        """
        return self._request

    @request.setter
    def request(self, request: RequestInfo | None) -> None:
        if request is not None and self.token != self.connection_id:
            query = {
                key: (self.connection_id if value == self.token else value)
                for key, value in request.query.items()
            }
            if query != request.query:
                request = RequestInfo(
                    request.path, request.headers, query, request.cookies, request.scheme, request.client
                )
        self._request = request

    def write(self, data: bytes) -> None:
        """Queue framed bytes for the client; never awaits."""
        self.outbox.write(data)

    def abort(self, reason: str | None = None) -> None:
        """End the connection from the server side (transports close once drained)."""
        if self.abort_reason is None:
            self.abort_reason = reason or "aborted"
        self.outbox.close()

    def _overflow(self) -> None:
        self.close_slow(f"{self.outbox.buffered} bytes unsent")

    def close_slow(self, detail: str) -> None:
        """End a connection whose client does not read fast enough (unsent bytes past the bound)."""
        if self.abort_reason is not None:
            return
        stats.slow_consumer_closes += 1
        log.warning(
            "closing slow consumer %s: %s",
            self.connection_id,
            detail,
            extra={"connection_id": self.connection_id, "event": "slow_consumer"},
        )
        self.abort("slow consumer")

    def __repr__(self) -> str:  # never show the token
        return f"<Connection {self.connection_id} {self.transport_name or '-'}>"


class ConnectionManager:
    """Registry of negotiated connections, looked up by their secret token.

    Connections that were negotiated but have no transport request in flight
    for longer than ``disconnect_timeout`` are disposed by :meth:`sweep`,
    which the server's heartbeat calls every second.
    """

    def __init__(self, disconnect_timeout: float = 15.0, issuer: TokenIssuer | None = None) -> None:
        self._by_token: dict[str, Connection] = {}
        #: tokens of ended connections, kept until they could no longer verify (no replays)
        self._retired: dict[str, float] = {}
        self.disconnect_timeout = disconnect_timeout
        self.issuer = issuer or TokenIssuer(max_age=disconnect_timeout + 15.0)

    def __len__(self) -> int:
        return len(self._by_token)

    def create(
        self,
        negotiate_version: int,
        principal: Principal | None = None,
        max_buffered: int | None = None,
    ) -> Connection:
        """A new connection with a fresh signed id and token (v0: the id doubles as the token)."""
        connection_id, token = self.issuer.issue(negotiate_version)
        conn = Connection(connection_id, token, negotiate_version, principal, max_buffered)
        self._by_token[token] = conn
        return conn

    def get(self, token: str) -> Connection | None:
        """A connection negotiated on this instance (or already taken over)."""
        return self._by_token.get(token)

    def resolve(self, token: str, max_buffered: int | None = None) -> Connection | None:
        """The connection for ``token``: local, or taken over from the instance that negotiated it.

        A token that another instance of the same app issued recently is
        verified by signature, and the connection is created here with the same
        id, so no sticky sessions are needed between negotiate and transport.
        """
        conn = self._by_token.get(token)
        if conn is not None:
            return conn
        if token in self._retired:
            return None
        verified = self.issuer.verify(token)
        if verified is None:
            return None
        conn = Connection(verified.connection_id, token, verified.negotiate_version, None, max_buffered)
        self._by_token[token] = conn
        return conn

    def remove(self, conn: Connection) -> None:
        if self._by_token.get(conn.token) is conn:
            del self._by_token[conn.token]
            self._retired[conn.token] = time.monotonic() + self.issuer.max_age + 5.0

    def connections(self) -> list[Connection]:
        return list(self._by_token.values())

    def sweep(self, now: float | None = None) -> list[Connection]:
        """Remove and return connections inactive for longer than the disconnect timeout."""
        now = time.monotonic() if now is None else now
        if self._retired:
            for token in [t for t, until in self._retired.items() if until < now]:
                del self._retired[token]
        expired = [
            c
            for c in self._by_token.values()
            if c.inactive_since is not None and now - c.inactive_since > self.disconnect_timeout
        ]
        for conn in expired:
            self.remove(conn)
        return expired
