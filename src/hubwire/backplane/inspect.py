"""Asking every live instance over Redis: cluster inspection and cluster-wide presence.

Why a scatter-gather: each instance knows only its own connections, and
keeping a shared copy in Redis (a set per group) goes stale the moment an
instance dies with members in it. Instead the live instances are asked and
answer from their own tables, so what a dead instance held is never in an
answer, and nothing has to be kept in sync. Which instances are live comes
from their leases (``lease.py``): the instances hash lists them, a lease says
the instance is alive. A killed instance stops answering at once and stops
being waited for when its lease expires (3 s by default).

The exchange (MessagePack, every message untrusted):

1. The requester -> ``{prefix}hubwire:internal:inspect`` (every instance
   subscribes): a **query** (request id, the requester's name, what: ``info``
   / ``group`` / ``user`` / ``connection`` / ``count``, hub, key, the largest
   answer it takes in bytes). It lists the live instances meanwhile.
2. Every instance -> ``{prefix}hubwire:internal:inspect:{requester}``: an
   **answer** from its own tables, bounded in bytes (entries past the bound are
   left out and the answer says it is truncated). An instance asking answers
   itself without a round trip.
3. The requester returns once every live instance answered, or at the
   deadline, naming the live instances that did not answer. Answers from
   instances that hold no lease are dropped.

Bounds: a query or an answer over its size limit is dropped unread; the
answers of one request together are bounded; an instance answers at most
``answer_rate`` bytes a second (a flood of queries cannot fill the outage
buffer that hub messages share) and not at all while it cannot publish (a late
answer would be useless). Connection tokens and credentials are never read
here: an answer carries connection ids, users, groups, transports, protocols.

:class:`ClusterInspector` is the standalone async API (what ``hubwire inspect``
uses); inside a server the same :class:`ClusterView` answers the dashboard
and hub code's presence (:class:`HubPresence`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import msgspec

from ..exceptions import HubException
from ..hubs.presence import ConnectionInfo, PresenceKind, PresenceResult
from .base import BackplaneUnavailable
from .bus import RedisBus
from .lease import instances_key, lease_key

__all__ = [
    "BackplaneStatus",
    "ClusterInspector",
    "ClusterView",
    "Entry",
    "HubPresence",
    "HubTransport",
    "Inspector",
    "Instance",
    "InstanceInfo",
    "LocalInspector",
    "LocalSource",
]

log = logging.getLogger("hubwire.backplane")

Query = Literal["info", "group", "user", "connection", "count"]
#: instance and requester names: what a reply channel ends with (under the prefix's own namespace)
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
#: group names, user ids, connection ids, hub names
_Key = Annotated[str, msgspec.Meta(max_length=4096)]
_Short = Annotated[str, msgspec.Meta(max_length=256)]
_Count = Annotated[int, msgspec.Meta(ge=0)]

#: the largest query read (they are a few hundred bytes)
_MAX_QUERY = 16 * 1024
#: room for an answer's header and instance info beyond its entries' bound
_ANSWER_SLACK = 16 * 1024
#: instances hash entries considered at most (each restart adds one; pruned after a day)
_MAX_LISTED = 4096
#: lease checks in flight at once
_LEASE_CHECKS = 16


# -- what answers carry (and what the API returns) ---------------------------------------------------


class Entry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One connection in an answer (its instance is the answer's origin).

    ``gc=False``: it holds only strings, so it is never in a reference cycle; untracked, the
    thousands of entries of a large group do not set off the cycle collector.
    """

    hub: _Key
    connection_id: _Key
    user: _Key | None
    transport: _Short | None
    protocol: _Short | None = None
    groups: list[_Key] | None = None


class HubTransport(msgspec.Struct, frozen=True, kw_only=True):
    """How many connections one hub has over one transport on one instance."""

    hub: _Key
    transport: _Short
    connections: _Count


