"""Stateful reconnect bookkeeping without I/O: numbering, the replay buffer, acks, duplicates,
the outbox around it, and the signed flag in connection tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from hubwire.connections.outbox import Outbox, set_delivery_tag
from hubwire.connections.replay import ReplayBuffer, SequenceError
from hubwire.connections.tokens import TokenIssuer

INVOCATION, PING, ACK, SEQUENCE = 1, 6, 8, 9


def msg(i: int, size: int = 10) -> bytes:
    return f"{i:<{size}}".encode()[:size]


# -- sending -----------------------------------------------------------------------------------------


def test_messages_are_numbered_from_one_and_sent_within_the_limit() -> None:
    buf = ReplayBuffer(limit=25, hold_limit=1000)
    assert buf.next_id == 1
    # sent while at most 25 bytes are unacknowledged: the third crosses it, the fourth waits
    assert [buf.keep(msg(i)) for i in range(1, 6)] == [True, True, True, False, False]
    assert (buf.kept, buf.next_id, buf.unacked_bytes, buf.held_bytes) == (5, 6, 30, 20)


def test_ack_trims_and_releases_held_messages_in_order() -> None:
    buf = ReplayBuffer(limit=25, hold_limit=1000)
    for i in range(1, 7):
        buf.keep(msg(i))
    assert buf.ack(2) == [msg(4), msg(5)]  # 10 bytes left unacked: two more fit (the second crosses)
    assert (buf.first_id, buf.kept, buf.unacked_bytes, buf.held_bytes) == (3, 4, 30, 10)
    assert buf.ack(2) == []  # an old Ack changes nothing
    assert buf.ack(6) == [msg(6)]  # clamped to what went out (3..5): 6 goes out now
    assert (buf.first_id, buf.kept, buf.unacked_bytes, buf.held_bytes) == (6, 1, 10, 0)
    assert buf.ack(6) == [] and buf.kept == 0 and buf.next_id == 7


def test_an_ack_past_what_was_sent_cannot_drop_held_messages() -> None:
    buf = ReplayBuffer(limit=5, hold_limit=1000)
    buf.keep(msg(1))
    buf.keep(msg(2))  # held
    assert buf.ack(1_000_000) == [msg(2)]  # only message 1 went out: 2 is released, not dropped
    assert buf.kept == 1 and buf.first_id == 2


def test_rewind_and_replay_resend_everything_unacked_from_the_first() -> None:
    buf = ReplayBuffer(limit=25, hold_limit=1000)
    for i in range(1, 6):
        buf.keep(msg(i))
    buf.ack(1)
    buf.rewind()  # the WebSocket dropped
    assert buf.keep(msg(6), connected=False) is False  # kept while no transport carries it
    first, resend = buf.replay()
    assert first == 2
    assert resend == [msg(2), msg(3), msg(4)]  # the window again; 5 and 6 wait for Acks
    assert buf.ack(4) == [msg(5), msg(6)]


def test_replay_with_nothing_kept_announces_the_next_id() -> None:
    buf = ReplayBuffer(limit=100, hold_limit=1000)
    buf.keep(msg(1))
    buf.keep(msg(2))
    buf.ack(2)
    assert buf.replay() == (3, [])


def test_overflowing_is_past_the_hold_limit() -> None:
    buf = ReplayBuffer(limit=5, hold_limit=25)  # the first goes out, the rest are held
    buf.keep(msg(1))
    buf.keep(msg(2))
    buf.keep(msg(3))
    assert not buf.overflowing  # 20 held
    buf.keep(msg(4))
    assert buf.overflowing  # 30 held
    buf.clear()
    assert (buf.kept, buf.held_bytes, buf.unacked_bytes, buf.overflowing) == (0, 0, 0, False)


# -- receiving ---------------------------------------------------------------------------------------


def test_received_messages_are_acknowledged_once_when_new() -> None:
    buf = ReplayBuffer(100, 1000)
    assert buf.ack_due() is None  # nothing received yet
    assert buf.accept(PING) and buf.accept(ACK)  # not counted
    assert buf.ack_due() is None
    for _ in range(3):
        assert buf.accept(INVOCATION)
        buf.processed()
    assert buf.ack_due() == 3
    assert buf.ack_due() is None  # nothing new since
    assert buf.accept(INVOCATION)
    assert buf.ack_due() is None  # accepted but not handled yet: not acknowledged
    buf.processed()
    assert buf.ack_due() == 4


def test_after_a_reconnect_duplicates_are_dropped_and_new_messages_handled() -> None:
    buf = ReplayBuffer(100, 1000)
    for _ in range(3):
        buf.accept(INVOCATION)
        buf.processed()
    assert buf.ack_due() == 3
    buf.expect_sequence()
    assert buf.ack_due() == 3  # acknowledged again on the new transport (the last Ack may be lost)
    assert not buf.accept(INVOCATION)  # before the client's Sequence: ignored
    assert not buf.accept(PING)
    assert buf.accept(SEQUENCE)
    buf.reset_sequence(2)  # the client resends from its message 2 (it saw the Ack of 1 only)
    assert [buf.accept(INVOCATION) for _ in range(2)] == [False, False]  # 2 and 3 ran already
    assert buf.accept(INVOCATION)  # 4 is new
    buf.processed()
    assert buf.latest_received == 4


def test_a_message_whose_handling_was_cancelled_is_handled_when_resent() -> None:
    buf = ReplayBuffer(100, 1000)
    buf.accept(INVOCATION)
    buf.processed()
    assert buf.accept(INVOCATION)  # message 2: its handling is cancelled (the socket dropped)
    buf.expect_sequence()
    buf.accept(SEQUENCE)
    buf.reset_sequence(2)
    assert buf.accept(INVOCATION)  # 2 again: never counted, so handled now
    buf.processed()
    assert buf.ack_due() == 2


def test_a_sequence_past_the_next_expected_id_is_an_error() -> None:
    buf = ReplayBuffer(100, 1000)
    buf.accept(INVOCATION)
    buf.processed()
    buf.reset_sequence(2)  # the next one: fine
    with pytest.raises(SequenceError) as raised:
        buf.reset_sequence(3)
    assert str(raised.value) == "Sequence ID greater than amount of messages we've received."
    assert SequenceError.dotnet_name == "InvalidOperationException"


# -- the outbox around it ----------------------------------------------------------------------------


def test_outbox_numbers_only_hub_messages_and_replays_them_after_a_detach() -> None:
    box = Outbox()
    replay = box.enable_replay(limit=1000, hold_limit=10_000)
    box.write_control(b"handshake")
    box.write(b"m1")
    box.write_control(b"ping")
    box.write(b"m2")
    assert box.take_nowait() == [b"handshake", b"m1", b"ping", b"m2"]
    assert replay.next_id == 3
    epoch = box.epoch
    box.detach()
    assert box.epoch == epoch + 1 and box.detached
    box.write(b"m3")  # kept for the replay only
    box.write_control(b"ping")  # dropped: no transport
    assert box.take_nowait() == []
    assert box.attach(b"sequence(1)") == 3
    assert box.take_nowait() == [b"sequence(1)", b"m1", b"m2", b"m3"]
    box.ack(2)
    assert replay.first_id == 3 and replay.kept == 1


def test_outbox_ack_sends_held_messages() -> None:
    box = Outbox()
    box.enable_replay(limit=2, hold_limit=100)
    box.write(b"aa")
    box.write(b"bb")  # unacked bytes were 2 (at the limit): sent, now 4
    box.write(b"cc")  # held
    assert box.take_nowait() == [b"aa", b"bb"]
    box.ack(1)  # 2 bytes unacked: at the limit, cc goes out
    assert box.take_nowait() == [b"cc"]


def test_outbox_overflowing_replay_calls_the_overflow_hook_once() -> None:
    box = Outbox()
    box.enable_replay(limit=1, hold_limit=4)
    calls: list[int] = []
    box.on_overflow = lambda: calls.append(1)
    box.detach()
    for _ in range(5):
        box.write(b"xx")
    assert calls == [1]


async def test_outbox_writer_of_an_old_epoch_stops_and_leaves_bytes_to_the_new_one() -> None:
    box = Outbox()
    box.enable_replay(limit=100, hold_limit=1000)
    old_epoch = box.epoch
    old_writer = asyncio.ensure_future(box.take(old_epoch))
    await asyncio.sleep(0)
    box.detach()
    box.attach(b"seq")  # before the old writer even ran again
    assert await asyncio.wait_for(old_writer, 1) is None
    assert await asyncio.wait_for(box.take(box.epoch), 1) == [b"seq"]


def test_close_lets_go_of_kept_messages() -> None:
    box = Outbox()
    replay = box.enable_replay(limit=100, hold_limit=1000)
    box.write(b"m1")
    box.close()
    assert replay.kept == 0


# -- the signed flag ----------------------------------------------------------------------------------


def test_tokens_carry_the_stateful_flag_signed() -> None:
    issuer = TokenIssuer(b"k" * 32)
    cid, plain = issuer.issue(1)
    cid2, stateful = issuer.issue(1, stateful=True)
    assert len(plain) == 48 and len(stateful) == 50
    verified = issuer.verify(stateful)
    assert verified is not None and verified.connection_id == cid2 and verified.stateful
    verified = issuer.verify(plain)
    assert verified is not None and verified.connection_id == cid and not verified.stateful
    assert len(issuer.issue(0, stateful=True)[1]) == 22  # v0 has no room for it: not stateful
    other = TokenIssuer(b"o" * 32)
    assert other.verify(stateful) is None  # another app's key
    old = issuer.issue(1, now=time.time() - 3600, stateful=True)[1]
    assert issuer.verify(old) is None
    assert issuer.verify(old, check_age=False) is not None  # a resume of a connection held here


def test_a_token_whose_flags_were_changed_is_refused() -> None:
    import base64

    issuer = TokenIssuer(b"k" * 32)
    _, token = issuer.issue(1, stateful=True)
    raw = bytearray(base64.urlsafe_b64decode(token + "=="))
    for flags in (0, 2, 3):
        raw[20] = flags
        forged = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        assert issuer.verify(forged) is None, flags
    _, plain = issuer.issue(1)
    raw = bytearray(base64.urlsafe_b64decode(plain + "=="))
    forged = base64.urlsafe_b64encode(bytes(raw[:20] + b"\x01" + raw[20:])).rstrip(b"=").decode()
    assert issuer.verify(forged) is None  # a flag cannot be added to a plain token either


# -- moving between instances and durable resume ----------------------------------------------------


def test_export_and_restore_carry_the_numbering_and_the_counters() -> None:
    old = ReplayBuffer(limit=1000, hold_limit=10_000)
    for i in range(1, 5):
        old.keep(msg(i))
    old.ack(1)
    for message_type in (INVOCATION, INVOCATION):
        assert old.accept(message_type)
        old.processed()
    state = old.export()
    assert (state.first_id, state.kept, state.next_receive_id, state.latest_received) == (
        2,
        [msg(2), msg(3), msg(4)],
        3,
        2,
    )
    new = ReplayBuffer(limit=1000, hold_limit=10_000)
    new.keep(msg(100))  # what the new holder got meanwhile (numbered 1 there, renumbered now)
    new.restore(state, new.taken())
    assert (new.first_id, new.kept, new.next_id, new.unacked_bytes, new.held_bytes) == (2, 4, 6, 0, 40)
    assert new.replay() == (2, [msg(2), msg(3), msg(4), msg(100)])
    new.expect_sequence()
    assert new.accept(SEQUENCE)
    new.reset_sequence(2)  # the client resends its message 2: handled by the old holder, dropped
    assert not new.accept(INVOCATION)
    assert new.accept(INVOCATION)  # its message 3 is new


class _Journal:
    """The journal side of the outbox contract: what was appended, what Redis confirmed."""

    def __init__(self) -> None:
        self.confirmed = 0
        self.appended: list[tuple[int, bytes, object]] = []
        self.trimmed = 0
        self.touched = 0

    def append(self, seq: int, data: bytes, tag: object) -> None:
        self.appended.append((seq, data, tag))

    def trim(self, acked: int) -> None:
        self.trimmed = acked

    def touch(self) -> None:
        self.touched += 1


def test_durable_outbox_sends_nothing_before_the_journal_has_it() -> None:
    box = Outbox()
    box.enable_replay(1000, 10_000)
    journal = _Journal()
    box.journal = journal
    set_delivery_tag(("i1", 7, "hub:all"))
    box.write(msg(1))
    set_delivery_tag(None)
    box.write(msg(2))
    assert journal.appended == [(1, msg(1), ("i1", 7, "hub:all")), (2, msg(2), None)]
    assert box.take_nowait() == []  # write-ahead: nothing goes out yet
    journal.confirmed = 1
    box.journaled()
    assert box.take_nowait() == [msg(1)]
    journal.confirmed = 2
    box.journaled()
    box.write(msg(3))
    assert box.take_nowait() == [msg(2)]  # 3 waits for its own write
    box.ack(2)
    assert journal.trimmed == 2
    # a detach drops what waited (it is kept); the replay goes out once journaled, in order
    box.detach()
    box.attach(b"SEQ")
    assert box.take_nowait() == [b"SEQ"]
    journal.confirmed = 3
    box.journaled()
    assert box.take_nowait() == [msg(3)]


def test_a_moved_outbox_forwards_hub_messages_only() -> None:
    box = Outbox()
    box.enable_replay(1000, 10_000)
    forwarded: list[bytes] = []
    box.moved(forwarded.append)
    box.write(msg(1))
    box.write_control(b"PING")
    assert forwarded == [msg(1)] and box.take_nowait() == [] and box.replay is None
