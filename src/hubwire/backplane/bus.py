"""The process's link to Redis: one in-order outage buffer, subscribers on every node, never silent.

What it guarantees, and why (the failures peers are known for):

* **Every deployment** (:mod:`.deployment`): one Redis, a Sentinel-managed master (followed
  through failovers) or a Redis Cluster, where channels are published and subscribed with
  sharded pub/sub (SPUBLISH / SSUBSCRIBE) on the master owning each channel's slot, so traffic
  spreads over the shards; slot moves and failovers re-route queued messages and subscriptions.
* **Outages are buffered, not lost.** ``publish`` appends to a bounded queue and returns at
  once; each node's publisher writes its queue pipelined, and a message leaves the queue only
  when Redis has answered it, so while Redis is unreachable messages wait and are published
  **in order** when it returns. The buffer is bounded in messages and in bytes; past either the
  oldest are dropped, counted and logged.
* **After an outage the buffer is flushed with a grace delay**, so that the other instances'
  subscribers (reconnecting on the same backoff) are back before the buffered messages are published.
* **The subscriber cannot die silently.** A supervisor reconnects with backoff and re-subscribes
  every channel; a watchdog PINGs it and replaces it when it is silent while Redis answers a fresh
  connection (a dead socket); a frozen or slow Redis is waited for, not re-published to. A
  subscriber task that ends unexpectedly is restarted and counted.
* **Health is visible**: :meth:`health` and :class:`BusStats` counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Collection, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..connections.tasks import BackgroundTasks, cancel_and_wait
from .deployment import NodeSettings, parse_deployment, redact_text
from .link import NodeLink, Outgoing
from .resp import RespError

__all__ = ["BusStats", "RedisBus", "history_key"]

log = logging.getLogger("hubwire.backplane")

Handler = Callable[[bytes, bytes], None]
#: how often a Sentinel or Cluster layout is checked even when nothing failed
_LAYOUT_INTERVAL = 2.0
#: the shortest time between two layout refreshes asked for by failures
_REFRESH_MIN_GAP = 0.2


@dataclass(slots=True)
class BusStats:
    """Counters of one process's backplane link (exported as metrics)."""

    published: int = 0
    received: int = 0
    dropped: int = 0
    dropped_bytes: int = 0
    publish_errors: int = 0
    publisher_reconnects: int = 0
    subscriber_reconnects: int = 0
    subscriber_restarts: int = 0
    stalls_detected: int = 0
    handler_errors: int = 0
    malformed: int = 0
    #: durable resume: history writes Redis refused (the publish itself went out)
    history_errors: int = 0
    publisher_restarts: int = 0
    layout_refreshes: int = 0
    last_publish_lag: float = 0.0


def history_key(channel: bytes) -> bytes:
    """The stream of a channel's recent messages (durable resume), in the channel's own hash slot.

    Why the slot: on a Redis Cluster the history write and the publish go to
    the same node in one pipeline, in that order. A channel with a hash tag
    keeps it (its name is a prefix of the key); any other is wrapped in one
    (the tag is then the whole channel name: the same slot). A channel whose
    braces make neither possible gets a key in another slot; the bus then
    writes its history on its own (:meth:`RedisBus.publish`).
    """
    start = channel.find(b"{")
    if start >= 0:
        end = channel.find(b"}", start + 1)
        if end > start + 1:
            return channel + b":history"
    return b"{" + channel + b"}:history"


