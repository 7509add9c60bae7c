"""The connection manager: the one owner of every connection's life on this instance.

Shaped after ASP.NET Core's ``HttpConnectionManager``: it creates connections
(negotiate), resolves tokens (including connections negotiated on another
instance of the app), moves each connection through its
:class:`~hubwire.connections.connection.ConnectionStatus`
(New -> Active <-> Inactive -> Ending -> Disposed), ends each exactly once
(whoever notices first: a transport loop, a long poll, DELETE, the sweep), and
sweeps connections that have had no transport request for longer than the
disconnect timeout. Transports get this object, never the server.

Stateful reconnect: a resumable connection whose WebSocket dropped without a
close handshake is *suspended* (Inactive, its messages kept) instead of ended;
a new WebSocket with its token *resumes* it (replacing the old transport if
that is still there); the sweep ends it when the disconnect timeout passes
first, or as soon as it is aborted meanwhile.

Connections are indexed by connection id. A token is accepted only in the
exact spelling it was issued in, so one leaked token cannot start a second
connection with the same id next to the first.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable

from .connection import Connection, ConnectionStatus, Principal, RequestInfo, TransportFeatures
from .tasks import BackgroundTasks
from .tokens import TokenIssuer, VerifiedToken

__all__ = ["ConnectionManager"]

log = logging.getLogger("hubwire.connection")

_OVER = (ConnectionStatus.ENDING, ConnectionStatus.DISPOSED)


class ConnectionManager:
    """Registry and lifetime of the connections held (or negotiated) here."""

    def __init__(
        self,
        disconnect_timeout: float = 15.0,
        issuer: TokenIssuer | None = None,
        max_buffered: int | None = None,
        tasks: BackgroundTasks | None = None,
    ) -> None:
        self._by_id: dict[str, Connection] = {}
        #: ids of ended connections, kept until their tokens could no longer verify (no replays)
        self._retired: dict[str, float] = {}
        self.disconnect_timeout = disconnect_timeout
        self.max_buffered = max_buffered
        self.issuer = issuer or TokenIssuer(max_age=disconnect_timeout + 15.0)
        self.tasks = tasks or BackgroundTasks()
        #: called (synchronously) when a connection starts ending (the backplane stops relaying to it)
        self.on_end: list[Callable[[Connection], None]] = []
        #: what ended connections sent (records, bytes), for metrics; internal endpoints' not counted
        self.retired_sent = [0, 0]

    def __len__(self) -> int:
        return len(self._by_id)

    def connections(self) -> list[Connection]:
        return list(self._by_id.values())

    # -- creation and lookup -----------------------------------------------------------------------

    def create(
        self, negotiate_version: int, principal: Principal | None = None, stateful: bool = False
    ) -> Connection:
        """A new connection with a fresh signed id and token (v0: the id doubles as the token).

        ``stateful``: negotiate granted stateful reconnect (v1 only; the token says so too).
        """
        stateful = stateful and negotiate_version > 0
        connection_id, token = self.issuer.issue(negotiate_version, stateful=stateful)
        conn = Connection(connection_id, token, negotiate_version, principal, self.max_buffered, stateful)
        self._by_id[connection_id] = conn
        return conn

    def register_linked(self, connection_id: str, principal: Principal | None) -> Connection:
        """A connection a service node opened on this app server (its id is the node's).

        It has no token of its own here: only its link reaches it.
        """
        conn = Connection(connection_id, connection_id, 1, principal, self.max_buffered)
        self._by_id[connection_id] = conn
        return conn

    def get(self, token: str) -> Connection | None:
        """The connection registered here for exactly this token, or None."""
        verified = self.issuer.verify(token, check_age=False)
        if verified is None:
            return None
        conn = self._by_id.get(verified.connection_id)
        if conn is None or not hmac.compare_digest(conn.token, token):
            return None
        return conn

    def resolve(self, token: str) -> Connection | None:
        """The connection for ``token``: held here, or taken over from the instance that negotiated it.

        A token that another instance of the same app issued recently is
        verified by signature and the connection is created here with the same
        id, so no sticky sessions are needed between negotiate and transport.
        """
        verified = self.issuer.verify(token)
        if verified is None:
            return self.get(token)  # older than the take-over window, but negotiated here
        conn = self._by_id.get(verified.connection_id)
        if conn is not None:
            return conn if hmac.compare_digest(conn.token, token) else None
        if verified.connection_id in self._retired:
            return None
        conn = Connection(
            verified.connection_id,
            token,
            verified.negotiate_version,
            None,
            self.max_buffered,
            verified.stateful,
        )
        self._by_id[conn.connection_id] = conn
        return conn

    def lookup(self, connection_id: str) -> Connection | None:
        """The connection registered here under ``connection_id`` (for the backplane; no token check)."""
        return self._by_id.get(connection_id)

    def is_live(self, conn: Connection) -> bool:
        """True while ``conn`` is registered here and is not ending or over."""
        return self._by_id.get(conn.connection_id) is conn and conn.status not in _OVER

    # -- status ------------------------------------------------------------------------------------

    def activate(
        self,
        conn: Connection,
        features: TransportFeatures,
        request: RequestInfo,
        principal: Principal | None = None,
    ) -> None:
        """A transport starts carrying ``conn``: its request becomes the connection's request."""
        conn.features = features
        conn.status = ConnectionStatus.ACTIVE
        conn.inactive_since = None
        conn.request = request
        if principal is not None:
            conn.principal = principal

    def mark_active(self, conn: Connection) -> None:
        """A transport request of ``conn`` is in flight again (a new long poll)."""
        if self.is_live(conn):
            conn.status = ConnectionStatus.ACTIVE
            conn.inactive_since = None

    def mark_inactive(self, conn: Connection) -> None:
        """No transport request of ``conn`` is in flight; the disconnect timeout starts."""
        if self.is_live(conn):
            conn.status = ConnectionStatus.INACTIVE
            conn.inactive_since = time.monotonic()

    def suspend(self, conn: Connection) -> None:
        """The WebSocket of a resumable connection dropped without a close handshake.

        The connection stays (Inactive: groups, user, running calls, and every
        message sent to it, kept for the replay) until a new WebSocket resumes
        it or the disconnect timeout ends it. ``on_disconnected`` does not run.
        """
        if not self.is_live(conn):
            return
        conn.carrier = None
        conn.outbox.detach()
        self.mark_inactive(conn)

    def hand_over(self, conn: Connection) -> bool:
        """Draining: drop the WebSocket of a resumable connection without a Close, so that its
        client resumes on another instance (which takes the connection over from this one).

        Like a dropped network: the connection stays here, suspended, with its messages kept,
        until it moves or the disconnect timeout ends it. False if no transport carries it.
        """
        if not self.is_live(conn) or conn.carrier is None or conn.outbox.replay is None:
            return False
        self._unplug(conn)
        self.mark_inactive(conn)
        return True

    def _unplug(self, conn: Connection) -> None:
        """Stop the transport still serving ``conn`` (if any) and keep its messages for the next one."""
        carrier, conn.carrier = conn.carrier, None
        if carrier is not None:
            try:
                carrier.replaced()
            except Exception:
                log.exception("stopping the transport of %s failed", conn.connection_id)
        conn.outbox.detach()

    def resume(self, conn: Connection, request: RequestInfo, principal: Principal | None) -> None:
        """A new WebSocket with ``conn``'s token carries it again (checked by the caller).

        A transport still serving it (the client saw the drop before the
        server did) is told to stop first; its bytes in flight are dropped and
        the replay resends them. ``request`` is not taken as the connection's:
        hub code keeps seeing the request that started it.
        """
        self._unplug(conn)
        conn.status = ConnectionStatus.ACTIVE
        conn.inactive_since = None
        if principal is not None:
            conn.principal = principal  # the same user (checked), perhaps with fresher claims
        log.debug("resuming %s from %s", conn.connection_id, request.client)

    # -- moving between instances (stateful reconnect across instances) -----------------------------

    def resumable_token(self, token: str) -> VerifiedToken | None:
        """What ``token`` says when it is validly signed and its connection may resume, at any age,
        unless it ended here (then it is over everywhere).

        Why any age: a resume is not a start, and a connection may live for hours.
        """
        verified = self.issuer.verify(token, check_age=False)
        if verified is None or not verified.stateful or verified.connection_id in self._retired:
            return None
        return verified

    def freeze(self, conn: Connection) -> None:
        """``conn`` is being moved to another instance: stop its transport, keep what is sent to it.

        Its messages are kept and tagged (the new owner drops the copies it got
        itself), and the sweep leaves it alone until :meth:`release` or :meth:`thaw`.
        """
        self._unplug(conn)
        conn.outbox.tags = []
        conn.status = ConnectionStatus.INACTIVE
        conn.inactive_since = None  # not swept while moving

    def thaw(self, conn: Connection) -> None:
        """The move did not happen: ``conn`` is suspended here again (the disconnect timeout runs)."""
        conn.outbox.tags = None
        if self.is_live(conn) and self._by_id.get(conn.connection_id) is conn:
            self.mark_inactive(conn)

    def release(self, conn: Connection, forward: Callable[[bytes], None]) -> None:
        """``conn`` moved to another instance: forget it here without ending it.

        No ``on_disconnect``: the connection lives on elsewhere. Its id is not
        retired, so it may come back here by the same route. What hub code
        still running here writes to it goes to ``forward``.
        """
        if self._by_id.get(conn.connection_id) is conn:
            del self._by_id[conn.connection_id]
        conn.outbox.moved(forward)
        conn.status = ConnectionStatus.DISPOSED
        conn.inactive_since = None
        conn.closed.set()

    def forget(self, conn: Connection) -> None:
        """A linked connection parked by its app server: it lives on as a compact record there
        (it comes back through :meth:`register_linked`); no end, no hooks. Its outbox stays open:
        hub code still holding these objects writes through the sink its app server gave it."""
        if self._by_id.get(conn.connection_id) is conn:
            del self._by_id[conn.connection_id]
        conn.outbox.on_overflow = None  # (a bound method of conn: a cycle that only the GC breaks)
        conn.status = ConnectionStatus.DISPOSED
        conn.closed.set()

    def adopt(self, verified: VerifiedToken, token: str, principal: Principal | None) -> Connection:
        """A connection moving here from another instance, registered before its state arrives.

        A stale entry for the same id (negotiated here, started elsewhere) is replaced.
        """
        conn = Connection(
            verified.connection_id, token, verified.negotiate_version, principal, self.max_buffered, True
        )
        conn.inactive_since = None  # not swept while its state arrives
        self._by_id[conn.connection_id] = conn
        return conn

    def drop_adopted(self, conn: Connection) -> None:
        """The move failed before the connection was served here: forget it (nothing started)."""
        if self._by_id.get(conn.connection_id) is conn:
            del self._by_id[conn.connection_id]
        conn.outbox.close()
        conn.status = ConnectionStatus.DISPOSED
        conn.closed.set()

    # -- the end -----------------------------------------------------------------------------------

    async def end(self, conn: Connection, error: BaseException | None = None) -> None:
        """``conn`` is over for good: dispose it and tell its application, exactly once.

        Called by whichever notices first; later calls return at once.
        """
        if self._begin_end(conn):
            await self._finish_end(conn, error)

    def end_soon(self, conn: Connection, error: BaseException | None = None) -> None:
        """:meth:`end` from synchronous code (the status changes now, the application hears soon)."""
        if self._begin_end(conn):
            self.tasks.spawn(self._finish_end(conn, error), name=f"end {conn.connection_id}")

    def _begin_end(self, conn: Connection) -> bool:
        if conn.status in _OVER:
            return False
        conn.status = ConnectionStatus.ENDING
        conn.inactive_since = None
        for hook in self.on_end:
            try:
                hook(conn)
            except Exception:
                log.exception("connection end hook failed for %s", conn.connection_id)
        if self._by_id.get(conn.connection_id) is conn:
            del self._by_id[conn.connection_id]
            self._retired[conn.connection_id] = time.monotonic() + self.issuer.max_age + 5.0
        conn.outbox.close()
        conn.transport_state = None
        if conn.application is None or not conn.application.internal:  # not the server's own pages
            self.retired_sent[0] += conn.outbox.sent
            self.retired_sent[1] += conn.outbox.sent_bytes
        return True

    async def _finish_end(self, conn: Connection, error: BaseException | None) -> None:
        try:
            if conn.application is not None:
                await conn.application.on_disconnect(conn, error)
        finally:
            conn.status = ConnectionStatus.DISPOSED
            conn.outbox.on_overflow = None  # (a bound method of conn: a cycle only the GC breaks)
            conn.closed.set()

    def abort_all(self, reason: str) -> None:
        """Abort every connection (shutdown); those no transport request serves end now."""
        for conn in list(self._by_id.values()):
            conn.abort(reason)
            if conn.status in (ConnectionStatus.NEW, ConnectionStatus.INACTIVE):
                self.end_soon(conn)

    def sweep(self, now: float | None = None) -> list[Connection]:
        """End connections without a transport request for longer than the disconnect timeout.

        A connection whose transport is still running (a WebSocket, an SSE
        stream) is only aborted: its transport loop notices and ends it. A
        suspended connection (stateful reconnect) that was aborted meanwhile (the
        app, a slow consumer) ends at once: nothing could resume it.
        """
        now = time.monotonic() if now is None else now
        if self._retired:
            for connection_id in [c for c, until in self._retired.items() if until < now]:
                del self._retired[connection_id]
        timeout = self.disconnect_timeout
        expired = [
            c
            for c in self._by_id.values()
            if c.inactive_since is not None
            and (now - c.inactive_since > timeout or (c.outbox.detached and c.outbox.closed))
        ]
        for conn in expired:
            log.debug("disposing inactive connection %s", conn.connection_id)
            conn.abort("inactive")
            self.end_soon(conn)
        return expired
