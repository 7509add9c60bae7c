"""``AsyncEmitter``: the asyncio twin of :class:`~hubwire.emitter.Emitter`, same names, awaited.

Publishing goes through redis-py's asyncio client of the backplane's own :mod:`deployment
<hubwire.backplane.deployment>` (routed by slot on a cluster; one pipelined round trip for several
channels), so one emitter serves any number of tasks of its event loop. A group add/remove
subscribes to this emitter's ack channel on a connection of its own for the time of the call,
opened where the servers' bus publishes that channel (the master; on a cluster the node owning its
slot, with SSUBSCRIBE), as the bus itself subscribes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import redis.exceptions

from ..backplane.deployment import parse_deployment
from ..backplane.resp import RespConnection, RespError
from ..protocol.backplane import GROUP_ADD, GROUP_REMOVE
from ..protocol.base import EncHook
from .core import EmitterCore, GroupRequest, TargetFactory

__all__ = ["AsyncEmitter", "AsyncGroups", "AsyncTarget"]


class AsyncTarget:
    """Who a send goes to (``emitter.all``, ``emitter.group("g")``, ...)."""

    __slots__ = ("_channels", "_emitter", "_excluded")

    def __init__(self, emitter: AsyncEmitter, channels: tuple[str, ...], excluded: tuple[str, ...]) -> None:
        self._emitter = emitter
        self._channels = channels
        self._excluded = excluded

    async def send(self, method: str, *args: Any) -> int:
        """Call ``method(*args)`` on every targeted client; returns how many server subscriptions
        Redis handed the message to (0: no instance holds anyone it names, and nobody gets it)."""
        items = self._emitter._core.invocations(self._channels, method, args, self._excluded)
        return await self._emitter._publish(items)


class AsyncGroups:
    """``emitter.groups``: the target ``emitter.groups(["a", "b"])`` and the group manager
    ``await emitter.groups.add(connection_id, "a")`` / ``.remove(...)`` in one object."""

    __slots__ = ("_emitter",)

    def __init__(self, emitter: AsyncEmitter) -> None:
        self._emitter = emitter

    def __call__(self, names: Iterable[str]) -> AsyncTarget:
        """Members of any of these groups (once per group, as on the server)."""
        return self._emitter._group_target(names)

    async def add(self, connection_id: str, group: str) -> None:
        """Add a connection (on whichever instance holds it) to a group; returns once that instance
        has joined it. Raises :class:`TimeoutError` when no instance acknowledges within ``ack_timeout``."""
        await self._emitter._group_command(GROUP_ADD, connection_id, group)

    async def remove(self, connection_id: str, group: str) -> None:
        """Remove a connection from a group; returns once its instance has (``TimeoutError`` as for add)."""
        await self._emitter._group_command(GROUP_REMOVE, connection_id, group)


class AsyncEmitter(TargetFactory[AsyncTarget]):
    """:class:`~hubwire.emitter.Emitter` for asyncio code: the same arguments, targets and errors,
    with ``await target.send(...)``, ``await groups.add(...)`` and ``await close()`` (or ``async
    with``). Use it from one event loop (redis-py's asyncio connections belong to the loop that
    opened them); any number of its tasks may share it.
    """

    def __init__(
        self,
        redis_url: str,
        channel_prefix: str = "",
        *,
        hub: str,
        enc_hook: EncHook | None = None,
        ack_timeout: float = 30.0,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
    ) -> None:
        self._core = EmitterCore(channel_prefix, hub, enc_hook)
        self._deployment = parse_deployment(
            redis_url, connect_timeout=connect_timeout, command_timeout=command_timeout
        )
        self._publish_command = "SPUBLISH" if self._deployment.sharded else "PUBLISH"
        self._subscribe_command = b"SSUBSCRIBE" if self._deployment.sharded else b"SUBSCRIBE"
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._layout: asyncio.Lock | None = None
        #: the ``groups(names)`` target and ``groups.add`` / ``groups.remove``
        self.groups = AsyncGroups(self)

    @property
    def name(self) -> str:
        """This emitter's sender name (``origin`` in its envelopes; its ack channel's suffix)."""
        return self._core.name

    @property
    def url(self) -> str:
        """The Redis URL with its password redacted."""
        return self._deployment.url

    def _target(self, channels: tuple[str, ...], excluded: tuple[str, ...] = ()) -> AsyncTarget:
        return AsyncTarget(self, channels, excluded)

    # -- I/O ---------------------------------------------------------------------------------------

    async def _publish(self, items: Sequence[tuple[str, bytes]]) -> int:
        if not items:
            return 0
        command = self._publish_command
        try:
            if len(items) == 1:
                return int(await self._deployment.command(command, *items[0]))
            pipe = self._deployment.client.pipeline(transaction=False)
            for channel, payload in items:
                pipe.execute_command(command, channel, payload)
            return sum(int(n) for n in await pipe.execute())
        except redis.exceptions.RedisClusterException as exc:  # not a RedisError
            raise redis.exceptions.ConnectionError(str(exc)) from None

    async def _ack_node_connection(self, request: GroupRequest, pushes: asyncio.Queue[list[Any]]) -> Any:
        """A subscriber connection to the node carrying the ack channel (the layout learnt afresh:
        a failover or slot move since the last call is followed)."""
        if self._layout is None:
            self._layout = asyncio.Lock()
        try:
            async with self._layout:  # one refresh at a time: they share redis-py's cluster client
                await asyncio.wait_for(self._deployment.refresh(), self.command_timeout)
            node = self._deployment.node_for(request.ack_channel.encode())
            conn = await RespConnection.open(node, self.connect_timeout, on_push=pushes.put_nowait)
        except redis.exceptions.RedisError:
            raise
        except (OSError, RespError, TimeoutError, redis.exceptions.RedisClusterException) as exc:
            raise redis.exceptions.ConnectionError(
                f"cannot reach Redis at {self._deployment.url}: {exc or type(exc).__name__}"
            ) from None
        conn.subscribed = True
        return conn

    async def _group_command(self, action: int, connection_id: str, group: str) -> None:
        request = self._core.group_request(action, connection_id, group)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout
        pushes: asyncio.Queue[list[Any]] = asyncio.Queue()
        conn = await self._ack_node_connection(request, pushes)
        try:
            conn.write_commands([(self._subscribe_command, request.ack_channel)], expect_replies=False)
            await self._wait(pushes, request, deadline, lambda p: p[0] in (b"subscribe", b"ssubscribe"))
            await self._publish([(request.channel, request.payload)])
            await self._wait(
                pushes,
                request,
                deadline,
                lambda p: p[0] in (b"message", b"smessage") and len(p) > 2 and request.is_ack(p[2]),
            )
        finally:
            conn.abort()

    async def _wait(
        self,
        pushes: asyncio.Queue[list[Any]],
        request: GroupRequest,
        deadline: float,
        wanted: Callable[[list[Any]], bool],
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            try:
                push = await asyncio.wait_for(pushes.get(), max(0.0, remaining))
            except TimeoutError:
                raise request.timeout(self.ack_timeout) from None
            if push and push[0] == b"error":  # e.g. NOPERM, or MOVED during a slot move
                raise redis.exceptions.ResponseError(bytes(push[1]).decode(errors="replace"))
            if push and wanted(push):
                return

    async def close(self) -> None:
        """Close the connections."""
        await self._deployment.aclose()

    async def __aenter__(self) -> AsyncEmitter:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