class BackplaneStatus(msgspec.Struct, frozen=True, kw_only=True):
    """An instance's backplane health: is it connected, what waits to be published, what was lost."""

    state: _Short
    deployment: _Short = ""
    buffered: _Count = 0
    buffered_bytes: _Count = 0
    subscriptions: _Count = 0
    published: _Count = 0
    received: _Count = 0
    dropped: _Count = 0
    dropped_bytes: _Count = 0
    lease_failures: _Count = 0


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What an instance says about itself."""

    name: _Name
    #: host:port the ASGI server reported for this instance's requests (None before the first)
    address: _Short | None
    host: _Short
    pid: _Count
    version: _Short
    #: Unix time the server started
    started: float
    backplane: BackplaneStatus | None
    connections: list[HubTransport]
    #: hub messages queued to this instance's clients since it started (a rate when read twice)
    messages_sent: _Count = 0

    @property
    def total(self) -> int:
        return sum(c.connections for c in self.connections)


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """A live instance: its name and lease start, and its own answer (None: none in time)."""

    name: str
    started: float | None
    info: InstanceInfo | None


class _Query(msgspec.Struct, tag="q", array_like=True):
    rid: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    origin: _Name
    what: Query
    hub: _Key | None
    key: _Key | None
    limit: Annotated[int, msgspec.Meta(ge=0, le=2**40)]


class _Answer(msgspec.Struct, tag="a", array_like=True):
    rid: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    origin: _Name
    entries: list[Entry] = []
    count: _Count = 0
    truncated: bool = False
    info: InstanceInfo | None = None


_encoder = msgspec.msgpack.Encoder()
_query_decoder = msgspec.msgpack.Decoder(_Query)
_answer_decoder = msgspec.msgpack.Decoder(_Answer)


def bounded(entries: Iterable[Entry], limit: int) -> tuple[list[Entry], bool]:
    """The first entries whose MessagePack fits in ``limit`` bytes, and whether any were left out.

    Encoding the list is cheaper than adding up sizes in Python (measured: 0.3 ms against 7 ms for
    3,300 entries), so the list is encoded, and cut and encoded again only when it is too large.
    """
    # an entry takes at least 7 bytes: never more than that many are even looked at
    items = list(itertools.islice(entries, limit // 7 + 1))
    cut = len(items) > limit // 7
    if cut:
        items.pop()
    size = len(_encoder.encode(items))
    if size <= limit or not items:
        return items, cut
    keep = len(items) * limit // size
    while keep > 0:  # each round keeps at most 90% of the last: a few rounds at worst
        if len(_encoder.encode(items[:keep])) <= limit:
            return items[:keep], True
        keep = min(keep - 1, keep * 9 // 10)
    return [], True


# -- what the server gives the answering side ---------------------------------------------------------


class LocalSource(Protocol):
    """This instance's own view, given by the server layer (it knows hubs, connections and stats)."""

    def info(self) -> InstanceInfo:
        """What this instance says about itself."""

    def find(self, what: PresenceKind, hub: str | None, key: str) -> Iterable[Entry]:
        """The local connections of a group / user / with an id (of one hub, or of every hub)."""

    def count(self, hub: str | None, group: str) -> int:
        """How many local connections the group has."""


def answer_from(source: LocalSource, query: _Query, origin: str, limit: int) -> _Answer:
    """This instance's answer to ``query``, its entries bounded by ``limit`` bytes."""
    answer = _Answer(query.rid, origin)
    if query.what == "info":
        answer.info = source.info()
    elif query.what == "count":
        answer.count = source.count(query.hub, query.key or "")
    else:
        answer.entries, answer.truncated = bounded(source.find(query.what, query.hub, query.key or ""), limit)
        answer.count = len(answer.entries)
    return answer


@dataclass(slots=True)
class Gathered:
    """The answers to one query: by instance, which instances were live, which did not answer."""

    answers: dict[str, _Answer]
    #: live instance -> lease start (Unix time; None when its record does not say)
    live: dict[str, float | None]
    missing: list[str] = field(default_factory=list)


class Gatherer(Protocol):
    async def gather(self, what: Query, hub: str | None, key: str | None, timeout: float | None) -> Gathered:
        """Ask every live instance; their answers within the timeout."""


# -- Redis: the scatter-gather ------------------------------------------------------------------------


class _Pending:
    """The answers of one request so far, bounded in bytes; done when every expected one is in."""

    __slots__ = ("answers", "done", "expected", "left", "overflowed")

    def __init__(self, total_limit: int) -> None:
        self.answers: dict[str, _Answer] = {}
        self.expected: set[str] | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.left = total_limit
        self.overflowed = False

    def add(self, answer: _Answer, size: int) -> None:
        if answer.origin in self.answers:
            return  # a repeat (the request was published twice)
        if size > self.left:
            self.overflowed = True
            return
        self.left -= size
        self.answers[answer.origin] = answer
        self._check()

    def expect(self, names: Iterable[str]) -> None:
        self.expected = set(names)
        self._check()

    def _check(self) -> None:
        if self.expected is not None and self.expected <= self.answers.keys() and not self.done.done():
            self.done.set_result(None)


