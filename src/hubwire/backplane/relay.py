"""Request/reply between instances, so HTTP transports need no sticky sessions.

Server-Sent Events and long polling use several HTTP requests per
connection (a GET stream or polls, plus POSTs and a DELETE). Behind a
round-robin balancer they land on different instances, but the connection's
hub state lives on one: the instance that started it (the *owner*). The
owner listens on ``{prefix}hubwire:internal:transport:{connectionId}``;
any other instance that receives a request for that connection relays it
there and writes the owner's reply as its own HTTP response.

Messages (MessagePack) are sealed: ``[body, mac]`` where ``mac`` is an
HMAC-SHA256 over the channel and ``body`` with a key derived from the app's
token key, so an instance refuses relay messages that no instance of the app
wrote, or that were copied to another connection's channel, or replayed. The
request body is ``[requestId, replyChannel, issued, payload]``, the reply body
``[requestId, status, body, [[header, value], ...]]``. The payload is opaque
here; the transports put in it only what the owner needs (never credentials
or connection tokens: the relaying instance checked those itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
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
#: how old a relayed request may be when it arrives (clock skew between instances included)
_MAX_AGE = 30.0
#: request ids remembered to refuse a replayed request, at most this many
_SEEN_MAX = 100_000


class Relay:
    """Relays HTTP transport requests to the instance that owns the connection."""

    def __init__(self, bus: RedisBus, channel_prefix: str, server_name: str) -> None:
        self.bus = bus
        self.prefix = f"{channel_prefix}hubwire:internal:transport:"
        self.reply_channel = f"{channel_prefix}hubwire:internal:reply:{server_name}"
        self._key: bytes | None = None
        self._keys: tuple[bytes, ...] = ()
        #: request ids already answered, with when they may be forgotten (no replays)
        self._seen: dict[str, float] = {}
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._handlers: dict[str, RelayHandler] = {}
        self._tasks = BackgroundTasks("relay")
        self._started = False

    def set_keys(self, keys: tuple[bytes, ...]) -> None:
        """Seal with (a key derived from) the app's first token key; accept any of them."""
        self._keys = tuple(hmac.new(k, b"hubwire relay v1", hashlib.sha256).digest() for k in keys)
        self._key = self._keys[0]

    def _seal(self, channel: str, body: list[object]) -> bytes:
        assert self._key is not None
        raw = _encoder.encode(body)
        mac = hmac.new(self._key, channel.encode() + b"\n" + raw, hashlib.sha256).digest()
        return _encoder.encode([raw, mac])

    def _open(self, channel: bytes, data: bytes) -> list[object] | None:
        """The body of a sealed message, or None when it is malformed or not sealed with our key."""
        if self._key is None:
            return None
        try:
            raw, mac = _decoder.decode(data)[:2]
            if not isinstance(raw, bytes) or not isinstance(mac, bytes):
                return None
            signed = channel + b"\n" + raw
            if not any(
                hmac.compare_digest(mac, hmac.new(key, signed, hashlib.sha256).digest()) for key in self._keys
            ):
                return None
            body = _decoder.decode(raw)
        except (msgspec.DecodeError, TypeError, ValueError):
            return None
        return body if isinstance(body, list) else None

    def _fresh(self, request_id: str, issued: object) -> bool:
        """False for a request too old, from the future, or seen before (a replay)."""
        now = time.time()
        if not isinstance(issued, int | float) or abs(now - issued) > _MAX_AGE or request_id in self._seen:
            return False
        if len(self._seen) >= _SEEN_MAX:
            for old in [r for r, until in self._seen.items() if until < now]:
                del self._seen[old]
            if len(self._seen) >= _SEEN_MAX:
                return False
        self._seen[request_id] = now + 2 * _MAX_AGE
        return True

    @property
    def available(self) -> bool:
        """False while Redis is unreachable: a relayed request could be neither sent nor answered."""
        return self.bus.healthy

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
        connection_id = channel.decode(errors="replace")[len(self.prefix) :]
        handler = self._handlers.get(connection_id)
        body = self._open(channel, data)
        if body is None or len(body) < 4:
            log.warning("ignoring a relay request on %r that is malformed or not sealed by this app", channel)
            return
        request_id, reply_channel, issued, payload = body[:4]
        if (
            not isinstance(request_id, str)
            or not isinstance(reply_channel, str)
            or not isinstance(payload, bytes)
        ):
            log.warning("ignoring a malformed relay request on %r", channel)
            return
        if not reply_channel.startswith(self.reply_channel.rsplit(":", 1)[0] + ":"):
            log.warning("ignoring a relay request with a foreign reply channel on %r", channel)
            return
        if not self._fresh(request_id, issued):
            log.warning("ignoring a stale or replayed relay request on %r", channel)
            return
        if handler is None:
            self._reply(reply_channel, [request_id, 404, texts.NO_CONNECTION.encode(), []])
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
        self._reply(reply_channel, [request_id, status, body, headers])

    def _reply(self, reply_channel: str, body: list[object]) -> None:
        self.bus.publish(reply_channel, self._seal(reply_channel, body))

    # -- forwarding side ---------------------------------------------------------------------------

    async def request(self, connection_id: str, payload: bytes, timeout: float) -> Reply | None:
        """Relay to the owner; None when no instance holds the connection (or Redis is down)."""
        await self.start()
        if self._key is None:
            return None  # not started: no key to seal with
        request_id = secrets.token_urlsafe(12)
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            channel = self.prefix + connection_id
            sealed = self._seal(channel, [request_id, self.reply_channel, time.time(), payload])
            receivers = self.bus.publish(channel, sealed, want_receivers=True)
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
        sealed = self._open(channel, data)
        if sealed is None or len(sealed) < 4:
            log.warning("ignoring a relay reply that is malformed or not sealed by this app")
            return
        request_id, status, body, raw_headers = sealed[:4]
        try:
            headers = [(str(k), str(v)) for k, v in raw_headers]  # type: ignore[attr-defined]
        except (TypeError, ValueError):
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
