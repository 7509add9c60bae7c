"""Durable resume: a connection survives the death of the instance holding it.

Why: stateful reconnect keeps a dropped connection's unacknowledged messages
in the holder's memory, so when the holder itself dies (kill -9, a crashed
pod) they die with it, and so does everything sent to the connection until
the client comes back. With durable resume on (``HUBWIRE_DURABLE_RESUME=1``),
three things live in Redis:

* **a journal per connection** (``{prefix}hubwire:internal:journal:{<id>}``,
  a stream whose entry ids are the messages' sequence ids): every message the
  client may receive is written there *before* it is sent (write-ahead), and
  trimmed when the client acknowledges it. So the journal always holds at
  least what the client may still lack, numbered as the client numbered it.
* **a record per connection** (``{prefix}hubwire:internal:record:{<id>}``):
  who it is (token digest, hub, user, protocol, groups, items), which of the
  client's messages were handled, when it joined each channel, and for each
  (sender, channel) the last message delivered that the journal no longer
  holds. Rewritten (same pipeline as the journal, so never ahead of it) when
  it changes, at most about once a second for the counters.
* **a recent history per channel** (``history_key``): every message published
  to a hub channel is also appended to a stream kept for ``window`` seconds,
  written just before the publish on the same node.

When the holder dies, the instance the client's resume reaches gets no answer
to its takeover request (``takeover.py``), waits until the holder's lease has
expired (so there are never two holders), subscribes to the connection's
channels and then reads the record, the journal and each channel's history:
it replays the journal as it was, then every history message of the
connection's channels that was not delivered (a (sender, channel) pair's
messages are delivered in order, so "not delivered" is "after the last one
delivered"), then what its own subscriptions received meanwhile minus what
it already has. Each message once, in order per sender. When that cannot be
proven - no record (the gap outlived it), a journal with a hole (Redis was
unreachable while the holder wrote), a history longer than the read bound -
the resume is refused and the client's automatic reconnect starts a new
connection: never a silent gap.

The cost (``bench/durable_resume.py``): one journal write per message to a
durable connection, held back one Redis round trip before it is sent, and one
history write per publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from ..connections.outbox import Tag
from .bus import RedisBus, history_key

if TYPE_CHECKING:
    from ..connections.outbox import Outbox

__all__ = ["ConnectionJournal", "DurableStore", "Record"]

log = logging.getLogger("hubwire.backplane")

#: entries read at most from one channel's history on a recovery (past it: refused, too long a gap)
HISTORY_READ_LIMIT = 20_000


class Record(msgspec.Struct):
    """What the holder keeps in Redis about a durable connection (the journal has the messages)."""

    digest: bytes
    hub: str
    holder: str
    #: the hub state as ``export_for_move`` gives it (None: it cannot move; resumes are refused)
    state: dict[str, Any] | None
    next_receive_id: int
    latest_received: int
    #: id of the last message the client acknowledged (the journal starts after it)
    acked: int
    #: channel -> wall-clock ms when the connection joined it (the history before is not its own)
    joined: dict[str, int]
    #: "origin\x00channel" -> last seq delivered from there that the journal no longer holds
    marks: dict[str, int]
    written_ms: int
    #: a journal write failed: the journal may lack messages the client got
    gapped: bool = False


_record_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)


def _fields(raw: Any) -> dict[bytes, bytes]:
    """A stream entry's fields, as redis-py parsed them (a dict) or raw (a flat list)."""
    if isinstance(raw, dict):
        return {bytes(k): bytes(v) for k, v in raw.items()}
    if isinstance(raw, list) and len(raw) % 2 == 0:
        return {bytes(raw[i]): bytes(raw[i + 1]) for i in range(0, len(raw), 2)}
    raise ValueError("malformed stream entry")


def tag_text(tag: Tag | None) -> bytes:
    """A delivery tag as journal field bytes (empty: untagged)."""
    return b"" if tag is None else f"{tag[0]}\x00{tag[1]}\x00{tag[2]}".encode()


