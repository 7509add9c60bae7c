"""Hub lifetime managers: who is connected, which groups and users they belong to, how to reach them.

:class:`HubLifetimeManager` is the one seam between hub code and delivery. The
in-memory manager (the zero-configuration default) delivers to local
connections; a backplane manager (Redis) publishes to other instances and
delivers what they publish. Either way a message is serialized **once per
protocol**: a :class:`SerializedMessage` caches the framed bytes for each
protocol, and every recipient gets those same bytes appended to its outbox.
"""

from __future__ import annotations

import abc
import asyncio
import secrets
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from ..exceptions import HubException
from ..protocol.base import HubProtocol
from ..protocol.messages import CompletionMessage, HubMessage, InvocationMessage

if TYPE_CHECKING:
    from .context import HubConnectionContext
    from .presence import PresenceSource

__all__ = [
    "ClientResults",
    "CompletionOutcome",
    "HubLifetimeManager",
    "InMemoryLifetimeManager",
    "PreframedMessage",
    "SendKind",
    "SerializedMessage",
]


class SerializedMessage:
    """A hub message plus its framed bytes per protocol, encoded at most once each."""

    __slots__ = ("_cache", "message")

    def __init__(self, message: HubMessage, cache: dict[str, bytes] | None = None) -> None:
        self.message = message
        self._cache: dict[str, bytes] = cache if cache is not None else {}

    def for_protocol(self, protocol: HubProtocol) -> bytes:
        """Framed bytes for ``protocol`` (encoded on first use, then reused)."""
        data = self._cache.get(protocol.name)
        if data is None:
            data = self._cache[protocol.name] = protocol.write_message(self.message)
        return data

    def cached(self, protocol_name: str) -> bytes | None:
        """Bytes already framed for a protocol name (e.g. received from the backplane)."""
        return self._cache.get(protocol_name)

    def serialize_all(self, protocols: Iterable[HubProtocol]) -> dict[str, bytes]:
        """Framed bytes for every protocol (what a backplane envelope carries)."""
        for protocol in protocols:
            self.for_protocol(protocol)
        return dict(self._cache)


class PreframedMessage(SerializedMessage):
    """A message framed elsewhere, once per protocol (an app server of the connection service).

    A protocol it was not framed for gets no bytes, and recipients speaking it get nothing,
    rather than a guess at what the message was.
    """

    __slots__ = ()

    def for_protocol(self, protocol: HubProtocol) -> bytes:
        return self._cache.get(protocol.name, b"")


#: the recipients of a send: everyone, or the named groups, users or connections
SendKind = Literal["all", "groups", "users", "connections"]


#: what became of a client's Completion: it answered its own pending call, answered nothing
#: (unknown or late), or named a call that was sent to another connection (refused)
CompletionOutcome = Literal["completed", "unknown", "forged"]


