"""All tunables in one place, defaulting to ASP.NET Core SignalR's values."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

__all__ = ["HubOptions"]


def _detailed_errors_default() -> bool:
    """``HUBWIRE_DETAILED_ERRORS=1`` (``hubwire run --detailed-errors``) turns detailed errors on for
    development without editing the app; a value given in code still wins."""
    return os.environ.get("HUBWIRE_DETAILED_ERRORS", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(slots=True)
class HubOptions:
    """Server options. Defaults are SignalR's, so clients tuned for .NET servers behave the same.

    Times are seconds, sizes bytes; ``None`` means unlimited where allowed.
    """

    #: send a Ping when nothing else was sent for this long
    keep_alive_interval: float = 15.0
    #: close a connection that sent nothing for this long (armed after its first Ping)
    client_timeout_interval: float = 30.0
    #: the client must complete the hub handshake within this time
    handshake_timeout: float = 15.0
    #: largest single inbound hub message (also applies to the handshake)
    maximum_receive_message_size: int | None = 32 * 1024
    #: hub method calls a client may run at once; further calls wait (streams do not count)
    maximum_parallel_invocations_per_client: int = 1
    #: items buffered per client upload stream before reading from the connection pauses
    stream_buffer_capacity: int = 10
    #: add exception type and message to error texts sent to clients (and which argument did not
    #: bind); default from ``HUBWIRE_DETAILED_ERRORS`` - development only, it tells clients internals
    enable_detailed_errors: bool = field(default_factory=_detailed_errors_default)
    #: hub protocols offered, by name
    supported_protocols: tuple[str, ...] = ("json", "messagepack")
    #: transports offered by default (a hub may narrow this)
    transports: tuple[str, ...] = ("WebSockets", "ServerSentEvents", "LongPolling")
    #: a negotiated connection with no transport request in flight is dropped after this
    disconnect_timeout: float = 15.0
    #: long polling: answer an idle poll with an empty 200 after this long
    long_poll_timeout: float = 90.0
    #: unsent bytes allowed per connection before it is closed as a slow consumer
    max_buffered_bytes: int | None = 1024 * 1024
    #: WebSocket close handshake wait
    websocket_close_timeout: float = 5.0
    #: natively served WebSockets (``hubwire run``, the default serving mode): accept the
    #: permessage-deflate extension a client offers (browsers always do). Negotiated without
    #: per-socket compression state, so a broadcast is compressed once for every such socket.
    #: The ASGI serving mode never compresses
    websocket_compression: bool = True
    #: messages smaller than this many bytes are sent uncompressed (compressing them costs CPU
    #: and saves little); a message that compresses no smaller is sent uncompressed as well
    websocket_compression_threshold: int = 256
    #: lowest negotiate version accepted
    minimum_negotiate_version: int = 0
    #: connections one instance holds at most (negotiated or connected); past it negotiate answers
    #: 503 and transport requests for connections negotiated elsewhere are refused with 503
    max_connections: int | None = None
    #: per-connection hub invocations (and stream invocations) allowed per second, as a token
    #: bucket; over it the call fails with :data:`~hubwire.hubs.dispatcher.RATE_LIMITED` (None = off)
    max_invocations_per_second: float | None = None
    #: bucket size of the rate limit: calls allowed in a burst (default: one second's worth)
    invocation_burst: int | None = None
    #: browser origins allowed to use the hubs (``Origin`` header of negotiate, WebSocket
    #: upgrades, SSE and long polling); others get 403. Requests without ``Origin`` (non-browser
    #: clients) are not affected. ``None`` = no check
    allowed_origins: tuple[str, ...] | None = None
    #: groups one connection may be in at once; past it adding fails with a HubException
    max_groups_per_connection: int | None = 1000
    #: longest group name, in characters (names become Redis channel names)
    max_group_name_length: int = 1024
    #: server-to-client streams one connection may run at once; past it the call fails
    max_streams_per_connection: int | None = 100
    #: requests of one SSE / long-polling connection relayed to it from other instances at once;
    #: past it they get 429 (each holds a task and its body until answered)
    max_relayed_requests_per_connection: int = 8
    #: stateful reconnect (ASP.NET's ``AllowStatefulReconnects``, on here by default): a client
    #: that asks for it (``withStatefulReconnect()``) keeps its connection id, groups and every
    #: message across a dropped WebSocket, if it comes back within ``disconnect_timeout``
    allow_stateful_reconnect: bool = True
    #: stateful reconnect: unacknowledged bytes sent to a client past which further messages wait
    #: for its Acks (ASP.NET's ``StatefulReconnectBufferSize``); messages waiting beyond it count
    #: against ``max_buffered_bytes`` (the slow-consumer bound)
    stateful_reconnect_buffer_size: int = 100_000

    @property
    def replay_limits(self) -> tuple[int, int]:
        """A stateful connection's replay bounds: unacknowledged bytes sent, then bytes held
        (past which it is a slow consumer)."""
        size = self.stateful_reconnect_buffer_size
        return size, self.max_buffered_bytes or 10 * size

    def copy(self, **changes: object) -> HubOptions:
        """A copy with some options changed (per-hub overrides)."""
        return replace(self, **changes)  # type: ignore[arg-type]