def parse_tag(raw: bytes) -> Tag | None:
    if not raw:
        return None
    parts = raw.decode(errors="replace").split("\x00")
    if len(parts) != 3 or not parts[1].isdigit():
        raise ValueError("malformed journal tag")
    return parts[0], int(parts[1]), parts[2]


def mark_key(origin: str, channel: str) -> str:
    return f"{origin}\x00{channel}"


class ConnectionJournal:
    """The journal of one durable connection (the outbox's :class:`~hubwire.connections.outbox.Journal`)."""

    __slots__ = (
        "_appended",
        "_dirty",
        "confirmed",
        "connection_id",
        "gapped",
        "joined",
        "marks",
        "outbox",
        "source",
        "store",
        "trimmed",
    )

    def __init__(
        self,
        store: DurableStore,
        connection_id: str,
        outbox: Outbox,
        source: Callable[[], dict[str, Any] | None],
    ) -> None:
        self.store = store
        self.connection_id = connection_id
        self.outbox = outbox
        #: the record's hub state, built when the record is written
        self.source = source
        #: last sequence id Redis confirmed (messages up to it may be sent)
        self.confirmed = 0
        self._appended = 0
        #: last acknowledged id (trimmed from the journal)
        self.trimmed = 0
        #: (origin, channel) -> last seq delivered (the record keeps them past the trim)
        self.marks: dict[str, int] = {}
        self.joined: dict[str, int] = {}
        self.gapped = False
        self._dirty = True

    def append(self, seq: int, data: bytes, tag: Tag | None) -> None:
        self._appended = seq
        if tag is not None:
            key = mark_key(tag[0], tag[2])
            if tag[1] > self.marks.get(key, 0):
                self.marks[key] = tag[1]
        self.store.queue(
            self,
            (
                b"XADD",
                self.store.journal_key(self.connection_id),
                f"{seq}-1",
                b"d",
                data,
                b"t",
                tag_text(tag),
            ),
        )

    def trim(self, acked: int) -> None:
        if acked <= self.trimmed:
            return
        self.trimmed = acked
        self._dirty = True
        key = self.store.journal_key(self.connection_id)
        self.store.queue(self, (b"XTRIM", key, b"MINID", f"{acked + 1}-0"))

    def touch(self) -> None:
        """The hub state or the counters changed: the record is written with the next flush."""
        self._dirty = True
        self.store.queue(self, None)

    def joined_channel(self, channel: str) -> None:
        self.joined.setdefault(channel, int(time.time() * 1000))
        self.touch()

    def left_channel(self, channel: str) -> None:
        self.joined.pop(channel, None)
        self.touch()

    def take_dirty(self) -> bool:
        dirty, self._dirty = self._dirty, False
        return dirty

    def record(self, hub: str, holder: str, digest: bytes) -> Record:
        replay = self.outbox.replay
        state = self.source()
        return Record(
            digest,
            hub,
            holder,
            state,
            replay.next_receive_id if replay is not None else 1,
            replay.latest_received if replay is not None else 0,
            self.trimmed,
            dict(self.joined),
            dict(self.marks),
            int(time.time() * 1000),
            self.gapped,
        )

    def written(self, ok: bool, upto: int) -> None:
        """A flush holding this journal's writes up to ``upto`` ended: those may go out."""
        if not ok and not self.gapped:
            self.gapped = True
            self._dirty = True
        # never hold messages back because Redis is away: local delivery goes on (the record
        # says the journal has a hole, so no other instance resumes from it)
        if upto > self.confirmed:
            self.confirmed = upto
        self.outbox.journaled()


