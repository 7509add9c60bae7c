"""Instance leases: an instance's death is known in seconds, also to requests relayed to it.

Each instance keeps a short lease in Redis (``{prefix}hubwire:internal:lease:{server_name}``,
refreshed every second, expiring after three) and lists itself in ``{prefix}hubwire:internal:instances``.
A request relayed to the owner of an SSE / long-polling connection is answered 404 ("no such
connection") as soon as the owner's lease is gone, instead of after the relay timeout (up to 100 s
for a poll), so the official client (``withAutomaticReconnect()``) reconnects to a live instance.

Real processes: three instances on Redis behind the round-robin front, official JS clients through
Node, the owner SIGKILLed or SIGSTOPped (alive, sockets open: Redis still counts its subscriber).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from hubwire.backplane import RedisBackplane
from hubwire.backplane.bus import RedisBus
from hubwire.backplane.lease import InstanceLease, LeaseWatch

from .conftest import RedisServer, ServerProcess
from .hwtools import APP, stats, wait_for
from .nodeclients import node_clients, round_robin_front
from .requirements import NODE_CLIENT, requires

SCRIPT = Path(__file__).parent / "hardening" / "leases.cjs"
PREFIX = "Leases:"
MODES = ["sse_json", "longpolling_json", "longpolling_messagepack", "websockets_json"]
#: every client is connected again this long after its instance died
BACK_WITHIN = 5.0
RS = "\x1e"
HANDSHAKE = json.dumps({"protocol": "json", "version": 1}) + RS


@pytest.fixture
def cluster(start_server: Any, redis_server: RedisServer) -> Iterator[tuple[list[ServerProcess], str]]:
    """Three instances (following HUBWIRE_SERVING) and the round-robin front before them."""
    instances: list[ServerProcess] = [
        start_server(APP, args=["--redis", redis_server.url, "--channel-prefix", PREFIX]) for _ in range(3)
    ]
    with round_robin_front([i.url for i in instances]) as url:
        yield instances, url


@contextlib.contextmanager
def resumed_on_exit(instance: ServerProcess) -> Iterator[None]:
    """A SIGSTOPped instance is continued (then killed by its fixture) however the test ends."""
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(instance.proc.pid, signal.SIGCONT)
        instance.kill(signal.SIGKILL)


@requires(*NODE_CLIENT)
async def test_owner_killed_every_client_connected_again_within_seconds(
    cluster: tuple[list[ServerProcess], str],
) -> None:
    """SIGKILL an instance: SSE, long-polling (JSON, MessagePack) and WebSocket clients are all
    Connected again within 5 s, on a survivor, and get the next broadcast exactly once."""
    instances, front_url = cluster
    survivor, _, victim = instances
    pids = {i.proc.pid for i in instances}
    async with node_clients(SCRIPT, front_url, str(len(instances)), ",".join(MODES)) as clients:
        ready = (await clients.wait_for("ready", 90))["clients"]
        mode_of = {c["client"]: c["mode"] for c in ready}
        on_victim = {c["client"] for c in ready if c["pid"] == victim.proc.pid}
        assert {c["pid"] for c in ready} == pids
        assert {mode_of[c] for c in on_victim} == set(MODES)
        killed = time.time()
        victim.kill(signal.SIGKILL)
        lost: dict[int, float] = {}
        back: dict[int, float] = {}
        # the victim's clients come back (bounded past the relay timeout, to measure how late they are)
        deadline = time.monotonic() + 110
        while not on_victim <= set(back):
            try:
                event = await clients.next_event(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                missing = {c: mode_of[c] for c in on_victim - set(back)}
                raise AssertionError(f"not connected again: {missing}; back after {back}") from None
            if event["event"] == "reconnecting":
                lost[event["client"]] = event["at"] - killed
            elif event["event"] == "reconnected":
                back[event["client"]] = event["at"] - killed
                print(f"{mode_of[event['client']]}: back after {back[event['client']]:.2f}", file=sys.stderr)
                assert event["pid"] in pids - {victim.proc.pid}, event
        # a client that lost a request relayed through the victim may reconnect too: all by the limit
        await asyncio.sleep(max(0.0, killed + BACK_WITHIN - time.time()))
        await clients.command("report")
        report = (await clients.wait_for("report", 10))["clients"]
        for event in clients.events:
            if event["event"] == "reconnected":
                back[event["client"]] = event["at"] - killed
        by_mode: dict[str, list[float]] = {}
        for client, seconds in sorted(back.items()):
            by_mode.setdefault(mode_of[client], []).append(round(seconds, 2))
        print(f"\nconnected again after the kill (s), by mode: {by_mode}", file=sys.stderr)
        print(f"lost after the kill (s): {sorted(lost.values())}", file=sys.stderr)
        assert max(back.values()) <= BACK_WITHIN, by_mode
        assert [c for c in report if c["state"] != "Connected"] == []

        # the next broadcasts reach every client exactly once
        async with httpx.AsyncClient(base_url=survivor.url, timeout=5) as http:
            for seq in (1, 2):
                assert (await http.post(f"/broadcast/{seq}")).status_code == 200
        report_deadline = time.monotonic() + 10
        while True:
            await clients.command("report")
            report = (await clients.wait_for("report", 10))["clients"]
            if all(2 in c["broadcasts"] for c in report) or time.monotonic() > report_deadline:
                break
            await asyncio.sleep(0.1)
        assert [c for c in report if c["broadcasts"] != [1, 2]] == []
        await clients.command("stop")
        assert (await clients.wait_for("stopped", 15))["errors"] == []
    for instance in instances[:2]:
        assert "Traceback" not in instance.output(), instance.output()[-3000:]


async def _long_polling_on(owner: str, relayed: str, client: httpx.AsyncClient) -> tuple[str, str]:
    """A long-polling connection (id, token) started on ``owner``, its handshake through ``relayed``."""
    negotiated = (await client.post(f"{owner}/hub/negotiate?negotiateVersion=1")).json()
    token: str = negotiated["connectionToken"]
    assert (await client.get(f"{owner}/hub?id={token}")).status_code == 200  # the owner starts it
    assert (await client.post(f"{relayed}/hub?id={token}", content=HANDSHAKE)).status_code == 200
    poll = await client.get(f"{relayed}/hub?id={token}")
    assert poll.status_code == 200 and poll.text == "{}" + RS, poll.text
    return negotiated["connectionId"], token


async def test_owner_stopped_relayed_requests_answered_404_within_seconds(
    start_server: Any, private_redis: RedisServer
) -> None:
    """SIGSTOP the owner (alive, sockets open: Redis still counts its subscriber): a poll waiting on
    it, a new POST and a new poll are answered 404 once its lease expired, not after the relay
    timeout; on an instance that relayed for the connection before and on one that never did."""
    args = ["--redis", private_redis.url, "--channel-prefix", "lease-stop:"]
    owner, relayer, other = (start_server(APP, args=args) for _ in range(3))
    r = redis.Redis.from_url(private_redis.url)
    async with httpx.AsyncClient(timeout=120) as client:
        connection_id, token = await _long_polling_on(owner.url, relayer.url, client)
        received = await _received(owner.url)
        waiting = asyncio.create_task(client.get(f"{relayer.url}/hub?id={token}"))
        channel = f"lease-stop:hubwire:internal:transport:{connection_id}"
        with resumed_on_exit(owner):
            await _until_received(owner.url, received + 1)  # the poll waits on the owner
            stopped = time.monotonic()
            os.killpg(owner.proc.pid, signal.SIGSTOP)
            poll = await asyncio.wait_for(waiting, 120)
            waited = time.monotonic() - stopped
            assert r.pubsub_numsub(channel)[0][1] == 1  # Redis still counts the stopped owner
            timings = {"waiting poll": waited}
            for name, url, method in (
                ("new POST via relayer", relayer.url, "POST"),
                ("new poll via relayer", relayer.url, "GET"),
                ("new POST via other", other.url, "POST"),
            ):
                started = time.monotonic()
                if method == "POST":
                    response = await client.post(f"{url}/hub?id={token}", content=HANDSHAKE)
                else:
                    response = await client.get(f"{url}/hub?id={token}")
                timings[name] = time.monotonic() - started
                assert response.status_code == 404, (name, response.status_code, response.text)
            print(f"\nanswered after SIGSTOP (s): {timings}", file=sys.stderr)
            assert poll.status_code == 404, poll.text
            assert waited <= 5.0, timings
            assert all(t <= 5.0 for t in timings.values()), timings
    r.close()


async def _received(url: str) -> int:
    """Backplane messages the instance at ``url`` received so far."""
    count: int = (await stats(url))["backplane"]["received"]
    return count


async def _until_received(url: str, count: int) -> None:
    async def check() -> bool:
        return await _received(url) >= count

    await wait_for(check, 10, f"{url} to receive {count} backplane messages", 0.02)


@pytest.mark.parametrize("when", ["at-once", "after-cancel"])
async def test_relayed_poll_whose_client_left_takes_no_data(
    start_server: Any, private_redis: RedisServer, when: str
) -> None:
    """A relayed long poll whose client went away leaves what it would have answered queued for the
    client's next poll: sent right after the client left (the owner may have taken it: it commits
    only when the relaying instance confirms), or once the owner ended the poll ("cancel")."""
    args = ["--redis", private_redis.url, "--channel-prefix", f"lease-gone-{when}:"]
    owner, relayer, other = (start_server(APP, args=args) for _ in range(3))
    async with httpx.AsyncClient(timeout=15) as client:
        _, token = await _long_polling_on(owner.url, relayer.url, client)
        seen = await _received(owner.url)
        async with httpx.AsyncClient(timeout=15) as leaving:
            poll = asyncio.create_task(leaving.get(f"{relayer.url}/hub?id={token}"))
            await _until_received(owner.url, seen + 1)  # the poll waits on the owner
            poll.cancel()
            await asyncio.gather(poll, return_exceptions=True)
        if when == "after-cancel":
            await _until_received(owner.url, seen + 2)  # the poll, then its "cancel"
        assert (await client.post(f"{owner.url}/broadcast/7")).status_code == 200
        nxt = await client.get(f"{other.url}/hub?id={token}")
        assert nxt.status_code == 200
        assert '"target":"Broadcast","arguments":[7]' in nxt.text.replace(" ", ""), nxt.text


async def test_relaying_instance_killed_during_a_poll_leaves_its_data_queued(
    start_server: Any, private_redis: RedisServer
) -> None:
    """The relaying instance dies while the owner holds its poll: the data that poll takes finds no
    one on the reply channel, and stays queued for the client's next poll (through another instance)."""
    args = ["--redis", private_redis.url, "--channel-prefix", "lease-relayer:"]
    owner, relayer, other = (start_server(APP, args=args) for _ in range(3))
    r = redis.Redis.from_url(private_redis.url)
    async with httpx.AsyncClient(timeout=15) as client:
        _, token = await _long_polling_on(owner.url, relayer.url, client)
        replies = {c.decode() for c in r.pubsub_channels("lease-relayer:hubwire:internal:reply:*")}
        seen = await _received(owner.url)
        async with httpx.AsyncClient(timeout=15) as doomed:
            poll = asyncio.create_task(doomed.get(f"{relayer.url}/hub?id={token}"))
            await _until_received(owner.url, seen + 1)  # the poll waits on the owner
            relayer.kill(signal.SIGKILL)
            await asyncio.gather(poll, return_exceptions=True)

        async def relayer_gone() -> bool:
            left = {c.decode() for c in r.pubsub_channels("lease-relayer:hubwire:internal:reply:*")}
            return len(left) == len(replies) - 1

        await wait_for(relayer_gone, 10, "Redis to drop the killed relayer's reply channel", 0.02)
        assert (await client.post(f"{owner.url}/broadcast/8")).status_code == 200
        nxt = await client.get(f"{other.url}/hub?id={token}")
        assert nxt.status_code == 200
        assert '"target":"Broadcast","arguments":[8]' in nxt.text.replace(" ", ""), nxt.text
    r.close()