class ClientResults:
    """Pending client-result invocations of one process, keyed by invocation id.

    A client result is an Invocation with an id sent to one connection; the
    Completion that comes back (on this instance or, through a backplane, on
    another) resolves the waiting future.
    """

    def __init__(self, prefix: str = "s") -> None:
        self._prefix = prefix
        self._pending: dict[str, tuple[asyncio.Future[Any], str]] = {}

    def new_id(self) -> str:
        """An unguessable id, so no client can aim a Completion at a call sent to another."""
        return self._prefix + secrets.token_urlsafe(12)

    def add(self, invocation_id: str, connection_id: str) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[invocation_id] = (future, connection_id)
        return future

    def discard(self, invocation_id: str) -> None:
        self._pending.pop(invocation_id, None)

    def __contains__(self, invocation_id: object) -> bool:
        return invocation_id in self._pending

    def complete(self, completion: CompletionMessage, connection_id: str | None) -> CompletionOutcome:
        """Resolve the waiter for ``completion`` when it came from the connection the call was sent to.

        ``connection_id`` is the connection that sent the Completion (None: already checked by the
        instance holding it, for results returned over a backplane). A Completion from any other
        connection is refused and the call keeps waiting for its own client (as in ASP.NET).
        """
        entry = self._pending.get(completion.invocation_id)
        if entry is None:
            return "unknown"
        future, owner = entry
        if connection_id is not None and owner != connection_id:
            return "forged"
        del self._pending[completion.invocation_id]
        if not future.done():
            if completion.error is not None:
                future.set_exception(HubException(completion.error))
            else:
                future.set_result(completion.result)
        return "completed"

    async def invoke_local(
        self, conn: HubConnectionContext, method: str, args: Sequence[Any], timeout: float | None
    ) -> Any:
        """Invoke a client method on a connection held here and wait for its result."""
        invocation_id = self.new_id()
        future = self.add(invocation_id, conn.connection_id)
        conn.write_message(InvocationMessage(method, list(args), invocation_id=invocation_id))
        try:
            return await await_result(future, timeout)
        finally:
            self.discard(invocation_id)

    def owes(self, connection_id: str) -> bool:
        """A result is awaited from this connection."""
        return any(owner == connection_id for _, owner in self._pending.values())

    def fail_connection(self, connection_id: str) -> None:
        """The connection went away: every result it owed fails."""
        for invocation_id, (future, owner) in list(self._pending.items()):
            if owner == connection_id:
                del self._pending[invocation_id]
                if not future.done():
                    future.set_exception(HubException(f"Connection '{connection_id}' disconnected."))


async def await_result(future: asyncio.Future[Any], timeout: float | None) -> Any:
    """Wait for a client result, with an optional timeout."""
    if timeout is None:
        return await future
    try:
        return await asyncio.wait_for(future, timeout)
    except TimeoutError:
        raise HubException("Client result timed out.") from None


class HubLifetimeManager(abc.ABC):
    """Delivery and membership for one hub, shaped after SignalR's HubLifetimeManager.

    Implementations must deliver each send at most once per connection and must
    not serialize per recipient. All sends are coroutines because a backplane
    publishes over the network; the in-memory manager completes them without
    suspending.
    """

    #: protocols of this hub (set by the server); a backplane serializes for all of them
    protocols: Sequence[HubProtocol] = ()
    #: where cluster-wide presence is asked (set by the server; None: presence is unavailable)
    presence: PresenceSource | None = None

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Called once when the server starts (connect to a backplane, ...)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called once when the server stops."""

    @abc.abstractmethod
    async def on_connected(self, connection: HubConnectionContext) -> None:
        """A connection completed its handshake on this instance."""

    @abc.abstractmethod
    async def on_disconnected(self, connection: HubConnectionContext) -> None:
        """A local connection ended: forget it, its groups and its user subscription."""

    async def on_moved_in(  # noqa: B027 - optional hook
        self, connection: HubConnectionContext, delivered: Collection[tuple[str, int, str]]
    ) -> None:
        """A connection moved here has its messages: keep them durable if the backplane does.

        ``delivered``: the backplane ids of the messages it has (or had) from here and before.
        """

    def channels_of(self, connection_id: str, user: str | None, groups: Collection[str]) -> list[str]:
        """Every backplane channel a connection hears (none without a backplane)."""
        return []

    @abc.abstractmethod
    async def send_all(self, method: str, args: Sequence[Any], exclude: Collection[str] = ()) -> None:
        """Every connection of the hub except ``exclude`` (connection ids)."""

    @abc.abstractmethod
    async def send_connections(
        self, connection_ids: Collection[str], method: str, args: Sequence[Any]
    ) -> None:
        """Each of the given connections."""

    @abc.abstractmethod
    async def send_groups(
        self, groups: Collection[str], method: str, args: Sequence[Any], exclude: Collection[str] = ()
    ) -> None:
        """Members of any of the groups (once each per group send), except ``exclude``."""

    @abc.abstractmethod
    async def send_users(self, user_ids: Collection[str], method: str, args: Sequence[Any]) -> None:
        """Every connection of each user."""

    @abc.abstractmethod
    async def add_to_group(self, connection_id: str, group: str) -> None:
        """Add a connection (local or, with a backplane, remote) to a group."""

    @abc.abstractmethod
    async def remove_from_group(self, connection_id: str, group: str) -> None:
        """Remove a connection from a group."""

    @abc.abstractmethod
    async def invoke_connection(
        self, connection_id: str, method: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        """Invoke a client method on one connection and return the client's result."""

    @abc.abstractmethod
    def set_connection_result(
        self, connection: HubConnectionContext, completion: CompletionMessage
    ) -> CompletionOutcome:
        """A Completion arrived from ``connection``: did it answer a client-result call sent to it?"""

    def send_serialized(
        self,
        kind: SendKind,
        targets: Collection[str],
        message: SerializedMessage,
        exclude: Collection[str] = (),
    ) -> None:
        """Send a message already framed (a service node relaying an app server's send): to all,
        or to the ``targets`` groups, users or connections; delivered in the order of the calls."""
        raise NotImplementedError(f"{type(self).__name__} cannot relay framed messages")

    def local_connections(self) -> LocalConnections | None:
        """This instance's membership tables, where presence and inspection look (None: none kept)."""
        return None

    # conveniences built on the primitives ------------------------------------------------------

    async def send_connection(self, connection_id: str, method: str, args: Sequence[Any]) -> None:
        await self.send_connections((connection_id,), method, args)

    async def send_group(
        self, group: str, method: str, args: Sequence[Any], exclude: Collection[str] = ()
    ) -> None:
        await self.send_groups((group,), method, args, exclude)

    async def send_user(self, user_id: str, method: str, args: Sequence[Any]) -> None:
        await self.send_users((user_id,), method, args)


