"""The process's link to Redis: one publisher queue, one multiplexed subscriber, never silent.

What it guarantees, and why (the failures peers are known for):

* **Outages are buffered, not lost.** ``publish`` appends to a bounded queue
  and returns at once; one task writes the queue to Redis pipelined. A message
  leaves the queue only when Redis has answered its PUBLISH, so while Redis is
  unreachable messages wait and are published **in order** when it returns.
  Past ``buffer_size`` the oldest are dropped, counted and logged.
* **After an outage the buffer is flushed with a grace delay**, so that the
  other instances' subscribers (reconnecting on the same backoff) are back
  before the buffered messages are published.
* **The subscriber cannot die silently.** A supervisor reconnects with
  backoff and re-subscribes every channel; a watchdog PINGs the subscriber
  connection and aborts it when no byte arrived within ``health_timeout``
  (a stalled socket or a killed client); if the supervisor task itself ever
  ends unexpectedly it is restarted and counted.
* **Health is visible**: :meth:`health` and :class:`BusStats` counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

from ..connections.tasks import BackgroundTasks
from .resp import RedisAddress, RespConnection, RespError

__all__ = ["BusStats", "RedisBus"]

log = logging.getLogger("hubwire.backplane")

Handler = Callable[[bytes, bytes], None]
_SUBSCRIBE_CHUNK = 256


@dataclass(slots=True)
class BusStats:
    """Counters of one process's backplane link (exported as metrics)."""

    published: int = 0
    received: int = 0
    dropped: int = 0
    publish_errors: int = 0
    publisher_reconnects: int = 0
    subscriber_reconnects: int = 0
    subscriber_restarts: int = 0
    stalls_detected: int = 0
    handler_errors: int = 0
    last_publish_lag: float = 0.0


@dataclass(slots=True)
class _Outgoing:
    channel: bytes
    payload: bytes
    enqueued: float
    future: asyncio.Future[int] | None