def _lease_of(r: redis.Redis, prefix: str, known: set[str]) -> str | None:
    """The server name of the one lease under ``prefix`` not in ``known`` (None: not there yet)."""
    found = {k.decode().rsplit(":", 1)[1] for k in r.scan_iter(f"{prefix}hubwire:internal:lease:*")} - known
    assert len(found) <= 1, found
    return found.pop() if found else None


async def test_lease_keys_set_refreshed_expired_after_kill_deleted_on_clean_stop(
    start_server: Any, private_redis: RedisServer
) -> None:
    prefix = "lease-keys:"
    args = ["--redis", private_redis.url, "--channel-prefix", prefix]
    r = redis.Redis.from_url(private_redis.url)
    listing = f"{prefix}hubwire:internal:instances"
    killed = start_server(APP, args=args)
    name = None

    async def leased() -> bool:
        nonlocal name
        name = _lease_of(r, prefix, set())
        return name is not None

    await wait_for(leased, 10, "the instance's lease")
    assert name is not None
    key = f"{prefix}hubwire:internal:lease:{name}"
    record = json.loads(r.hget(listing, name) or b"{}")
    assert abs(record["started"] - time.time()) < 30 and "stopped" not in record
    first = r.pttl(key)
    first_at = time.monotonic()
    assert 0 < first <= 3000, first

    async def refreshed() -> bool:
        # without a refresh the TTL would be ``first`` less the time since: more than that (with
        # a margin for the clocks) is a refresh. (Comparing with ``first`` alone fails when it was
        # read just after a refresh: a later read then has to come even sooner after one.)
        left_without = first - (time.monotonic() - first_at) * 1000
        return bool(r.pttl(key) > left_without + 200)

    await wait_for(refreshed, 3, "the lease refreshed", 0.05)

    killed.kill(signal.SIGKILL)
    died = time.monotonic()

    async def expired() -> bool:
        return not r.exists(key)

    await wait_for(expired, 5, "the killed instance's lease to expire", 0.05)
    assert time.monotonic() - died <= 3.5
    assert "stopped" not in json.loads(r.hget(listing, name) or b"{}")  # listed: dead

    stopped = start_server(APP, args=args)
    other = None

    async def leased_again() -> bool:
        nonlocal other
        other = _lease_of(r, prefix, {name})
        return other is not None

    await wait_for(leased_again, 10, "the second instance's lease")
    assert other is not None
    stopped.kill(signal.SIGTERM)  # waits for the exit
    assert stopped.proc.returncode == -signal.SIGTERM
    assert not r.exists(f"{prefix}hubwire:internal:lease:{other}")  # deleted at once, not expired
    assert "stopped" in json.loads(r.hget(listing, other) or b"{}")
    assert set(r.hkeys(listing)) == {name.encode(), other.encode()}
    r.close()


