"""One node's link: a pipelined publisher and a subscriber, reconnecting.

The bus (:mod:`.bus`) keeps one :class:`NodeLink` per Redis node it talks to: one for a single
Redis or a Sentinel-managed master, one per master that owns a channel of this process on a
Redis Cluster.

On a single Redis or Sentinel the publisher publishes on the subscriber's connection (RESP3):
Redis then writes a publish's reply and this instance's copy of the message together, so per
message it makes one write fewer, and the instance wakes up once instead of twice
(bench/RESULTS.md, many small rooms). A Redis without RESP3 (before 6.0), and a Cluster, get a
connection of its own for the publisher: on a Cluster, Redis unsubscribes a channel by itself
when its slot moves, so a push could not always be told from the confirmation of our own
(un)subscribe, and an error reply from the answer to a publish.

A link never loses a message on its own: a queued message leaves its queue only when Redis has
answered its PUBLISH, and a connection that stops answering is replaced only when Redis itself
answers a fresh connection, so a slow or frozen Redis (``DEBUG SLEEP``, SIGSTOP, a long fork)
causes no re-publish storm: the messages already written are answered when it wakes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..connections.tasks import cancel_and_wait
from .resp import RespConnection, RespError

if TYPE_CHECKING:
    from .bus import RedisBus
    from .deployment import NodeSettings

__all__ = ["NodeLink", "Outgoing"]

log = logging.getLogger("hubwire.backplane")

_SUBSCRIBE_CHUNK = 256
#: commands written before a publish that keeps a history (``RedisBus.history_commands``)
_HISTORY_COMMANDS = 2
#: one pipelined write publishes what is queued, up to this many messages and bytes. Why this
#: large: one batch is in flight at a time, so a loaded instance (a slow event-loop pass, so a
#: slow answer) publishes at most a batch per answer. At 1,000 an overloaded machine fell behind
#: its own sends, filled the buffer and dropped messages (bench/RESULTS.md, many small rooms)
_BATCH = 10_000
_BATCH_BYTES = 8 * 1024 * 1024
#: replies that mean "this node is not (or not yet) the one for that channel": retry after a refresh
#: (or "not now": BUSY with a long script, LOADING after a restart)
_RETRY_ERRORS = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "LOADING", "READONLY", "MASTERDOWN", "BUSY")
#: how long a silent connection may lag behind the probe that Redis answered, and still be kept
_BEHIND_PROBE = 0.1
#: the watchdog's probe publishes to the channel of a waiting publish + this (no one subscribes there)
_PROBE_SUFFIX = b"\x00hubwire-probe"
#: the longest pause between two restarts of a task that keeps failing
_RESTART_BACKOFF_MAX = 5.0


class QueueSignal:
    """ "Something was queued": what an ``asyncio.Event`` did for the publisher, for less per message.

    Why: at a low message rate every publish finds the publisher idle, so each one paid for a
    task around ``Event.wait()`` and an ``asyncio.wait`` with the connection's ``lost`` future,
    and three or four event-loop passes before the publisher ran. Here ``set`` resolves the one
    waiting future directly, and losing the connection resolves it too (a done callback), so the
    publisher runs on the next pass.
    """

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._set = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, lost: asyncio.Future[Any]) -> None:
        """Until :meth:`set` is called or ``lost`` completes (at once when either already happened)."""
        if self._set or lost.done():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake(_: object) -> None:
            if not waiter.done():
                waiter.set_result(None)

        self._waiter = waiter
        lost.add_done_callback(wake)
        try:
            await waiter
        finally:
            self._waiter = None
            lost.remove_done_callback(wake)


async def _until_done(future: asyncio.Future[Any], timeout: float) -> bool:
    """Wait for ``future`` at most ``timeout`` seconds without ever cancelling it; True once it is done.

    Why not ``wait_for(shield(...))``: that costs a shield future, a task wake-up per layer and
    a timeout handle per call; the publisher waits like this once per batch, which at a low rate
    is once per message.
    """
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)
    return future.done()


def _outcome(future: asyncio.Future[Any]) -> Any:
    """A finished reply future's result, or its exception (as ``gather(return_exceptions=True)``)."""
    if future.cancelled():
        return asyncio.CancelledError()
    return future.exception() or future.result()


