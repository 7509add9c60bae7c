"""Per-connection hub state and what hub methods see as ``self.context``."""

from __future__ import annotations

import asyncio
import contextvars
from typing import TYPE_CHECKING, Any

from ..connections.connection import Connection, Principal, RequestInfo
from ..connections.replay import TRACKABLE
from ..protocol.base import HubProtocol
from ..protocol.messages import CloseMessage, HubMessage

if TYPE_CHECKING:
    from .streams import UploadStream

__all__ = ["HubCallerContext", "HubConnectionContext", "current_connection"]

#: the connection whose hub method is running in this task (for client-result checks)
current_connection: contextvars.ContextVar[HubConnectionContext | None] = contextvars.ContextVar(
    "hubwire_current_connection", default=None
)


class HubConnectionContext:
    """One connection as the hub layer sees it: protocol, user, groups, running work.

    This is the single owner of a connection's hub state (groups, user,
    pending invocations, streams), so a later step can persist or move it.
    """

    __slots__ = (
        "active_streams",
        "binding_logged",
        "connection",
        "connection_id",
        "disconnected",
        "first_ping_seen",
        "forged_logged",
        "groups",
        "handshake_version",
        "invocation_slots",
        "last_write",
        "max_group_name_length",
        "max_groups",
        "max_parallel",
        "max_streams",
        "migrated_from",
        "outbox",
        "protocol",
        "protocol_name",
        "rate_stamp",
        "rate_tokens",
        "received",
        "received_since_tick",
        "running",
        "upload_streams",
        "user_identifier",
    )

    def __init__(
        self,
        connection: Connection,
        protocol: HubProtocol,
        handshake_version: int,
        max_parallel_invocations: int,
    ) -> None:
        self.connection = connection
        self.connection_id = connection.connection_id
        #: the connection's outbox and protocol name, kept here for the per-recipient delivery loops
        self.outbox = connection.outbox
        self.protocol = protocol
        self.protocol_name = protocol.name
        self.handshake_version = handshake_version
        principal = connection.principal
        self.user_identifier = principal.identifier if principal else None
        self.groups: set[str] = set()
        #: set before ``on_disconnected`` runs: no hub method may start after it
        self.disconnected = False
        self.active_streams: dict[str, asyncio.Task[None]] = {}
        self.upload_streams: dict[str, UploadStream] = {}
        self.max_parallel = max_parallel_invocations
        #: per-connection limits (HubOptions), set by the connection handler
        self.max_groups: int | None = None
        self.max_group_name_length = 1024
        self.max_streams: int | None = None
        self.invocation_slots = asyncio.Semaphore(max_parallel_invocations)
        #: hub methods running for this connection (a draining server lets them finish first)
        self.running = 0
        self.last_write = 0.0
        self.first_ping_seen = False
        self.forged_logged = False
        self.binding_logged = False
        self.received = 0.0
        self.received_since_tick = True
        #: invocation rate limit (token bucket): tokens left and when they were last counted
        self.rate_tokens = 0.0
        self.rate_stamp = 0.0
        #: the app server this connection moved from (the connection service), None otherwise
        self.migrated_from: str | None = None

    def write(self, data: bytes) -> None:
        """Queue already-framed bytes (for this connection's protocol)."""
        self.outbox.write(data)

    def write_message(self, message: HubMessage) -> None:
        """Frame one message with this connection's protocol and queue it.

        Trackable messages (types 1-5) go through the outbox's numbering when
        stateful reconnect is on; the others are control messages.
        """
        data = self.protocol.write_message(message)
        if message.type in TRACKABLE:
            self.outbox.write(data)
        else:
            self.outbox.write_control(data)

    @property
    def busy(self) -> bool:
        """A hub method or a stream of this connection is in progress (its result has not gone out)."""
        return bool(self.running or self.active_streams or self.upload_streams)

    def close(self, error: str | None = None, allow_reconnect: bool = False) -> None:
        """Send a Close message and end the connection once it is flushed."""
        if not self.connection.outbox.closed:
            self.write_message(CloseMessage(error=error, allow_reconnect=allow_reconnect))
        self.connection.abort(error or "closed")


class HubCallerContext:
    """``self.context`` inside a hub: who is calling and over what request.

    ``items`` persists for the connection's lifetime (per-connection state for
    hub code); ``abort()`` ends the connection without allowing reconnect.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: HubConnectionContext) -> None:
        self._conn = conn

    @property
    def connection_id(self) -> str:
        return self._conn.connection_id

    @property
    def user_identifier(self) -> str | None:
        return self._conn.user_identifier

    @property
    def user(self) -> Principal | None:
        return self._conn.connection.principal

    @property
    def claims(self) -> dict[str, Any]:
        principal = self._conn.connection.principal
        return principal.claims if principal else {}

    @property
    def items(self) -> dict[Any, Any]:
        return self._conn.connection.items

    @property
    def request(self) -> RequestInfo | None:
        """The transport request (WebSocket upgrade, SSE GET or first long poll)."""
        return self._conn.connection.request

    @property
    def headers(self) -> dict[str, str]:
        req = self._conn.connection.request
        return req.headers if req else {}

    @property
    def query(self) -> dict[str, str]:
        req = self._conn.connection.request
        return req.query if req else {}

    @property
    def cookies(self) -> dict[str, str]:
        req = self._conn.connection.request
        return req.cookies if req else {}

    @property
    def transport(self) -> str | None:
        """``WebSockets``, ``ServerSentEvents`` or ``LongPolling``."""
        return self._conn.connection.transport_name

    @property
    def protocol(self) -> str:
        return self._conn.protocol.name

    @property
    def migrated_from(self) -> str | None:
        """The app server this connection ran on before (connection service), else None.

        A connection moved off a draining app server keeps its id, user, groups and items
        and ``on_connected`` does not run again; after an app server crash the items are lost
        and ``on_connected`` runs again with this set.
        """
        return self._conn.migrated_from

    def abort(self) -> None:
        """Close this connection now (the client is not invited to reconnect)."""
        self._conn.close(None, allow_reconnect=False)
