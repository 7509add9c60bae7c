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
wrote, or that were copied to another connection's channel, or replayed.
Bodies:

* on the connection's channel, a request ``[requestId, replyChannel, issued,
  payload, 2]``, and ``[requestId, "commit" | "cancel", issued]``: the relaying
  instance wrote the reply to its client / its client went away;
* on the relaying instance's reply channel, ``[requestId, "accepted",
  serverName]`` at once (who owns the connection), then the reply
  ``[requestId, status, body, [[header, value], ...], commitConnectionId]``;
  a reply with a connection id (a long poll's data) is committed by the owner
  only when the relaying instance answers "commit", and queued again for the
  next poll on "cancel" or when no answer comes within a few seconds.

The trailing ``2`` of a request says that its sender understands "accepted"
and commits; a request without it (an instance of an earlier version, during
a rolling upgrade) gets neither, and is answered as before.

The payload is opaque here; the transports put in it only what the owner
needs (never credentials or connection tokens: the relaying instance checked
those itself).

While it waits for a reply the relaying instance watches the owner's lease
(:mod:`.lease`): once it is gone the request is answered 404 at once, as
for a connection that does not exist, and the connection's owner is
remembered (:data:`_OWNERS_MAX` connections) so that later requests for it
get 404 without waiting either, even while Redis still counts the dead
owner's subscriber (a frozen process, a host gone without a RST).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from ..connections.tasks import BackgroundTasks
from ..protocol import texts
from ..transports.relayed import Answer, RelayHandler, Reply
from .bus import RedisBus
from .lease import LeaseWatch, claim_key

__all__ = ["Relay", "RelayHandler", "Reply"]

log = logging.getLogger("hubwire.backplane")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
#: how old a relayed request may be when it arrives (clock skew between instances included)
_MAX_AGE = 30.0
#: request ids remembered to refuse a replayed request, at most this many
_SEEN_MAX = 100_000
#: connections whose owner is remembered (learnt from "accepted"), at most this many
_OWNERS_MAX = 10_000
#: how long an owner waits for the relaying instance to confirm a poll's data (less than the 5 s a
#: newer poll waits for the one it replaces, so data put back comes before the newer poll takes any)
_COMMIT_WAIT = 3.0
#: a request's trailing version: its sender understands "accepted" and commits
_VERSION = 2
_ACCEPTED = "accepted"
_COMMIT = "commit"
_CANCEL = "cancel"


def _no_connection() -> Answer:
    """What a request for a connection whose owner is dead gets (as for one that never existed)."""
    return Answer(404, texts.NO_CONNECTION.encode(), [])


class _Call:
    """One relayed request being answered here: the owner's side (a :class:`RelayedCall`)."""

    __slots__ = (
        "confirms",
        "connection_id",
        "gone",
        "relay",
        "replied",
        "reply_channel",
        "request_id",
        "settled",
    )

    def __init__(
        self, relay: Relay, connection_id: str, request_id: str, reply_channel: str, confirms: bool
    ) -> None:
        self.relay = relay
        #: the relaying instance confirms what it wrote (an earlier version does not: no commit)
        self.confirms = confirms
        self.connection_id = connection_id
        self.request_id = request_id
        self.reply_channel = reply_channel
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.settled: asyncio.Future[bool] | None = None
        #: a reply went out (or must not: its data was put back)
        self.replied = False

    async def deliver(self, reply: Reply) -> bool:
        """Send a poll's data; True once the relaying instance wrote it to its client.

        False (the poll puts the data back) when its client is gone, the relaying instance is gone
        (nobody listens on its reply channel), it does not confirm within :data:`_COMMIT_WAIT`, or
        Redis is unreachable: then an empty poll answer ("poll again") goes out instead, so the
        relaying instance never writes data it was not given to commit.
        """
        if not self.confirms:
            return True  # answered as by earlier versions: the reply goes out when the poll ends
        if self.replied or self.gone.done():
            return False
        self.replied = True
        status, body, headers = reply
        if not self.relay.available:
            empty = [(k, v) for k, v in headers if k != "content-type"]
            self.relay.reply(self.reply_channel, [self.request_id, 200, b"", empty, None])
            return False
        self.settled = asyncio.get_running_loop().create_future()
        receivers = self.relay.reply(
            self.reply_channel, [self.request_id, status, body, headers, self.connection_id], True
        )
        assert receivers is not None
        try:
            async with asyncio.timeout(_COMMIT_WAIT):
                if await receivers == 0:
                    return False
                return await self.settled
        except Exception:  # no confirmation in time, or the publish was dropped
            return False

    def settle(self, verb: str) -> None:
        """The relaying instance's word: its client got the reply ("commit"), or is gone ("cancel")."""
        if verb == _CANCEL and not self.gone.done():
            self.gone.set_result(None)
        if self.settled is not None and not self.settled.done():
            self.settled.set_result(verb == _COMMIT)


class _Waiting:
    """A request relayed from here, waiting for its owner's reply."""

    __slots__ = ("accepted", "connection_id", "reply")

    def __init__(self, connection_id: str) -> None:
        loop = asyncio.get_running_loop()
        self.connection_id = connection_id
        self.reply: asyncio.Future[Answer] = loop.create_future()
        #: the owner's server name, as soon as it accepted the request
        self.accepted: asyncio.Future[str] = loop.create_future()


class Relay:
    """Relays HTTP transport requests to the instance that owns the connection."""

    def __init__(
        self, bus: RedisBus, channel_prefix: str, server_name: str, leases: LeaseWatch | None = None
    ) -> None:
        self.bus = bus
        self.channel_prefix = channel_prefix
        self.server_name = server_name
        self.prefix = f"{channel_prefix}hubwire:internal:transport:"
        self.reply_channel = f"{channel_prefix}hubwire:internal:reply:{server_name}"
        #: tells whether an owner is dead, from its lease
        self.leases = leases or LeaseWatch(bus, channel_prefix, 1.0)
        self._key: bytes | None = None
        self._keys: tuple[bytes, ...] = ()
        #: request ids already answered, with when they may be forgotten (no replays)
        self._seen: dict[str, float] = {}
        self._waiting: dict[str, _Waiting] = {}
        self._handlers: dict[str, RelayHandler] = {}
        #: requests being answered here, by request id
        self._calls: dict[str, _Call] = {}
        #: connection id -> owner's server name, for connections recently relayed (oldest first)
        self._owners: OrderedDict[str, str] = OrderedDict()
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

    def stop_serving(self, connection_id: str, linger: bool = True) -> None:
        """Stop answering for ``connection_id`` (a request already on its way gets a 404)."""
        if self._handlers.pop(connection_id, None) is not None:
            self.bus.unsubscribe(self.prefix + connection_id, linger)

    def _on_request(self, channel: bytes, data: bytes) -> None:
        connection_id = channel.decode(errors="replace")[len(self.prefix) :]
        handler = self._handlers.get(connection_id)
        body = self._open(channel, data)
        if body is None or len(body) < 3:
            log.warning("ignoring a relay request on %r that is malformed or not sealed by this app", channel)
            return
        if len(body) == 3:
            self._on_settle(connection_id, body)
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
            self.reply(reply_channel, [request_id, 404, texts.NO_CONNECTION.encode(), []])
            return
        confirms = len(body) > 4 and body[4] == _VERSION
        if confirms:  # who owns it, at once: the relaying instance watches our lease from now on
            self.reply(reply_channel, [request_id, _ACCEPTED, self.server_name])
        call = _Call(self, connection_id, request_id, reply_channel, confirms)
        self._calls[request_id] = call
        self._tasks.spawn(self._answer(handler, call, payload), name="relayed request")

    def _on_settle(self, connection_id: str, body: list[object]) -> None:
        """A relaying instance's "commit" or "cancel" for a request being answered here."""
        request_id, verb, issued = body
        if (
            not isinstance(request_id, str)
            or verb not in (_COMMIT, _CANCEL)
            or not isinstance(issued, int | float)
            or abs(time.time() - issued) > _MAX_AGE
        ):
            log.warning("ignoring a malformed or stale relay %r for connection %s", verb, connection_id)
            return
        call = self._calls.get(request_id)
        if call is not None and call.connection_id == connection_id:
            call.settle(str(verb))

    async def _answer(self, handler: RelayHandler, call: _Call, payload: bytes) -> None:
        try:
            status, body, headers = await handler(payload, call)
        except Exception:
            log.exception("relayed request failed")
            status, body, headers = 500, b"", []
        finally:
            self._calls.pop(call.request_id, None)
        if not call.replied and not call.gone.done():
            call.replied = True
            self.reply(call.reply_channel, [call.request_id, status, body, headers, None])

    def reply(
        self, reply_channel: str, body: list[object], want_receivers: bool = False
    ) -> asyncio.Future[int] | None:
        """Publish a sealed message on a relaying instance's reply channel."""
        return self.bus.publish(reply_channel, self._seal(reply_channel, body), want_receivers)

    # -- forwarding side ---------------------------------------------------------------------------

    async def request(
        self, connection_id: str, payload: bytes, timeout: float, gone: asyncio.Future[Any] | None = None
    ) -> Answer | None:
        """Relay to the owner; None when no instance holds the connection (or Redis is down, or
        ``gone`` resolved: the client left), a 404 answer as soon as the owner is known to be dead."""
        await self.start()
        if self._key is None:
            return None  # not started: no key to seal with
        owner = self._owners.get(connection_id)
        if owner is not None and self.leases.known_dead(owner) and await self.leases.dead(owner):
            return _no_connection()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request_id = secrets.token_urlsafe(12)
        waiting = self._waiting[request_id] = _Waiting(connection_id)
        try:
            channel = self.prefix + connection_id
            sealed = self._seal(channel, [request_id, self.reply_channel, time.time(), payload, _VERSION])
            receivers = self.bus.publish(channel, sealed, want_receivers=True)
            assert receivers is not None
            await _first([receivers, gone], deadline - loop.time())
            if gone is not None and gone.done():
                self._cancel(waiting, owner, request_id)
                return None
            if not receivers.done() or receivers.cancelled() or receivers.exception() is not None:
                return None  # timed out, or dropped from the buffer while Redis is down
            if receivers.result() == 0:
                # nobody listens: it ended, or its owner died (Redis dropped a killed process's subscriber)
                return _no_connection() if owner is not None else None
            return await self._await_reply(waiting, request_id, owner, gone, deadline)
        finally:
            self._waiting.pop(request_id, None)

    async def _await_reply(
        self,
        waiting: _Waiting,
        request_id: str,
        owner: str | None,
        gone: asyncio.Future[Any] | None,
        deadline: float,
    ) -> Answer | None:
        """Wait for the reply while watching the owner's lease (learnt from "accepted", or from the
        connection's claim when it did not come within a lease interval)."""
        loop = asyncio.get_running_loop()
        connection_id = waiting.connection_id
        ask_claim_at: float | None = loop.time() + self.leases.interval
        death: asyncio.Future[None] | None = None
        try:
            while True:
                if owner is not None and death is None:
                    death = self.leases.watch(owner)
                    ask_claim_at = None
                until = deadline if ask_claim_at is None else min(deadline, ask_claim_at)
                pending = None if waiting.accepted.done() else waiting.accepted
                await _first([waiting.reply, gone, death, pending], until - loop.time())
                if waiting.reply.done():
                    return None if waiting.reply.cancelled() else waiting.reply.result()
                if gone is not None and gone.done():
                    self._cancel(waiting, owner, request_id)
                    return None
                if death is not None and death.done():
                    return _no_connection()
                if owner is None and waiting.accepted.done():
                    owner = waiting.accepted.result()
                elif loop.time() >= deadline:
                    return None
                elif ask_claim_at is not None and loop.time() >= ask_claim_at:
                    ask_claim_at = None
                    owner = await self._claimed_by(connection_id)
        finally:
            if owner is not None and death is not None:
                self.leases.unwatch(owner, death)

    async def holder(self, connection_id: str) -> str | None:
        """The instance that started ``connection_id`` (this one included), from its claim, kept
        while its token is young; None when none did. Raises when Redis cannot tell in time."""
        value = await asyncio.wait_for(
            self.bus.command("GET", claim_key(self.channel_prefix, connection_id)), self.leases.interval
        )
        if not isinstance(value, bytes | str) or not value:
            return None
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    async def _claimed_by(self, connection_id: str) -> str | None:
        """The instance that started ``connection_id`` when it is another one (None: unknown)."""
        try:
            owner = await self.holder(connection_id)
        except Exception:
            return None
        if owner is None or owner == self.server_name:
            return None
        self._remember(connection_id, owner)
        return owner

    def _remember(self, connection_id: str, owner: str) -> None:
        self._owners[connection_id] = owner
        self._owners.move_to_end(connection_id)
        while len(self._owners) > _OWNERS_MAX:
            self._owners.popitem(last=False)

    def _settle(self, connection_id: str, request_id: str, verb: str) -> None:
        """Tell the owner whether the reply to ``request_id`` reached the client."""
        if self._key is None:
            return
        channel = self.prefix + connection_id
        self.bus.publish(channel, self._seal(channel, [request_id, verb, time.time()]))

    def _cancel(self, waiting: _Waiting, owner: str | None, request_id: str) -> None:
        """The client left: tell the owner to end its poll, when the owner is known.

        (An unknown owner may be of an earlier version, which would not understand. One of this
        version that takes data for the poll anyway gets "cancel" when its reply finds nobody here.)
        """
        if owner is not None or waiting.accepted.done():
            self._settle(waiting.connection_id, request_id, _CANCEL)

    def _settler(self, connection_id: str, request_id: str) -> Callable[[bool], None]:
        """The ``settle`` of an answer whose data the owner commits only when told (once)."""
        settled = False

        def settle(delivered: bool) -> None:
            nonlocal settled
            if not settled:
                settled = True
                self._settle(connection_id, request_id, _COMMIT if delivered else _CANCEL)

        return settle

    def _on_reply(self, channel: bytes, data: bytes) -> None:
        sealed = self._open(channel, data)
        if sealed is None or len(sealed) < 3:
            log.warning("ignoring a relay reply that is malformed or not sealed by this app")
            return
        request_id = str(sealed[0])
        waiting = self._waiting.get(request_id)
        if len(sealed) == 3:
            owner = sealed[2]
            if waiting is not None and sealed[1] == _ACCEPTED and isinstance(owner, str):
                self._remember(waiting.connection_id, owner)
                if not waiting.accepted.done():
                    waiting.accepted.set_result(owner)
            return
        status, body, raw_headers = sealed[1:4]
        commit = sealed[4] if len(sealed) > 4 and isinstance(sealed[4], str) else None
        try:
            headers = [(str(k), str(v)) for k, v in raw_headers]  # type: ignore[attr-defined]
        except (TypeError, ValueError):
            return
        if waiting is None or waiting.reply.done() or not isinstance(status, int):
            if commit is not None:  # nobody waits for this poll's data any more: the owner keeps it
                self._settle(commit, request_id, _CANCEL)
            return
        answer = Answer(status, body if isinstance(body, bytes) else b"", headers)
        if commit is not None:
            answer.settle = self._settler(waiting.connection_id, request_id)
        waiting.reply.set_result(answer)

    async def close(self) -> None:
        """Stop answering and waiting (server shutdown): every task ended, every waiter cancelled,
        every relay channel unsubscribed."""
        for connection_id in list(self._handlers):
            self.stop_serving(connection_id, linger=False)
        if self._started:
            self._started = False
            self.bus.unsubscribe(self.reply_channel, linger=False)
        for waiting in self._waiting.values():
            waiting.reply.cancel()
        for call in self._calls.values():
            call.settle(_CANCEL)
        await self._tasks.cancel_all()
        await self.leases.close()


async def _first(futures: Iterable[asyncio.Future[Any] | None], timeout: float) -> None:
    """Wait (at most ``timeout``) until one of ``futures`` (None: absent) is done."""
    waits = [f for f in futures if f is not None]
    if timeout > 0 and not any(f.done() for f in waits):
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