class SpyBus:
    """A real bus whose commands wait ``delay`` seconds first (a slow Redis); counts what ran."""

    def __init__(self, bus: RedisBus, delay: float = 0.0) -> None:
        self.bus = bus
        self.delay = delay
        self.calls: list[tuple[object, ...]] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def command(self, *args: object) -> object:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.calls.append(args)
            await asyncio.sleep(self.delay)
            return await self.bus.command(*args)
        finally:
            self.in_flight -= 1

    def count(self, name: str) -> int:
        return sum(1 for call in self.calls if call[0] == name)


@contextlib.asynccontextmanager
async def spy_bus(url: str, delay: float = 0.0) -> AsyncIterator[SpyBus]:
    bus = RedisBus(url, name="lease-test", max_backoff=0.2)
    await bus.start()
    try:
        yield SpyBus(bus, delay)
    finally:
        await bus.close()


async def _until(check: Any, timeout: float, what: str) -> None:
    async def condition() -> bool:
        return bool(check())

    await wait_for(condition, timeout, what, 0.01)


async def test_lease_refreshes_one_at_a_time_survive_redis_errors_and_delete_on_stop(
    private_redis: RedisServer,
) -> None:
    r = redis.Redis.from_url(private_redis.url)
    async with spy_bus(private_redis.url, delay=0.1) as bus:  # slower than the refresh interval
        lease = InstanceLease(bus, "p:", "me", interval=0.02, ttl=0.1)  # type: ignore[arg-type]
        lease.start()
        await _until(lambda: bus.count("SET") >= 4, 5, "refreshes of a slow Redis")
        assert bus.most_in_flight == 1  # never piled up
        assert bus.calls[0] == (
            "SET",
            "p:hubwire:internal:lease:me",
            json.dumps({"started": lease.started}),
            "PX",
            100,
        )
        assert bus.calls[1][:3] == ("HSET", "p:hubwire:internal:instances", "me")
        assert r.hexists("p:hubwire:internal:instances", "me")
        bus.delay = 0.0
        private_redis.kill()
        failures = lease.failures
        await _until(lambda: lease.failures >= failures + 3, 10, "failed refreshes")
        assert lease._task is not None and not lease._task.done()  # still refreshing
        private_redis.start()  # empty: no persistence
        lease.reregister()  # as after a reconnect
        r = redis.Redis.from_url(private_redis.url)
        await _until(lambda: r.hexists("p:hubwire:internal:instances", "me"), 10, "the instance listed again")
        await _until(lambda: r.exists("p:hubwire:internal:lease:me"), 10, "the lease again")
        await lease.stop()
        assert ("DEL", "p:hubwire:internal:lease:me") in bus.calls
        assert not r.exists("p:hubwire:internal:lease:me")  # deleted, not left to expire
        assert json.loads(r.hget("p:hubwire:internal:instances", "me") or b"{}")["stopped"] > 0
        calls = len(bus.calls)
        await asyncio.sleep(0.1)  # stopped: no more refreshes
        assert len(bus.calls) == calls
        with pytest.raises(ValueError):
            InstanceLease(bus, "p:", "me", interval=1.0, ttl=1.0)  # type: ignore[arg-type]
    r.close()


