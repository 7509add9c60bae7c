"""``Emitter``: send to a hub's clients from a process without an event loop (Celery, RQ, cron, scripts).

Plain blocking redis-py (its clients are thread-safe: one emitter serves every thread of a process).
Each ``send`` returns once Redis has taken the message, with the number of server subscriptions that
got it. ``groups.add`` / ``groups.remove`` subscribe to this emitter's own ack channel for the time
of the call (on a dedicated connection, so concurrent calls never share one), publish the command
and wait for the instance holding the connection to acknowledge it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import redis.exceptions
from redis.exceptions import RedisClusterException

from ..backplane.deployment import blocking_deployment
from ..protocol.backplane import GROUP_ADD, GROUP_REMOVE
from ..protocol.base import EncHook
from .core import EmitterCore, GroupRequest, TargetFactory

__all__ = ["Emitter", "Groups", "Target"]


class Target:
    """Who a send goes to (``emitter.all``, ``emitter.group("g")``, ...)."""

    __slots__ = ("_channels", "_emitter", "_excluded")

    def __init__(self, emitter: Emitter, channels: tuple[str, ...], excluded: tuple[str, ...]) -> None:
        self._emitter = emitter
        self._channels = channels
        self._excluded = excluded

    def send(self, method: str, *args: Any) -> int:
        """Call ``method(*args)`` on every targeted client; returns how many server subscriptions
        Redis handed the message to (0: no instance holds anyone it names, and nobody gets it)."""
        items = self._emitter._core.invocations(self._channels, method, args, self._excluded)
        return self._emitter._publish(items)


class Groups:
    """``emitter.groups``: the target ``emitter.groups(["a", "b"])`` and the group manager
    ``emitter.groups.add(connection_id, "a")`` / ``.remove(...)`` in one object.

    (The server keeps them apart, ``clients.groups(...)`` and ``hub_context.groups``; an emitter has
    both at the top, so ``groups`` is callable and has ``add`` / ``remove``.)
    """

    __slots__ = ("_emitter",)

    def __init__(self, emitter: Emitter) -> None:
        self._emitter = emitter

    def __call__(self, names: Iterable[str]) -> Target:
        """Members of any of these groups (once per group, as on the server)."""
        return self._emitter._group_target(names)

    def add(self, connection_id: str, group: str) -> None:
        """Add a connection (on whichever instance holds it) to a group; returns once that instance
        has joined it, so a send to the group made after this reaches the connection.

        Raises :class:`TimeoutError` when no instance acknowledges within ``ack_timeout``.
        """
        self._emitter._group_command(GROUP_ADD, connection_id, group)

    def remove(self, connection_id: str, group: str) -> None:
        """Remove a connection from a group; returns once its instance has (``TimeoutError`` as for add)."""
        self._emitter._group_command(GROUP_REMOVE, connection_id, group)


class Emitter(TargetFactory[Target]):
    """Send to a hub's clients through the servers' Redis backplane, without running a server.

    ``redis_url``: any URL the backplane takes (``redis://``, ``rediss://`` with TLS options,
    ``unix://``, ``redis+sentinel://``, ``redis+cluster://``: README, Redis deployments);
    ``channel_prefix``: the servers' (``HUBWIRE_CHANNEL_PREFIX``); ``hub``: the hub's backplane name
    (the ``name=`` of ``add_hub``, by default the hub class's name). ``enc_hook`` teaches the
    protocols application types, as ``HubServer(enc_hook=...)`` does. ``ack_timeout`` bounds
    ``groups.add`` / ``remove``; ``connect_timeout`` / ``command_timeout`` bound each Redis call.

    Targets as on the server: ``all``, ``all_except(ids)``, ``client(id)``, ``clients(ids)``,
    ``group(g)``, ``groups(gs)``, ``group_except(g, ids)``, ``user(u)``, ``users(us)``, each with
    ``send(method, *args)``. Nothing connects until the first call; a bad URL raises
    :class:`ValueError` here (password redacted); Redis being unreachable raises redis-py's
    ``ConnectionError`` / ``TimeoutError`` from the call. Make one per process and share it across
    threads: each emitter is a sender the servers keep a small de-duplication window for.
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
        self._deployment = blocking_deployment(
            redis_url, connect_timeout=connect_timeout, command_timeout=command_timeout
        )
        self._publish_command = "SPUBLISH" if self._deployment.sharded else "PUBLISH"
        self.ack_timeout = ack_timeout
        #: the ``groups(names)`` target and ``groups.add`` / ``groups.remove``
        self.groups = Groups(self)

    @property
    def name(self) -> str:
        """This emitter's sender name (``origin`` in its envelopes; its ack channel's suffix)."""
        return self._core.name

    @property
    def url(self) -> str:
        """The Redis URL with its password redacted."""
        return self._deployment.url

    def _target(self, channels: tuple[str, ...], excluded: tuple[str, ...] = ()) -> Target:
        return Target(self, channels, excluded)

    # -- I/O ---------------------------------------------------------------------------------------

    def _client(self) -> Any:
        try:
            return self._deployment.client
        except RedisClusterException as exc:  # redis-py's cluster errors are not RedisErrors
            raise redis.exceptions.ConnectionError(str(exc)) from None

    def _publish(self, items: Sequence[tuple[str, bytes]]) -> int:
        if not items:
            return 0
        client = self._client()
        command = self._publish_command
        try:
            if len(items) == 1:
                return int(client.execute_command(command, *items[0]))
            pipe = client.pipeline(transaction=False)
            for channel, payload in items:
                pipe.execute_command(command, channel, payload)
            return sum(int(n) for n in pipe.execute())
        except RedisClusterException as exc:
            raise redis.exceptions.ConnectionError(str(exc)) from None

    def _group_command(self, action: int, connection_id: str, group: str) -> None:
        request = self._core.group_request(action, connection_id, group)
        deadline = time.monotonic() + self.ack_timeout
        client = self._client()
        if self._deployment.sharded:  # on the node owning the ack channel's slot, as the servers publish
            client = client.get_redis_connection(client.get_node_from_key(request.ack_channel))
        pubsub = client.pubsub()
        try:
            if self._deployment.sharded:
                pubsub.ssubscribe(request.ack_channel)
            else:
                pubsub.subscribe(request.ack_channel)
            self._wait(pubsub, request, deadline, lambda m: m["type"] in ("subscribe", "ssubscribe"))
            self._publish([(request.channel, request.payload)])
            self._wait(
                pubsub,
                request,
                deadline,
                lambda m: m["type"] in ("message", "smessage") and request.is_ack(m["data"]),
            )
        finally:
            pubsub.close()

    def _wait(
        self, pubsub: Any, request: GroupRequest, deadline: float, wanted: Callable[[dict[str, Any]], bool]
    ) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise request.timeout(self.ack_timeout)
            message = pubsub.get_message(timeout=remaining)
            if message is not None and wanted(message):
                return

    def close(self) -> None:
        """Close the connections (a later call opens new ones)."""
        self._deployment.close()

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
