"""A lean asyncio Redis connection for the backplane's two hot paths: PUBLISH and pub/sub reads.

Why not redis-py here: its PubSub handles one message per await and its
pipelines build a command object per call. Measured on one machine in one run
(``bench/redis_paths.py``, bench/RESULTS.md, 200 B messages): redis-py's
subscriber costs 6-14 us of CPU per message (79-166k msg/s a core), this one
0.6-0.8 us (~1M msg/s); redis-py's pipelined PUBLISH ~10.6 us, this one ~2 us.
This protocol object feeds every socket read into hiredis's parser and
dispatches all complete replies synchronously, so one read of many messages
costs one wake-up. Commands are
written pipelined; replies resolve futures in order. Where to connect and how
(TCP or unix socket, TLS, credentials, database) comes from redis-py's URL
parsing and TLS contexts (:mod:`.deployment`), so URLs mean the same as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import hiredis

if TYPE_CHECKING:
    from .deployment import NodeSettings

__all__ = ["RespConnection", "RespError"]

CommandArg = bytes | str | int
_PUSH_KINDS = {b"message", b"smessage", b"subscribe", b"ssubscribe", b"unsubscribe", b"sunsubscribe", b"pong"}


class RespError(Exception):
    """An error reply from Redis, or the connection failing under a command."""


class RespConnection(asyncio.Protocol):
    """One Redis connection. ``on_push`` receives pub/sub pushes (message, subscribe, pong, ...)."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._on_push = on_push
        self.subscribed = False
        self.last_read = time.monotonic()
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    # -- opening -----------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        node: NodeSettings,
        timeout: float = 5.0,
        on_push: Callable[[list[Any]], None] | None = None,
        name: str | None = None,
    ) -> RespConnection:
        """Connect, authenticate and select the database, all within ``timeout``.

        ``name`` is set with CLIENT SETNAME when the user may run it; a least-privilege ACL user
        that may not is not an error (the name only helps operators reading CLIENT LIST).
        """
        loop = asyncio.get_running_loop()
        if node.path:
            connecting = loop.create_unix_connection(lambda: cls(on_push), node.path, ssl=node.tls)
        else:
            connecting = loop.create_connection(lambda: cls(on_push), node.host, node.port, ssl=node.tls)
        _, proto = await asyncio.wait_for(connecting, timeout)
        try:
            setup: list[tuple[CommandArg, ...]] = []
            if node.password:
                setup.append(
                    ("AUTH", node.username, node.password) if node.username else ("AUTH", node.password)
                )
            if node.db:
                setup.append(("SELECT", node.db))
            if setup:
                await asyncio.wait_for(asyncio.gather(*proto.write_commands(setup)), timeout)
            if name:
                (named,) = proto.write_commands([("CLIENT", "SETNAME", name)])
                with contextlib.suppress(RespError):
                    await asyncio.wait_for(named, timeout)
        except BaseException:
            proto.abort()
            raise
        return proto

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        reader = self._reader
        reader.feed(data)
        push = self._on_push
        while True:
            reply = reader.gets()
            if reply is False:
                return
            if (
                push is not None
                and self.subscribed
                and type(reply) is list
                and reply
                and reply[0] in _PUSH_KINDS
            ):
                push(reply)
            elif push is not None and reply == b"PONG" and not self._pending:
                push([b"pong", b""])
            elif (
                push is not None
                and self.subscribed
                and not self._pending
                and isinstance(reply, hiredis.ReplyError)
            ):
                push([b"error", str(reply).encode()])  # e.g. MOVED for an SSUBSCRIBE on the wrong shard
            elif self._pending:
                future = self._pending.popleft()
                if not future.done():
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(RespError(str(reply)))
                    else:
                        future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RespError(f"connection lost: {exc}" if exc else "connection closed")
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(exc)

    # -- commands ----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def write_commands(
        self, commands: Sequence[Sequence[CommandArg]], expect_replies: bool = True
    ) -> list[asyncio.Future[Any]]:
        """Pipeline several commands in one write; one future per reply (unless pushes answer them)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RespError("not connected")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        transport.write(b"".join(hiredis.pack_command(tuple(cmd)) for cmd in commands))  # type: ignore[arg-type]
        if expect_replies:
            for _ in commands:
                future = loop.create_future()
                self._pending.append(future)
                futures.append(future)
        return futures

    async def command(self, *args: CommandArg) -> Any:
        """Send one command and wait for its reply."""
        (future,) = self.write_commands([args])
        return await future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