async def test_lease_watch_shares_checks_and_calls_only_listed_instances_dead(
    private_redis: RedisServer,
) -> None:
    r = redis.Redis.from_url(private_redis.url)
    async with spy_bus(private_redis.url, delay=0.05) as bus:
        watch = LeaseWatch(bus, "p:", interval=0.2)  # type: ignore[arg-type]
        r.set("p:hubwire:internal:lease:alive", "{}", px=2500)
        assert await asyncio.gather(*(watch.dead("alive") for _ in range(10))) == [False] * 10
        assert bus.count("PTTL") == 1  # one round trip for ten concurrent waits
        assert not await watch.dead("unlisted")  # no lease, never listed (an older version): not dead
        r.hset("p:hubwire:internal:instances", "gone", "{}")
        assert await watch.dead("gone") and watch.known_dead("gone")
        # a watched owner found dead once its lease is gone
        r.set("p:hubwire:internal:lease:dying", "{}", px=300)
        r.hset("p:hubwire:internal:instances", "dying", "{}")
        started = time.monotonic()
        futures = [watch.watch("dying") for _ in range(3)]
        r.delete("p:hubwire:internal:lease:dying")
        await asyncio.wait_for(asyncio.gather(*futures), 2)
        assert time.monotonic() - started < 1.0
        private_redis.kill()  # Redis cannot tell: not dead
        assert not await watch.dead("someone")
        await watch.close()
    r.close()