def check_group_name(group: str, limit: int) -> None:
    """Raise :class:`HubException` for a group name longer than ``limit`` characters."""
    if len(group) > limit:
        raise HubException(f"Group names are limited to {limit} characters.")


class LocalConnections:
    """Local membership tables shared by the in-memory and backplane managers."""

    def __init__(self) -> None:
        self.connections: dict[str, HubConnectionContext] = {}
        self.groups: dict[str, dict[str, HubConnectionContext]] = {}
        self.users: dict[str, dict[str, HubConnectionContext]] = {}

    def add(self, conn: HubConnectionContext) -> bool:
        """Register; True when this is the user's first local connection."""
        self.connections[conn.connection_id] = conn
        uid = conn.user_identifier
        if uid is None:
            return False
        members = self.users.setdefault(uid, {})
        members[conn.connection_id] = conn
        return len(members) == 1

    def remove(self, conn: HubConnectionContext) -> tuple[list[str], bool]:
        """Unregister; returns the groups that became empty and whether the user has none left."""
        self.connections.pop(conn.connection_id, None)
        emptied = [g for g in list(conn.groups) if self.leave(conn, g)]
        user_gone = False
        uid = conn.user_identifier
        if uid is not None and uid in self.users:
            self.users[uid].pop(conn.connection_id, None)
            if not self.users[uid]:
                del self.users[uid]
                user_gone = True
        return emptied, user_gone

    def join(self, conn: HubConnectionContext, group: str) -> bool:
        """Add to a group; True when it is the group's first local member.

        Raises :class:`HubException` past the connection's group limits (names from other
        instances are untrusted too, so they are checked here, where membership lives).
        """
        check_group_name(group, conn.max_group_name_length)
        limit = conn.max_groups
        if limit is not None and group not in conn.groups and len(conn.groups) >= limit:
            raise HubException(f"The connection is already in {limit} groups, the most allowed.")
        members = self.groups.setdefault(group, {})
        first = not members
        members[conn.connection_id] = conn
        conn.groups.add(group)
        return first

    def leave(self, conn: HubConnectionContext, group: str) -> bool:
        """Remove from a group; True when the group has no local member left."""
        conn.groups.discard(group)
        members = self.groups.get(group)
        if members is None:
            return False
        members.pop(conn.connection_id, None)
        if not members:
            del self.groups[group]
            return True
        return False

    @staticmethod
    def deliver(
        recipients: Iterable[HubConnectionContext],
        message: SerializedMessage,
        exclude: Collection[str] = (),
    ) -> int:
        """Append the message's bytes to each recipient's outbox; returns the count."""
        count = 0
        cache: dict[str, bytes] = {}
        for conn in recipients:
            if exclude and conn.connection_id in exclude:
                continue
            data = cache.get(conn.protocol_name)
            if data is None:
                data = cache[conn.protocol_name] = message.for_protocol(conn.protocol)
            if not data:
                continue  # not framed for this connection's protocol (PreframedMessage)
            conn.outbox.write(data)
            count += 1
        return count