class RedisBus:
    """Publisher queue + one subscriber connection shared by every hub of the process."""

    def __init__(
        self,
        url: str,
        *,
        buffer_size: int = 10_000,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        health_interval: float = 1.0,
        health_timeout: float = 3.0,
        max_backoff: float = 1.0,
        flush_grace: float | None = None,
        name: str = "hubwire",
    ) -> None:
        self.address = RedisAddress(url)
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.max_backoff = max_backoff
        self.flush_grace = max_backoff + 0.5 if flush_grace is None else flush_grace
        self.name = name
        self.stats = BusStats()
        self._queue: deque[_Outgoing] = deque()
        self._queue_event = asyncio.Event()
        self._handlers: dict[bytes, Handler] = {}
        self._confirmations: dict[bytes, list[asyncio.Future[None]]] = {}
        self._sub: RespConnection | None = None
        self._pub: RespConnection | None = None
        self._sub_ready = asyncio.Event()
        self._pub_task: asyncio.Task[None] | None = None
        self._sub_task: asyncio.Task[None] | None = None
        self._running = False
        self._last_drop_log = 0.0
        self._pong: asyncio.Future[None] | None = None
        self._ever_published = False
        self._reconnect_hooks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._hook_tasks = BackgroundTasks("backplane reconnect hooks")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start both loops; waits briefly for the first connection but never fails on it."""
        if self._running:
            return
        self._running = True
        loop = asyncio.get_running_loop()
        self._pub_task = loop.create_task(self._publisher(), name="hubwire-redis-publisher")
        self._start_subscriber()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sub_ready.wait(), self.connect_timeout)

    def _start_subscriber(self) -> None:
        self._sub_task = asyncio.get_running_loop().create_task(
            self._subscriber(), name="hubwire-redis-subscriber"
        )
        self._sub_task.add_done_callback(self._subscriber_ended)

    def _subscriber_ended(self, task: asyncio.Task[None]) -> None:
        if not self._running:
            return
        if task.cancelled():
            log.error("backplane subscriber task was cancelled; restarting it")
        else:
            log.error(
                "backplane subscriber task ended unexpectedly; restarting it", exc_info=task.exception()
            )
        self.stats.subscriber_restarts += 1
        self._start_subscriber()

    async def close(self) -> None:
        """Stop the loops and close both connections (queued messages get one last flush attempt)."""
        if not self._running:
            return
        if self._queue and self._pub is not None and self._pub.is_open:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_once(self._pub), self.command_timeout)
        self._running = False
        await self._hook_tasks.cancel_all()
        for task in (self._pub_task, self._sub_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        for conn in (self._pub, self._sub):
            if conn is not None:
                conn.close()

    def on_reconnect(self, hook: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``hook`` (in the background) each time the publisher reconnects after losing Redis."""
        self._reconnect_hooks.append(hook)

    def _run_reconnect_hooks(self) -> None:
        for hook in self._reconnect_hooks:
            self._hook_tasks.spawn(hook(), name="backplane reconnect hook")

    # -- health ------------------------------------------------------------------------------------

    @property
    def publisher_connected(self) -> bool:
        return self._pub is not None and self._pub.is_open

    @property
    def subscriber_connected(self) -> bool:
        return self._sub is not None and self._sub.is_open and self._sub_ready.is_set()

    @property
    def healthy(self) -> bool:
        return self.publisher_connected and self.subscriber_connected

    @property
    def buffered(self) -> int:
        return len(self._queue)

    def health(self) -> dict[str, Any]:
        """A snapshot for health endpoints and logs."""
        return {
            "state": "connected" if self.healthy else "degraded",
            "publisher_connected": self.publisher_connected,
            "subscriber_connected": self.subscriber_connected,
            "buffered": self.buffered,
            "subscriptions": len(self._handlers),
            **asdict(self.stats),
        }

    # -- subscriptions -----------------------------------------------------------------------------

    async def subscribe(self, channel: str, handler: Handler, wait: float | None = None) -> None:
        """Route messages of ``channel`` to ``handler``; waits for Redis to confirm when connected.

        While Redis is unreachable the subscription is recorded and made on
        reconnect, so callers are never blocked by an outage.
        """
        key = channel.encode()
        already = key in self._handlers
        self._handlers[key] = handler
        sub = self._sub
        if already or sub is None or not sub.is_open or not self._sub_ready.is_set():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(key, []).append(future)
        try:
            sub.write_commands([("SUBSCRIBE", key)], expect_replies=False)
            await asyncio.wait_for(future, wait if wait is not None else self.command_timeout)
        except (TimeoutError, RespError):
            log.warning("subscription to %s not confirmed yet; it will be renewed on reconnect", channel)
        finally:
            waiters = self._confirmations.get(key)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._confirmations[key]

    def unsubscribe(self, channel: str) -> None:
        """Stop routing ``channel``; tells Redis when connected."""
        key = channel.encode()
        if self._handlers.pop(key, None) is None:
            return
        sub = self._sub
        if sub is not None and sub.is_open and self._sub_ready.is_set():
            with contextlib.suppress(RespError):
                sub.write_commands([("UNSUBSCRIBE", key)], expect_replies=False)

    def is_subscribed(self, channel: str) -> bool:
        return channel.encode() in self._handlers

    def _on_push(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"message":
            handler = self._handlers.get(reply[1])
            if handler is None:
                return
            self.stats.received += 1
            try:
                handler(reply[1], reply[2])
            except Exception:
                self.stats.handler_errors += 1
                log.exception("backplane handler for %r failed", reply[1])
        elif kind == b"pong":
            if self._pong is not None and not self._pong.done():
                self._pong.set_result(None)
        elif kind == b"subscribe":
            for future in self._confirmations.pop(reply[1], ()):
                if not future.done():
                    future.set_result(None)

    async def _subscriber(self) -> None:
        attempt = 0
        while self._running:
            conn: RespConnection | None = None
            try:
                conn = await RespConnection.open(
                    self.address, self.connect_timeout, on_push=self._on_push, name=f"{self.name}-sub"
                )
                conn.subscribed = True
                self._sub = conn
                channels = list(self._handlers)
                for i in range(0, len(channels), _SUBSCRIBE_CHUNK):
                    conn.write_commands(
                        [("SUBSCRIBE", *channels[i : i + _SUBSCRIBE_CHUNK])], expect_replies=False
                    )
                # the PONG arrives after every SUBSCRIBE reply: then we are really subscribed
                self._pong = asyncio.get_running_loop().create_future()
                conn.write_commands([("PING",)], expect_replies=False)
                await asyncio.wait_for(self._pong, self.command_timeout)
                if attempt:
                    self.stats.subscriber_reconnects += 1
                    log.warning("backplane subscriber reconnected (%d channels)", len(channels))
                attempt = 0
                self._sub_ready.set()
                await self._watch(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, RespError, TimeoutError) as exc:
                log.warning("backplane subscriber: %s", exc or type(exc).__name__)
            finally:
                self._sub_ready.clear()
                if conn is not None:
                    conn.abort()
                if self._sub is conn:
                    self._sub = None
            if not self._running:
                return
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    async def _watch(self, conn: RespConnection) -> None:
        """Ping the subscriber and abort it when it stops answering."""
        while self._running and conn.is_open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.lost), self.health_interval)
            if not conn.is_open:
                return
            idle = time.monotonic() - conn.last_read
            if idle > self.health_timeout:
                self.stats.stalls_detected += 1
                log.error("backplane subscriber silent for %.1fs; reconnecting", idle)
                conn.abort()
                # Redis is frozen or unreachable, so the publisher's unanswered PUBLISHes would be
                # answered (if ever) while no subscriber is back: keep them queued and resend them
                # after the reconnect grace instead of letting them complete into the void
                pub = self._pub
                if pub is not None:
                    pub.abort()
                return
            if idle >= self.health_interval:
                with contextlib.suppress(RespError):
                    conn.write_commands([("PING",)], expect_replies=False)

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.max_backoff, 0.05 * 2.0 ** min(attempt, 10))
        return base * (0.75 + random.random() * 0.5)

    # -- publishing --------------------------------------------------------------------------------

    def publish(
        self, channel: str, payload: bytes, want_receivers: bool = False
    ) -> asyncio.Future[int] | None:
        """Queue a PUBLISH; never blocks. With ``want_receivers`` a future gets Redis's receiver count."""
        future: asyncio.Future[int] | None = None
        if want_receivers:
            future = asyncio.get_running_loop().create_future()
        self._queue.append(_Outgoing(channel.encode(), payload, time.monotonic(), future))
        if len(self._queue) > self.buffer_size:
            dropped = self._queue.popleft()
            self.stats.dropped += 1
            if dropped.future is not None and not dropped.future.done():
                dropped.future.set_exception(RespError("backplane buffer overflow: message dropped"))
            now = time.monotonic()
            if now - self._last_drop_log > 5.0:
                self._last_drop_log = now
                log.error(
                    "backplane buffer full (%d messages): dropping the oldest (%d dropped so far)",
                    self.buffer_size,
                    self.stats.dropped,
                )
        self._queue_event.set()
        return future

    async def command(self, *args: Any) -> Any:
        """Run one ordinary command on the publisher connection (used for setup, e.g. shared keys)."""
        conn = self._pub
        if conn is None or not conn.is_open:
            conn = await RespConnection.open(self.address, self.connect_timeout)
            try:
                return await asyncio.wait_for(conn.command(*args), self.command_timeout)
            finally:
                conn.close()
        return await asyncio.wait_for(conn.command(*args), self.command_timeout)

    async def _publisher(self) -> None:
        attempt = 0
        while self._running:
            try:
                conn = await RespConnection.open(self.address, self.connect_timeout, name=f"{self.name}-pub")
            except (OSError, RespError, TimeoutError) as exc:
                attempt += 1
                if attempt == 1:
                    log.warning("backplane publisher cannot reach Redis: %s", exc or type(exc).__name__)
                await asyncio.sleep(self._backoff(attempt))
                continue
            self._pub = conn
            if attempt or self._ever_published:
                self.stats.publisher_reconnects += 1
                log.warning(
                    "backplane publisher reconnected; %d buffered messages to flush", len(self._queue)
                )
                self._run_reconnect_hooks()
                # let every instance's subscriber come back before flushing what piled up
                await self._wait_subscriber(self.flush_grace)
            attempt = 0
            self._ever_published = True
            try:
                while self._running and conn.is_open:
                    if not self._queue:
                        self._queue_event.clear()
                        waiter: asyncio.Future[Any] = asyncio.ensure_future(self._queue_event.wait())
                        lost: asyncio.Future[Any] = conn.lost
                        done, _ = await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
                        if waiter not in done:
                            waiter.cancel()
                        continue
                    await self._flush_once(conn)
            except asyncio.CancelledError:
                raise
            except (OSError, RespError, TimeoutError) as exc:
                self.stats.publish_errors += 1
                log.warning("backplane publish failed: %s", exc or type(exc).__name__)
            finally:
                conn.abort()
                if self._pub is conn:
                    self._pub = None
            attempt = 1

    async def _wait_subscriber(self, grace: float) -> None:
        start = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._sub_ready.wait(), max(grace, self.command_timeout))
        remaining = grace - (time.monotonic() - start)
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def _flush_once(self, conn: RespConnection) -> None:
        """Publish up to 1,000 queued messages pipelined; remove them once Redis answered."""
        batch = [self._queue[i] for i in range(min(len(self._queue), 1000))]
        futures = conn.write_commands([("PUBLISH", item.channel, item.payload) for item in batch])
        results = await asyncio.wait_for(asyncio.gather(*futures), self.command_timeout)
        now = time.monotonic()
        for item, receivers in zip(batch, results, strict=True):
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
            if item.future is not None and not item.future.done():
                item.future.set_result(int(receivers))
        self.stats.published += len(batch)
        self.stats.last_publish_lag = now - batch[-1].enqueued