async def test_lease_survives_a_redis_outage_and_is_back_after_it(private_redis: RedisServer) -> None:
    backplane = RedisBackplane(private_redis.url, "lease-outage:", lease_interval=0.1, lease_ttl=0.5)
    r = redis.Redis.from_url(private_redis.url)
    key = f"lease-outage:hubwire:internal:lease:{backplane.server_name}"
    listing = "lease-outage:hubwire:internal:instances"
    await backplane.start()
    try:
        await _until(lambda: r.exists(key) and r.hexists(listing, backplane.server_name), 5, "the lease")
        private_redis.kill()  # Redis restarts empty (no persistence)
        failures = backplane.lease.failures
        await _until(lambda: backplane.lease.failures >= failures + 3, 10, "refreshes failing")
        private_redis.start()
        r = redis.Redis.from_url(private_redis.url)
        await _until(
            lambda: r.exists(key) and r.hexists(listing, backplane.server_name), 10, "the lease back"
        )
        assert backplane.health()["lease_failures"] >= 3
    finally:
        await backplane.close()
    assert not r.exists(key)
    r.close()


async def test_relay_close_unsubscribes_its_channels(private_redis: RedisServer) -> None:
    """Shutdown: the relay's reply channel and every connection's relay channel are unsubscribed."""
    backplane = RedisBackplane(private_redis.url, "relay-close:")
    relay = backplane.relay
    relay.set_keys((b"k" * 32,))

    async def handler(payload: bytes, call: Any) -> tuple[int, bytes, list[tuple[str, str]]]:
        return 200, b"", []

    await backplane.start()
    try:
        await relay.serve("c1", handler)
        transport = f"{relay.prefix}c1"
        assert backplane.bus.is_subscribed(relay.reply_channel) and backplane.bus.is_subscribed(transport)
        await relay.close()
        assert not backplane.bus.is_subscribed(relay.reply_channel)
        assert not backplane.bus.is_subscribed(transport)
    finally:
        await backplane.close()


async def test_a_request_from_an_earlier_version_gets_no_accepted_and_commits_nothing(
    private_redis: RedisServer,
) -> None:
    """Rolling upgrade: a relayed request without the version marker is answered as before (its
    sender would neither understand "accepted" nor confirm a poll's data)."""
    backplane = RedisBackplane(private_redis.url, "relay-compat:")
    relay = backplane.relay
    relay.set_keys((b"k" * 32,))
    delivered: list[bool] = []

    async def handler(payload: bytes, call: Any) -> tuple[int, bytes, list[tuple[str, str]]]:
        delivered.append(await call.deliver((200, b"data", [])))
        return 200, b"data", []

    reply_channel = "relay-compat:hubwire:internal:reply:an-older-instance"
    client = aioredis.Redis.from_url(private_redis.url)
    pubsub = client.pubsub()
    await backplane.start()
    try:
        await relay.serve("c1", handler)
        await pubsub.subscribe(reply_channel)
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        channel = relay.prefix + "c1"
        earlier = relay._seal(channel, ["r1", reply_channel, time.time(), b"payload"])  # no version
        assert await client.publish(channel, earlier) == 1
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
        assert message is not None
        assert relay._open(reply_channel.encode(), message["data"]) == ["r1", 200, b"data", [], None]
        assert delivered == [True]
        assert await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2) is None
    finally:
        await pubsub.aclose()
        await client.aclose()
        await backplane.close()
