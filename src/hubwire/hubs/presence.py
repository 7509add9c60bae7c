"""Cluster-wide presence: which connections a group or a user has, on every instance.

Why: hub code often needs "who is in this room" (a member list, a count, "is
alice online"). Each instance knows only its own connections; a hand-kept
Redis set of members goes stale the moment an instance dies with its members
in it. Here the instances that are alive are *asked* (a scatter-gather over
the backplane, ``backplane/inspect.py``), so a dead instance's connections
are never in an answer, and there is nothing to keep in sync.

Reached from hub code as ``self.clients.group(g).connections()`` /
``.count()`` and ``self.clients.user(u).connections()``, and from anywhere in
the process as ``server.hub_context(Hub).presence.group(g)`` / ``.user(u)`` /
``.count(g)`` / ``.connection(id)``. The lifetime manager carries the
:class:`PresenceSource` the server gives it (one instance: its own tables;
Redis: every live instance).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, overload

import msgspec

from ..exceptions import HubException

if TYPE_CHECKING:
    from .lifetime import HubLifetimeManager

__all__ = ["ConnectionInfo", "Presence", "PresenceKind", "PresenceResult", "PresenceSource"]

#: what a presence query selects connections by
PresenceKind = Literal["group", "user", "connection"]


class ConnectionInfo(msgspec.Struct, frozen=True, gc=False):
    """One connection as presence and ``hubwire inspect`` show it: never its token or credentials.

    ``groups`` is filled only when one connection is asked for (``presence.connection(id)``).
    (``gc=False``: only strings inside, never in a cycle; a large answer does not set off the
    cycle collector.)
    """

    connection_id: str
    user: str | None
    #: the server name of the instance holding it
    instance: str
    #: the hub's backplane name
    hub: str
    #: ``WebSockets``, ``ServerSentEvents`` or ``LongPolling`` (None: no transport yet)
    transport: str | None = None
    protocol: str | None = None
    groups: tuple[str, ...] | None = None


class PresenceResult(Sequence[ConnectionInfo]):
    """The connections found, plus what the answer may lack.

    ``missing``: live instances that did not answer within the timeout (their
    connections are not in the result); ``truncated``: an instance had more
    than fits in one answer (bounded in bytes) and sent only the first ones.
    ``complete`` is true when neither happened.
    """

    __slots__ = ("_items", "missing", "truncated")

    def __init__(
        self, items: Sequence[ConnectionInfo], missing: Sequence[str] = (), truncated: bool = False
    ) -> None:
        self._items = tuple(items)
        self.missing = tuple(missing)
        self.truncated = truncated

    @property
    def complete(self) -> bool:
        return not self.missing and not self.truncated

    @property
    def ids(self) -> set[str]:
        """The connection ids (what a send to some of them needs)."""
        return {item.connection_id for item in self._items}

    @property
    def users(self) -> set[str]:
        """The distinct users among the connections (anonymous ones left out)."""
        return {item.user for item in self._items if item.user is not None}

    @overload
    def __getitem__(self, index: int) -> ConnectionInfo: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[ConnectionInfo]: ...
    def __getitem__(self, index: int | slice) -> ConnectionInfo | Sequence[ConnectionInfo]:
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[ConnectionInfo]:
        return iter(self._items)

    def __repr__(self) -> str:
        extra = f", missing={list(self.missing)}" if self.missing else ""
        extra += ", truncated" if self.truncated else ""
        return f"PresenceResult({len(self._items)} connections{extra})"


class PresenceSource(Protocol):
    """What a lifetime manager asks for presence (given to it by the server)."""

    async def connections(self, kind: PresenceKind, key: str, timeout: float | None) -> PresenceResult:
        """The hub's connections of a group / a user / with an id, on every live instance."""

    async def count(self, group: str, timeout: float | None) -> int:
        """How many connections the group has on the live instances that answered."""


def _source(manager: HubLifetimeManager) -> PresenceSource:
    source = manager.presence
    if source is None:
        raise HubException("Presence is not available: this hub's lifetime manager has no presence source.")
    return source


class Presence:
    """``server.hub_context(Hub).presence``: a hub's connections across the cluster.

    Every call asks the live instances and waits at most ``timeout`` seconds
    (default: the backplane's, 2 s); instances that did not answer in time are
    named in the result's ``missing``.
    """

    __slots__ = ("_manager",)

    def __init__(self, manager: HubLifetimeManager) -> None:
        self._manager = manager

    async def group(self, name: str, *, timeout: float | None = None) -> PresenceResult:
        """The connections in group ``name``, each with its id, user and instance."""
        return await _source(self._manager).connections("group", name, timeout)

    async def user(self, user_id: str, *, timeout: float | None = None) -> PresenceResult:
        """The connections of one user (by ``user_identifier``)."""
        return await _source(self._manager).connections("user", user_id, timeout)

    async def count(self, group: str, *, timeout: float | None = None) -> int:
        """How many connections group ``group`` has (cheaper than ``len(await group(...))``).

        Counts the instances that answered within the timeout; use :meth:`group` to
        learn which did not.
        """
        return await _source(self._manager).count(group, timeout)

    async def connection(self, connection_id: str, *, timeout: float | None = None) -> ConnectionInfo | None:
        """One connection with its groups, or None when no live instance holds it."""
        found = await _source(self._manager).connections("connection", connection_id, timeout)
        return found[0] if found else None
