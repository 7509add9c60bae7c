"""``RedisBackplane``: hubs on N instances behave as one, over Redis pub/sub.

Channels follow ASP.NET Core SignalR's Redis backplane (``{prefix}{hub}:all``,
``:group:{g}``, ``:user:{u}``, ``:connection:{id}`` and the internal group,
ack and return channels), with the same MessagePack envelopes, so Python and
.NET instances can share one Redis. Each instance subscribes only to what it
has local members for (group and user channels are reference-counted), so no
instance has to read the whole cluster's traffic.

Routing: a send to all / groups / users / connections is delivered to the
sending instance's own matching connections when it is made (honouring
excluded ids, group membership and users) and published for the others. So
while Redis is unreachable an instance's clients still get what that instance
sends, at once; the other instances get it from the bus's ordered outage
buffer when Redis returns. Unlike ASP.NET Core (which delivers its own sends
only when they come back from Redis, and loses them during an outage), the
sender drops its own copy when it comes back.

Exactly once: every envelope this instance publishes carries its origin (the
server name) and a per-hub sequence number (``protocol/backplane.py``);
receivers drop a number they have seen (``dedupe.py``: the last 64k per
origin), because the bus publishes a batch again when Redis's answer is lost
and subscribers may have had the first copy. Envelopes without an id (.NET
servers) are delivered as they come. Group commands are de-duplicated by
their (server name, ack id), which every sender already makes unique: a late
repeat of an "add" would otherwise put back a connection that has left the
group since (and the same for "remove"). Acks and client-result completions
need nothing: a second ack finds its waiter gone or done, and a second
completion finds no pending call ("unknown").

Ordering that remains: **per sender**. One instance's sends reach every
client in the order they were made: locally synchronously, remotely through
one ordered publisher queue and one subscriber connection per instance (and
a re-published batch re-sends what is still queued, in order, its repeats
dropped). Between senders there is no common order any more: a client on
instance A gets A's message at once and B's when Redis delivers it, while a
client on instance C gets both in Redis's order, so two clients may see two
senders' messages interleaved differently. (On one Redis, causality still
holds: what A sends after receiving B's message is published after it.) With
sharded channels on a Redis Cluster the per-sender order holds per shard; the
dedupe window does not depend on order, only on numbers being unique.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import logging
import math
import os
import secrets
import socket
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from ..connections.outbox import set_delivery_tag
from ..connections.tasks import BackgroundTasks
from ..connections.tokens import derive_key
from ..exceptions import HubException
from ..hubs.lifetime import (
    ClientResults,
    CompletionOutcome,
    HubLifetimeManager,
    LocalConnections,
    SendKind,
    SerializedMessage,
    await_result,
)
from ..protocol.backplane import (
    GROUP_ADD,
    GROUP_REMOVE,
    BackplaneChannels,
    GroupCommand,
    RedisInvocation,
    decode_ack,
    decode_completion,
    decode_group_command,
    decode_invocation,
    encode_ack,
    encode_completion,
    encode_group_command,
    encode_invocation,
    is_from,
    origin_marker,
)
from ..protocol.errors import InvalidDataError
from ..protocol.messages import CompletionMessage, InvocationMessage
from .base import Backplane, BackplaneUnavailable
from .bus import RedisBus
from .dedupe import Deduplicator
from .durable import ConnectionJournal, DurableStore, mark_key
from .inspect import Inspector
from .lease import InstanceLease, LeaseWatch, claim_key, lease_key
from .relay import Relay
from .resp import RespError
from .takeover import Takeovers

if TYPE_CHECKING:
    from ..hubs.context import HubConnectionContext

__all__ = ["RedisBackplane", "RedisHubLifetimeManager"]

log = logging.getLogger("hubwire.backplane")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class RedisBackplane(Backplane):
    """Scale hubs out over Redis. One instance of this per process, shared by all hubs.

    ``channel_prefix`` isolates apps sharing one Redis (it is prepended to every
    channel, no separator, like StackExchange.Redis's ChannelPrefix).
    ``buffer_size`` and ``buffer_bytes`` bound what is kept while Redis is unreachable;
    ``ack_timeout`` bounds group changes for connections on other instances.
    ``secret`` (``HUBWIRE_SECRET``) is where the app's token key comes from
    (HKDF per channel prefix; never stored), so any instance accepts a
    connection negotiated on another; ``previous_secret`` is still accepted
    during a rotation. Without one the instances agree on a random key stored
    in Redis under the prefix.

    ``takeover_timeout``: how long a stateful-reconnect resume waits for the
    instance holding the connection to hand it over (``takeover.py``); past it
    the resume is refused and the client starts a new connection.

    ``durable_resume`` (``HUBWIRE_DURABLE_RESUME=1``): resumable connections
    survive the death of the instance holding them (``durable.py``): their
    messages are journaled in Redis before they are sent and every publish is
    kept in its channel's history for ``durable_window`` seconds
    (``HUBWIRE_DURABLE_WINDOW``), the longest gap a resume can cover.

    ``lease_interval`` / ``lease_ttl``: the instance's lease in Redis is
    refreshed every ``lease_interval`` seconds and expires ``lease_ttl``
    seconds after the last refresh, so other instances know within about
    ``lease_ttl`` that this one died, and answer the requests they relay to it
    with 404 (the client reconnects elsewhere) instead of waiting for the relay
    timeout. They check the leases they wait on every ``lease_interval``.
    """

    def __init__(
        self,
        url: str,
        channel_prefix: str = "",
        *,
        buffer_size: int = 10_000,
        buffer_bytes: int = 64 * 1024 * 1024,
        ack_timeout: float = 30.0,
        secret: bytes | str | None = None,
        previous_secret: bytes | str | None = None,
        lease_interval: float = 1.0,
        lease_ttl: float = 3.0,
        takeover_timeout: float = 2.0,
        durable_resume: bool = False,
        durable_window: float = 60.0,
        require_reachable: bool | None = None,
        **bus_options: Any,
    ) -> None:
        self.url = url
        #: refuse to start while Redis cannot be reached (None: ``HUBWIRE_REQUIRE_REDIS``)
        self.require_reachable = (
            _env_flag("HUBWIRE_REQUIRE_REDIS") if require_reachable is None else require_reachable
        )
        self.channel_prefix = channel_prefix
        self.ack_timeout = ack_timeout
        self.server_name = f"{socket.gethostname()}_{uuid.uuid4().hex}"
        self.bus = RedisBus(
            url, buffer_size=buffer_size, buffer_bytes=buffer_bytes, name="hubwire", **bus_options
        )
        #: configured secrets: the current one first, then one still accepted during a rotation
        self._secrets = [s.encode() if isinstance(s, str) else s for s in (secret, previous_secret) if s]
        self._stored_key: bytes | None = None
        self._started = 0
        self.managers: dict[str, RedisHubLifetimeManager] = {}
        #: this instance's lease: other instances learn in seconds that it died
        self.lease = InstanceLease(
            self.bus,
            channel_prefix,
            self.server_name,
            lease_interval,
            lease_ttl,
            f"Redis at {self.bus.address}",
        )
        self.bus.on_reconnect(self._reregister)
        #: relays SSE / long-polling requests to the instance holding the connection
        self.relay: Relay = Relay(
            self.bus, channel_prefix, self.server_name, LeaseWatch(self.bus, channel_prefix, lease_interval)
        )
        #: stateful reconnect across instances: resumable connections move to where the client lands
        self.takeovers: Takeovers = Takeovers(self.bus, channel_prefix, self.server_name, takeover_timeout)
        self.lease_ttl = lease_ttl
        #: durable resume: journals, records and channel histories in Redis (``durable.py``)
        self.durable: DurableStore | None = (
            DurableStore(self.bus, channel_prefix, self.server_name, durable_window)
            if durable_resume
            else None
        )
        #: cluster inspection and presence: asks every live instance, answers for this one
        self.inspector: Inspector = Inspector(self.bus, channel_prefix, self.server_name)

    @classmethod
    def from_env(cls) -> RedisBackplane | None:
        """``HUBWIRE_REDIS_URL`` / ``HUBWIRE_CHANNEL_PREFIX`` / ``HUBWIRE_SECRET`` /
        ``HUBWIRE_BACKPLANE_BUFFER`` (messages) / ``HUBWIRE_BACKPLANE_BUFFER_BYTES`` /
        ``HUBWIRE_ACK_TIMEOUT`` / ``HUBWIRE_LEASE_INTERVAL`` / ``HUBWIRE_LEASE_TTL`` /
        ``HUBWIRE_TAKEOVER_TIMEOUT`` (seconds), or
        None when unset."""
        url = os.environ.get("HUBWIRE_REDIS_URL")
        if not url:
            return None
        return cls(
            url,
            os.environ.get("HUBWIRE_CHANNEL_PREFIX", ""),
            buffer_size=int(os.environ.get("HUBWIRE_BACKPLANE_BUFFER") or 10_000),
            buffer_bytes=int(os.environ.get("HUBWIRE_BACKPLANE_BUFFER_BYTES") or 64 * 1024 * 1024),
            ack_timeout=float(os.environ.get("HUBWIRE_ACK_TIMEOUT") or 30.0),
            secret=os.environ.get("HUBWIRE_SECRET") or None,
            previous_secret=os.environ.get("HUBWIRE_PREVIOUS_SECRET") or None,
            lease_interval=float(os.environ.get("HUBWIRE_LEASE_INTERVAL") or 1.0),
            lease_ttl=float(os.environ.get("HUBWIRE_LEASE_TTL") or 3.0),
            takeover_timeout=float(os.environ.get("HUBWIRE_TAKEOVER_TIMEOUT") or 2.0),
            durable_resume=(os.environ.get("HUBWIRE_DURABLE_RESUME") or "").strip().lower() in ("1", "true"),
            durable_window=float(os.environ.get("HUBWIRE_DURABLE_WINDOW") or 60.0),
        )

    def create_manager(self, hub_name: str) -> HubLifetimeManager:
        manager = RedisHubLifetimeManager(self, hub_name)
        self.managers[hub_name] = manager
        return manager

    def describe(self) -> str:
        bus = self.bus
        return f"Redis at {bus.address} ({bus.deployment.kind}), channel prefix {self.channel_prefix!r}"

    async def start(self) -> None:
        self._started += 1
        if self._started == 1:
            await self.bus.start()
            if self.require_reachable and not self.bus.healthy:
                # without Redis this instance would run alone, its broadcasts reaching no other
                self._started -= 1
                await self.bus.close()
                raise BackplaneUnavailable(
                    f"Redis at {self.bus.address} is not reachable and it is required "
                    "(--require-redis / HUBWIRE_REQUIRE_REDIS): not starting"
                )
            await self.takeovers.start()
            await self.inspector.start()
            self.lease.start()

    async def close(self) -> None:
        self._started -= 1
        if self._started == 0:
            await self.lease.stop()  # first: the others stop relaying here at once
            await self.takeovers.close()
            if self.durable is not None:
                await self.durable.close()
            await self.inspector.close()
            await self.relay.close()
            await self.bus.close()

    async def _reregister(self) -> None:
        """After a reconnect: Redis may have restarted empty, so list this instance again."""
        self.lease.reregister()

    @property
    def _token_key(self) -> str:
        return f"{self.channel_prefix}hubwire:internal:token-key"

    async def token_keys(self) -> tuple[bytes, ...] | None:
        """The app's token keys: derived from ``secret`` (and ``previous_secret``), or agreed in Redis.

        With a secret, each app (channel prefix) gets its own key by HKDF and nothing is stored.
        Without one, the first instance stores a random key under the prefix and the others read
        it; while Redis cannot be asked this raises, and the server is not ready until it can.
        """
        if self._secrets:
            return tuple(derive_key(s, self.channel_prefix) for s in self._secrets)
        key = self._token_key
        candidate = base64.b64encode(secrets.token_bytes(32))
        try:
            await self.bus.command("SET", key, candidate, "NX")
            value = await self.bus.command("GET", key)
        except Exception as exc:
            raise BackplaneUnavailable(
                f"cannot agree on a token key through Redis at {self.bus.address!r}: {exc}"
            ) from None
        if not isinstance(value, bytes) or not value:
            raise BackplaneUnavailable("the token key read back from Redis is empty")
        if self._stored_key is None:
            self.bus.on_reconnect(self._restore_token_key)
        self._stored_key = value
        return (base64.b64decode(value),)

    async def _restore_token_key(self) -> None:
        """After a reconnect, put the agreed key back if Redis lost it (restart without persistence).

        Otherwise the next instance to start would store a new key, and tokens
        negotiated on it and on the older instances would be refused by the other side.
        """
        key = self._token_key
        try:
            await self.bus.command("SET", key, self._stored_key or b"", "NX")
            value = await self.bus.command("GET", key)
        except Exception as exc:
            log.warning("cannot restore the token key in Redis: %s", exc)
            return
        if value != self._stored_key:
            log.error(
                "the token key in Redis is not this instance's (another instance stored a new one after "
                "Redis lost it): connections negotiated on one of them will be refused by the other "
                "until the instances restart; set HUBWIRE_SECRET to avoid this"
            )

    async def claim_connection(self, connection_id: str, ttl: float) -> bool | None:
        """Record that this instance started ``connection_id``; False if another already did.

        Why: a connection token is valid on every instance for a while, so without a
        claim a replayed token could start a second connection with the same id
        elsewhere. The claim lives ``ttl`` seconds (as long as a token can start a
        connection). While Redis cannot be asked, a replay cannot be told apart from
        a first start, so None is returned and the start refused (503).
        """
        key = claim_key(self.channel_prefix, connection_id)
        try:
            # set when absent, and say who holds it otherwise (Redis >= 7.0)
            previous = await self.bus.command(
                "SET", key, self.server_name, "NX", "GET", "EX", max(1, math.ceil(ttl))
            )
            if previous is None:
                return True
            if not isinstance(previous, bytes | str):
                # redis-py turns SET's reply into "was it set" (False) unless told otherwise: ask
                previous = await self.bus.command("GET", key)
        except Exception as exc:
            log.warning("cannot claim connection %s (%s); refusing its start", connection_id, exc)
            return None
        if isinstance(previous, str):
            previous = previous.encode()
        return bool(previous == self.server_name.encode())

    async def instance_alive(self, server_name: str) -> bool:
        """True while the instance's lease exists (or Redis cannot tell: then it may be alive)."""
        try:
            return bool(await self.bus.command("EXISTS", lease_key(self.channel_prefix, server_name)))
        except Exception:
            return True

    async def reclaim_connection(self, connection_id: str) -> None:
        key = claim_key(self.channel_prefix, connection_id)
        try:
            await self.bus.command("SET", key, self.server_name, "XX", "KEEPTTL")
        except Exception as exc:
            log.warning("cannot record that connection %s moved here: %s", connection_id, exc)

    def health(self) -> dict[str, Any]:
        duplicates = sum(m.duplicates_dropped for m in self.managers.values())
        moves = {
            "moved_in": self.takeovers.moved_in,
            "moved_out": self.takeovers.moved_out,
            "takeover_malformed": self.takeovers.malformed,
            "takeover_requests": self.takeovers.requests,
            "inspect_malformed": self.inspector.malformed,
            "inspect_unanswered": self.inspector.unanswered,
        }
        if self.durable is not None:
            moves["journal_writes"] = self.durable.journal_writes
            moves["journal_failures"] = self.durable.write_failures
        return {
            **self.bus.health(),
            "duplicates_dropped": duplicates,
            "lease_failures": self.lease.failures,
            **moves,
        }


class RedisHubLifetimeManager(HubLifetimeManager):
    """The lifetime manager of one hub over the shared :class:`RedisBus`."""

    def __init__(self, backplane: RedisBackplane, hub_name: str) -> None:
        self.backplane = backplane
        self.bus = backplane.bus
        self.hub_name = hub_name
        self.server_name = backplane.server_name
        self.channels = BackplaneChannels(backplane.channel_prefix, hub_name)
        self.local = LocalConnections()
        self.results = ClientResults("s")
        self._ack_ids = itertools.count(1)
        self._acks: dict[int, asyncio.Future[None]] = {}
        #: client-result requests from other instances awaiting our client's answer
        self._remote_results: dict[str, tuple[str, str]] = {}
        #: this instance's name as encoded in its envelopes: its own sends coming back are dropped
        #: from their last bytes, without decoding them (``is_from``)
        self._own_origin = origin_marker(self.server_name)
        self._ack_channel = self.channels.ack(self.server_name)
        self._return_channel = self.channels.return_results(self.server_name)
        #: group joins acknowledged in the background
        self.tasks = BackgroundTasks(f"backplane {hub_name}")
        #: sequence numbers of the envelopes this instance publishes for this hub
        self._seq = itertools.count(1)
        #: (origin, seq) of invocations and (server name, id) of group commands already handled
        self._seen_invocations = Deduplicator()
        #: group commands are few: their ids move slowly, a small window reaches as far back
        self._seen_commands = Deduplicator(window=4096)

    def local_connections(self) -> LocalConnections:
        return self.local

    @property
    def duplicates_dropped(self) -> int:
        """Backplane messages received a second time and not handled again."""
        return self._seen_invocations.duplicates + self._seen_commands.duplicates

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.backplane.start()
        await self.bus.subscribe(self.channels.all, self._on_all)
        await self.bus.subscribe(self.channels.group_management, self._on_group_command)
        await self.bus.subscribe(self._ack_channel, self._on_ack)
        await self.bus.subscribe(self._return_channel, self._on_return)

    async def close(self) -> None:
        for channel in (
            self.channels.all,
            self.channels.group_management,
            self._ack_channel,
            self._return_channel,
        ):
            self.bus.unsubscribe(channel, linger=False)
        for future in self._acks.values():
            if not future.done():
                future.cancel()
        await self.tasks.cancel_all()
        await self.backplane.close()

    def _serialize(self, message: InvocationMessage) -> tuple[SerializedMessage, dict[str, bytes]]:
        """Framed once per protocol: the same bytes go to local connections and into the envelopes."""
        serialized = SerializedMessage(message)
        return serialized, serialized.serialize_all(self.protocols)

    def _envelope(
        self, serializations: dict[str, bytes], exclude: Collection[str] = (), seq: int | None = None
    ) -> RedisInvocation:
        """An envelope with the next sequence number: one per publish, so that one instance receiving
        two of them (a member of two groups sent to together) does not take the second for a repeat."""
        number = next(self._seq) if seq is None else seq
        return RedisInvocation(serializations, list(exclude), origin=self.server_name, seq=number)

    def _publish(
        self,
        channel: str,
        serializations: dict[str, bytes],
        exclude: Collection[str] = (),
        seq: int | None = None,
    ) -> None:
        envelope = encode_invocation(self._envelope(serializations, exclude, seq))
        self.bus.publish(channel, envelope, history=self.backplane.durable is not None)

    def _deliver_local(
        self,
        channel: str,
        recipients: list[HubConnectionContext],
        message: SerializedMessage,
        exclude: Collection[str] = (),
    ) -> int:
        """Deliver to local connections what is about to be published; returns the envelope's number.

        The deliveries are tagged with the envelope's id, so a connection moving
        to another instance just now gets this message once (``takeover.py``).
        """
        seq = next(self._seq)
        set_delivery_tag((self.server_name, seq, channel))
        try:
            self.local.deliver(recipients, message, exclude)
        finally:
            set_delivery_tag(None)
        return seq

    # -- connections -------------------------------------------------------------------------------

    async def on_connected(self, connection: HubConnectionContext) -> None:
        first_of_user = self.local.add(connection)
        cid = connection.connection_id
        self._journal(connection)
        await self.bus.subscribe(self.channels.connection(cid), self._on_connection_message)
        if first_of_user and connection.user_identifier is not None:
            await self.bus.subscribe(self.channels.user(connection.user_identifier), self._on_user)

    def _journal(self, connection: HubConnectionContext) -> ConnectionJournal | None:
        """Durable resume: journal a resumable connection (not one moving in: its new holder
        attaches the journal once the old holder's messages are in)."""
        store = self.backplane.durable
        outbox = connection.outbox
        if store is None or outbox.replay is None or outbox.journal is not None or outbox.tags is not None:
            return None
        conn = connection.connection

        def source() -> dict[str, Any] | None:
            state = conn.application.export_for_move(conn) if conn.application is not None else None
            return state if isinstance(state, dict) else None

        journal = store.attach(conn.connection_id, conn.token, self.hub_name, outbox, source)
        self.journal_channels(connection, journal)
        return journal

    def journal_channels(self, connection: HubConnectionContext, journal: ConnectionJournal) -> None:
        """The channels a durable connection hears from now on (its history starts there)."""
        journal.joined_channel(self.channels.all)
        journal.joined_channel(self.channels.connection(connection.connection_id))
        if connection.user_identifier is not None:
            journal.joined_channel(self.channels.user(connection.user_identifier))
        for group in connection.groups:
            journal.joined_channel(self.channels.group(group))

    async def on_moved_in(
        self, connection: HubConnectionContext, delivered: Collection[tuple[str, int, str]]
    ) -> None:
        """Durable resume: journal a connection moved here, continuing its old holder's record."""
        store = self.backplane.durable
        outbox = connection.outbox
        replay = outbox.replay
        if store is None or replay is None:
            return
        outbox.tags = None
        previous = await store.read_record(connection.connection_id)
        journal = self._journal(connection)
        if journal is None:
            return
        if previous is not None:
            for key, seq in previous.marks.items():
                if seq > journal.marks.get(key, 0):
                    journal.marks[key] = seq
            for channel, since in previous.joined.items():
                if channel in journal.joined:
                    journal.joined[channel] = min(journal.joined[channel], since)
        for origin, seq, channel in delivered:
            key = mark_key(origin, channel)
            if seq > journal.marks.get(key, 0):
                journal.marks[key] = seq
        journal.trimmed = replay.first_id - 1
        kept = replay.taken()
        await store.rewrite(journal, [(replay.first_id + i, data, None) for i, data in enumerate(kept)])

    def channels_of(self, connection_id: str, user: str | None, groups: Collection[str]) -> list[str]:
        """Every channel a connection hears: all, its own, its user's, its groups'."""
        names = [self.channels.all, self.channels.connection(connection_id)]
        if user is not None:
            names.append(self.channels.user(user))
        names.extend(self.channels.group(g) for g in groups)
        return names

    async def on_disconnected(self, connection: HubConnectionContext) -> None:
        journal = connection.outbox.journal
        if isinstance(journal, ConnectionJournal):
            journal.store.detach(journal, delete=True)  # over: nothing will resume it
        emptied, user_gone = self.local.remove(connection)
        cid = connection.connection_id
        self.bus.unsubscribe(self.channels.connection(cid))
        for group in emptied:
            self.bus.unsubscribe(self.channels.group(group))
        if user_gone and connection.user_identifier is not None:
            self.bus.unsubscribe(self.channels.user(connection.user_identifier))
        self.results.fail_connection(cid)
        for invocation_id, (return_channel, owner) in list(self._remote_results.items()):
            if owner == cid:
                del self._remote_results[invocation_id]
                self._send_completion(
                    return_channel,
                    connection,
                    CompletionMessage.with_error(invocation_id, "Connection disconnected."),
                )

    # -- sends -------------------------------------------------------------------------------------

    # Each send is delivered here first (synchronously, so in the order the sends are made) and then
    # published; the copy coming back from Redis is dropped (its origin is this instance).

    async def send_all(self, method: str, args: Sequence[Any], exclude: Collection[str] = ()) -> None:
        self.send_serialized("all", (), SerializedMessage(InvocationMessage(method, list(args))), exclude)

    async def send_connections(
        self, connection_ids: Collection[str], method: str, args: Sequence[Any]
    ) -> None:
        ids = list(dict.fromkeys(connection_ids))
        if not ids:
            return
        conns = self.local.connections
        remote = [cid for cid in ids if cid not in conns]
        if not remote:  # all local: frame only the protocols these connections use
            self.local.deliver(
                [conns[cid] for cid in ids], SerializedMessage(InvocationMessage(method, list(args)))
            )
            return
        message, serializations = self._serialize(InvocationMessage(method, list(args)))
        self.local.deliver([conns[cid] for cid in ids if cid in conns], message)
        for cid in remote:
            self._publish(self.channels.connection(cid), serializations)

    async def send_groups(
        self, groups: Collection[str], method: str, args: Sequence[Any], exclude: Collection[str] = ()
    ) -> None:
        if any(groups):
            message = SerializedMessage(InvocationMessage(method, list(args)))
            self.send_serialized("groups", groups, message, exclude)

    async def send_users(self, user_ids: Collection[str], method: str, args: Sequence[Any]) -> None:
        if user_ids:
            self.send_serialized("users", user_ids, SerializedMessage(InvocationMessage(method, list(args))))

    def send_serialized(
        self,
        kind: SendKind,
        targets: Collection[str],
        message: SerializedMessage,
        exclude: Collection[str] = (),
    ) -> None:
        serializations = message.serialize_all(self.protocols)
        local = self.local
        if kind == "all":
            channel = self.channels.all
            seq = self._deliver_local(channel, list(local.connections.values()), message, exclude)
            self._publish(channel, serializations, exclude, seq)
            return
        if kind == "connections":
            conns = local.connections
            for cid in dict.fromkeys(targets):
                if cid in conns:
                    local.deliver([conns[cid]], message)
                else:
                    self._publish(self.channels.connection(cid), serializations)
            return
        table, channel_of = (
            (local.groups, self.channels.group) if kind == "groups" else (local.users, self.channels.user)
        )
        for name in dict.fromkeys(t for t in targets if t):
            members = table.get(name)
            channel = channel_of(name)
            seq = self._deliver_local(channel, list(members.values()) if members else [], message, exclude)
            self._publish(channel, serializations, exclude, seq)

    # -- receiving ---------------------------------------------------------------------------------

    def _decode(self, channel: bytes, data: bytes) -> RedisInvocation | None:
        """The envelope to deliver, or None: malformed, sent by this instance, or already delivered."""
        if is_from(data, self._own_origin):
            return None  # delivered to the local connections when it was sent
        try:
            inv = decode_invocation(data)
        except InvalidDataError as exc:
            log.warning("ignoring a malformed backplane message on %r: %s", channel, exc)
            return None
        if inv.origin is None or inv.seq is None:
            return inv  # from .NET (or an older hubwire): no id, delivered as it comes
        if inv.origin == self.server_name:
            return None  # delivered to the local connections when it was sent
        return inv if self._seen_invocations.first_time(inv.origin, inv.seq) else None

    def _deliver(
        self,
        channel: bytes,
        recipients: list[HubConnectionContext],
        inv: RedisInvocation,
        honour_excluded: bool,
    ) -> None:
        excluded = set(inv.excluded) if honour_excluded and inv.excluded else ()
        sers = inv.serializations
        if inv.origin is not None and inv.seq is not None:
            set_delivery_tag((inv.origin, inv.seq, channel.decode()))
        try:
            self._write_all(recipients, sers, excluded)
        finally:
            set_delivery_tag(None)

    @staticmethod
    def _write_all(
        recipients: list[HubConnectionContext], sers: dict[str, bytes], excluded: Collection[str]
    ) -> None:
        for conn in recipients:
            if excluded and conn.connection_id in excluded:
                continue
            data = sers.get(conn.protocol_name)
            if data is None:
                log.warning(
                    "backplane message has no %r serialization; %s does not get it",
                    conn.protocol_name,
                    conn.connection_id,
                )
                continue
            conn.outbox.write(data)

    def _on_all(self, channel: bytes, data: bytes) -> None:
        inv = self._decode(channel, data)
        if inv is not None:
            self._deliver(channel, list(self.local.connections.values()), inv, True)

    def _on_group_message(self, channel: bytes, data: bytes) -> None:
        inv = self._decode(channel, data)
        if inv is None:
            return
        group = channel.decode()[len(self.channels.prefix) + len(":group:") :]
        members = self.local.groups.get(group)
        if members:
            self._deliver(channel, list(members.values()), inv, True)

    def _on_user(self, channel: bytes, data: bytes) -> None:
        inv = self._decode(channel, data)
        if inv is None:
            return
        uid = channel.decode()[len(self.channels.prefix) + len(":user:") :]
        members = self.local.users.get(uid)
        if members:
            self._deliver(channel, list(members.values()), inv, False)

    def _on_connection_message(self, channel: bytes, data: bytes) -> None:
        inv = self._decode(channel, data)
        if inv is None:
            return
        cid = channel.decode()[len(self.channels.prefix) + len(":connection:") :]
        conn = self.local.connections.get(cid)
        if conn is None:
            return
        if inv.invocation_id is not None and inv.return_channel is not None:
            self._remote_results[inv.invocation_id] = (inv.return_channel, cid)
        self._deliver(channel, [conn], inv, False)

    # -- groups ------------------------------------------------------------------------------------

    async def _join_local(self, conn: HubConnectionContext, group: str) -> None:
        first = self.local.join(conn, group)
        journal = conn.outbox.journal
        if isinstance(journal, ConnectionJournal):
            journal.joined_channel(self.channels.group(group))
        if first:
            await self.bus.subscribe(self.channels.group(group), self._on_group_message)

    def _leave_local(self, conn: HubConnectionContext, group: str) -> None:
        left_last = self.local.leave(conn, group)
        journal = conn.outbox.journal
        if isinstance(journal, ConnectionJournal):
            journal.left_channel(self.channels.group(group))
        if left_last:
            self.bus.unsubscribe(self.channels.group(group))

    async def add_to_group(self, connection_id: str, group: str) -> None:
        conn = self.local.connections.get(connection_id)
        if conn is not None:
            await self._join_local(conn, group)
            return
        await self._remote_group_command(GROUP_ADD, connection_id, group)

    async def remove_from_group(self, connection_id: str, group: str) -> None:
        conn = self.local.connections.get(connection_id)
        if conn is not None:
            self._leave_local(conn, group)
            return
        await self._remote_group_command(GROUP_REMOVE, connection_id, group)

    async def _remote_group_command(self, action: int, connection_id: str, group: str) -> None:
        ack_id = next(self._ack_ids) & 0x7FFFFFFF
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._acks[ack_id] = future
        command = GroupCommand(ack_id, self.server_name, action, group, connection_id)
        self.bus.publish(self.channels.group_management, encode_group_command(command))
        try:
            await asyncio.wait_for(future, self.backplane.ack_timeout)
        except TimeoutError:
            verb = "add" if action == GROUP_ADD else "remove"
            raise HubException(
                f"Could not {verb} connection '{connection_id}' to group '{group}': no instance "
                f"acknowledged within {self.backplane.ack_timeout:g}s "
                "(the connection does not exist or Redis is unreachable)."
            ) from None
        finally:
            self._acks.pop(ack_id, None)

    def _on_group_command(self, channel: bytes, data: bytes) -> None:
        try:
            command = decode_group_command(data)
        except InvalidDataError as exc:
            log.warning("ignoring a malformed group command: %s", exc)
            return
        conn = self.local.connections.get(command.connection_id)
        if conn is None:
            return
        if not self._seen_commands.first_time(command.server_name, command.id):
            return  # a repeat: acting again could undo a change made since (and ack twice)
        if command.action == GROUP_ADD:
            self.tasks.spawn(self._ack_after_join(conn, command), name="group join ack")
        else:
            self._leave_local(conn, command.group)
            self.bus.publish(self.channels.ack(command.server_name), encode_ack(command.id))

    async def _ack_after_join(self, conn: HubConnectionContext, command: GroupCommand) -> None:
        try:
            await self._join_local(conn, command.group)
        except HubException as exc:  # past the connection's limits: no ack, the caller's add fails
            log.info("refused adding %s to a group: %s", conn.connection_id, exc)
            return
        self.bus.publish(self.channels.ack(command.server_name), encode_ack(command.id))

    def _on_ack(self, channel: bytes, data: bytes) -> None:
        try:
            ack_id = decode_ack(data)
        except InvalidDataError:
            return
        future = self._acks.get(ack_id)
        if future is not None and not future.done():
            future.set_result(None)

    # -- client results ----------------------------------------------------------------------------

    async def invoke_connection(
        self, connection_id: str, method: str, args: Sequence[Any], timeout: float | None = None
    ) -> Any:
        conn = self.local.connections.get(connection_id)
        if conn is not None:
            return await self.results.invoke_local(conn, method, args, timeout)
        invocation_id = base64.b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        future = self.results.add(invocation_id, connection_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            _, serializations = self._serialize(
                InvocationMessage(method, list(args), invocation_id=invocation_id)
            )
            envelope = self._envelope(serializations)
            envelope.invocation_id, envelope.return_channel = invocation_id, self._return_channel
            receivers = self.bus.publish(
                self.channels.connection(connection_id), encode_invocation(envelope), want_receivers=True
            )
            assert receivers is not None
            # the timeout covers the publish too: while Redis is down the request waits in the buffer
            try:
                count = await asyncio.wait_for(receivers, timeout)
            except TimeoutError:
                raise HubException("Client result timed out.") from None
            except RespError as exc:  # dropped from a full outage buffer
                raise HubException(
                    f"Client result request to '{connection_id}' was not sent: {exc}"
                ) from None
            if count == 0:
                raise HubException(f"Connection '{connection_id}' does not exist.")
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            return await await_result(future, remaining)
        finally:
            self.results.discard(invocation_id)

    def set_connection_result(
        self, connection: HubConnectionContext, completion: CompletionMessage
    ) -> CompletionOutcome:
        remote = self._remote_results.get(completion.invocation_id)
        if remote is not None:
            if remote[1] != connection.connection_id:
                return "forged"  # the call was sent to another connection: it keeps waiting for it
            del self._remote_results[completion.invocation_id]
            self._send_completion(remote[0], connection, completion)
            return "completed"
        return self.results.complete(completion, connection.connection_id)

    def _send_completion(
        self, return_channel: str, connection: HubConnectionContext, completion: CompletionMessage
    ) -> None:
        protocol = connection.protocol
        framed = protocol.write_message(completion)
        self.bus.publish(return_channel, encode_completion(protocol.name, framed))

    def _on_return(self, channel: bytes, data: bytes) -> None:
        try:
            protocol_name, framed = decode_completion(data)
            protocol = next(p for p in self.protocols if p.name == protocol_name)
            messages = protocol.parse_all(framed)
        except (InvalidDataError, StopIteration) as exc:
            log.warning("ignoring a malformed client-result completion: %s", exc)
            return
        for message in messages:
            if isinstance(message, CompletionMessage):
                self.results.complete(message, None)  # the holding instance checked the sender