class _Budget:
    """A token bucket of answer bytes per second (a burst of one second's worth)."""

    __slots__ = ("rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.stamp = time.monotonic()

    def take(self, size: int) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if size > self.tokens:
            return False
        self.tokens -= size
        return True


class Inspector:
    """One process's end of the exchange: asks (:meth:`gather`) and, with a ``source``, answers.

    ``name``: this process's server name (an instance) or any unique name (a
    standalone inspector); its answers come on ``{prefix}hubwire:internal:inspect:{name}``.
    ``answer_bytes``: the largest answer this process sends or accepts (per instance);
    ``total_bytes``: what the answers to one query may take together; ``answer_rate``: answer bytes
    this process sends per second at most (past it, queries go unanswered and are counted).
    """

    def __init__(
        self,
        bus: RedisBus,
        channel_prefix: str,
        name: str,
        timeout: float = 2.0,
        *,
        answer_bytes: int = 4 * 1024 * 1024,
        total_bytes: int = 64 * 1024 * 1024,
        answer_rate: float = 32 * 1024 * 1024,
    ) -> None:
        self.bus = bus
        self.channel_prefix = channel_prefix
        self.server_name = name
        self.timeout = timeout
        self.answer_bytes = answer_bytes
        self.total_bytes = total_bytes
        self.requests_channel = f"{channel_prefix}hubwire:internal:inspect"
        self._reply_prefix = self.requests_channel + ":"
        self.own_channel = self._reply_prefix + name
        #: this instance's own view (set by the server); None: a standalone inspector, it only asks
        self.source: LocalSource | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._budget = _Budget(answer_rate)
        self.malformed = 0
        self.unanswered = 0
        self._last_log = 0.0

    async def start(self) -> None:
        await self.bus.subscribe(self.requests_channel, self._on_query)
        await self.bus.subscribe(self.own_channel, self._on_answer)

    async def close(self) -> None:
        self.bus.unsubscribe(self.requests_channel, linger=False)
        self.bus.unsubscribe(self.own_channel, linger=False)
        for pending in self._pending.values():
            if not pending.done.done():
                pending.done.cancel()

    # -- asking ------------------------------------------------------------------------------------

    async def gather(
        self, what: Query, hub: str | None, key: str | None, timeout: float | None = None
    ) -> Gathered:
        """Ask every live instance; returns when all answered or after ``timeout`` seconds.

        Raises :class:`BackplaneUnavailable` when Redis cannot list the live instances.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if timeout is None else timeout)
        if not self.bus.publisher_connected:  # a query waiting in the outage buffer would come too late
            raise BackplaneUnavailable(f"Redis at {self.bus.address} is not reachable now")
        rid = next(self._ids)
        pending = self._pending[rid] = _Pending(self.total_bytes)
        query = _Query(rid, self.server_name, what, hub, key, self.answer_bytes)
        try:
            if self.source is not None:  # this instance answers itself, no round trip; before the
                # query is published, so its own query is not among the messages it says it buffers
                pending.add(answer_from(self.source, query, self.server_name, self.answer_bytes), 0)
            self.bus.publish(self.requests_channel, _encoder.encode(query))
            try:
                live = await asyncio.wait_for(
                    live_instances(self.bus, self.channel_prefix), deadline - loop.time()
                )
            except TimeoutError:
                raise BackplaneUnavailable(
                    f"Redis at {self.bus.address} did not list the instances in time"
                ) from None
            except Exception as exc:
                raise BackplaneUnavailable(
                    f"cannot list the instances in Redis at {self.bus.address}: {exc}"
                ) from None
            if self.source is not None:
                live.setdefault(self.server_name, None)  # alive: it is asking (even if its lease lapsed)
            pending.expect(live)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(pending.done), max(0.0, deadline - loop.time()))
        finally:
            self._pending.pop(rid, None)
        if pending.overflowed:
            log.warning("the answers to an inspection exceeded %d bytes; some were dropped", self.total_bytes)
        answers = {name: answer for name, answer in pending.answers.items() if name in live}
        missing = sorted(set(live) - answers.keys())
        return Gathered(answers, live, missing)

    def _on_answer(self, channel: bytes, data: bytes) -> None:
        if len(data) > self.answer_bytes + _ANSWER_SLACK:
            self._malformed(f"an answer of {len(data)} bytes (more than {self.answer_bytes})")
            return
        try:
            answer = _answer_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(str(exc))
            return
        pending = self._pending.get(answer.rid)
        if pending is not None and answer.origin != self.server_name:
            pending.add(answer, len(data))

    # -- answering ---------------------------------------------------------------------------------

    def _on_query(self, channel: bytes, data: bytes) -> None:
        source = self.source
        if source is None:
            return
        if len(data) > _MAX_QUERY:
            self._malformed(f"a query of {len(data)} bytes")
            return
        try:
            query = _query_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._malformed(str(exc))
            return
        if query.origin == self.server_name:
            return  # answered without a round trip
        if not self.bus.publisher_connected:
            return  # it would wait in the outage buffer and come too late
        try:
            answer = answer_from(source, query, self.server_name, min(query.limit, self.answer_bytes))
        except Exception:
            log.exception("answering an inspection query failed")
            return
        payload = _encoder.encode(answer)
        if not self._budget.take(len(payload)):
            self.unanswered += 1
            self._say("inspection queries come faster than this instance answers them; some are unanswered")
            return
        self.bus.publish(self._reply_prefix + query.origin, payload)

    def _malformed(self, why: str) -> None:
        self.malformed += 1
        self._say(f"ignoring a malformed inspection message: {why}")

    def _say(self, text: str) -> None:
        """Log at most every 10 s: whoever floods Redis must not flood the logs too."""
        now = time.monotonic()
        if now - self._last_log > 10.0:
            self._last_log = now
            log.warning("%s", text)


async def live_instances(bus: RedisBus, channel_prefix: str) -> dict[str, float | None]:
    """The instances listed in the instances hash that hold a lease: name -> start (Unix time)."""
    key = instances_key(channel_prefix)
    size = await bus.command("HLEN", key)
    if not isinstance(size, int):
        raise ValueError(f"HLEN answered {size!r}")
    if size > _MAX_LISTED:
        raise ValueError(f"{key} lists {size} instances, more than {_MAX_LISTED}")
    listed = await bus.command("HGETALL", key)
    if isinstance(listed, list):  # RESP2: field, value, field, value...
        listed = dict(zip(listed[::2], listed[1::2], strict=False))
    if not isinstance(listed, dict):
        raise ValueError(f"HGETALL answered {type(listed).__name__}")
    candidates: dict[str, float | None] = {}
    for raw_name, raw_record in listed.items():
        name = raw_name.decode(errors="replace") if isinstance(raw_name, bytes) else str(raw_name)
        record = _record(raw_record)
        if len(name) <= 256 and "stopped" not in record:
            started = record.get("started")
            candidates[name] = float(started) if isinstance(started, (int, float)) else None
    gate = asyncio.Semaphore(_LEASE_CHECKS)

    async def alive(name: str) -> bool:
        async with gate:
            return bool(await bus.command("EXISTS", lease_key(channel_prefix, name)))

    names = list(candidates)
    held = await asyncio.gather(*(alive(name) for name in names))
    return {name: candidates[name] for name, lease in zip(names, held, strict=True) if lease}


def _record(raw: object) -> dict[str, Any]:
    """An instance's record in the hash (JSON written by ``lease.py``; anything else counts as empty)."""
    if not isinstance(raw, (bytes, str)) or len(raw) > 4096:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# -- one instance in memory ---------------------------------------------------------------------------


class LocalInspector:
    """The :class:`Gatherer` of a server without a backplane: it is the whole cluster."""

    def __init__(self, source: LocalSource, name: str, started: float, timeout: float = 2.0) -> None:
        self.source = source
        self.server_name = name
        self.started = started
        self.timeout = timeout

    async def gather(
        self, what: Query, hub: str | None, key: str | None, timeout: float | None = None
    ) -> Gathered:
        query = _Query(0, self.server_name, what, hub, key, 0)
        answer = answer_from(self.source, query, self.server_name, 1 << 40)
        return Gathered({self.server_name: answer}, {self.server_name: self.started})


# -- the API ------------------------------------------------------------------------------------------


class ClusterView:
    """The cluster as data: live instances, and connections by group, user or id.

    What ``hubwire inspect`` prints and a dashboard shows; every call asks the
    live instances and waits at most ``timeout`` seconds (the inspector's by default).
    """

    def __init__(self, gatherer: Gatherer) -> None:
        self.gatherer = gatherer

    async def instances(self, timeout: float | None = None) -> list[Instance]:
        """The live instances (by name), each with what it says about itself when it answered."""
        gathered = await self.gatherer.gather("info", None, None, timeout)
        return [
            Instance(
                name=name,
                started=gathered.live[name],
                info=gathered.answers[name].info if name in gathered.answers else None,
            )
            for name in sorted(gathered.live)
        ]

    async def connections(
        self, what: PresenceKind, key: str, hub: str | None = None, timeout: float | None = None
    ) -> PresenceResult:
        """The connections of group / user ``key`` (or the connection with id ``key``), of one hub or all."""
        gathered = await self.gatherer.gather(what, hub, key, timeout)
        found: list[ConnectionInfo] = []
        truncated = False
        for name in sorted(gathered.answers):
            answer = gathered.answers[name]
            truncated = truncated or answer.truncated
            found.extend(
                # positional: a quarter of the CPU a 10k-member answer costs here with keywords
                ConnectionInfo(
                    e.connection_id,
                    e.user,
                    name,
                    e.hub,
                    e.transport,
                    e.protocol,
                    None if e.groups is None else tuple(e.groups),
                )
                for e in answer.entries
            )
        return PresenceResult(found, gathered.missing, truncated)

    async def group(self, name: str, hub: str | None = None, timeout: float | None = None) -> PresenceResult:
        return await self.connections("group", name, hub, timeout)

    async def user(
        self, user_id: str, hub: str | None = None, timeout: float | None = None
    ) -> PresenceResult:
        return await self.connections("user", user_id, hub, timeout)

    async def connection(self, connection_id: str, timeout: float | None = None) -> PresenceResult:
        """The connection with this id (with its groups; empty when no live instance holds it)."""
        return await self.connections("connection", connection_id, None, timeout)

    async def count(
        self, group: str, hub: str | None = None, timeout: float | None = None
    ) -> tuple[int, list[str]]:
        """How many connections the group has, and the live instances that did not answer."""
        gathered = await self.gatherer.gather("count", hub, group, timeout)
        return sum(a.count for a in gathered.answers.values()), gathered.missing


class HubPresence:
    """A hub's :class:`~hubwire.hubs.presence.PresenceSource`: the cluster view, narrowed to the hub."""

    def __init__(self, view: ClusterView, hub: str) -> None:
        self.view = view
        self.hub = hub

    async def connections(self, kind: PresenceKind, key: str, timeout: float | None) -> PresenceResult:
        try:
            return await self.view.connections(kind, key, self.hub, timeout)
        except BackplaneUnavailable as exc:
            raise _unavailable(exc) from None

    async def count(self, group: str, timeout: float | None) -> int:
        try:
            total, missing = await self.view.count(group, self.hub, timeout)
        except BackplaneUnavailable as exc:
            raise _unavailable(exc) from None
        if missing:
            log.warning("presence count of group %r: no answer in time from %s", group, ", ".join(missing))
        return total


def _unavailable(exc: Exception) -> Exception:
    return HubException(f"Presence is unavailable: {exc}")


class ClusterInspector(ClusterView):
    """Inspect a cluster from a process that runs no server (``hubwire inspect``'s async API).

    ::

        async with ClusterInspector("redis://redis:6379", "BlogApp:SignalR:") as cluster:
            for instance in await cluster.instances():
                print(instance.name, instance.info)
            members = await cluster.group("room-1")

    It subscribes to its own answer channel only, and publishes nothing but queries.
    """

    def __init__(
        self, url: str, channel_prefix: str = "", *, timeout: float = 2.0, **bus_options: Any
    ) -> None:
        self.bus = RedisBus(url, name="hubwire-inspect", **bus_options)
        self.inspector = Inspector(self.bus, channel_prefix, f"inspect-{uuid.uuid4().hex}", timeout)
        super().__init__(self.inspector)

    async def start(self) -> None:
        """Connect; raises :class:`BackplaneUnavailable` when Redis cannot be reached."""
        await self.bus.start()
        await self.inspector.start()
        if not self.bus.healthy:
            await self.close()
            raise BackplaneUnavailable(f"cannot reach Redis at {self.bus.address}")

    async def close(self) -> None:
        await self.inspector.close()
        await self.bus.close()

    async def __aenter__(self) -> ClusterInspector:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
