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
#: (un)subscribe commands: on RESP3 each channel is confirmed by a push, a refusal is one error reply
_SUBSCRIBING = {b"SUBSCRIBE", b"SSUBSCRIBE", b"UNSUBSCRIBE", b"SUNSUBSCRIBE"}
_PushNotification = hiredis.PushNotification


class _Confirmations:
    """On RESP3: the pushes that answer one (un)subscribe command, channel by channel, in order.

    Why: on RESP3 a connection subscribes and publishes at once, and its replies come in the
    order of its commands, except that an (un)subscribe is answered by pushes when it succeeds
    and by one error reply when Redis refuses it. Knowing which pushes are still owed tells
    whose an error reply is, so a publish's reply never goes to another command.
    """

    __slots__ = ("channels", "kind")

    def __init__(self, kind: bytes, channels: Sequence[CommandArg]) -> None:
        self.kind = kind
        self.channels = deque(c if isinstance(c, bytes) else str(c).encode() for c in channels)


#: on RESP3: a PING written without a future: its answer goes to ``on_push`` as a PONG push
_AS_PUSH = object()
#: what the reader returns when no complete reply is buffered (not ``False``: RESP3's ``#f`` is)
_INCOMPLETE = object()


class RespError(Exception):
    """An error reply from Redis, or the connection failing under a command."""


class RespConnection(asyncio.Protocol):
    """One Redis connection. ``on_push`` receives pub/sub pushes (message, subscribe, pong, ...)."""

    def __init__(self, on_push: Callable[[list[Any]], None] | None = None) -> None:
        self._reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self._transport: asyncio.Transport | None = None
        #: what answers each command written, in order: a future (a reply), or on RESP3 a
        #: :class:`_Confirmations` or ``_AS_PUSH`` for commands written without a future
        self._pending: deque[Any] = deque()
        self._on_push = on_push
        self.subscribed = False
        #: RESP3 (``HELLO 3`` accepted): pushes are told from replies by their type, so the
        #: connection may publish while it is subscribed
        self.resp3 = False
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
        resp3: bool = False,
    ) -> RespConnection:
        """Connect, authenticate and select the database, all within ``timeout``.

        ``name`` is set with CLIENT SETNAME when the user may run it; a least-privilege ACL user
        that may not is not an error (the name only helps operators reading CLIENT LIST).
        ``resp3`` asks for RESP3 (``HELLO 3``); a Redis that refuses it (before 6.0, or HELLO
        renamed away) leaves the connection on RESP2: :attr:`resp3` tells which one it got.
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
            if resp3:
                (hello,) = proto.write_commands([("HELLO", "3")])
                try:
                    greeting = await asyncio.wait_for(hello, timeout)
                except RespError:
                    greeting = None  # stays on RESP2
                # RESP3 answers HELLO with a map (RESP2 would give a flat array)
                proto.resp3 = isinstance(greeting, dict)
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
        if self.resp3:
            self._received_resp3(reader)
            return
        push = self._on_push
        while True:
            reply = reader.gets()
            if reply is _INCOMPLETE:
                return
            if (
                push is not None
                and self.subscribed
                and isinstance(reply, list)
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

    def _received_resp3(self, reader: hiredis.Reader) -> None:
        """Pushes to ``on_push`` (counted off the (un)subscribe they confirm), replies in order."""
        push = self._on_push
        pending = self._pending
        while True:
            reply = reader.gets()
            if reply is _INCOMPLETE:
                return
            if type(reply) is _PushNotification:
                if pending and reply and type(pending[0]) is _Confirmations:
                    self._confirmed(pending[0], reply)
                if push is not None:
                    push(reply)
                continue
            if not pending:
                continue  # nothing was asked: not a reply of ours
            waiting = pending.popleft()
            if waiting is _AS_PUSH:
                # a PING's answer, even an error (LOADING, BUSY): everything before it is answered,
                # which is what the PING is for (the PONG that confirms a (re)subscription, a barrier)
                if push is not None:
                    push([b"pong", b""])
            elif type(waiting) is _Confirmations:
                if push is not None and isinstance(reply, hiredis.ReplyError):
                    push([b"error", str(reply).encode()])  # e.g. NOPERM for a SUBSCRIBE
            elif not waiting.done():
                if isinstance(reply, hiredis.ReplyError):
                    waiting.set_exception(RespError(str(reply)))
                else:
                    waiting.set_result(reply)

    def _confirmed(self, confirmations: _Confirmations, reply: list[Any]) -> None:
        """A push that confirms the next channel of the (un)subscribe awaiting its pushes."""
        channels = confirmations.channels
        if len(reply) > 1 and reply[0] == confirmations.kind and channels and reply[1] == channels[0]:
            channels.popleft()
            if not channels:
                self._pending.popleft()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        error = RespError(f"connection lost: {exc}" if exc else "connection closed")
        while self._pending:
            future = self._pending.popleft()
            if isinstance(future, asyncio.Future) and not future.done():
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
        """Pipeline several commands in one write, with one future per reply.

        Without replies expected (a subscriber's commands): on RESP2 a subscribed connection's
        pushes answer them; on RESP3 (only (un)subscribes and PINGs then) their pushes go to
        ``on_push`` too, a refused (un)subscribe as ``[b"error", text]``, a PING's answer as
        ``[b"pong", b""]`` even when it is an error (LOADING): it still comes after everything
        written before it.
        """
        transport = self._transport
        if transport is None or transport.is_closing():
            raise RespError("not connected")
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        answers: list[Any] = []
        if not expect_replies and self.resp3:
            for cmd in commands:
                name = cmd[0].encode() if isinstance(cmd[0], str) else cmd[0]
                if isinstance(name, bytes) and name.upper() in _SUBSCRIBING:
                    if len(cmd) < 2:  # its pushes could not be told apart: always name the channels
                        raise ValueError(f"{name!r} without channels")
                    answers.append(_Confirmations(name.lower(), cmd[1:]))
                elif isinstance(name, bytes) and name.upper() == b"PING":
                    answers.append(_AS_PUSH)
                else:  # its answer would be taken for a PONG
                    raise ValueError(f"{name!r} needs a future on RESP3")
        transport.write(b"".join(hiredis.pack_command(tuple(cmd)) for cmd in commands))  # type: ignore[arg-type]
        if expect_replies:
            for _ in commands:
                future = loop.create_future()
                self._pending.append(future)
                futures.append(future)
        else:
            self._pending.extend(answers)
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
