"""Stateful reconnect bookkeeping of one connection: numbering, the replay buffer, acks, duplicates.

Why: with stateful reconnect (hub protocol version 2, WebSockets only) a dropped
WebSocket does not end the connection; the client comes back with the same
token and both sides send again what the other has not acknowledged. This
module is that logic and nothing else (no I/O, no clock, no asyncio), so it is
tested on its own; the :class:`~hubwire.connections.outbox.Outbox` drives the
sending half and the hub connection handler the receiving half. It follows
ASP.NET Core's ``MessageBuffer`` and the official JS client's, which number the
same way:

* each side numbers the trackable messages it sends (types 1-5: invocations,
  stream items, completions, stream invocations, cancels) from 1, never
  resetting; Ping, Close, Ack and Sequence are not numbered;
* sent messages are kept (the framed bytes, shared with every other recipient
  of a broadcast: a reference, not a copy) until an Ack with an id at or past
  theirs arrives;
* past ``limit`` unacknowledged bytes further messages are *held*: kept, but
  not sent until Acks make room (the protocol's back-pressure). Senders never
  wait for it (a broadcast must not wait for one slow client): held bytes are
  bounded by ``hold_limit`` instead, past which the client counts as a slow
  consumer and its connection is closed;
* on a reconnect the sender writes ``Sequence{id of the first kept message, or
  the next id when none is kept}`` then the kept messages in order; the
  receiver rewinds its counter to that id and drops every trackable message
  it already processed.
"""

from __future__ import annotations

from collections import deque

__all__ = ["TRACKABLE", "ReplayBuffer", "ReplayState", "SequenceError"]

#: message types that are numbered, kept and acknowledged (Invocation .. CancelInvocation)
TRACKABLE = frozenset((1, 2, 3, 4, 5))
_SEQUENCE = 9


class SequenceError(Exception):
    """The peer's Sequence names messages this side never received (a protocol error).

    The text is ASP.NET Core's; ``dotnet_name`` is the exception type it reports in detailed errors.
    """

    dotnet_name = "InvalidOperationException"

    def __init__(self) -> None:
        super().__init__("Sequence ID greater than amount of messages we've received.")


class ReplayState:
    """Everything a :class:`ReplayBuffer` knows, to move a connection to another instance.

    ``kept`` are the framed messages the client has not acknowledged (sent or
    held), numbered from ``first_id``; ``next_receive_id`` / ``latest_received``
    say which of the client's messages were handled, so the new owner drops
    what the client resends after the move as the old one would have.
    """

    __slots__ = ("first_id", "kept", "latest_received", "next_receive_id")

    def __init__(self, first_id: int, kept: list[bytes], next_receive_id: int, latest_received: int) -> None:
        self.first_id = first_id
        self.kept = kept
        self.next_receive_id = next_receive_id
        self.latest_received = latest_received


