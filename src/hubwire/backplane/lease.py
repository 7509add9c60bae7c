"""Instance leases: every instance says in Redis, every second, that it is alive.

Why: an SSE or long-polling connection lives on one instance (its *owner*);
other instances relay its requests there over Redis. When the owner dies,
nothing else tells the relaying instance: Redis drops a killed process's
subscriptions only once its socket closes (never, for a host that vanished
without a RST, or a process that is frozen), so a relayed request waited the
whole relay timeout (up to 100 s for a poll) while the client kept a dead
connection. With a lease, the owner's death is known within the lease's
expiry (3 s by default) and the request is answered "no such connection"
(404): the client reconnects to a live instance.

Keys (single-key commands only, so they work on Redis Cluster too):

* ``{prefix}hubwire:internal:lease:{server_name}``: the lease, set with a
  short expiry and refreshed by :class:`InstanceLease`; deleted at once on a
  clean stop.
* ``{prefix}hubwire:internal:instances``: a hash of every instance that ever
  held a lease (recently): ``server_name -> {"started": t, "stopped": t?}``.
  An instance listed there without a lease is dead (or stopped cleanly, then
  ``stopped`` says when). Entries of instances gone for a day are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Protocol

from ..connections.tasks import cancel_and_wait

__all__ = ["InstanceLease", "LeaseWatch", "claim_key", "instances_key", "lease_key"]

log = logging.getLogger("hubwire.backplane")

#: instances without a lease that started longer ago than this are pruned from the instances hash
_FORGET_AFTER = 24 * 3600.0
#: how long a clean stop waits for Redis to delete the lease (it expires anyway)
_STOP_WAIT = 1.0
#: verdicts of at most this many owners are cached (instances are few; this only bounds a bug)
_MAX_OWNERS = 1000


class CommandBus(Protocol):
    """What leases need of the bus: one keyed command at a time, and a hook after reconnects."""

    async def command(self, *args: object) -> object: ...


def lease_key(channel_prefix: str, server_name: str) -> str:
    return f"{channel_prefix}hubwire:internal:lease:{server_name}"


def instances_key(channel_prefix: str) -> str:
    return f"{channel_prefix}hubwire:internal:instances"


def claim_key(channel_prefix: str, connection_id: str) -> str:
    """Who started ``connection_id`` (its value is that instance's server name)."""
    return f"{channel_prefix}hubwire:internal:claim:{connection_id}"


class InstanceLease:
    """Keeps this instance's lease alive in Redis while the backplane runs.

    One refresh is in flight at a time (the loop awaits it before sleeping),
    so a slow Redis never piles up commands; a failed refresh is logged once
    per outage and retried at the next tick. If Redis cannot be reached for
    longer than ``ttl``, the lease expires and other instances answer this
    instance's relayed connections with 404: while Redis is unreachable they
    could not reach it anyway.
    """

    def __init__(
        self,
        bus: CommandBus,
        channel_prefix: str,
        server_name: str,
        interval: float,
        ttl: float,
        where: str = "Redis",
    ) -> None:
        if not 0 < interval < ttl:
            raise ValueError(f"the lease must outlive its refresh interval (interval {interval}, ttl {ttl})")
        self.bus = bus
        self.channel_prefix = channel_prefix
        self.server_name = server_name
        #: the Redis named in warnings (its URL, password redacted)
        self.where = where
        self.interval = interval
        self.ttl = ttl
        self.key = lease_key(channel_prefix, server_name)
        self.started = 0.0
        #: refreshes that failed (Redis unreachable or slow); for health
        self.failures = 0
        self._registered = False
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def _record(self) -> str:
        return json.dumps({"started": self.started})

    def start(self) -> None:
        if self._task is None:
            self.started = time.time()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hubwire-lease")

    def reregister(self) -> None:
        """List this instance again at the next refresh (after a reconnect: Redis may have lost it)."""
        self._registered = False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pruned = False
        while True:
            began = loop.time()
            try:
                await self.refresh()
                if not pruned:
                    pruned = True
                    await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis unreachable or slow: try again at the next tick
                self.failures += 1
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "cannot refresh this instance's lease in %s: %s",
                        self.where,
                        exc or type(exc).__name__,
                    )
            else:
                if self._failing:
                    self._failing = False
                    log.warning("this instance's lease in Redis is refreshed again")
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - began)))

    async def refresh(self) -> None:
        """Set the lease for ``ttl`` (and list this instance when it is not listed yet)."""
        await self.bus.command("SET", self.key, self._record, "PX", math.ceil(self.ttl * 1000))
        if not self._registered:
            await self.bus.command("HSET", instances_key(self.channel_prefix), self.server_name, self._record)
            self._registered = True

    async def _prune(self) -> None:
        """Forget instances listed long ago that hold no lease (each restart adds a name)."""
        key = instances_key(self.channel_prefix)
        listed = await self.bus.command("HGETALL", key)
        if isinstance(listed, list):  # RESP2: field, value, field, value...
            listed = dict(zip(listed[::2], listed[1::2], strict=False))
        if not isinstance(listed, dict):
            return
        horizon = time.time() - _FORGET_AFTER
        for name, record in listed.items():
            try:
                started = float(json.loads(record)["started"])
            except (ValueError, TypeError, KeyError):
                started = 0.0
            if started < horizon:
                owner = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                if not await self.bus.command("EXISTS", lease_key(self.channel_prefix, owner)):
                    await self.bus.command("HDEL", key, name)

    async def stop(self) -> None:
        """Clean stop: end the refreshes and delete the lease now (no waiting for it to expire)."""
        task, self._task = self._task, None
        if task is None:
            return
        await cancel_and_wait([task], what="the instance lease")
        record = json.dumps({"started": self.started, "stopped": time.time()})
        try:
            await asyncio.wait_for(self.bus.command("DEL", self.key), _STOP_WAIT)
            await asyncio.wait_for(
                self.bus.command("HSET", instances_key(self.channel_prefix), self.server_name, record),
                _STOP_WAIT,
            )
        except Exception as exc:  # it expires within ttl anyway
            log.warning(
                "cannot delete this instance's lease in %s: %s", self.where, exc or type(exc).__name__
            )


