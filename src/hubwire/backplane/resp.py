"""A lean asyncio Redis connection for the backplane's two hot paths: PUBLISH and pub/sub reads.

Why not redis-py's PubSub here: its loop handles one message per await, which
caps a process at ~35-55k backplane messages/s. This protocol object feeds
every socket read into hiredis's parser and dispatches all complete replies
synchronously, so one read of many messages costs one wake-up. Commands are
written pipelined; replies resolve futures in order. URL parsing comes from
redis-py so ``redis://`` / ``rediss://`` URLs mean the same as everywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url

__all__ = ["RedisAddress", "RespConnection", "RespError"]

CommandArg = bytes | str | int
_PUSH_KINDS = {b"message", b"subscribe", b"unsubscribe", b"pong"}


class RespError(Exception):
    """An error reply from Redis, or the connection failing under a command."""


class RedisAddress:
    """Where and how to connect, parsed from a Redis URL."""

    def __init__(self, url: str) -> None:
        params = parse_url(url)
        self.url = url
        self.host: str = params.get("host", "127.0.0.1")
        self.port: int = int(params.get("port", 6379))
        self.username: str | None = params.get("username")
        self.password: str | None = params.get("password")
        self.db: int = int(params.get("db", 0) or 0)
        self.ssl = url.startswith("rediss://")

    def __repr__(self) -> str:  # never print the password
        return f"RedisAddress({self.host}:{self.port}/{self.db})"


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
        address: RedisAddress,
        timeout: float = 5.0,
        on_push: Callable[[list[Any]], None] | None = None,
        name: str | None = None,
    ) -> RespConnection:
        """Connect, authenticate and select the database, all within ``timeout``."""
        loop = asyncio.get_running_loop()
        ctx = ssl.create_default_context() if address.ssl else None
        _, proto = await asyncio.wait_for(
            loop.create_connection(lambda: cls(on_push), address.host, address.port, ssl=ctx), timeout
        )
        try:
            if address.password:
                auth: list[CommandArg] = ["AUTH"]
                if address.username:
                    auth.append(address.username)
                auth.append(address.password)
                await asyncio.wait_for(proto.command(*auth), timeout)
            if address.db:
                await asyncio.wait_for(proto.command("SELECT", address.db), timeout)
            if name:
                await asyncio.wait_for(proto.command("CLIENT", "SETNAME", name), timeout)
        except BaseException:
            proto.close()
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