class DurableStore:
    """Journals, records and histories of one backplane (writes pipelined per loop iteration)."""

    def __init__(self, bus: RedisBus, channel_prefix: str, server_name: str, window: float) -> None:
        self.bus = bus
        self.prefix = f"{channel_prefix}hubwire:internal:"
        self.server_name = server_name
        self.window = window
        bus.history_window_ms = int(window * 1000)
        self._queued: list[tuple[ConnectionJournal, tuple[Any, ...] | None]] = []
        self._scheduled = False
        self._flushing: asyncio.Task[None] | None = None
        #: journals of this instance by connection id: hub name, token digest
        self._meta: dict[str, tuple[str, bytes]] = {}
        self._journals: dict[str, ConnectionJournal] = {}
        self._refresher: asyncio.Task[None] | None = None
        self.write_failures = 0
        self.journal_writes = 0
        self.record_writes = 0

    # -- keys ----------------------------------------------------------------------------------------

    def journal_key(self, connection_id: str) -> str:
        return f"{self.prefix}journal:{{{connection_id}}}"

    def record_key(self, connection_id: str) -> str:
        return f"{self.prefix}record:{{{connection_id}}}"

    def lock_key(self, connection_id: str) -> str:
        return f"{self.prefix}recovering:{{{connection_id}}}"

    @property
    def ttl_ms(self) -> int:
        return int(self.window * 1000)

    # -- writing -------------------------------------------------------------------------------------

    def attach(
        self,
        connection_id: str,
        token: str,
        hub: str,
        outbox: Outbox,
        source: Callable[[], dict[str, Any] | None],
    ) -> ConnectionJournal:
        """Journal a durable connection's messages from now on (its outbox waits for the writes)."""
        journal = ConnectionJournal(self, connection_id, outbox, source)
        self._meta[connection_id] = (hub, hashlib.sha256(token.encode()).digest())
        self._journals[connection_id] = journal
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh(), name="hubwire-records")
        outbox.journal = journal
        journal.touch()
        return journal

    def detach(self, journal: ConnectionJournal, delete: bool) -> None:
        """Stop journaling (the connection ended, or moved: then the new holder owns the keys)."""
        if journal.outbox.journal is journal:
            journal.outbox.journal = None
            journal.outbox.journaled()
        self._meta.pop(journal.connection_id, None)
        if self._journals.get(journal.connection_id) is journal:
            del self._journals[journal.connection_id]
        if delete:
            cid = journal.connection_id
            self.queue(journal, (b"DEL", self.journal_key(cid), self.record_key(cid)))

    def queue(self, journal: ConnectionJournal, command: tuple[Any, ...] | None) -> None:
        self._queued.append((journal, command))
        running = self._flushing is not None and not self._flushing.done()
        if not self._scheduled and not running:  # a running flush starts the next one itself
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flush)

    def _start_flush(self) -> None:
        self._scheduled = False
        if self._flushing is not None and not self._flushing.done():
            return  # it starts the next one when it ends
        if self._queued:
            self._flushing = asyncio.get_running_loop().create_task(self._flush(), name="hubwire-journal")

    async def _flush(self) -> None:
        try:
            batch, self._queued = self._queued, []
            journals: dict[int, ConnectionJournal] = {}
            upto: dict[int, int] = {}
            pipe = self.bus.deployment.client.pipeline(transaction=False)
            for journal, command in batch:
                journals[id(journal)] = journal
                if command is not None:
                    pipe.execute_command(*command)
                    if command[0] == b"XADD":
                        self.journal_writes += 1
                        upto[id(journal)] = int(str(command[2]).split("-", 1)[0])
            for key, journal in journals.items():
                if key in upto:  # the journal expires with its record, never before it is written
                    pipe.execute_command(b"PEXPIRE", self.journal_key(journal.connection_id), self.ttl_ms)
                meta = self._meta.get(journal.connection_id)
                if meta is not None and journal.take_dirty():
                    record = journal.record(meta[0], self.server_name, meta[1])
                    cid = journal.connection_id
                    pipe.execute_command(
                        b"SET", self.record_key(cid), _record_encoder.encode(record), b"PX", self.ttl_ms
                    )
                    pipe.execute_command(b"PEXPIRE", self.journal_key(cid), self.ttl_ms)
                    self.record_writes += 1
            ok = True
            try:
                results = await asyncio.wait_for(pipe.execute(raise_on_error=False), self.bus.command_timeout)
                failed = [r for r in results if isinstance(r, Exception)]
                if failed:
                    ok = False
                    log.warning("durable resume: %d journal writes refused: %s", len(failed), failed[0])
            except Exception as exc:
                ok = False
                log.warning(
                    "durable resume: journal writes failed (%s); those connections cannot "
                    "resume elsewhere if this instance dies",
                    exc,
                )
            if not ok:
                self.write_failures += 1
            for key, journal in journals.items():
                journal.written(ok, upto.get(key, 0))
        finally:
            if self._queued and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start_flush)

    async def _refresh(self) -> None:
        """Rewrite every record a few times per window, so a quiet connection stays recoverable."""
        while self._journals:
            await asyncio.sleep(max(self.window / 3, 0.2))
            for journal in list(self._journals.values()):
                journal.touch()

    async def drain(self) -> None:
        """Return once everything queued so far was written (or failed)."""
        for _ in range(100):
            task = self._flushing
            if not self._queued and (task is None or task.done()):
                return
            if task is not None and not task.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(task), self.bus.command_timeout)
            else:
                await asyncio.sleep(0)

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        await self.drain()

    # -- reading (recovery) --------------------------------------------------------------------------

    async def read_record(self, connection_id: str) -> Record | None:
        raw = await self.bus.command("GET", self.record_key(connection_id))
        if not isinstance(raw, bytes):
            return None
        try:
            return _record_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring a malformed durable record of %s: %s", connection_id, exc)
            return None

    async def read_journal(self, connection_id: str, limit: int) -> list[tuple[int, bytes, Tag | None]]:
        """The journal's entries (id, bytes, tag) in order; raises ValueError when malformed."""
        raw = await self.bus.command("XRANGE", self.journal_key(connection_id), "-", "+", "COUNT", limit + 1)
        if not isinstance(raw, list) or len(raw) > limit:
            raise ValueError("journal too long or malformed")
        entries: list[tuple[int, bytes, Tag | None]] = []
        for entry in raw:
            entry_id, values = entry[0], _fields(entry[1])
            seq = int(bytes(entry_id).split(b"-", 1)[0])
            entries.append((seq, bytes(values[b"d"]), parse_tag(bytes(values.get(b"t", b"")))))
        return entries

    async def read_history(self, channel: str, since_ms: int) -> list[tuple[int, bytes]] | None:
        """A channel's history from ``since_ms`` on: (ms, envelope) in order; None past the bound."""
        key = history_key(channel.encode())
        raw = await self.bus.command(
            "XRANGE", key, f"{max(since_ms, 0)}-0", "+", "COUNT", HISTORY_READ_LIMIT + 1
        )
        if not isinstance(raw, list):
            raise ValueError("malformed history")
        if len(raw) > HISTORY_READ_LIMIT:
            return None
        out: list[tuple[int, bytes]] = []
        for entry in raw:
            ms = int(bytes(entry[0]).split(b"-", 1)[0])
            values = _fields(entry[1])
            out.append((ms, bytes(values[b"e"])))
        return out

    async def lock(self, connection_id: str) -> bool:
        """Only one instance recovers a connection at a time."""
        got = await self.bus.command(
            "SET", self.lock_key(connection_id), self.server_name, "NX", "PX", 15_000
        )
        return got is not None

    async def unlock(self, connection_id: str) -> None:
        await self.bus.command("DEL", self.lock_key(connection_id))

    async def rewrite(self, journal: ConnectionJournal, frames: list[tuple[int, bytes, Tag | None]]) -> None:
        """A connection recovered or moved here: its journal becomes exactly the kept messages."""
        cid = journal.connection_id
        journal.store.queue(journal, (b"DEL", self.journal_key(cid)))
        for seq, data, tag in frames:
            journal.append(seq, data, tag)