class ReplayBuffer:
    """Both directions of one connection's stateful reconnect state.

    Sending: :meth:`keep` numbers a message and says whether it may go out now,
    :meth:`ack` drops what the peer acknowledged and returns held messages that
    now fit, :meth:`rewind` (transport lost) and :meth:`replay` (transport back)
    resend. Receiving: :meth:`accept` / :meth:`processed` around each inbound
    message, :meth:`reset_sequence` for the peer's Sequence, :meth:`ack_due`
    for the periodic Ack.
    """

    __slots__ = (
        "_kept",
        "_pending",
        "_sent",
        "first_id",
        "held_bytes",
        "hold_limit",
        "last_acked",
        "latest_received",
        "limit",
        "next_receive_id",
        "unacked_bytes",
        "waiting_for_sequence",
    )

    def __init__(self, limit: int, hold_limit: int) -> None:
        #: unacknowledged bytes on the wire past which further messages are held
        self.limit = limit
        #: held bytes past which the peer counts as a slow consumer (see :attr:`overflowing`)
        self.hold_limit = hold_limit
        #: kept messages in id order (created on demand: an idle connection keeps no deque)
        self._kept: deque[bytes] | None = None
        #: id of the first kept message (the next id to assign when nothing is kept)
        self.first_id = 1
        #: how many kept messages (a prefix) went out on the current transport
        self._sent = 0
        self.unacked_bytes = 0
        self.held_bytes = 0
        # receiving side
        self.next_receive_id = 1
        self.latest_received = 0
        self.last_acked = 0
        self.waiting_for_sequence = False
        #: id of the inbound message being processed (counted once :meth:`processed` is called)
        self._pending = 0

    # -- sending -----------------------------------------------------------------------------------

    @property
    def kept(self) -> int:
        """Messages kept (sent but unacknowledged, or held)."""
        return len(self._kept) if self._kept is not None else 0

    @property
    def sent_count(self) -> int:
        """How many kept messages (a prefix) went out on the current transport."""
        return self._sent

    @property
    def next_id(self) -> int:
        """The id the next trackable message gets."""
        return self.first_id + self.kept

    @property
    def overflowing(self) -> bool:
        """Held bytes are past the hold limit: the peer does not acknowledge (or is gone too long)."""
        return self.held_bytes > self.hold_limit

    def keep(self, data: bytes, connected: bool = True) -> bool:
        """Number and keep one trackable message; True when it may be sent now.

        Sent when a transport is there (``connected``), nothing is held before
        it and the unacknowledged bytes are within the limit (as ASP.NET: a
        message goes out while at most ``limit`` bytes are unacknowledged, so
        the last one may cross it).
        """
        kept = self._kept
        if kept is None:
            kept = self._kept = deque()
        kept.append(data)
        if connected and self._sent == len(kept) - 1 and self.unacked_bytes <= self.limit:
            self._sent += 1
            self.unacked_bytes += len(data)
            return True
        self.held_bytes += len(data)
        return False

    def ack(self, sequence_id: int) -> list[bytes]:
        """Drop kept messages up to ``sequence_id``; returns held messages that may go out now.

        Only messages that went out can be acknowledged: a larger id (a broken
        peer) is clamped to the last one sent.
        """
        kept = self._kept
        count = min(sequence_id - self.first_id + 1, self._sent)
        if kept is None or count <= 0:
            return []
        for _ in range(count):
            self.unacked_bytes -= len(kept.popleft())
        self.first_id += count
        self._sent -= count
        released = self._release()
        if not kept:
            self._kept = None
        return released

    def _release(self) -> list[bytes]:
        """Held messages that fit within the limit now, marked as sent."""
        kept = self._kept
        released: list[bytes] = []
        if kept is None:
            return released
        while self._sent < len(kept) and self.unacked_bytes <= self.limit:
            data = kept[self._sent]
            self._sent += 1
            self.unacked_bytes += len(data)
            self.held_bytes -= len(data)
            released.append(data)
        return released

    def rewind(self) -> None:
        """The transport is gone: nothing kept is on a wire any more (all of it is held)."""
        self.held_bytes += self.unacked_bytes
        self.unacked_bytes = 0
        self._sent = 0

    def replay(self) -> tuple[int, list[bytes]]:
        """A new transport: the Sequence id to announce and the kept messages to send, in order.

        The id is that of the first kept message, or the next id when nothing
        is kept (both ASP.NET and the JS client do so, whatever the spec says).
        Messages beyond the limit stay held until Acks make room.
        """
        self.rewind()
        return self.first_id, self._release()

    def export(self) -> ReplayState:
        """A copy of the state (the frames are shared, not copied) for the instance taking over."""
        kept = list(self._kept) if self._kept is not None else []
        return ReplayState(self.first_id, kept, self.next_receive_id, self.latest_received)

    def restore(self, state: ReplayState, later: list[bytes]) -> None:
        """Take over a moved connection: the old owner's ``state``, then ``later``.

        ``later`` are messages this instance kept for the connection while the
        move was under way and that the old owner did not have; they follow the
        old owner's in the numbering. Nothing is on a wire yet: everything is
        held until the client's transport arrives (:meth:`replay`).
        """
        frames = [*state.kept, *later]
        self._kept = deque(frames) if frames else None
        self.first_id = state.first_id
        self._sent = 0
        self.unacked_bytes = 0
        self.held_bytes = sum(len(f) for f in frames)
        self.next_receive_id = state.next_receive_id
        self.latest_received = state.latest_received
        self.last_acked = 0
        self._pending = 0

    def taken(self) -> list[bytes]:
        """Every kept message, in order (this instance's own, before a :meth:`restore` merges)."""
        return list(self._kept) if self._kept is not None else []

    def clear(self) -> None:
        """The connection is over: let go of every kept message."""
        self._kept = None
        self.unacked_bytes = self.held_bytes = self._sent = 0

    # -- receiving ---------------------------------------------------------------------------------

    def accept(self, message_type: int) -> bool:
        """Whether an inbound message is to be handled (False: a duplicate, or before the Sequence).

        After a reconnect everything before the peer's Sequence is ignored, as
        ASP.NET does. A trackable message is counted only once
        :meth:`processed` is called: one whose handling was cancelled (its
        transport dropped meanwhile) is handled again when the peer resends it.
        """
        if self.waiting_for_sequence:
            if message_type != _SEQUENCE:
                return False
            self.waiting_for_sequence = False
            return True
        if message_type not in TRACKABLE:
            return True
        current = self.next_receive_id
        self.next_receive_id = current + 1
        if current <= self.latest_received:
            return False  # handled before the reconnect: the peer resent it
        self._pending = current
        return True

    def processed(self) -> None:
        """The accepted trackable message was handled: count it (it will be acknowledged)."""
        if self._pending > self.latest_received:
            self.latest_received = self._pending

    def reset_sequence(self, sequence_id: int) -> None:
        """The peer's Sequence: its next message has this id. Raises :class:`SequenceError`
        when that is past the next id expected (messages would be missing)."""
        if sequence_id > self.next_receive_id:
            raise SequenceError()
        self.next_receive_id = sequence_id

    def expect_sequence(self) -> None:
        """A new transport: ignore the peer's messages until its Sequence arrives.

        The last Ack may have been lost with the old transport, so what was
        handled is acknowledged again at the next chance: a peer whose sends
        wait for Acks (its buffer full) would otherwise wait for ever.
        """
        self.waiting_for_sequence = True
        self.last_acked = 0

    def ack_due(self) -> int | None:
        """The id to acknowledge now, when something new was processed since the last Ack."""
        if self.latest_received > self.last_acked:
            self.last_acked = self.latest_received
            return self.last_acked
        return None
