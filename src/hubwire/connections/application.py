"""What runs on top of a connection's byte streams, as transports see it.

A transport starts the application with :meth:`ConnectionApplication.on_connect`
(or, for a connection resumed by stateful reconnect, :meth:`~ConnectionApplication.on_resume`),
hands it every inbound chunk with :meth:`~ConnectionApplication.on_receive`,
and the connection manager calls :meth:`~ConnectionApplication.on_disconnect`
exactly once when the connection is over. The hub layer implements this
interface; :class:`RawEndpoint` hands bytes to a plain handler (an echo
connection, a custom protocol). Transports never know which one they carry.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..options import HubOptions
from ..protocol.base import TransferFormat

if TYPE_CHECKING:
    from .connection import Connection, Principal

__all__ = ["ConnectionApplication", "Policy", "RawEndpoint", "check_policies"]

#: a policy gets the caller's principal (None when anonymous) and says yes or no
Policy = Callable[["Principal | None"], bool | Awaitable[bool]]


async def check_policies(principal: Principal | None, policies: tuple[Policy, ...]) -> bool:
    """True when the principal is authenticated and every policy agrees."""
    if principal is None:
        return False
    for policy in policies:
        verdict = policy(principal)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        if not verdict:
            return False
    return True


class ConnectionApplication(abc.ABC):
    """The application of one path: its transports, options and authorization."""

    #: transports this endpoint accepts
    transports: tuple[str, ...]
    #: options in force on this path (timeouts, sizes, limits)
    options: HubOptions
    #: path-level authorization (None = anonymous allowed)
    policies: tuple[Policy, ...] | None = None
    #: text frames are handed over unparsed, so WebSocket transports must check their UTF-8
    validate_text: bool = False
    #: a server's own endpoint (the dashboard's hub), not the app's: its connections and what they
    #: are sent are left out of the app's statistics
    internal: bool = False

    @abc.abstractmethod
    async def on_connect(self, conn: Connection) -> None:
        """The transport is up; bytes will follow."""

    @abc.abstractmethod
    async def on_receive(self, conn: Connection, data: bytes) -> None:
        """Inbound bytes (any chunking). Awaiting here applies back-pressure to the client."""

    @abc.abstractmethod
    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        """The connection is over (called exactly once per started connection)."""

    async def on_resume(self, conn: Connection) -> None:
        """A new transport carries a resumed connection (stateful reconnect); bytes will follow.

        Only connections the application made resumable (``conn.outbox.enable_replay``) are
        resumed, so an application that never does needs nothing here.
        """
        conn.abort("not resumable")

    # -- moving a resumable connection to another instance (stateful reconnect across instances) ----

    def export_for_move(self, conn: Connection) -> dict[str, Any] | str:
        """What another instance needs to carry ``conn`` on (plain MessagePack-able values),
        or why it cannot move (the client then starts a new connection)."""
        return "this path does not move connections"

    async def import_moved(self, conn: Connection, state: dict[str, Any]) -> None:
        """Carry on a connection moved here: register it (groups, user) before its replay arrives.

        Raises ``ValueError`` when ``state`` is not usable (it came from another instance)."""
        raise ValueError("this path does not move connections")

    # -- moving a connection between app servers (the connection service) ---------------------------

    def export_for_migration(self, conn: Connection) -> dict[str, Any] | str:
        """What the next app server needs of ``conn`` (its items), or why it cannot move now."""
        return "this path does not move connections"

    async def migrate_in(self, conn: Connection, state: dict[str, Any]) -> None:
        """Run a connection that moved here from another app server (its handshake was done there).

        Raises ``ValueError`` when ``state`` is not usable."""
        raise ValueError("this path does not move connections")

    async def refresh_moved(self, conn: Connection, state: dict[str, Any]) -> None:  # noqa: B027
        """The state at hand-over time (groups or items changed on the old holder meanwhile)."""

    async def release_moved(self, conn: Connection, parked: bool = False) -> None:  # noqa: B027
        """``conn`` moved to another instance (or, ``parked``, is kept as a record here until it
        is needed): unregister it here, without ``on_disconnect``."""

    async def abandon_moved(self, conn: Connection) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`import_moved` (the move failed half-way; the client starts afresh)."""

    async def finish_moved_in(  # noqa: B027 - optional hook
        self, conn: Connection, delivered: Collection[tuple[str, int, str]]
    ) -> None:
        """A connection moved here has its messages (see ``HubLifetimeManager.on_moved_in``)."""

    #: the name this path's messages carry on the backplane (None: no backplane)
    backplane_name: str | None = None

    def channels_of(self, connection_id: str, user: str | None, groups: Collection[str]) -> list[str]:
        """The backplane channels a connection of this path hears (durable resume reads them)."""
        return []

    def tick(self, now: float) -> None:  # noqa: B027 - optional hook
        """Called about once a second by the server heartbeat."""

    def server_closing(self, conn: Connection) -> None:
        """The server is shutting down: end ``conn`` (hubs invite the client to reconnect)."""
        conn.abort("server shutting down")

    def drain(self, conn: Connection, hand_over: Callable[[Connection], bool] | None, final: bool) -> bool:
        """The server is draining (a rolling deploy): let ``conn`` go when it can.

        True once it was let go (closed, or - ``hand_over(conn)`` - its transport stopped so
        the client resumes on another instance); False while work of it is in progress and
        should finish first (asked again shortly). ``final``: the drain deadline passed.
        """
        self.server_closing(conn)
        return True

    def max_receive_size(self) -> int | None:
        """Largest inbound message this application accepts (None = unlimited)."""
        return self.options.maximum_receive_message_size


class RawEndpoint(ConnectionApplication):
    """A connection without the hub protocol: ``handler(conn, data)`` gets every inbound chunk."""

    validate_text = True

    def __init__(
        self,
        handler: Callable[[Connection, bytes], Awaitable[None] | None],
        transports: Sequence[str],
        options: HubOptions,
        transfer_format: TransferFormat = TransferFormat.TEXT,
    ) -> None:
        self.handler = handler
        self.transports = tuple(transports)
        self.options = options
        self.transfer_format = transfer_format

    async def on_connect(self, conn: Connection) -> None:
        conn.transfer_format = self.transfer_format

    async def on_receive(self, conn: Connection, data: bytes) -> None:
        result: Any = self.handler(conn, data)
        if inspect.isawaitable(result):
            await result

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        return None