class RedisBus:
    """Publisher queues + subscribers of every node, shared by every hub of the process."""

    def __init__(
        self,
        url: str,
        *,
        buffer_size: int = 10_000,
        buffer_bytes: int = 64 * 1024 * 1024,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        health_interval: float = 1.0,
        health_timeout: float = 3.0,
        max_backoff: float = 1.0,
        flush_grace: float | None = None,
        name: str = "hubwire",
    ) -> None:
        self.deployment = parse_deployment(
            url, connect_timeout=connect_timeout, command_timeout=command_timeout
        )
        #: the URL with its password redacted: what logs and errors show
        self.address = self.deployment.url
        self.buffer_size = buffer_size
        self.buffer_bytes = buffer_bytes
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.health_interval = health_interval
        self.health_timeout = health_timeout
        self.max_backoff = max_backoff
        self.flush_grace = max_backoff + 0.5 if flush_grace is None else flush_grace
        self.name = name
        #: durable resume: how long channel histories keep messages (0: no histories)
        self.history_window_ms = 0
        self.stats = BusStats()
        self.running = False
        self._seq = itertools.count()
        self._links: dict[str, NodeLink] = {}
        #: channel -> the link subscribed to it
        self._channel_links: dict[bytes, NodeLink] = {}
        self._handlers: dict[bytes, Handler] = {}
        #: channels unsubscribed whose UNSUBSCRIBE Redis has not answered yet, with their handler:
        #: what Redis sent before it took the UNSUBSCRIBE still reaches the handler (which knows
        #: the connection or group is gone here: a relayed request gets its 404 at once, instead
        #: of its sender waiting out a timeout for an answer that was dropped)
        self._leaving: dict[bytes, tuple[Handler, NodeLink]] = {}
        #: subscribers waiting for Redis to confirm a channel: True when it did, False at the timeout
        self._confirmations: dict[bytes, list[asyncio.Future[bool]]] = {}
        #: waiters that started in this loop pass, by timeout: one timer ends them all
        self._expiring: dict[float, list[asyncio.Future[bool]]] = {}
        #: messages published before the layout is known (or for a slot no master serves)
        self._unrouted: deque[Outgoing] = deque()
        self._buffered = 0
        self._buffered_bytes = 0
        self._last_drop_log = 0.0
        self._layout_known = False
        self.routed = False
        #: how long a node holds what it publishes after channels moved to it (NodeLink.hold)
        self.move_grace = self.flush_grace + health_interval
        self._layout_error: str | None = None
        self._refresh_wanted = asyncio.Event()
        self._lost_channels = False
        self._refreshed = asyncio.Event()
        self._maintainer: asyncio.Task[None] | None = None
        self._reconnect_hooks: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._stopping = BackgroundTasks("backplane links stopping")
        self._hook_tasks = BackgroundTasks("backplane reconnect hooks")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the links; waits briefly for the first connection but never fails on it.

        An unreachable deployment is logged as an error naming the URL (password redacted),
        and retried: while Redis is away messages are buffered, and the server says it is not
        ready where it needs Redis to answer (the token key).
        """
        if self.running:
            return
        self.running = True
        self._start_maintainer()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._until_healthy(), self.connect_timeout)
        if not self.healthy:
            log.error(
                "backplane: Redis at %s is not reachable yet (%s); messages are buffered and it is retried",
                self.address,
                self._layout_error or "connecting",
            )

    async def _until_healthy(self) -> None:
        # health spans every node's two connections (no single event): a short poll, at startup only
        while not self.healthy:  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop the links and close their connections (queued messages get one last flush attempt)."""
        if not self.running:
            return
        # the publishers send what is queued (bounded); never a second writer on their connections
        await asyncio.gather(*(link.drain(self.command_timeout) for link in list(self._links.values())))
        self._layout_known = False  # what is published from now on waits in _unrouted
        self.running = False
        await self._hook_tasks.cancel_all()
        if self._maintainer is not None:
            await cancel_and_wait([self._maintainer], what="the backplane layout")
        await self._stopping.cancel_all()
        for link in list(self._links.values()):
            await link.stop()
            self._unrouted.extend(link.pending())  # kept for a restart of this bus
        self._leaving.clear()
        unsent = [item for item in self._unrouted if not item.done]
        if unsent:
            # never silent: what the shutdown drain could not publish is named in the log
            log.error(
                "backplane closing with %d message(s) not published to Redis at %s",
                len(unsent),
                self.address,
            )
        for item in self._unrouted:
            if item.future is not None and not item.future.done():
                item.future.set_exception(RespError("backplane closed before this message was sent"))
        self._links.clear()
        self._channel_links.clear()
        self._layout_known = False
        self.routed = False
        with contextlib.suppress(Exception):
            await self.deployment.aclose()

    def on_reconnect(self, hook: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``hook`` (in the background) each time a publisher reconnects after losing Redis."""
        self._reconnect_hooks.append(hook)

    def run_reconnect_hooks(self) -> None:
        for hook in self._reconnect_hooks:
            self._hook_tasks.spawn(hook(), name="backplane reconnect hook")

    def backoff(self, attempt: int) -> float:
        base: float = min(self.max_backoff, 0.05 * 2.0 ** min(attempt, 10))
        return base * (0.75 + random.random() * 0.5)

    # -- layout ------------------------------------------------------------------------------------

    def request_refresh(self, why: str) -> None:
        """Something failed in a way a new layout may explain (a failover, a slot move)."""
        if self.deployment.kind != "standalone" and not self._refresh_wanted.is_set():
            log.info("backplane: refreshing the %s layout (%s)", self.deployment.kind, why)
            self._refresh_wanted.set()

    async def refreshed(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the next layout refresh."""
        self._refreshed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._refreshed.wait(), timeout)

    def channel_lost(self, key: bytes, why: str) -> None:
        """A node stopped carrying a channel we still want (its slot moved): subscribe it again."""
        self._lost_channels = True
        self.request_refresh(why)

    def slot_of(self, key: bytes) -> int:
        return key_slot(key)

    def history_commands(self, key: bytes, payload: bytes) -> list[tuple[bytes, ...]]:
        """XADD of one message to a channel's history, trimming what is older than the window, and
        the key's expiry (a channel nobody publishes to any more leaves nothing behind)."""
        oldest = int(time.time() * 1000) - self.history_window_ms
        window = str(self.history_window_ms).encode()
        return [
            (b"XADD", key, b"MINID", b"~", str(max(oldest, 0)).encode(), b"*", b"e", payload),
            (b"PEXPIRE", key, window),
        ]

    async def _maintain(self) -> None:
        """Learn the layout, route channels and messages to their nodes, and follow changes."""
        attempt = 0
        while self.running:
            self._refresh_wanted.clear()  # a failure reported from now on asks for another refresh
            try:
                changed, gained = await asyncio.wait_for(self.deployment.refresh(), self.command_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py's cluster errors are not all RedisErrors: never die here
                attempt += 1
                error = redact_text(str(exc) or type(exc).__name__)
                if error != self._layout_error or attempt % 30 == 1:
                    log.error("backplane: cannot reach the Redis deployment at %s: %s", self.address, error)
                self._layout_error = error
                await asyncio.sleep(self.backoff(attempt))
                continue
            attempt = 0
            self._layout_error = None
            self.stats.layout_refreshes += 1
            self._layout_known = True
            if changed or not self.routed or self._lost_channels:
                self._lost_channels = False
                self._route(gained)
            self._refreshed.set()
            if self.deployment.kind == "standalone":
                return  # one node, for good
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._refresh_wanted.wait(), _LAYOUT_INTERVAL)
            await asyncio.sleep(_REFRESH_MIN_GAP)

    def _maintainer_ended(self, task: asyncio.Task[None]) -> None:
        """Following the layout must not stop while the bus runs: restart it (after a pause)."""
        if not self.running or (not task.cancelled() and task.exception() is None):
            return  # closing, or one Redis: its layout was learned once, for good
        log.error(
            "backplane layout task ended unexpectedly; restarting it",
            exc_info=None if task.cancelled() else task.exception(),
        )
        self._start_maintainer(1.0)

    def _start_maintainer(self, delay: float = 0.0) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            await self._maintain()

        self._maintainer = asyncio.get_running_loop().create_task(run(), name="hubwire-redis-layout")
        self._maintainer.add_done_callback(self._maintainer_ended)

    def _target(self, key: bytes) -> NodeLink | None:
        try:
            node: NodeSettings = self.deployment.node_for(key)
        except RedisError:
            return None
        return self._link(node)

    def _link(self, node: NodeSettings) -> NodeLink:
        link = self._links.get(node.node)
        if link is None:
            link = self._links[node.node] = NodeLink(self, node)
            if self.routed:  # a new master (a failover): the others' subscribers are moving too
                link.hold(self.move_grace)
            link.start()
        return link

    def _route(self, gained: Collection[str] = ()) -> None:
        """Put every channel and queued message on the link of the node that now owns it.

        ``gained``: nodes that took over slots or mastership; they hold what this instance
        publishes for a moment (:meth:`NodeLink.hold`), even on channels it only publishes to.
        """
        for node in self.deployment.masters():
            link = self._link(node)
            if self.routed and node.node in gained:
                link.hold(self.move_grace)
        for key in self._handlers:
            target = self._target(key)
            current = self._channel_links.get(key)
            if current is not None and current is not target:
                current.drop_channel(key)
                del self._channel_links[key]
                if target is not None:
                    target.hold(self.move_grace)
            if target is not None:
                self._channel_links[key] = target
                target.add_channel(key)
        for link in list(self._links.values()):
            self._reroute(link.pending(), link)
        unrouted, self._unrouted = list(self._unrouted), deque()
        self._reroute(unrouted, None)
        masters = self.deployment.nodes()
        for name, link in list(self._links.items()):
            if name not in masters:  # no longer a master: what it carried is on the new owners now
                del self._links[name]
                for key in link.unsubscribing():  # no answer comes from a link that stops
                    self.left(key, link)
                for key in list(link.channels):
                    link.channels.discard(key)
                    if self._channel_links.get(key) is link:
                        del self._channel_links[key]
                self._reroute(link.pending(), link)
                self._stopping.spawn(link.stop(), name=f"stop backplane link {name}")
        if any(key not in self._channel_links for key in self._handlers):
            self.request_refresh("channels without a node")
        self.routed = True

    def _reroute(self, items: list[Outgoing], source: NodeLink | None) -> None:
        moved: dict[NodeLink | None, list[Outgoing]] = {}
        for item in items:
            target = self._target(item.channel)
            if target is source:
                if source is None:
                    self._unrouted.append(item)  # still no node for it
                continue
            if source is not None:
                item.done = True  # leaves the old node's queue; a copy goes to the new one
                item = Outgoing(
                    item.seq, item.channel, item.payload, item.enqueued, item.future, size=item.size
                )
            moved.setdefault(target, []).append(item)
        for target, batch in moved.items():
            queue = self._unrouted if target is None else target.queue
            queue.extendleft(reversed(batch))  # they were published before what is queued there
            if target is not None:
                if source is not None:
                    target.hold(self.move_grace)
                target.queue_event.set()
        if source is not None:
            source.trim()

    # -- health ------------------------------------------------------------------------------------

    def _active_links(self) -> list[NodeLink]:
        return [link for link in self._links.values() if link.channels or link.pending()] or list(
            self._links.values()
        )

    @property
    def publisher_connected(self) -> bool:
        links = self._active_links()
        return self._layout_known and bool(links) and all(link.publisher_connected for link in links)

    @property
    def subscriber_connected(self) -> bool:
        links = self._active_links()
        return self._layout_known and bool(links) and all(link.subscriber_connected for link in links)

    @property
    def healthy(self) -> bool:
        return self.publisher_connected and self.subscriber_connected and not self._unrouted

    @property
    def buffered(self) -> int:
        return self._buffered

    def health(self) -> dict[str, Any]:
        """A snapshot for health endpoints and logs."""
        return {
            "state": "connected" if self.healthy else "degraded",
            "deployment": self.deployment.kind,
            "nodes": sorted(self._links),
            "publisher_connected": self.publisher_connected,
            "subscriber_connected": self.subscriber_connected,
            "buffered": self._buffered,
            "buffered_bytes": self._buffered_bytes,
            "subscriptions": len(self._handlers),
            **asdict(self.stats),
        }

    # -- subscriptions -----------------------------------------------------------------------------

    async def subscribe(self, channel: str, handler: Handler, wait: float | None = None) -> None:
        """Route messages of ``channel`` to ``handler``; waits for Redis to confirm when connected.

        While Redis is unreachable the subscription is recorded and made on reconnect, so
        callers are never blocked by an outage.
        """
        key = channel.encode()
        already = key in self._handlers
        self._handlers[key] = handler
        self._leaving.pop(key, None)
        if already:
            return
        link = self._target(key) if self._layout_known else None
        if link is None:
            return
        self._channel_links[key] = link
        if not link.subscriber_connected:
            link.add_channel(key)
            return
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(key, []).append(future)
        try:
            self._expire_later(future, wait if wait is not None else self.command_timeout)
            link.add_channel(key)
            if not await future:
                log.warning("subscription to %s not confirmed yet; it is asked again until it is", channel)
        finally:
            waiters = self._confirmations.get(key)
            if waiters and future in waiters:
                waiters.remove(future)
                if not waiters:
                    del self._confirmations[key]

    def _expire_later(self, future: asyncio.Future[bool], timeout: float) -> None:
        """End ``future`` with False after ``timeout`` unless confirmed before.

        Why not ``asyncio.wait_for``: every joined group and every connection waits here, and a
        timer, a waiter future and a callback each cost ~9 µs per subscription on Python 3.11.
        Waiters that start in the same loop pass (a burst of joins) share one timer instead, so
        a later one of the pass may wait up to that pass's length less than ``timeout``.
        """
        batch = self._expiring.get(timeout)
        if batch is None:
            batch = self._expiring[timeout] = []
            loop = asyncio.get_running_loop()
            loop.call_later(max(timeout, 0.0), self._expire, timeout, batch)
            loop.call_soon(self._close_batch, timeout, batch)  # the next pass starts another batch
        batch.append(future)

    def _close_batch(self, timeout: float, batch: list[asyncio.Future[bool]]) -> None:
        if self._expiring.get(timeout) is batch:
            del self._expiring[timeout]

    def _expire(self, timeout: float, batch: list[asyncio.Future[bool]]) -> None:
        """A batch's timeout: each waiter not confirmed (nor cancelled) by now gets False.

        The batch is closed first: uvloop runs due timers before the callbacks already queued,
        so after a pass longer than ``timeout`` a subscriber queued before the batch's own close
        would otherwise join a batch whose timer has fired, and wait without a bound.
        """
        self._close_batch(timeout, batch)
        for future in batch:
            if not future.done():
                future.set_result(False)
        batch.clear()

    def unsubscribe(self, channel: str, linger: bool = True) -> None:
        """Stop routing ``channel``; tells Redis when connected.

        ``linger``: until Redis answers, what it pushed before taking the UNSUBSCRIBE still
        reaches the handler (False for a component that is closing: nothing reaches it after).
        """
        key = channel.encode()
        handler = self._handlers.pop(key, None)
        if handler is None:
            return
        link = self._channel_links.pop(key, None)
        if link is not None and link.drop_channel(key) and linger:
            self._leaving[key] = (handler, link)

    def left(self, key: bytes, link: NodeLink) -> None:
        """``link``'s UNSUBSCRIBE of ``key`` was answered (or can no longer be: its connection or
        the link is gone); an entry from a later unsubscribe on another link stays."""
        leaving = self._leaving.get(key)
        if leaving is not None and leaving[1] is link:
            del self._leaving[key]

    def is_subscribed(self, channel: str) -> bool:
        return channel.encode() in self._handlers

    def confirmed(self, key: bytes) -> None:
        for future in self._confirmations.pop(key, ()):
            if not future.done():
                future.set_result(True)

    def dispatch(self, channel: bytes, data: bytes) -> None:
        handler = self._handlers.get(channel)
        if handler is None:
            leaving = self._leaving.get(channel)
            if leaving is None:
                return
            handler = leaving[0]
        self.stats.received += 1
        try:
            handler(channel, data)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("backplane handler for %r failed", channel)

    async def barrier(self, timeout: float) -> bool:
        """Wait until every node has pushed us what it had for us before now (False on timeout).

        Why: an instance handing a connection over must have seen every message
        published before the new owner subscribed; with sharded channels those
        come from several nodes, in no common order with the handover's own messages.
        """
        links = [link for link in self._links.values() if link.channels]
        if not links:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*(link.barrier() for link in links)), timeout)
        except TimeoutError:
            return False
        return True

    # -- publishing --------------------------------------------------------------------------------

    def publish(
        self, channel: str, payload: bytes, want_receivers: bool = False, history: bool = False
    ) -> asyncio.Future[int] | None:
        """Queue a publish; never blocks. With ``want_receivers`` a future gets Redis's receiver count.

        (On a cluster the count is that of the channel's shard, which is where its subscribers are.)
        ``history``: also append the payload to the channel's recent history (durable resume:
        see :func:`history_key`), written just before the publish on the same node.
        """
        future: asyncio.Future[int] | None = None
        if want_receivers:
            future = asyncio.get_running_loop().create_future()
        key = channel.encode()
        item = Outgoing(next(self._seq), key, payload, time.monotonic(), future, size=len(key) + len(payload))
        if history and self.history_window_ms:
            hkey = history_key(key)
            if self.deployment.sharded and key_slot(hkey) != key_slot(key):
                self._hook_tasks.spawn(self._history_alone(hkey, payload), name="history write")
            else:
                item.history = hkey
                item.size += len(hkey) + len(payload)
        link = self._target(key) if self._layout_known else None
        if link is None:
            self._unrouted.append(item)
        else:
            link.queue.append(item)
            link.queue_event.set()
        self._buffered += 1
        self._buffered_bytes += item.size
        while self._buffered > self.buffer_size or self._buffered_bytes > self.buffer_bytes:
            if not self._drop_oldest():
                break
        return future

    def finished(self, item: Outgoing, result: int | Exception) -> None:
        """A queued message was answered (or refused for good): it leaves the buffer."""
        item.done = True
        self._buffered -= 1
        self._buffered_bytes -= item.size
        if isinstance(result, int):
            self.stats.published += 1
        if item.future is not None and not item.future.done():
            if isinstance(result, int):
                item.future.set_result(result)
            else:
                item.future.set_exception(result)

    def _drop_oldest(self) -> bool:
        """Drop the oldest message not yet written to Redis (one in flight may well arrive)."""
        oldest: Outgoing | None = None
        for queue in [link.queue for link in self._links.values()] + [self._unrouted]:
            while queue and queue[0].done:
                queue.popleft()
            for item in queue:  # past the in-flight batch (at most one per node) at the head
                if not item.done and not item.inflight:
                    if oldest is None or item.seq < oldest.seq:
                        oldest = item
                    break
        if oldest is None:
            return False
        dropped = oldest
        self.stats.dropped += 1
        self.stats.dropped_bytes += dropped.size
        self.finished(dropped, RespError("backplane buffer overflow: message dropped"))
        now = time.monotonic()
        if now - self._last_drop_log > 5.0:
            self._last_drop_log = now
            log.error(
                "backplane buffer full (%d messages, %d bytes at most): dropping the oldest "
                "(%d dropped so far, %d bytes)",
                self.buffer_size,
                self.buffer_bytes,
                self.stats.dropped,
                self.stats.dropped_bytes,
            )
        return True

    async def _history_alone(self, key: bytes, payload: bytes) -> None:
        """A history write that cannot share its channel's node (braces in the channel name)."""
        try:
            for command in self.history_commands(key, payload):
                await self.command(*command)
        except Exception:
            self.stats.history_errors += 1

    async def command(self, *args: Any) -> Any:
        """Run one keyed command through redis-py (setup and shared keys: token key, claims, leases)."""
        for attempt in (1, 2):
            try:
                return await asyncio.wait_for(self.deployment.command(*args), self.command_timeout)
            except RedisConnectionError as exc:
                # a pooled connection that Redis closed (a restart): one retry on a fresh one
                if attempt == 2:
                    raise RespError(str(exc)) from None
            except RedisError as exc:
                raise RespError(str(exc)) from None
        raise AssertionError("unreachable")
