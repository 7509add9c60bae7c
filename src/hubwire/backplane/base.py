"""What a backplane is to the server, and the in-memory one.

Every capability the server uses is declared here with a default, so the
server never probes a backplane with ``getattr``: creating each hub's
lifetime manager, relaying SSE / long-polling requests to the instance that
holds a connection, agreeing on the key that signs connection tokens,
claiming connection starts, asking every instance (inspection, presence),
and reporting health.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..connections.application import ConnectionApplication
from ..connections.connection import Principal, RequestInfo
from ..connections.manager import ConnectionManager
from ..hubs.lifetime import HubLifetimeManager, InMemoryLifetimeManager
from ..transports.relayed import RequestRelay

if TYPE_CHECKING:
    from .durable import DurableStore
    from .inspect import Inspector
    from .takeover import Takeovers

__all__ = ["Backplane", "BackplaneUnavailable", "InMemoryBackplane", "UserRedirect"]

#: a negotiate redirect that gets the authenticated user: ``(url, access token)`` or None
UserRedirect = Callable[[RequestInfo, Principal | None], tuple[str, str | None] | None]


class BackplaneUnavailable(Exception):
    """The backplane cannot be reached for something that needs it (its text says what and where)."""


class Backplane:
    """Base class of backplanes; the defaults are those of a single instance."""

    #: relays HTTP-transport requests to the instance holding the connection (None: one instance)
    relay: RequestRelay | None = None
    #: moves resumable connections between instances (None: one instance, nothing to move)
    takeovers: Takeovers | None = None
    #: durable resume: connections survive their holder's death (None: off)
    durable: DurableStore | None = None
    #: seconds after which a dead instance's lease is gone
    lease_ttl: float = 0.0
    #: asks every live instance (inspection, presence); None: one instance, it answers itself
    inspector: Inspector | None = None

    def create_manager(self, hub_name: str) -> HubLifetimeManager:
        """The lifetime manager of one hub (called once per hub name)."""
        raise NotImplementedError

    async def start(self) -> None:
        """Join the cluster (the server starts it, and each hub's manager; counted, not repeated)."""

    async def close(self) -> None:
        """Leave it (once per :meth:`start`)."""

    def bind(self, connections: ConnectionManager) -> None:
        """The server's connection manager (the connection service opens connections in it)."""

    def serve_hub(self, hub_name: str, endpoint: ConnectionApplication) -> UserRedirect | None:
        """``endpoint`` serves ``hub_name`` here; a redirect for its negotiates, or None (the
        connection service sends every client to a node)."""
        return None

    def begin_drain(self) -> None:
        """This instance starts draining (the connection service moves its connections)."""

    async def token_keys(self) -> tuple[bytes, ...] | None:
        """The keys of connection tokens shared by every instance: the first signs, all verify.

        None: no shared key is needed (one instance; a per-process key). Raises
        :class:`BackplaneUnavailable` when one is needed but cannot be agreed on now.
        """
        return None

    async def claim_connection(self, connection_id: str, ttl: float) -> bool | None:
        """Record for ``ttl`` seconds that this instance starts ``connection_id``.

        False if another instance already did; None when the backplane cannot tell (the start is
        refused then, with 503: a replayed token could not be told apart).
        """
        return True

    async def reclaim_connection(self, connection_id: str) -> None:
        """A connection moved here: its start claim, while it lasts, names this instance now.

        Why: a fresh token of it reaching the old holder must not look like a first start there.
        """
        return None

    async def instance_alive(self, server_name: str) -> bool:
        """Whether another instance's lease is still in force (False when unknown: one instance)."""
        return False

    def health(self) -> dict[str, Any] | None:
        """State and counters for stats and metrics (None: nothing to report)."""
        return None

    def describe(self) -> str:
        """One line for the startup log: which backplane, where (passwords redacted)."""
        return f"{type(self).__name__}"


class InMemoryBackplane(Backplane):
    """The zero-configuration default: every hub's connections live in this process."""

    def create_manager(self, hub_name: str) -> HubLifetimeManager:
        return InMemoryLifetimeManager()

    def describe(self) -> str:
        return "in-memory (this process only; --redis or HUBWIRE_REDIS_URL scales out over Redis)"
