"""The durable-resume store against a real redis-server: write-ahead ordering and flush scheduling.

In-process (a :class:`RedisBus` and a :class:`DurableStore` on a private ``redis-server``), so the
interleavings that matter can be driven exactly; the end-to-end behaviour (a holder SIGKILLed, the
client resuming on a survivor) is in ``test_stateful_across_instances.py``.
"""

from __future__ import annotations

import asyncio

import redis

from hubwire.backplane.bus import RedisBus, history_key
from hubwire.backplane.durable import DurableStore
from hubwire.connections.outbox import Outbox, set_delivery_tag
from tests.conftest import RedisServer
from tests.hwtools import wait_for


async def _store(url: str) -> tuple[RedisBus, DurableStore]:
    bus = RedisBus(url)
    await bus.start()
    return bus, DurableStore(bus, "t:", "me", 60.0)


def _outbox() -> Outbox:
    box = Outbox()
    box.enable_replay(100_000, 1_000_000)
    return box


async def test_a_write_queued_while_a_flush_starts_is_never_stranded(private_redis: RedisServer) -> None:
    bus, store = await _store(private_redis.url)
    try:
        box = _outbox()
        store.attach("c1", "token", "Hub", box, lambda: {"user": None})
        await asyncio.sleep(0)  # the first flush is created; its first step has not run yet
        box.write(b"a")  # queued between the flush's creation and its start
        sent: list[bytes] = []

        async def got(n: int) -> bool:
            sent.extend(box.take_nowait())
            return len(sent) >= n

        await wait_for(lambda: got(1), 5, "the first message")
        await store.drain()
        box.write(b"b")  # after that flush ended: must start a new one
        await wait_for(lambda: got(2), 5, "the second message")
        assert sent == [b"a", b"b"]
        client = redis.Redis.from_url(private_redis.url)
        try:
            entries = client.xrange(store.journal_key("c1"))
            assert [(e[0], e[1][b"d"]) for e in entries] == [(b"1-1", b"a"), (b"2-1", b"b")]
            assert client.exists(store.record_key("c1"))
        finally:
            client.close()
    finally:
        await bus.close()


async def test_nothing_is_sent_before_its_journal_write_and_acks_trim(private_redis: RedisServer) -> None:
    bus, store = await _store(private_redis.url)
    client = redis.Redis.from_url(private_redis.url)
    try:
        box = _outbox()
        store.attach("c2", "token", "Hub", box, lambda: {"user": None})
        set_delivery_tag(("i1", 5, "Hub:all"))
        box.write(b"m1")
        set_delivery_tag(None)
        box.write(b"m2")
        assert box.take_nowait() == []  # write-ahead: nothing before Redis has it
        await store.drain()
        assert box.take_nowait() == [b"m1", b"m2"]
        assert client.xlen(store.journal_key("c2")) == 2
        box.ack(1)
        await store.drain()
        entries = client.xrange(store.journal_key("c2"))
        assert [e[0] for e in entries] == [b"2-1"]  # acknowledged: trimmed
        record = await store.read_record("c2")
        assert record is not None and record.acked == 1 and record.marks == {"i1\x00Hub:all": 5}
    finally:
        client.close()
        await bus.close()


async def test_while_redis_is_down_messages_still_go_out_and_the_record_says_so(
    private_redis: RedisServer,
) -> None:
    bus, store = await _store(private_redis.url)
    try:
        box = _outbox()
        journal = store.attach("c3", "token", "Hub", box, lambda: {"user": None})
        await store.drain()
        private_redis.kill()
        box.write(b"during")
        await wait_for(lambda: _has(box, b"during"), 15, "local delivery during the outage")
        assert journal.gapped  # no other instance may resume it from this journal
    finally:
        await bus.close()


async def _has(box: Outbox, data: bytes) -> bool:
    return data in box.take_nowait()


def test_history_keys_share_their_channels_hash_slot() -> None:
    from redis.crc import key_slot

    for channel in (b"app:Hub:all", b"app:Hub:group:a{b}c", b"app:{tag}:Hub:all"):
        key = history_key(channel)
        assert key_slot(key) == key_slot(channel), channel
    # braces that make no tag: no key can share the slot by name (the bus writes it on its own)
    assert key_slot(history_key(b"x:{}:y")) != key_slot(b"x:{}:y")


async def test_a_quiet_connection_stays_recoverable_and_nothing_outlives_it(
    private_redis: RedisServer,
) -> None:
    bus = RedisBus(private_redis.url)
    await bus.start()
    store = DurableStore(bus, "t:", "me", 1.5)
    client = redis.Redis.from_url(private_redis.url)
    try:
        box = _outbox()
        journal = store.attach("c4", "token", "Hub", box, lambda: {"user": None})
        box.write(b"once")
        await store.drain()
        await asyncio.sleep(2.5)  # longer than the window without a message or an ack
        assert client.exists(store.record_key("c4"))  # refreshed while the connection lives
        assert 0 < client.pttl(store.journal_key("c4")) <= 1500  # the journal expires with it
        store.detach(journal, delete=False)  # it moved or its instance stops: the keys expire
        await asyncio.sleep(2.0)
        assert not client.exists(store.record_key("c4"), store.journal_key("c4"))
        bus.history_window_ms = 1500
        bus.publish("t:Hub:all", b"x", history=True)
        await asyncio.sleep(0.3)
        assert 0 < client.pttl(history_key(b"t:Hub:all")) <= 1500  # histories expire too
    finally:
        client.close()
        await store.close()
        await bus.close()
