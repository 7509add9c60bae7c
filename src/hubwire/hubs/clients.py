"""Client proxies: ``clients.all / group / user / client / others ... .send(method, *args)``.

A proxy is a target description plus the lifetime manager that can reach it,
so the same code works on one instance (in-memory) and across instances
(backplane). Proxies are cheap to create; hub code builds them per call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..exceptions import HubException
from ..protocol.messages import InvocationMessage
from .context import current_connection
from .presence import Presence, PresenceResult

if TYPE_CHECKING:
    from .context import HubConnectionContext
    from .lifetime import HubLifetimeManager

__all__ = ["ClientProxy", "GroupProxy", "HubCallerClients", "HubClients", "SingleClientProxy", "UserProxy"]


class ClientProxy:
    """Something you can ``send`` a client-method call to (fire-and-forget)."""

    __slots__ = ()

    async def send(self, method: str, *args: Any) -> None:
        raise NotImplementedError


class _AllProxy(ClientProxy):
    __slots__ = ("_exclude", "_manager")

    def __init__(self, manager: HubLifetimeManager, exclude: tuple[str, ...] = ()) -> None:
        self._manager = manager
        self._exclude = exclude

    async def send(self, method: str, *args: Any) -> None:
        await self._manager.send_all(method, args, self._exclude)


class _ConnectionsProxy(ClientProxy):
    __slots__ = ("_ids", "_manager")

    def __init__(self, manager: HubLifetimeManager, ids: tuple[str, ...]) -> None:
        self._manager = manager
        self._ids = ids

    async def send(self, method: str, *args: Any) -> None:
        await self._manager.send_connections(self._ids, method, args)


class _GroupsProxy(ClientProxy):
    __slots__ = ("_exclude", "_groups", "_manager")

    def __init__(
        self, manager: HubLifetimeManager, groups: tuple[str, ...], exclude: tuple[str, ...] = ()
    ) -> None:
        self._manager = manager
        self._groups = groups
        self._exclude = exclude

    async def send(self, method: str, *args: Any) -> None:
        await self._manager.send_groups(self._groups, method, args, self._exclude)


class GroupProxy(_GroupsProxy):
    """One group: ``send`` to it, or ask who is in it across the cluster (``connections``, ``count``)."""

    __slots__ = ()

    async def connections(self, *, timeout: float | None = None) -> PresenceResult:
        """The group's connections on every live instance, each with id, user and instance."""
        return await Presence(self._manager).group(self._groups[0], timeout=timeout)

    async def count(self, *, timeout: float | None = None) -> int:
        """How many connections the group has across the cluster."""
        return await Presence(self._manager).count(self._groups[0], timeout=timeout)


class _UsersProxy(ClientProxy):
    __slots__ = ("_manager", "_users")

    def __init__(self, manager: HubLifetimeManager, users: tuple[str, ...]) -> None:
        self._manager = manager
        self._users = users

    async def send(self, method: str, *args: Any) -> None:
        await self._manager.send_users(self._users, method, args)


class UserProxy(_UsersProxy):
    """One user: ``send`` to every connection of theirs, or list them across the cluster."""

    __slots__ = ()

    async def connections(self, *, timeout: float | None = None) -> PresenceResult:
        """The user's connections on every live instance, each with id and instance."""
        return await Presence(self._manager).user(self._users[0], timeout=timeout)


class SingleClientProxy(ClientProxy):
    """One connection: ``send``, or ``invoke`` and await the client's result.

    ``invoke`` raises :class:`HubException` with the client's error text when
    its handler fails or is missing, when the connection does not exist or
    disconnects before answering, and after ``timeout`` seconds if given.
    """

    __slots__ = ("_connection_id", "_local", "_manager")

    def __init__(
        self,
        manager: HubLifetimeManager,
        connection_id: str,
        local: HubConnectionContext | None = None,
    ) -> None:
        self._manager = manager
        self._connection_id = connection_id
        self._local = local

    async def send(self, method: str, *args: Any) -> None:
        if self._local is not None:
            self._local.write_message(InvocationMessage(method, list(args)))
        else:
            await self._manager.send_connections((self._connection_id,), method, args)

    async def invoke(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        local = self._local
        if local is not None and local.max_parallel <= 1 and _inside_invocation_of(local):
            raise HubException(
                "Client results inside a Hub method requires "
                "HubOptions.MaximumParallelInvocationsPerClient to be greater than 1."
            )
        return await self._manager.invoke_connection(self._connection_id, method, args, timeout)


def _inside_invocation_of(conn: HubConnectionContext) -> bool:
    return current_connection.get(None) is conn


def _ids(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        return (values,)
    return tuple(values)


class HubClients:
    """Targets reachable from anywhere in the process (``server.hub_context(Hub).clients``)."""

    __slots__ = ("_manager",)

    def __init__(self, manager: HubLifetimeManager) -> None:
        self._manager = manager

    @property
    def all(self) -> ClientProxy:
        """Every connection of the hub, on every instance."""
        return _AllProxy(self._manager)

    def all_except(self, connection_ids: Iterable[str]) -> ClientProxy:
        return _AllProxy(self._manager, _ids(connection_ids))

    def client(self, connection_id: str) -> SingleClientProxy:
        return SingleClientProxy(self._manager, connection_id)

    def clients(self, connection_ids: Iterable[str]) -> ClientProxy:
        return _ConnectionsProxy(self._manager, _ids(connection_ids))

    def group(self, name: str) -> GroupProxy:
        return GroupProxy(self._manager, (name,))

    def groups(self, names: Iterable[str]) -> ClientProxy:
        return _GroupsProxy(self._manager, _ids(names))

    def group_except(self, name: str, connection_ids: Iterable[str]) -> ClientProxy:
        return _GroupsProxy(self._manager, (name,), _ids(connection_ids))

    def user(self, user_id: str) -> UserProxy:
        """Every connection of one user (by ``user_identifier``)."""
        return UserProxy(self._manager, (user_id,))

    def users(self, user_ids: Iterable[str]) -> ClientProxy:
        return _UsersProxy(self._manager, _ids(user_ids))


class HubCallerClients(HubClients):
    """``self.clients`` inside a hub method: adds the caller-relative targets."""

    __slots__ = ("_caller",)

    def __init__(self, manager: HubLifetimeManager, caller: HubConnectionContext) -> None:
        super().__init__(manager)
        self._caller = caller

    @property
    def caller(self) -> SingleClientProxy:
        return SingleClientProxy(self._manager, self._caller.connection_id, self._caller)

    @property
    def others(self) -> ClientProxy:
        return _AllProxy(self._manager, (self._caller.connection_id,))

    def others_in_group(self, name: str) -> ClientProxy:
        return _GroupsProxy(self._manager, (name,), (self._caller.connection_id,))

    def client(self, connection_id: str) -> SingleClientProxy:
        if connection_id == self._caller.connection_id:
            return self.caller
        return SingleClientProxy(self._manager, connection_id)
