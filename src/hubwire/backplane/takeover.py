"""Moving a resumable connection between instances, over Redis: stateful reconnect anywhere.

Why: a client with stateful reconnect comes back with the same connection
token after its WebSocket dropped, and behind a load balancer without sticky
sessions it usually reaches another instance. That instance takes the
connection over from the one holding it, so the resume succeeds wherever it
lands. The exchange (B takes over from A; all messages MessagePack, on
``{prefix}hubwire:internal:takeover`` for requests and
``{prefix}hubwire:internal:takeover:{server name}`` for everything else):

1. B -> every instance: **Request** (connection id, a SHA-256 of the token,
   the user and the hub path). Only the holder answers: a refusal (the HTTP
   status B answers the client with), or
2. A -> B: **Offer**: the connection's hub state (protocol, user, groups,
   items). A stops its transport (if it had not noticed the drop) and keeps,
   tagged with their backplane ids, whatever is sent to the connection.
3. B registers the connection (subscribing to its group and user channels;
   what it receives for it is kept and tagged too), then -> A: **Commit**.
4. A waits until every Redis node pushed it what it had before now (a PING
   per subscriber connection: after that, anything published later reached B,
   which was subscribed before the Commit), unregisters the connection and
   -> B: **Final**: the unacknowledged messages with their numbering, the
   client's counters, and the ids A delivered since the Offer. B keeps A's
   messages, then its own minus those ids (each message once, in order per
   sender), and replays them to the client.
5. Later, A -> B: **Forward**: what hub methods still running on A send to
   the connection (a result, stream items), so nothing is lost.

No answer within ``timeout`` (the holder died, or nobody holds the
connection) and B refuses the resume (404): the client's automatic reconnect
then starts a new connection, never a silent gap. Every message is untrusted: each is sealed
(HMAC-SHA256 over its channel and body, with a key derived from the app's
token key, as the relay's), so only instances of this app can ask, offer or
forward; malformed or unsealed ones are counted and dropped; a request older
than the timeout (held in an outage buffer) or seen before (a batch published
twice) is not answered; commits and finals are accepted only from the
instance that offered, forwards only from the instance a connection moved
from (checked by the caller).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from ..connections.tasks import BackgroundTasks
from .bus import RedisBus

__all__ = ["Offer", "TakeoverHolder", "TakeoverRequest", "Takeovers"]

log = logging.getLogger("hubwire.backplane")


class _Request(msgspec.Struct, tag="req", array_like=True):
    rid: int
    origin: str
    cid: str
    digest: bytes
    user: str | None
    path: str
    #: wall-clock time it was made: one held in an outage buffer past the timeout is stale
    ts: float


class _Offer(msgspec.Struct, tag="offer", array_like=True):
    rid: int
    origin: str
    state: bytes


class _Refuse(msgspec.Struct, tag="refuse", array_like=True):
    rid: int
    origin: str
    status: int


class _Commit(msgspec.Struct, tag="commit", array_like=True):
    rid: int
    origin: str
    cid: str


class _Final(msgspec.Struct, tag="final", array_like=True):
    rid: int
    origin: str
    state: bytes


class _Forward(msgspec.Struct, tag="fwd", array_like=True):
    origin: str
    cid: str
    data: bytes


_Message = _Request | _Offer | _Refuse | _Commit | _Final | _Forward
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Message)
_sealed_decoder = msgspec.msgpack.Decoder(tuple[bytes, bytes])


@dataclass(frozen=True, slots=True)
class TakeoverRequest:
    """Another instance asks for a connection: who asks, which connection, proof of the token."""

    origin: str
    connection_id: str
    #: SHA-256 of the connection token: the token itself never crosses Redis
    token_digest: bytes
    user: str | None
    path: str


@dataclass(frozen=True, slots=True)
class Offer:
    """The holder's answer: who holds it and its hub state (opaque here)."""

    request_id: int
    origin: str
    connection_id: str
    state: bytes


class TakeoverHolder(Protocol):
    """What the server gives the takeover exchange: this instance's side as the holder and the taker."""

    def offer(self, request: TakeoverRequest) -> bytes | int | None:
        """The state to offer (the connection is frozen), an HTTP status refusing, or None (not here)."""

    def finish(self, connection_id: str, forward: Callable[[bytes], None]) -> Awaitable[bytes | None]:
        """Hand the frozen connection over: its final state; later writes go to ``forward``."""

    def abandon(self, connection_id: str) -> None:
        """The taker never committed: the frozen connection is suspended here again."""

    def forwarded(self, origin: str, connection_id: str, data: bytes) -> None:
        """A hub message for a connection taken over from ``origin``."""