@dataclass(slots=True, eq=False)
class Outgoing:
    """One message waiting to be published (it leaves the queue once Redis answered it)."""

    seq: int
    channel: bytes
    payload: bytes
    enqueued: float
    future: asyncio.Future[int] | None
    done: bool = False
    size: int = field(default=0)
    #: written to a connection, its answer not read yet (never dropped from a full buffer then)
    inflight: bool = False
    #: durable resume: the channel's history stream, written just before the publish (same node)
    history: bytes | None = None


class NodeLink:
    """Publisher queue + subscriber of one Redis node, supervised by the bus."""

    def __init__(self, bus: RedisBus, node: NodeSettings) -> None:
        self.bus = bus
        self.node = node
        self.queue: deque[Outgoing] = deque()
        self.channels: set[bytes] = set()
        self.pub: RespConnection | None = None
        self.sub: RespConnection | None = None
        self.sub_ready = asyncio.Event()
        self.queue_event = QueueSignal()
        self.pub_task: asyncio.Task[None] | None = None
        self.sub_task: asyncio.Task[None] | None = None
        self.retired = False
        #: no publishing before this (monotonic) time: see :meth:`hold`
        self.held_until = 0.0
        #: one entry per PING written on the subscriber connection, in order: the waiter its PONG
        #: resolves (None for the watchdog's): PONGs come back in the order of the PINGs
        self._pings: deque[asyncio.Future[None] | None] = deque()
        #: a link made after startup (a new master): it may lack what the old one had (the token key)
        self._ever_published = bus.routed
        self._stall_logged = False
        #: SUNSUBSCRIBEs we sent and whose replies are still to come (not a slot move)
        self._unsubscribing: dict[bytes, int] = {}
        #: channels whose subscribe Redis has not confirmed yet on the current connection
        self._unconfirmed: set[bytes] = set()
        #: (un)subscribes asked for in this loop iteration, for the connection they were asked on:
        #: written together at its end (one write for us, one read for Redis; joins come in bursts)
        self._sub_writes: list[tuple[bytes, bytes]] = []
        self._sub_writes_conn: RespConnection | None = None
        self._retry_delay = 0.0
        self._retry: asyncio.TimerHandle | None = None
        self._restarts = {"publisher": 0, "subscriber": 0}
        self._last_refusal_log = 0.0
        self._last_sub_refusal_log = 0.0
        #: did the subscriber's last connection get RESP3 (None: not connected yet)? Without it
        #: the publisher connects on its own without waiting for the subscriber
        self._resp3: bool | None = None
        sharded = bus.deployment.sharded
        self.publish_command = b"SPUBLISH" if sharded else b"PUBLISH"
        self.subscribe_command = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self.unsubscribe_command = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._start("publisher")
        self._start("subscriber")

    def _start(self, which: str, delay: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        body = self._publisher() if which == "publisher" else self._subscriber()
        task = loop.create_task(self._after(delay, body), name=f"hubwire-redis-{which} {self.node.node}")
        if which == "publisher":
            self.pub_task = task
        else:
            self.sub_task = task
        task.add_done_callback(lambda done: self._ended(which, done))

    @staticmethod
    async def _after(delay: float, body: Coroutine[Any, Any, None]) -> None:
        if delay:
            await asyncio.sleep(delay)
        await body

    def _ended(self, which: str, task: asyncio.Task[None]) -> None:
        """The supervisor: a loop that ends while the link runs is restarted (with backoff) and counted."""
        if not self.bus.running or self.retired:
            return
        if task.cancelled():
            log.error("backplane %s task was cancelled; restarting it", which)
        else:
            log.error("backplane %s task ended unexpectedly; restarting it", which, exc_info=task.exception())
        if which == "subscriber":
            self.bus.stats.subscriber_restarts += 1
        else:
            self.bus.stats.publisher_restarts += 1
        self._restarts[which] += 1
        delay = min(_RESTART_BACKOFF_MAX, 0.05 * 2.0 ** min(self._restarts[which] - 1, 10))
        self._start(which, delay if self._restarts[which] > 1 else 0.0)

    async def stop(self) -> None:
        self.retired = True
        await cancel_and_wait(
            [t for t in (self.pub_task, self.sub_task) if t is not None], what="a Redis link"
        )
        for conn in (self.pub, self.sub):
            if conn is not None:
                conn.close()

    @property
    def publisher_connected(self) -> bool:
        return self.pub is not None and self.pub.is_open

    @property
    def subscriber_connected(self) -> bool:
        return self.sub is not None and self.sub.is_open and self.sub_ready.is_set()

    def hold(self, seconds: float) -> None:
        """Publish nothing for ``seconds``: channels just moved here (a failover, a slot move).

        Why: every instance's subscriber follows the move on its own, within about a second of
        the others; a message published here before they all did would reach only some of them.
        Held, it behaves as in a short outage: buffered, then sent in order.
        """
        self.held_until = max(self.held_until, time.monotonic() + seconds)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the publisher has sent everything queued, or cannot."""
        deadline = time.monotonic() + timeout
        while self.pending() and self.publisher_connected and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    def pending(self) -> list[Outgoing]:
        return [item for item in self.queue if not item.done]

    def trim(self) -> None:
        """Forget answered messages at the head of the queue."""
        queue = self.queue
        while queue and queue[0].done:
            queue.popleft()

    # -- subscriptions -----------------------------------------------------------------------------

    def add_channel(self, key: bytes) -> None:
        """Subscribe ``key`` here (at once when connected, also while the rest is re-subscribed)."""
        if key in self.channels:
            return
        self.channels.add(key)
        sub = self.sub
        if sub is not None and sub.is_open:
            self._queue_sub_write(sub, self.subscribe_command, key)
            self._unconfirmed.add(key)

    def drop_channel(self, key: bytes) -> bool:
        """Unsubscribe ``key`` here; True when an UNSUBSCRIBE goes to Redis (its answer will come)."""
        if key not in self.channels:
            return False
        self.channels.discard(key)
        self._unconfirmed.discard(key)
        sub = self.sub
        if sub is None or not sub.is_open:
            return False
        self._queue_sub_write(sub, self.unsubscribe_command, key)
        # counted now, not when written: a slot-move push for this channel read before the write
        # must find it counted (a node that lost the slot answers our write with MOVED, which
        # consumes nothing). A write dropped with its connection: the count is reset when the
        # next connection opens.
        self._unsubscribing[key] = self._unsubscribing.get(key, 0) + 1
        return True

    def unsubscribing(self) -> list[bytes]:
        """Channels whose UNSUBSCRIBE was sent here and not answered yet."""
        return list(self._unsubscribing)

    def _queue_sub_write(self, sub: RespConnection, command: bytes, key: bytes) -> None:
        if self._sub_writes_conn is not sub:
            # a new connection: what was queued for the old one is void (the new one was
            # subscribed to every channel in self.channels when it opened)
            self._sub_writes = []
            self._sub_writes_conn = sub
        if not self._sub_writes:
            asyncio.get_running_loop().call_soon(self._write_sub_commands)
        self._sub_writes.append((command, key))

    def _write_sub_commands(self) -> None:
        """Write the queued (un)subscribes in order, in one write; runs of the same command become
        one command with many channels (SSUBSCRIBE takes one slot per command: one channel each).

        Redis refuses a whole SUBSCRIBE when ACL rules forbid one of its channels: the others are
        then asked for again one by one after the backoff (``_on_subscribe_error``)."""
        writes, self._sub_writes = self._sub_writes, []
        sub = self._sub_writes_conn
        if not writes or sub is None or sub is not self.sub or not sub.is_open:
            return
        with contextlib.suppress(RespError):  # the connection is gone: the next one subscribes
            sub.write_commands(self._sub_commands(writes), expect_replies=False)

    def _sub_commands(self, writes: list[tuple[bytes, bytes]]) -> list[list[bytes]]:
        """(command, channel) pairs as commands, in order: consecutive channels of the same command
        in one command (at most ``_SUBSCRIBE_CHUNK``), except on a cluster (one slot per command)."""
        commands: list[list[bytes]] = []
        merge = not self.bus.deployment.sharded
        for command, key in writes:
            last = commands[-1] if commands else None
            if merge and last is not None and last[0] == command and len(last) <= _SUBSCRIBE_CHUNK:
                last.append(key)
            else:
                commands.append([command, key])
        return commands

    def _on_push(self, reply: list[Any]) -> None:
        """A push on the subscriber connection (bytes from Redis: a malformed one is counted, not raised)."""
        try:
            kind = reply[0]
            if kind == b"message" or kind == b"smessage":
                self.bus.dispatch(reply[1], reply[2])
            elif kind == b"pong":
                waiter = self._pings.popleft() if self._pings else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
            elif kind == b"subscribe" or kind == b"ssubscribe":
                self._unconfirmed.discard(reply[1])
                self._retry_delay = 0.0
                self.bus.confirmed(reply[1])
            elif kind == b"sunsubscribe" or kind == b"unsubscribe":
                self._on_unsubscribed(reply[1])
            elif kind == b"error":
                self._on_subscribe_error(reply[1])
        except (IndexError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            self.bus.stats.malformed += 1
            log.warning("ignoring a malformed push from Redis at %s: %s", self.node.node, exc)

    def _on_unsubscribed(self, key: bytes) -> None:
        pending = self._unsubscribing.get(key, 0)
        if pending:  # the reply to our own unsubscribe
            if pending == 1:
                del self._unsubscribing[key]
                self.bus.left(key, self)
            else:
                self._unsubscribing[key] = pending - 1
        elif key in self.channels:
            # Redis dropped a channel we still want: its slot moved to another shard
            self.channels.discard(key)
            self.bus.channel_lost(key, f"channel {key!r} left {self.node.node} (slot moved)")

    def _on_subscribe_error(self, error: bytes) -> None:
        text = error.decode(errors="replace")
        parts = text.split()
        if parts and parts[0] in ("MOVED", "ASK") and len(parts) > 1 and parts[1].isdigit():
            slot = int(parts[1])
            for key in [k for k in self.channels if self.bus.slot_of(k) == slot]:
                self.channels.discard(key)
                self.bus.confirmed(key)  # its subscriber waits no longer: the new owner gets it
                self.bus.channel_lost(key, f"{self.node.node}: {text}")
            # this node no longer has the slot: our unsubscribes there get MOVED too, not an answer
            for key in [k for k in self._unsubscribing if self.bus.slot_of(k) == slot]:
                del self._unsubscribing[key]
                self.bus.left(key, self)
            return
        # anything else (BUSY, LOADING, TRYAGAIN, NOPERM...), also while connecting: the channels
        # not confirmed yet are asked for again (one per command) after a backoff; the connection
        # and every confirmed channel stay as they are. (Starting over would refuse the same
        # re-subscription again: one channel the ACL forbids refuses the whole SUBSCRIBE.)
        if self._retry is None:
            self._retry_delay = min(self.bus.max_backoff, max(0.05, self._retry_delay * 2))
            now = time.monotonic()
            if now - self._last_sub_refusal_log > 5.0:  # a channel refused for good: not every second
                self._last_sub_refusal_log = now
                log.warning(
                    "backplane subscription refused by %s: %s; asking again in %.2fs",
                    self.node.node,
                    text,
                    self._retry_delay,
                )
            self._retry = asyncio.get_running_loop().call_later(self._retry_delay, self._resubscribe)

    def _resubscribe(self) -> None:
        self._retry = None
        self._write_sub_commands()
        sub = self.sub
        keys = [key for key in self._unconfirmed if key in self.channels]
        if sub is None or not sub.is_open or not keys:
            return
        with contextlib.suppress(RespError):
            sub.write_commands([(self.subscribe_command, key) for key in keys], expect_replies=False)

    async def _subscriber(self) -> None:
        attempt = 0
        while self.bus.running and not self.retired:
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(
                    self.node,
                    self.bus.connect_timeout,
                    on_push=self._on_push,
                    name=f"{self.bus.name}-sub",
                    resp3=not self.bus.deployment.sharded,
                )
                conn.subscribed = True
                self._resp3 = conn.resp3
                self.sub = conn
                for key in self._unsubscribing:  # sent on an earlier connection: no reply comes here
                    self.bus.left(key, self)
                self._unsubscribing = {}
                count = self._subscribe_all(conn)
                # the PONG arrives after every subscribe reply: then we are really subscribed
                pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._pings = deque([pong])
                conn.write_commands([(b"PING",)], expect_replies=False)
                await asyncio.wait_for(pong, self.bus.command_timeout + count / 10_000)
                if attempt:
                    self.bus.stats.subscriber_reconnects += 1
                    log.warning("backplane subscriber reconnected to %s (%d channels)", self.node.node, count)
                attempt = 0
                self.sub_ready.set()
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, RespError, TimeoutError) as exc:
                # the first failure of a streak is a warning; its retries (every backoff) are not news
                level = logging.WARNING if attempt == 0 else logging.DEBUG
                log.log(
                    level,
                    "backplane subscriber (%s, of %s): %s",
                    self.node.node,
                    self.bus.address,
                    str(exc) or type(exc).__name__,
                )
                self.bus.request_refresh(f"subscriber of {self.node.node} failed")
            finally:
                self.sub_ready.clear()
                if conn is not None:
                    conn.abort()
                if self.sub is conn:
                    self.sub = None
            if not self.bus.running or self.retired:
                return
            attempt += 1
            await asyncio.sleep(self.bus.backoff(attempt))

    def _subscribe_all(self, conn: RespConnection) -> int:
        channels = list(self.channels)
        self._unconfirmed = set(channels)
        commands = self._sub_commands([(self.subscribe_command, key) for key in channels])
        for i in range(0, len(commands), _SUBSCRIBE_CHUNK):  # pipelined, a write per chunk
            conn.write_commands(commands[i : i + _SUBSCRIBE_CHUNK], expect_replies=False)
        return len(channels)

    async def _watch(self, conn: RespConnection) -> None:
        """Ping the subscriber; replace it when it is silent while Redis answers a fresh connection."""
        bus = self.bus
        while bus.running and conn.is_open and not self.retired:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), bus.health_interval)
            if not conn.is_open:
                return
            idle = time.monotonic() - conn.last_read
            if idle > bus.health_timeout:
                if await self._stalled("subscriber", conn, idle):
                    conn.abort()
                    return
            elif idle >= bus.health_interval:
                self._stall_logged = False
                with contextlib.suppress(RespError):
                    conn.write_commands([(b"PING",)], expect_replies=False)
                    self._pings.append(None)

    async def _stalled(self, which: str, conn: RespConnection, idle: float) -> bool:
        """A connection of ours is silent: True when it must be replaced (Redis answers others).

        Why not replace it at once: when Redis itself is frozen or slow the connection is fine
        and everything written on it is answered when Redis wakes up; a new connection would
        only re-publish (duplicates) and miss messages published meanwhile. A Redis that wakes
        up while the probe waits answers the probe and ours together: ours is kept then.
        """
        if not self._stall_logged:
            self.bus.stats.stalls_detected += 1
        asked = time.monotonic()
        # publishes wait on it: Redis may be holding writes (CLIENT PAUSE WRITE, as FAILOVER and
        # managed services' maintenance do) while it answers a PING. The probe then publishes too,
        # nothing to nobody (beside the oldest waiting publish's channel: an ACL that lets us
        # publish there lets us publish here), and is held like ours. Not on a Cluster, where
        # that channel could be another node's slot (a MOVED answers at once).
        beside = None
        if conn is self.pub and not self.bus.deployment.sharded:
            waiting = next((item for item in self.queue if item.inflight and not item.done), None)
            beside = None if waiting is None else waiting.channel + _PROBE_SUFFIX
        answered = await self.probe(beside)
        if answered and conn.last_read < asked:
            # Redis may write the probe's answer a moment before ours (read in the same pass or next)
            await asyncio.sleep(_BEHIND_PROBE)
        if answered and conn.last_read < asked:
            log.error(
                "backplane %s to %s silent for %.1fs while Redis answers: reconnecting",
                which,
                self.node.node,
                idle,
            )
            self._stall_logged = False
            return True
        if answered:  # ours answered too: Redis was slow; a later silence is a new stall
            log.warning("Redis at %s was silent for %.1fs: slow, now answering", self.node.node, idle)
            self._stall_logged = False
        elif not self._stall_logged:
            self._stall_logged = True
            log.error("Redis at %s does not answer (%.1fs): waiting for it", self.node.node, idle)
        return False

    async def barrier(self) -> None:
        """Return once every message Redis pushed to our subscriber before now was dispatched.

        A PING on the subscriber connection is answered after everything Redis
        queued on it before; nothing to wait for while it is not connected.
        """
        sub = self.sub
        if sub is None or not sub.is_open or not self.sub_ready.is_set():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._write_sub_commands()  # what was asked before the barrier goes before its PING
        sub.write_commands([(b"PING",)], expect_replies=False)
        self._pings.append(waiter)
        await waiter

    async def probe(self, publish_to: bytes | None = None) -> bool:
        """Does the node answer a PING (or an empty publish to ``publish_to``) on a fresh
        connection, within the health timeout? (A refused publish is an answer too.)"""
        bus = self.bus
        try:
            conn = await RespConnection.open(self.node, bus.health_timeout)
        except (OSError, RespError, TimeoutError):
            return False
        try:
            if publish_to is None:
                await asyncio.wait_for(conn.command(b"PING"), bus.health_timeout)
            else:
                published = conn.command(self.publish_command, publish_to, b"")
                await asyncio.wait_for(published, bus.health_timeout)
            return True
        except RespError as exc:
            return publish_to is not None and conn.is_open and not str(exc).startswith("connection")
        except (OSError, TimeoutError):
            return False
        finally:
            conn.abort()

    # -- publishing --------------------------------------------------------------------------------

    async def _shared_connection(self) -> RespConnection | None:
        """The subscriber's connection once it is subscribed, when it may publish (RESP3), else None.

        Not on a Cluster (see the module's docstring): None at once, the publisher connects itself.
        """
        if self.bus.deployment.sharded or self._resp3 is False:
            return None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.bus.connect_timeout
        while True:
            try:
                await asyncio.wait_for(self.sub_ready.wait(), deadline - loop.time())
            except TimeoutError:
                # the subscriber is not ready (Redis unreachable, a slow re-subscription): the
                # publisher does not wait on it, it connects on its own until that connection ends
                return None
            sub = self.sub
            if sub is not None and sub.is_open and self.sub_ready.is_set():
                return sub if sub.resp3 else None
            await asyncio.sleep(0.01)  # the connection just went: its subscriber clears sub_ready

    async def _publisher(self) -> None:
        attempt = 0
        bus = self.bus
        #: the last connection was left for the subscriber's (not lost): no reconnect to count
        moving = False
        while bus.running and not self.retired:
            try:
                conn = await self._shared_connection()
                if conn is None:
                    conn = await RespConnection.open(self.node, bus.connect_timeout, name=f"{bus.name}-pub")
            except (OSError, RespError, TimeoutError) as exc:
                attempt += 1
                if attempt == 1:
                    log.warning(
                        "backplane publisher cannot reach %s (of %s): %s",
                        self.node.node,
                        bus.address,
                        str(exc) or type(exc).__name__,
                    )
                bus.request_refresh(f"publisher of {self.node.node} cannot connect")
                await asyncio.sleep(bus.backoff(attempt))
                continue
            self.pub = conn
            if moving:
                moving = False
            elif attempt or self._ever_published:
                bus.stats.publisher_reconnects += 1
                log.warning(
                    "backplane publisher reconnected to %s; %d buffered messages to flush",
                    self.node.node,
                    len(self.pending()),
                )
                bus.run_reconnect_hooks()
                # let every instance's subscriber come back before flushing what piled up
                await self._wait_subscriber(bus.flush_grace)
            attempt = 0
            self._ever_published = True
            try:
                moving = await self._publish_while_open(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, RespError, TimeoutError) as exc:
                bus.stats.publish_errors += 1
                log.warning(
                    "backplane publish to %s (of %s) failed: %s",
                    self.node.node,
                    bus.address,
                    str(exc) or type(exc).__name__,
                )
            finally:
                if moving:
                    conn.close()  # its own, left between two batches: nothing in flight
                else:
                    conn.abort()  # shared: the subscriber sees it lost and reconnects
                if self.pub is conn:
                    self.pub = None
            attempt = 0 if moving else 1

    def _may_share(self, conn: RespConnection) -> bool:
        """Publishing on a connection of its own while the subscriber's could take it (RESP3)?"""
        sub = self.sub
        return (
            conn is not sub
            and sub is not None
            and sub.resp3
            and sub.is_open
            and self.sub_ready.is_set()
            and not self.bus.deployment.sharded
        )

    async def _publish_while_open(self, conn: RespConnection) -> bool:
        """Publish on ``conn`` until it ends; True when it is left for the subscriber's connection.

        A publisher that connected on its own (the subscriber was not ready in time) goes back
        to the shared connection as soon as it is ready, between two batches (nothing in flight).
        """
        while self.bus.running and conn.is_open and not self.retired:
            if self._may_share(conn):
                return True
            self.trim()
            if not self.queue:
                self.queue_event.clear()
                await self.queue_event.wait(conn.lost)
                continue
            delay = self.held_until - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            if not await self.flush_once(conn):
                # Redis said "not here" (a slot moved, a failover): wait for the new layout
                await self.bus.refreshed(self.bus.backoff(1))
        return False

    async def _wait_subscriber(self, grace: float) -> None:
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.sub_ready.wait(), max(grace, self.bus.command_timeout))
        remaining = grace - (time.monotonic() - start)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def flush_once(self, conn: RespConnection) -> bool:
        """Publish what is queued (up to ``_BATCH`` messages and ``_BATCH_BYTES``) pipelined, in
        one write; False when some must wait for a refresh."""
        batch: list[Outgoing] = []
        size = 0
        for item in self.queue:
            if not item.done:
                batch.append(item)
                size += item.size  # what the buffer counts it for (channel and payload)
                if len(batch) >= _BATCH or size >= _BATCH_BYTES:
                    break
        if not batch:
            return True
        command = self.publish_command
        commands: list[tuple[bytes, ...]] = []
        with_history = False
        for item in batch:
            if item.history is not None:
                # first the history, then the publish: a new owner that subscribed after this
                # publish finds the message in the history it reads after subscribing
                with_history = True
                commands.extend(self.bus.history_commands(item.history, item.payload))
            commands.append((command, item.channel, item.payload))
        futures = conn.write_commands(commands)
        for item in batch:
            item.inflight = True
        try:
            results = await self._replies(conn, futures)
        finally:
            for item in batch:
                item.inflight = False
        if with_history:
            results = self._publish_results(batch, results)
        return self._settle(batch, results)

    def _publish_results(self, batch: list[Outgoing], results: list[Any]) -> list[Any]:
        """The publishes' replies of a batch with history writes; a failed history write is counted."""
        picked: list[Any] = []
        index = 0
        for item in batch:
            if item.history is not None:
                for history in results[index : index + _HISTORY_COMMANDS]:
                    if isinstance(history, Exception) and not str(history).startswith(
                        ("connection", "not conn")
                    ):
                        self.bus.stats.history_errors += 1
                index += _HISTORY_COMMANDS
            picked.append(results[index])
            index += 1
        return picked

    async def _replies(self, conn: RespConnection, futures: list[asyncio.Future[Any]]) -> list[Any]:
        """Wait for the batch's replies; give up only when the connection is lost or replaced.

        Replies resolve their futures in order (and a lost connection fails every pending one in
        order), so the batch is answered when its last future is done: that one is waited for.
        """
        last = futures[-1]
        while not await _until_done(last, self.bus.health_timeout):
            if conn is self.sub:
                continue  # shared with the subscriber, whose watchdog looks after it
            idle = time.monotonic() - conn.last_read
            if idle > self.bus.health_timeout and await self._stalled("publisher", conn, idle):
                conn.abort()  # the pending replies fail with "connection lost": kept, resent
        return [_outcome(future) for future in futures]

    def _settle(self, batch: list[Outgoing], results: list[Any]) -> bool:
        bus = self.bus
        now = time.monotonic()
        complete = True
        lost = False
        for item, result in zip(batch, results, strict=True):
            if item.done:
                continue  # dropped from a full buffer, or moved to another node meanwhile
            if isinstance(result, int):
                bus.finished(item, result)
                continue
            text = str(result)
            if isinstance(result, RespError) and text.split(" ", 1)[0] in _RETRY_ERRORS:
                complete = False
                bus.request_refresh(f"{self.node.node}: {text}")
            elif isinstance(result, RespError) and text.startswith(("connection", "not connected")):
                lost = True
            else:  # refused for good (e.g. NOPERM on a channel): never retried
                bus.stats.publish_errors += 1
                if now - self._last_refusal_log > 5.0:
                    self._last_refusal_log = now
                    log.error("Redis at %s refused a publish to %r: %s", self.node.node, item.channel, text)
                bus.finished(item, RespError(text))
        self.trim()
        delivered = [item for item in batch if item.done]
        if delivered:
            bus.stats.last_publish_lag = now - delivered[-1].enqueued
        if lost:
            raise RespError("connection lost under a batch")
        return complete
