"""This server's side of cluster inspection and presence.

Why here: an answer about this instance needs the hubs' membership tables
(each lifetime manager's :class:`~hubwire.hubs.lifetime.LocalConnections`),
the transports of the connections (the hub endpoints) and the backplane's
health, and only the server layer sees all three. :class:`ServerInspection`
is the :class:`~hubwire.backplane.inspect.LocalSource` the backplane's
inspector answers from, and holds the :class:`~hubwire.backplane.inspect.ClusterView`
hub code's presence and a dashboard ask (in memory: this instance alone).
"""

from __future__ import annotations

import importlib.metadata
import os
import socket
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..backplane.inspect import (
    BackplaneStatus,
    ClusterView,
    Entry,
    Gatherer,
    HubPresence,
    HubTransport,
    InstanceInfo,
    LocalInspector,
)
from ..hubs.handler import HubConnectionHandler
from ..hubs.lifetime import HubLifetimeManager, LocalConnections
from ..hubs.presence import PresenceKind
from .metrics import sent_totals

if TYPE_CHECKING:
    from ..http import Scope
    from .app import HubServer

__all__ = ["ServerInspection"]


def _version() -> str:
    try:
        return importlib.metadata.version("hubwire")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VERSION = _version()
_STATUS_FIELDS = [f for f in BackplaneStatus.__struct_fields__ if f != "state"]


class ServerInspection:
    """Answers for this instance, and asks the cluster (through the backplane, or alone in memory)."""

    def __init__(self, server: HubServer, managers: Mapping[str, HubLifetimeManager]) -> None:
        self.server = server
        #: hub name -> lifetime manager (the server's own dict: hubs added later are seen)
        self.managers = managers
        self.started = time.time()
        #: host:port of this instance as the ASGI server reports it (None before the first request)
        self.address: str | None = None
        self.host = socket.gethostname()
        inspector = server.backplane.inspector
        gatherer: Gatherer
        if inspector is not None:
            inspector.source = self
            self.name = inspector.server_name
            gatherer = inspector
        else:
            self.name = f"{self.host}_{os.getpid()}"
            gatherer = LocalInspector(self, self.name, self.started)
        #: the cluster as data: what ``hubwire inspect`` prints, for code inside this server
        self.view = ClusterView(gatherer)

    def seen(self, scope: Scope) -> None:
        """Learn this instance's address from a request (the first one that names it)."""
        if self.address is None and isinstance(server := scope.get("server"), (list, tuple)) and server:
            self.address = f"{server[0]}:{server[1]}" if len(server) > 1 and server[1] else str(server[0])

    def presence(self, hub: str) -> HubPresence:
        """The presence source of one hub (what its lifetime manager asks)."""
        return HubPresence(self.view, hub)

    # -- LocalSource -------------------------------------------------------------------------------

    def _tables(self, hub: str | None) -> Iterator[tuple[str, LocalConnections]]:
        for name, manager in list(self.managers.items()):
            if hub is None or name == hub:
                local = manager.local_connections()
                if local is not None:
                    yield name, local

    def find(self, what: PresenceKind, hub: str | None, key: str) -> list[Entry]:
        found: list[Entry] = []
        for name, local in self._tables(hub):
            if what == "connection":
                c = local.connections.get(key)
                if c is not None:
                    transport, groups = c.connection.transport_name, sorted(c.groups)
                    found.append(
                        Entry(name, c.connection_id, c.user_identifier, transport, c.protocol_name, groups)
                    )
                continue
            members = (local.groups if what == "group" else local.users).get(key)
            if members:  # one comprehension: this loop is most of what a large group's answer costs
                found += [
                    Entry(
                        name, c.connection_id, c.user_identifier, c.connection.transport_name, c.protocol_name
                    )
                    for c in list(members.values())
                ]
        return found

    def count(self, hub: str | None, group: str) -> int:
        return sum(len(local.groups.get(group) or ()) for _, local in self._tables(hub))

    def info(self) -> InstanceInfo:
        hub_of = {id(manager): name for name, manager in self.managers.items()}
        counts: dict[tuple[str, str], int] = {}
        for endpoint in self.server.router.endpoints():
            if not isinstance(endpoint, HubConnectionHandler) or endpoint.internal:
                continue  # the dashboard's viewers are not connections of the app
            hub = hub_of.get(id(endpoint.manager), endpoint.hub_cls.__name__)
            for ctx in list(endpoint.connected.values()):
                key = (hub, ctx.connection.transport_name or "")
                counts[key] = counts.get(key, 0) + 1
        return InstanceInfo(
            name=self.name,
            address=self.address,
            host=self.host,
            pid=os.getpid(),
            version=_VERSION,
            started=self.started,
            backplane=_status(self.server.backplane.health()),
            connections=[
                HubTransport(hub=h, transport=t, connections=n) for (h, t), n in sorted(counts.items())
            ],
            messages_sent=sent_totals(self.server)[0],
        )


def _status(health: dict[str, Any] | None) -> BackplaneStatus | None:
    if health is None:
        return None
    numbers = {f: health[f] for f in _STATUS_FIELDS if isinstance(health.get(f), int) and health[f] >= 0}
    if isinstance(health.get("deployment"), str):
        numbers["deployment"] = health["deployment"]
    return BackplaneStatus(state=str(health.get("state", "unknown")), **numbers)