class Takeovers:
    """This instance's end of the takeover exchange (one per backplane)."""

    def __init__(self, bus: RedisBus, channel_prefix: str, server_name: str, timeout: float = 2.0) -> None:
        self.bus = bus
        self.server_name = server_name
        self.timeout = timeout
        self.requests_channel = f"{channel_prefix}hubwire:internal:takeover"
        self._prefix = f"{channel_prefix}hubwire:internal:takeover:"
        self.own_channel = self._prefix + server_name
        self.holder: TakeoverHolder | None = None
        #: request ids start at random: a restarted instance's new ids are not its old ones
        self._ids = itertools.count(secrets.randbelow(1 << 40) + 1)
        #: request id -> (the instance answering, once known; the answer waited for)
        self._waiting: dict[int, tuple[str | None, asyncio.Future[_Offer | _Refuse | _Final]]] = {}
        #: connections offered and not committed yet: id -> (taker, request id, commit timer)
        self._offered: dict[str, tuple[str, int, asyncio.TimerHandle]] = {}
        self.tasks = BackgroundTasks("takeovers")
        self.malformed = 0
        self._last_warning = 0.0
        self._keys: tuple[bytes, ...] = ()
        #: requests answered lately (asker, request id): a repeat is not answered twice
        self._seen: dict[tuple[str, int], float] = {}
        self.moved_in = 0
        self.moved_out = 0
        #: takeover requests this instance sent
        self.requests = 0

    async def start(self) -> None:
        await self.bus.subscribe(self.requests_channel, self._on_request)
        await self.bus.subscribe(self.own_channel, self._on_own)

    async def close(self) -> None:
        self.bus.unsubscribe(self.requests_channel, linger=False)
        self.bus.unsubscribe(self.own_channel, linger=False)
        for _, future in self._waiting.values():
            if not future.done():
                future.cancel()
        for _, _, timer in self._offered.values():
            timer.cancel()
        self._offered.clear()
        await self.tasks.cancel_all()

    def set_keys(self, keys: tuple[bytes, ...]) -> None:
        """Seal with (a key derived from) the app's first token key; accept any of them.

        Why: only instances of this app may ask for, offer or forward into a
        connection; anything else on Redis (another app sharing it, a client of
        Redis that is not hubwire) is dropped.
        """
        self._keys = tuple(hmac.new(k, b"hubwire takeover v1", hashlib.sha256).digest() for k in keys)

    def _seal(self, channel: str, message: _Message) -> bytes:
        raw = _encoder.encode(message)
        mac = hmac.new(self._keys[0], channel.encode() + b"\n" + raw, hashlib.sha256).digest()
        return _encoder.encode((raw, mac))

    def _publish(self, channel: str, message: _Message) -> None:
        if self._keys:
            self.bus.publish(channel, self._seal(channel, message))

    def _send(self, server_name: str, message: _Message) -> None:
        self._publish(self._prefix + server_name, message)

    # -- taking a connection over ------------------------------------------------------------------

    async def request(
        self, connection_id: str, token_digest: bytes, user: str | None, path: str
    ) -> Offer | int | None:
        """Ask the holder of ``connection_id`` for it: its offer, a refusal status, or None (no answer)."""
        rid = next(self._ids)
        self.requests += 1
        future: asyncio.Future[_Offer | _Refuse | _Final] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = (None, future)
        message = _Request(rid, self.server_name, connection_id, token_digest, user, path, time.time())
        self._publish(self.requests_channel, message)
        try:
            answer = await asyncio.wait_for(future, self.timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(rid, None)
        if isinstance(answer, _Refuse):
            return answer.status
        if isinstance(answer, _Offer):
            return Offer(rid, answer.origin, connection_id, answer.state)
        return None

    async def commit(self, offer: Offer) -> bytes | None:
        """Tell the holder we are ready (subscribed): its final state, or None (it never came)."""
        future: asyncio.Future[_Offer | _Refuse | _Final] = asyncio.get_running_loop().create_future()
        self._waiting[offer.request_id] = (offer.origin, future)
        self._send(offer.origin, _Commit(offer.request_id, self.server_name, offer.connection_id))
        try:
            answer = await asyncio.wait_for(future, self.timeout + self.timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(offer.request_id, None)
        if isinstance(answer, _Final):
            self.moved_in += 1
            return answer.state
        return None

    # -- receiving ---------------------------------------------------------------------------------

    def _decode(self, channel: bytes, data: bytes) -> _Message | None:
        """The message, or None when it is malformed or not sealed by an instance of this app."""
        try:
            raw, mac = _sealed_decoder.decode(data)
            signed = channel + b"\n" + raw
            if not any(
                hmac.compare_digest(mac, hmac.new(key, signed, hashlib.sha256).digest()) for key in self._keys
            ):
                raise ValueError("not sealed by this app")
            return _decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            self.malformed += 1
            now = time.monotonic()
            if now - self._last_warning > 5.0:
                self._last_warning = now
                log.warning("ignoring a malformed or unsealed takeover message: %s", exc)
            return None

    def _on_request(self, channel: bytes, data: bytes) -> None:
        message = self._decode(channel, data)
        holder = self.holder
        if not isinstance(message, _Request) or holder is None or message.origin == self.server_name:
            return
        if abs(time.time() - message.ts) > self.timeout:
            return  # stale (it waited out an outage): its asker gave up long ago
        key = (message.origin, message.rid)
        if key in self._seen:
            return  # a repeat (the bus publishes a batch again when Redis's answer was lost)
        self._remember(key)
        if message.cid in self._offered:
            log.debug("refused handing %s over to %s: 409, already offered", message.cid, message.origin)
            self._send(message.origin, _Refuse(message.rid, self.server_name, 409))  # already moving
            return
        request = TakeoverRequest(message.origin, message.cid, message.digest, message.user, message.path)
        try:
            answer = holder.offer(request)
        except Exception:
            log.exception("offering connection %s failed", message.cid)
            answer = 500
        if answer is None:
            return  # not held here: the holder answers
        if isinstance(answer, int):
            log.debug("refused handing %s over to %s: %d", message.cid, message.origin, answer)
            self._send(message.origin, _Refuse(message.rid, self.server_name, answer))
            return
        timer = asyncio.get_running_loop().call_later(
            self.timeout + self.timeout, self._commit_timed_out, message.cid
        )
        self._offered[message.cid] = (message.origin, message.rid, timer)
        self._send(message.origin, _Offer(message.rid, self.server_name, answer))

    def _commit_timed_out(self, connection_id: str) -> None:
        if self._offered.pop(connection_id, None) is not None and self.holder is not None:
            log.info("connection %s was offered to another instance that never committed", connection_id)
            self.holder.abandon(connection_id)

    def _remember(self, key: tuple[str, int]) -> None:
        now = time.monotonic()
        self._seen[key] = now
        if len(self._seen) > 4096:
            for old in [k for k, at in self._seen.items() if now - at > 4 * self.timeout]:
                del self._seen[old]

    def _on_own(self, channel: bytes, data: bytes) -> None:
        message = self._decode(channel, data)
        if message is None:
            return
        if isinstance(message, _Commit):
            offered = self._offered.get(message.cid)
            if offered is None or offered[:2] != (message.origin, message.rid):
                return  # not offered to that instance (late, or not ours to answer)
            del self._offered[message.cid]
            offered[2].cancel()
            self.tasks.spawn(self._finish(message), name=f"hand over {message.cid}")
        elif isinstance(message, _Forward):
            if self.holder is not None:
                self.holder.forwarded(message.origin, message.cid, message.data)
        elif isinstance(message, (_Offer, _Refuse, _Final)):
            waiting = self._waiting.get(message.rid)
            if waiting is None:
                return
            expected, future = waiting
            if expected is not None and expected != message.origin:
                return  # only the instance that offered may finish
            if not future.done():
                future.set_result(message)

    async def _finish(self, commit: _Commit) -> None:
        holder = self.holder
        if holder is None:
            return
        if not await self.bus.barrier(self.timeout / 2):
            # without it a message published just before the taker subscribed could be missed
            log.warning("not handing %s over: Redis did not answer the barrier in time", commit.cid)
            holder.abandon(commit.cid)
            self._send(commit.origin, _Refuse(commit.rid, self.server_name, 503))
            return
        taker = commit.origin

        def forward(data: bytes) -> None:
            self._send(taker, _Forward(self.server_name, commit.cid, data))

        state = await holder.finish(commit.cid, forward)
        if state is None:
            self._send(taker, _Refuse(commit.rid, self.server_name, 404))
            return
        self.moved_out += 1
        self._send(taker, _Final(commit.rid, self.server_name, state))
