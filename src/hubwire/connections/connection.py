"""One logical client connection, independent of transport and hub protocol.

A :class:`Connection` is "a byte stream in, a byte stream out". Transports
(WebSockets, SSE, long polling) move bytes; the application on top (a hub, or a
raw handler such as an echo endpoint) parses them. Outbound bytes go through an
:class:`~hubwire.connections.outbox.Outbox`. Its life (status, registry,
disposal) belongs to :class:`~hubwire.connections.manager.ConnectionManager`
alone; transports and applications ask the manager, never change the status.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from typing import Any, Protocol
from urllib.parse import parse_qsl

from ..protocol.base import TransferFormat
from .outbox import Outbox

__all__ = [
    "Carrier",
    "Connection",
    "ConnectionLayerStats",
    "ConnectionStatus",
    "DoneFlag",
    "Principal",
    "RequestInfo",
    "TransportFeatures",
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


class Carrier(Protocol):
    """The transport request serving a connection, as the connection manager sees it."""

    def replaced(self) -> None:
        """A new request resumed the connection: stop serving it and drop the socket, without
        ending or suspending the connection."""


class DoneFlag:
    """Set once, when the connection is over: ``set`` / ``is_set`` / ``await wait()`` as an
    :class:`asyncio.Event`, whose waiter deque (~0.8 KB) is made only if someone waits. Why: a
    server holding ten thousand idle connections (an app server of the connection service) pays
    for each one's flags."""

    __slots__ = ("_event", "_set")

    def __init__(self) -> None:
        self._set = False
        self._event: asyncio.Event | None = None

    def set(self) -> None:
        self._set = True
        if self._event is not None:
            self._event.set()

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> bool:
        if not self._set:
            if self._event is None:
                self._event = asyncio.Event()
            await self._event.wait()
        return True


class ConnectionStatus(enum.Enum):
    """Where a connection is in its life (changed only by the connection manager)."""

    #: negotiated or taken over; no transport has started it yet
    NEW = "new"
    #: a transport request is in flight (a WebSocket, an SSE stream, a waiting long poll)
    ACTIVE = "active"
    #: between HTTP requests (long polling between polls), or a stateful-reconnect WebSocket that
    #: dropped: disposed after the disconnect timeout unless a request (a resume) comes
    INACTIVE = "inactive"
    #: being ended: the application's disconnect handling runs
    ENDING = "ending"
    #: over for good
    DISPOSED = "disposed"


@dataclass(frozen=True, slots=True)
class TransportFeatures:
    """What a transport can do, declared by the transport so applications never check its name.

    ``inherent_keep_alive``: the transport itself shows the client is there
    (long polling polls), so no keep-alive pings are sent on it;
    ``binary``: it carries binary frames (SSE is text-only);
    ``resumable``: a connection that dropped may be resumed on a new request
    of this transport (stateful reconnect: WebSockets only, as in ASP.NET).
    """

    name: str
    inherent_keep_alive: bool = False
    binary: bool = True
    resumable: bool = False


class Connection:
    """One logical connection (what negotiate creates and a transport then carries).

    Holds the public ``connection_id``, the secret ``token`` that authorises
    transport requests, the request that opened the transport, the user, and
    the outbound :class:`~hubwire.connections.outbox.Outbox`. ``items`` is free
    for the application.
    """

    __slots__ = (
        "_request",
        "abort_reason",
        "application",
        "application_state",
        "carrier",
        "closed",
        "connection_id",
        "created",
        "features",
        "inactive_since",
        "items",
        "migrate",
        "negotiate_version",
        "outbox",
        "principal",
        "stateful",
        "status",
        "token",
        "transfer_format",
        "transport_state",
    )

    def __init__(
        self,
        connection_id: str,
        token: str,
        negotiate_version: int,
        principal: Principal | None = None,
        max_buffered: int | None = None,
        stateful: bool = False,
    ) -> None:
        self.connection_id = connection_id
        self.token = token
        self.negotiate_version = negotiate_version
        self.principal = principal
        self.outbox = Outbox(max_buffered)
        self.outbox.on_overflow = self._overflow
        self.status = ConnectionStatus.NEW
        #: declared by the transport that started the connection (None until then)
        self.features: TransportFeatures | None = None
        self.transfer_format = TransferFormat.TEXT
        self._request: RequestInfo | None = None
        self.items: dict[Any, Any] = {}
        self.created = time.monotonic()
        #: time the connection last had no transport request in flight (None = active)
        self.inactive_since: float | None = self.created
        self.closed = DoneFlag()
        self.abort_reason: str | None = None
        #: what runs on the connection (set when its transport starts it), and its state there
        self.application: Any = None
        self.application_state: Any = None
        #: state a transport keeps across its HTTP requests (SSE / long polling)
        self.transport_state: Any = None
        #: negotiate granted stateful reconnect (the hub handshake switches it on, version >= 2)
        self.stateful = stateful
        #: the transport request serving the connection now (WebSockets), told to stop when a
        #: stateful-reconnect resume replaces it before it noticed its socket was gone
        self.carrier: Carrier | None = None
        #: set by the connection service's link: moves the connection to another app server
        #: (a draining one lets go of it when nothing of it runs); True once it did
        self.migrate: Callable[[], bool] | None = None

    @property
    def transport_name(self) -> str | None:
        """``WebSockets``, ``ServerSentEvents`` or ``LongPolling`` once a transport started it."""
        features = self.features
        return features.name if features is not None else None

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

    def write_control(self, data: bytes) -> None:
        """Queue framed bytes that stateful reconnect neither numbers nor replays (handshake, Close)."""
        self.outbox.write_control(data)

    @property
    def resumable(self) -> bool:
        """A new transport request may resume this connection (stateful reconnect is on for it)."""
        return self.outbox.replay is not None and not self.outbox.closed

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
        return f"<Connection {self.connection_id} {self.transport_name or '-'} {self.status.value}>"