class LeaseWatch:
    """Tells whether another instance is dead, from its lease; answers shared by concurrent waits.

    An owner is *dead* when its lease is gone while it is listed in the
    instances hash. An owner that is not listed (an instance of a version
    without leases, or Redis lost its keys) is never called dead: requests to
    it wait for its reply as before. Verdicts are cached for ``interval``;
    concurrent checks of one owner share one round trip, and one task per
    owner watches it for every request waiting on it.
    """

    def __init__(self, bus: CommandBus, channel_prefix: str, interval: float) -> None:
        self.bus = bus
        self.channel_prefix = channel_prefix
        self.interval = interval
        #: owner -> (checked at (loop time), dead, lease expiry (loop time) when alive)
        self._verdicts: dict[str, tuple[float, bool, float]] = {}
        self._checks: dict[str, asyncio.Task[bool]] = {}
        #: owners known to be listed in the instances hash (listed once, listed until pruned)
        self._listed: set[str] = set()
        self._watchers: dict[str, tuple[asyncio.Task[None], set[asyncio.Future[None]]]] = {}

    def known_dead(self, owner: str) -> bool:
        """The last verdict on ``owner`` was "dead" (no round trip; :meth:`dead` re-checks)."""
        verdict = self._verdicts.get(owner)
        return verdict is not None and verdict[1]

    async def dead(self, owner: str) -> bool:
        """True when ``owner``'s lease is gone (asked at most once per ``interval`` while it lasts)."""
        loop = asyncio.get_running_loop()
        verdict = self._verdicts.get(owner)
        if verdict is not None:
            checked, dead, until = verdict
            if loop.time() - checked < self.interval and (dead or loop.time() < until):
                return dead
        check = self._checks.get(owner)
        if check is None:
            check = self._checks[owner] = loop.create_task(self._check(owner), name="hubwire-lease-check")
            check.add_done_callback(lambda _: self._checks.pop(owner, None))
        return await asyncio.shield(check)

    async def _check(self, owner: str) -> bool:
        try:
            return await self._ask(owner)
        except Exception:  # Redis cannot tell now: not dead (the relay timeout still bounds the wait)
            return False

    async def _ask(self, owner: str) -> bool:
        loop = asyncio.get_running_loop()
        left = await self.bus.command("PTTL", lease_key(self.channel_prefix, owner))
        now = loop.time()
        if len(self._verdicts) >= _MAX_OWNERS and owner not in self._verdicts:
            self._verdicts.clear()
        if isinstance(left, int) and (left >= 0 or left == -1):
            # alive; it cannot be dead before its lease expires (-1: no expiry, never set by us)
            until = now + left / 1000 if left >= 0 else now + self.interval
            self._verdicts[owner] = (now, False, until)
            return False
        if owner not in self._listed:
            listed = await self.bus.command("HEXISTS", instances_key(self.channel_prefix), owner)
            if not listed:
                self._verdicts[owner] = (now, False, now + self.interval)
                return False
            self._listed.add(owner)
        self._verdicts[owner] = (now, True, now)
        log.info("instance %s holds no lease: its connections are gone", owner)
        return True

    def watch(self, owner: str) -> asyncio.Future[None]:
        """A future resolved when ``owner`` is found dead; :meth:`unwatch` it when done waiting."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = self._watchers.get(owner)
        if entry is None:
            task = asyncio.get_running_loop().create_task(self._watch(owner), name="hubwire-lease-watch")
            entry = self._watchers[owner] = (task, set())
        entry[1].add(future)
        return future

    def unwatch(self, owner: str, future: asyncio.Future[None]) -> None:
        entry = self._watchers.get(owner)
        if entry is None:
            return
        entry[1].discard(future)
        if not entry[1]:
            del self._watchers[owner]
            entry[0].cancel()

    async def _watch(self, owner: str) -> None:
        """Check ``owner`` every ``interval``, and just after its lease would expire; wake the waits."""
        loop = asyncio.get_running_loop()
        while True:
            if await self.dead(owner):
                entry = self._watchers.pop(owner, None)
                for future in entry[1] if entry is not None else ():
                    if not future.done():
                        future.set_result(None)
                return
            until = self._verdicts.get(owner, (0.0, False, 0.0))[2]
            # 20 ms past the expiry: Redis expires a key on access, so PTTL then says -2
            await asyncio.sleep(max(0.02, min(self.interval, until + 0.02 - loop.time())))

    async def close(self) -> None:
        """Stop every watch (server shutdown); waiting requests end on their own."""
        watchers, self._watchers = self._watchers, {}
        tasks = [task for task, _ in watchers.values()] + list(self._checks.values())
        for _, futures in watchers.values():
            for future in futures:
                future.cancel()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
