"""The outbound side of a connection: a synchronous append, drained by one writer per connection.

Why: a broadcast touching thousands of connections must do no awaiting and
create no task per recipient. ``Outbox.write`` appends; each transport drains
its outbox in its own single writer loop (or, natively served WebSockets,
through a *sink* flushed once per event-loop iteration), coalescing whatever
piled up into one frame / event / poll response.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..protocol.messages import AckMessage, HubMessage, SequenceMessage
from .replay import ReplayBuffer

if TYPE_CHECKING:
    from ..protocol.base import HubProtocol

__all__ = ["Journal", "Outbox", "flush_dirty", "set_delivery_tag"]

#: what a delivery is tagged with: (origin instance, its sequence number, the channel it came on)
Tag = tuple[str, int, str]


class Journal(Protocol):
    """Where a connection's kept messages are written before they go out (durable resume).

    Why: for a connection to resume on another instance after its holder died,
    every message the client may have received must be readable elsewhere, so
    none is sent before it is written (``confirmed`` is the last id written).
    """

    confirmed: int

    def append(self, seq: int, data: bytes, tag: Tag | None) -> None: ...

    def trim(self, acked: int) -> None: ...

    def touch(self) -> None:
        """What the connection's record says changed (the client's counters, its groups)."""


#: outboxes with a sink and unsent records, flushed together at the end of the loop iteration
_dirty: list[Outbox] = []


#: the backplane id (origin, seq) of the message being delivered right now, None for other writes.
#: Deliveries are synchronous, so one module-level value set around each is exact; only outboxes
#: of moving connections read it (:attr:`Outbox.tags`), to tell the two instances' copies apart.
_delivery_tag: list[Tag | None] = [None]


def set_delivery_tag(tag: Tag | None) -> None:
    """Tag the writes that follow with a backplane message id (None: untagged)."""
    _delivery_tag[0] = tag


def flush_dirty() -> None:
    """Hand what every connection was written so far to its sink now (before a frame that must
    follow it: a link's fan-out or group change)."""
    if _dirty:
        _flush_dirty()


def _flush_dirty() -> None:
    """Hand every dirty outbox's records to its sink; one frame memo for the whole pass.

    A broadcast leaves the same bytes object in many outboxes, so the sink
    frames it once and writes the same frame to every socket.
    """
    batch = _dirty[:]
    _dirty.clear()
    memo: dict[int, tuple[bytes, bytes]] = {}
    for outbox in batch:
        sink = outbox.sink
        outbox.dirty = False
        if sink is not None and outbox._chunks:
            sink.flush(outbox, memo)


class Outbox:
    """Outbound bytes of one connection, drained by the transport's single writer loop.

    ``write`` never awaits: it appends and wakes the writer if it is idle.
    ``max_buffered`` bounds memory for slow consumers: once more than that many
    bytes wait while the writer is stuck sending earlier ones (or, for long
    polling, no poll is waiting), ``on_overflow`` is called and the owner closes
    the connection instead of growing without bound.

    With stateful reconnect (:meth:`enable_replay`) ``write`` is for trackable
    hub messages (numbered and kept until acknowledged) and ``write_control``
    for the rest (handshake, Ping, Close, Ack, Sequence). When the transport
    drops, :meth:`detach` keeps the connection's messages in the replay buffer
    only (and a new ``epoch`` tells the old writer to stop); :meth:`attach`
    sends the Sequence and replays them on the new transport.
    """

    __slots__ = (
        "_chunks",
        "_closed",
        "_waiter",
        "_woken",
        "awaiting",
        "buffered",
        "detached",
        "dirty",
        "epoch",
        "forward",
        "journal",
        "max_buffered",
        "on_overflow",
        "replay",
        "sent",
        "sent_bytes",
        "sink",
        "tags",
        "wrote",
    )

    def __init__(self, max_buffered: int | None = None) -> None:
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        #: the writer was woken and will take everything queued at its next step
        self._woken = False
        self._closed = False
        self.buffered = 0
        self.max_buffered = max_buffered
        self.on_overflow: Any = None
        #: set on every write; the heartbeat clears it to decide when a keep-alive ping is due
        self.wrote = False
        #: native mode: writes go to this sink once per loop iteration instead of the writer loop
        self.sink: Any = None
        self.dirty = False
        #: records and bytes queued so far (metrics: plain ints, summed at scrape time)
        self.sent = 0
        self.sent_bytes = 0
        #: stateful reconnect: numbering and the replay buffer (None = the connection does not resume)
        self.replay: ReplayBuffer | None = None
        #: stateful reconnect: the transport dropped and no new one carries the connection yet
        self.detached = False
        #: bumped on every detach: a writer loop that started on an older epoch stops
        self.epoch = 0
        #: while the connection moves between instances: the delivery tag of every kept message
        self.tags: list[Tag | None] | None = None
        #: durable resume: kept messages are written here before they are sent
        self.journal: Journal | None = None
        #: durable resume: (id, bytes) to send once the journal has them, in order
        self.awaiting: deque[tuple[int, bytes]] | None = None
        #: after it moved: where later writes go (the new owner, through the backplane)
        self.forward: Callable[[bytes], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, data: bytes) -> None:
        """Queue a framed hub message for the transport (dropped silently once the outbox is closed).

        With stateful reconnect (:meth:`enable_replay`) the message is also
        numbered and kept, and goes out now only when the transport is there
        and the unacknowledged bytes allow (see :class:`_ReplayOutbox`).
        """
        if self._closed:
            return
        self._chunks.append(data)
        size = len(data)
        self.buffered += size
        self.sent += 1
        self.sent_bytes += size
        self.wrote = True
        if self.sink is not None:
            if not self.dirty:
                # native mode: flushed once per loop iteration, all dirty sockets in one pass
                self.dirty = True
                _dirty.append(self)
                if len(_dirty) == 1:
                    asyncio.get_running_loop().call_soon(_flush_dirty)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True
        # over the bound while the writer is busy (blocked sending earlier bytes to a client that
        # does not read) or absent (no long poll waiting): a slow consumer. Bytes written while
        # the writer is about to take them anyway (one burst) do not count.
        if (
            self.max_buffered is not None
            and self.buffered > self.max_buffered
            and not self._woken
            and self.on_overflow
        ):
            callback, self.on_overflow = self.on_overflow, None
            callback()

    def write_control(self, data: bytes) -> None:
        """Queue a message that stateful reconnect neither numbers nor replays (handshake, Ping,
        Close, Ack, Sequence): the same as :meth:`write` unless :meth:`enable_replay` was called."""
        self.write(data)

    # -- stateful reconnect ------------------------------------------------------------------------

    def enable_replay(self, limit: int, hold_limit: int) -> ReplayBuffer:
        """Number, keep and replay trackable messages from now on (hub handshake version 2).

        The outbox becomes a :class:`_ReplayOutbox` (same slots, other ``write``), so outboxes
        without stateful reconnect, nearly all of them, pay nothing for it on the hot path.
        """
        self.replay = ReplayBuffer(limit, hold_limit)
        self.__class__ = _ReplayOutbox
        return self.replay

    def ack(self, sequence_id: int) -> None:
        """The client acknowledged up to ``sequence_id``: forget those, send held ones that now fit."""
        replay = self.replay
        if replay is None:
            return
        released = replay.ack(sequence_id)
        if self.journal is not None:
            self.journal.trim(replay.first_id - 1)
        if not self.detached and released:
            self._send_kept(replay.first_id + replay.sent_count - len(released), released)

    def peer_control(self, message: HubMessage) -> bool:
        """Act on the peer's Ack or Sequence (True), or leave ``message`` be (False). Raises
        :class:`~hubwire.connections.replay.SequenceError` for a Sequence naming messages it
        never sent. Shared by whatever holds the client's numbering (a hub, a service node)."""
        if isinstance(message, AckMessage):
            self.ack(message.sequence_id)
            return True
        if isinstance(message, SequenceMessage) and self.replay is not None:
            self.replay.reset_sequence(message.sequence_id)
            return True
        return False

    def resume(self, protocol: HubProtocol) -> int:
        """A new transport: the Sequence and the replay go out; the peer's messages are ignored
        until its own Sequence. Returns how many messages were sent again."""
        replay = self.replay
        assert replay is not None
        resent = self.attach(protocol.write_message(SequenceMessage(replay.first_id)))
        replay.expect_sequence()
        return resent

    def ack_due(self, protocol: HubProtocol) -> bool:
        """The periodic Ack of what the peer sent and was handled, when there is news."""
        replay = self.replay
        acked = replay.ack_due() if replay is not None else None
        if acked is None:
            return False
        self.write_control(protocol.write_message(AckMessage(acked)))
        return True

    def _send_kept(self, first: int, frames: list[bytes]) -> None:
        """Send kept messages numbered from ``first``: now, or once the journal has them."""
        journal = self.journal
        if journal is None:
            for data in frames:
                Outbox.write(self, data)
            return
        awaiting = self.awaiting
        if awaiting is None:
            awaiting = self.awaiting = deque()
        for offset, data in enumerate(frames):
            seq = first + offset
            if awaiting or seq > journal.confirmed:
                awaiting.append((seq, data))
            else:
                Outbox.write(self, data)

    def journaled(self) -> None:
        """The journal confirmed more: send what waited for it, in order."""
        awaiting = self.awaiting
        journal = self.journal
        if not awaiting or journal is None:
            return
        confirmed = journal.confirmed
        while awaiting and awaiting[0][0] <= confirmed:
            data = awaiting.popleft()[1]
            if not self.detached and not self._closed:
                Outbox.write(self, data)

    def detach(self) -> None:
        """The transport is gone (or being replaced): unsent bytes are dropped (the replay buffer
        has the messages), the old writer is told to stop, writes are kept until :meth:`attach`."""
        self.detached = True
        self.epoch += 1
        self.sink = None
        self._chunks = []
        self.buffered = 0
        self._woken = False
        if self.awaiting:
            self.awaiting.clear()  # kept in the replay buffer: sent again on the next transport
        if self.replay is not None:
            self.replay.rewind()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def attach(self, sequence: bytes) -> int:
        """A new transport carries the connection: the framed Sequence message, then the replay.

        Returns how many messages are sent again now (held ones follow as Acks make room).
        """
        self.detached = False
        Outbox.write(self, sequence)
        if self.replay is None:
            return 0
        first, resent = self.replay.replay()
        self._send_kept(first, resent)
        return len(resent)

    def moved(self, forward: Callable[[bytes], None]) -> None:
        """The connection moved to another instance: later hub messages go to ``forward``.

        Why: a hub method still running here (its completion, its stream items)
        must reach the client on the instance that took the connection over.
        """
        self.replay = None
        self.tags = None
        self.journal = None
        self.awaiting = None
        self.detached = True
        self.forward = forward
        self.__class__ = _ForwardOutbox

    def close(self) -> None:
        """No more writes; the writer drains what is queued, then sees the end."""
        if self.replay is not None:
            self.replay.clear()
        sink = self.sink
        if sink is not None and not self._closed:
            if self._chunks:
                sink.flush(self)
            self._closed = True
            sink.closed()
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take_nowait(self) -> list[bytes]:
        """Everything queued right now (possibly nothing)."""
        chunks = self._chunks
        self._chunks = []
        self.buffered = 0
        self._woken = False
        return chunks

    def put_back(self, chunks: list[bytes]) -> None:
        """Queue again, first, what a long poll took but could not deliver (its client was gone).

        Why: a poll takes everything queued before it writes; when its client turns out to be
        gone, the bytes belong to the next poll, in their original order.
        """
        if not chunks:
            return
        self._chunks[:0] = chunks
        self.buffered += sum(len(c) for c in chunks)
        self._wake()

    def _wake(self) -> None:
        """Wake the waiting writer (``write`` does the same inline: it is the hot path)."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
                self._woken = True

    async def take(self, epoch: int | None = None) -> list[bytes] | None:
        """Wait for queued bytes and return them all; None once closed and drained, or (given the
        writer's ``epoch``) once the transport it writes to was detached."""
        while not self._chunks:
            if self._closed or (epoch is not None and epoch != self.epoch):
                return None
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        if epoch is not None and epoch != self.epoch:
            return None  # these bytes are for the transport that replaced this writer's
        return self.take_nowait()

    async def wait_readable(self, timeout: float | None) -> bool:
        """Wait until something is queued or the outbox closes; False on timeout."""
        if self._chunks or self._closed:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            if self._waiter is waiter:
                self._waiter = None
            return False
        return True


class _ReplayOutbox(Outbox):
    """An outbox with stateful reconnect on (:meth:`Outbox.enable_replay` switches the class).

    ``write`` is for trackable hub messages: numbered and kept; sent now only
    while a transport carries the connection and the unacknowledged bytes
    allow, else held (past the hold limit ``on_overflow`` fires: a slow
    consumer). ``write_control`` bypasses the numbering and is dropped while
    no transport is there.
    """

    __slots__ = ()

    def write(self, data: bytes) -> None:
        replay = self.replay
        assert replay is not None
        if self._closed:
            return
        tag = _delivery_tag[0]
        if self.tags is not None:
            self.tags.append(tag)
        journal = self.journal
        seq = replay.next_id
        if journal is not None:
            journal.append(seq, data, tag)
        if not replay.keep(data, not self.detached):
            if replay.overflowing and self.on_overflow:
                callback, self.on_overflow = self.on_overflow, None
                callback()
            return
        if journal is not None:
            self._send_kept(seq, [data])
        else:
            Outbox.write(self, data)

    def write_control(self, data: bytes) -> None:
        if not self.detached:
            Outbox.write(self, data)


class _ForwardOutbox(Outbox):
    """The outbox of a connection that moved away: hub messages are forwarded, the rest dropped."""

    __slots__ = ()

    def write(self, data: bytes) -> None:
        if not self._closed and self.forward is not None:
            self.forward(data)

    def write_control(self, data: bytes) -> None:
        return None
