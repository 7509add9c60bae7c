"""Request/reply between instances, so HTTP transports need no sticky sessions.

Server-Sent Events and long polling use several HTTP requests per
connection (a GET stream or polls, plus POSTs and a DELETE). Behind a
round-robin balancer they land on different instances, but the connection's
hub state lives on one: the instance that started it (the *owner*). The
owner listens on ``{prefix}hubwire:internal:transport:{connectionId}``;
any other instance that receives a request for that connection relays it
there and writes the owner's reply as its own HTTP response.

Messages (MessagePack): request ``[requestId, replyChannel, payload]``,
reply ``[requestId, status, body, [[header, value], ...]]``. The payload is
opaque here; the server encodes the HTTP request in it and the owner answers
it with its ordinary HTTP handlers, so relayed requests behave exactly like
local ones.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable

import msgspec

from ..connections.tasks import BackgroundTasks
from ..protocol import texts
from .bus import RedisBus

__all__ = ["Relay", "RelayHandler", "Reply"]

log = logging.getLogger("hubwire.backplane")

#: a relayed reply: status, body, response headers
Reply = tuple[int, bytes, list[tuple[str, str]]]
#: payload -> reply
RelayHandler = Callable[[bytes], Awaitable[Reply]]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class Relay:
    """Relays HTTP transport requests to the instance that owns the connection."""

    def __init__(self, bus: RedisBus, channel_prefix: str, server_name: str) -> None:
        self.bus = bus
        self.prefix = f"{channel_prefix}hubwire:internal:transport:"
        self.reply_channel = f"{channel_prefix}hubwire:internal:reply:{server_name}"
        self._ids = itertools.count(1)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._handlers: dict[str, RelayHandler] = {}
        self._tasks = BackgroundTasks("relay")
        self._started = False

    async def start(self) -> None:
        if not self._started:
            self._started = True
            await self.bus.subscribe(self.reply_channel, self._on_reply)

    # -- owner side --------------------------------------------------------------------------------

    async def serve(self, connection_id: str, handler: RelayHandler) -> None:
        """Answer relayed requests for a connection held here (until :meth:`stop_serving`)."""
        await self.start()
        self._handlers[connection_id] = handler
        await self.bus.subscribe(self.prefix + connection_id, self._on_request)

    def stop_serving(self, connection_id: str) -> None:
        if self._handlers.pop(connection_id, None) is not None:
            self.bus.unsubscribe(self.prefix + connection_id)

    def _on_request(self, channel: bytes, data: bytes) -> None:
        connection_id = channel.decode()[len(self.prefix) :]
        handler = self._handlers.get(connection_id)
        try:
            request_id, reply_channel, payload = _decoder.decode(data)[:3]
            if not isinstance(request_id, str) or not isinstance(reply_channel, str):
                raise TypeError("bad relay request")
            if not isinstance(payload, bytes):
                raise TypeError("bad relay payload")
        except (msgspec.DecodeError, TypeError, ValueError):
            log.warning("ignoring a malformed relay request on %r", channel)
            return
        if handler is None:
            self.bus.publish(
                reply_channel, _encoder.encode([request_id, 404, texts.NO_CONNECTION.encode(), []])
            )
            return
        self._tasks.spawn(self._answer(handler, request_id, reply_channel, payload), name="relayed request")

    async def _answer(
        self, handler: RelayHandler, request_id: str, reply_channel: str, payload: bytes
    ) -> None:
        try:
            status, body, headers = await handler(payload)
        except Exception:
            log.exception("relayed request failed")
            status, body, headers = 500, b"", []
        self.bus.publish(reply_channel, _encoder.encode([request_id, status, body, headers]))

    # -- forwarding side ---------------------------------------------------------------------------

    async def request(self, connection_id: str, payload: bytes, timeout: float) -> Reply | None:
        """Relay to the owner; None when no instance holds the connection (or Redis is down)."""
        await self.start()
        request_id = f"{next(self._ids)}"
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            receivers = self.bus.publish(
                self.prefix + connection_id,
                _encoder.encode([request_id, self.reply_channel, payload]),
                want_receivers=True,
            )
            assert receivers is not None
            try:
                if await asyncio.wait_for(receivers, timeout) == 0:
                    return None
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                return None
            except Exception:  # the publish itself failed (buffer overflow while Redis is down)
                return None
        finally:
            self._waiting.pop(request_id, None)

    def _on_reply(self, channel: bytes, data: bytes) -> None:
        try:
            request_id, status, body, raw_headers = _decoder.decode(data)[:4]
            headers = [(str(k), str(v)) for k, v in raw_headers]
        except (msgspec.DecodeError, TypeError, ValueError):
            return
        future = self._waiting.get(str(request_id))
        if future is not None and not future.done() and isinstance(status, int):
            future.set_result((status, body if isinstance(body, bytes) else b"", headers))

    async def close(self) -> None:
        """Stop answering and waiting (server shutdown): every task ended, every waiter cancelled."""
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        await self._tasks.cancel_all()