class InMemoryLifetimeManager(HubLifetimeManager):
    """The zero-configuration manager: all connections live in this process."""

    def __init__(self) -> None:
        self.local = LocalConnections()
        self.results = ClientResults("s")

    def local_connections(self) -> LocalConnections:
        return self.local

    async def on_connected(self, connection: HubConnectionContext) -> None:
        self.local.add(connection)

    async def on_disconnected(self, connection: HubConnectionContext) -> None:
        self.local.remove(connection)
        self.results.fail_connection(connection.connection_id)

    async def send_all(self, method: str, args: Sequence[Any], exclude: Collection[str] = ()) -> None:
        self.send_serialized("all", (), SerializedMessage(InvocationMessage(method, list(args))), exclude)

    async def send_connections(
        self, connection_ids: Collection[str], method: str, args: Sequence[Any]
    ) -> None:
        message = SerializedMessage(InvocationMessage(method, list(args)))
        self.send_serialized("connections", connection_ids, message)

    async def send_groups(
        self, groups: Collection[str], method: str, args: Sequence[Any], exclude: Collection[str] = ()
    ) -> None:
        self.send_serialized(
            "groups", groups, SerializedMessage(InvocationMessage(method, list(args))), exclude
        )

    async def send_users(self, user_ids: Collection[str], method: str, args: Sequence[Any]) -> None:
        self.send_serialized("users", user_ids, SerializedMessage(InvocationMessage(method, list(args))))

    def send_serialized(
        self,
        kind: SendKind,
        targets: Collection[str],
        message: SerializedMessage,
        exclude: Collection[str] = (),
    ) -> None:
        local = self.local
        if kind == "all":
            local.deliver(list(local.connections.values()), message, exclude)
            return
        if kind == "connections":
            conns = local.connections
            local.deliver([conns[c] for c in dict.fromkeys(targets) if c in conns], message, exclude)
            return
        table = local.groups if kind == "groups" else local.users
        for name in dict.fromkeys(targets):
            members = table.get(name)
            if members:
                local.deliver(list(members.values()), message, exclude)

    async def add_to_group(self, connection_id: str, group: str) -> None:
        conn = self.local.connections.get(connection_id)
        if conn is not None:
            self.local.join(conn, group)

    async def remove_from_group(self, connection_id: str, group: str) -> None:
        conn = self.local.connections.get(connection_id)
        if conn is not None:
            self.local.leave(conn, group)

    async def invoke_connection(
        self, connection_id: str, method: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        conn = self.local.connections.get(connection_id)
        if conn is None:
            raise HubException(f"Connection '{connection_id}' does not exist.")
        return await self.results.invoke_local(conn, method, args, timeout)

    def set_connection_result(
        self, connection: HubConnectionContext, completion: CompletionMessage
    ) -> CompletionOutcome:
        return self.results.complete(completion, connection.connection_id)
