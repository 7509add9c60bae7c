"""Stateful reconnect across instances: a resume lands on another instance and takes the connection over.

Three real instances of ``tests.apps.stateful:app`` share a private ``redis-server`` and a channel
prefix. The official JS client (``withStatefulReconnect()`` + ``withAutomaticReconnect()``) goes
through a loopback proxy (``CuttingProxy``) whose target the test moves before each cut, so every
resume reaches another instance than the one holding the connection: the proxy plays a load
balancer without sticky sessions, where the resume lands wherever it lands. A successful resume
never calls ``onreconnecting`` / ``onreconnected`` (checked against the client's code in
``test_stateful_reconnect.py``). Raw clients check the wire and the user check across instances.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgspec
import pytest
import redis
from websockets.exceptions import InvalidStatus

from tests.conftest import RedisServer, ServerProcess
from tests.requirements import NODE_CLIENT, requires
from tests.stateful_tools import cutting_proxy, node_client
from tests.test_scaleout import new_prefix
from tests.test_stateful_reconnect import (
    _drop,
    _kind,
    _negotiate,
    _open,
    _sequence,
    _sequence_id,
    _suspended,
    _until,
)

APP = "tests.apps.stateful:app"
PUMPED = 100


class Trio:
    """Three instances on one Redis and prefix, and an HTTP client for each."""

    def __init__(self, redis_url: str, env: dict[str, str] | None = None) -> None:
        self.prefix = new_prefix("moves")
        args = ["--redis", redis_url, "--channel-prefix", self.prefix]
        self.servers: list[ServerProcess] = []
        try:
            for _ in range(3):
                self.servers.append(ServerProcess(APP, env=env, args=args))
        except BaseException:
            self.close()
            raise
        self.http = [httpx.AsyncClient(base_url=s.url, timeout=5) for s in self.servers]

    async def stats(self, i: int) -> dict[str, Any]:
        response = await self.http[i].get("/debug/stats")
        response.raise_for_status()
        hub: dict[str, Any] = response.json()["hubs"]["/hub"]
        return hub

    async def total(self, key: str, alive: tuple[int, ...] = (0, 1, 2)) -> int:
        return sum([int((await self.stats(i))[key]) for i in alive])

    async def lifecycle(self, connection_id: str, alive: tuple[int, ...] = (0, 1, 2)) -> dict[str, int]:
        """on_connected / on_disconnected runs for a connection, summed over the instances."""
        total = {"connected": 0, "disconnected": 0}
        for i in alive:
            entry = (await self.http[i].get("/debug/lifecycle")).json().get(connection_id, {})
            for key in total:
                total[key] += int(entry.get(key, 0))
        return total

    async def calls(self, key: str) -> int:
        return sum([int((await h.get("/debug/calls")).json().get(key, 0)) for h in self.http])

    async def pump(self, i: int, connection_id: str, count: int, **extra: Any) -> None:
        body = {"connectionId": connection_id, "group": "g1", "count": count, "intervalMs": 20, **extra}
        assert (await self.http[i].post("/pump", json=body)).status_code == 202

    async def holder(self) -> int:
        """The instance whose hub holds the one connection (connected and not suspended)."""
        for i in range(3):
            stats = await self.stats(i)
            if stats["connected"] == 1:
                return i
        raise AssertionError("no instance holds the connection")

    def logs(self) -> str:
        return "\n".join(f"--- instance {i} ---\n{s.output()[-3000:]}" for i, s in enumerate(self.servers))

    async def aclose(self) -> None:
        for client in self.http:
            await client.aclose()
        self.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


@pytest.fixture
def redis_url(private_redis: RedisServer) -> Iterator[str]:
    yield private_redis.url


@pytest.fixture
async def trio(redis_url: str) -> AsyncIterator[Trio]:
    instances = Trio(redis_url)
    try:
        yield instances
    finally:
        await instances.aclose()


@pytest.fixture
async def durable_trio(redis_url: str) -> AsyncIterator[Trio]:
    instances = Trio(redis_url, env={"HUBWIRE_DURABLE_RESUME": "1"})
    try:
        yield instances
    finally:
        await instances.aclose()


@requires(*NODE_CLIENT)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_js_client_resumes_on_other_instances_with_every_message(trio: Trio, protocol: str) -> None:
    ports = [s.port for s in trio.servers]
    async with (
        cutting_proxy(ports[0]) as proxy,
        node_client(f"{proxy.url}/hub?user=alice&group=g1", protocol) as client,
    ):
        ready = await client.wait_for("ready", 20)
        assert ready["features"]["reconnect"] is True
        cid = ready["connectionId"]
        assert await trio.holder() == 0
        # from now on a round-robin front: each new TCP connection goes to the next instance
        proxy.rotation = [ports[1], ports[2], ports[0]]
        # a third instance sends (direct, to its group, to all) while the connection moves around
        await trio.pump(2, cid, PUMPED)
        holders = [0]
        for round_ in range(5):
            await asyncio.sleep(0.3)
            before = proxy.accepted
            assert proxy.cut(server_side=round_ % 2 == 0) >= 1
            await _until(lambda b=before: proxy.accepted > b and proxy.open_connections > 0, 10, "a resume")
            # settled on another instance: right after the cut the old holder may not have seen
            # its socket close yet, while the new one has not taken the connection over
            await _until(
                lambda previous=holders[-1]: _settled(trio, away_from=previous),
                10,
                f"another instance than {holders[-1]} to hold the connection",
            )
            holders.append(await trio.holder())

        async def all_arrived() -> bool:
            return len((await client.report())["nums"]) >= PUMPED

        await _until(all_arrived, 20, f"the {PUMPED} messages")
        report = await client.report()
        assert [n for n, _ in report["nums"]] == list(range(PUMPED)), trio.logs()  # all, in order, once
        assert report["connectionId"] == cid and report["state"] == "Connected"
        assert client.lifecycle_events() == []  # resumed every time: no automatic reconnect
        assert holders == [0, 1, 2, 0, 1, 2], holders  # every resume landed on another instance
        assert await trio.total("moved_in") == 5
        assert await trio.total("moved_out") == 5
        assert await trio.lifecycle(cid) == {"connected": 1, "disconnected": 0}

        # its group membership moved with it: a send to g1 from another instance reaches it once
        holder = holders[-1]
        sender = (holder + 1) % 3
        await trio.pump(sender, cid, 3, kinds=["group"], first=PUMPED)
        await _until(all_arrived_n(client, PUMPED + 3), 10, "the group sends")
        report = await client.report()
        assert [n for n, _ in report["nums"]] == list(range(PUMPED + 3))

        # a call in flight when the connection moves: it runs once, its result is forwarded
        proxy.rotation = []
        proxy.target = ports[sender]
        call = await client.invoke("CountCall", "inflight", 1500)
        await _until(lambda: trio.calls("inflight"), 10, "the call to start")
        assert proxy.cut() >= 1
        await _until(lambda: _holds(trio, sender), 10, "the move during the call")
        result = await client.wait_for("result", 20, lambda e: e["id"] == call)
        assert result.get("result") == 1, result
        assert await trio.calls("inflight") == 1
        who = await client.invoke("Whoami")
        result = await client.wait_for("result", 10, lambda e: e["id"] == who)
        assert result["result"] == {"connectionId": cid, "user": "alice"}
        assert client.lifecycle_events() == []

        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)

    async def ended() -> bool:
        return (await trio.lifecycle(cid))["disconnected"] == 1

    await _until(ended, 10, "on_disconnected, once, where the connection ended")
    assert await trio.lifecycle(cid) == {"connected": 1, "disconnected": 1}


async def _settled(trio: Trio, away_from: int | None = None) -> bool:
    """Exactly one instance holds the connection, with its WebSocket (none suspended or moving),
    and (``away_from``) it is not that one."""
    stats = [await trio.stats(i) for i in range(3)]
    if sum(s["connected"] for s in stats) != 1 or any(s["suspended"] for s in stats):
        return False
    return away_from is None or stats[away_from]["connected"] == 0


def all_arrived_n(client: Any, n: int) -> Any:
    async def check() -> bool:
        return len((await client.report())["nums"]) >= n

    return check


async def _holds(trio: Trio, i: int) -> bool:
    stats = await trio.stats(i)
    return bool(stats["connected"] == 1 and stats["suspended"] == 0)


@requires(*NODE_CLIENT)
async def test_owner_killed_the_client_starts_afresh(trio: Trio) -> None:
    """The holder is SIGKILLed while a survivor sends to the connection, its group and all.

    Its unacknowledged messages and the sends during the gap died with it (hubwire keeps no
    durable per-connection log yet, see the README), so the resume must not succeed silently:
    the survivor gets no answer to its takeover request within the takeover timeout and refuses
    the resume (404); the client's automatic reconnect then starts a new connection - the app
    hears ``onreconnecting`` / ``onreconnected`` and knows to refetch what it shows.
    """
    ports = [s.port for s in trio.servers]
    async with (
        cutting_proxy(ports[0]) as proxy,
        node_client(f"{proxy.url}/hub?user=alice&group=g1", "json") as client,
    ):
        cid = (await client.wait_for("ready", 20))["connectionId"]
        assert await trio.holder() == 0
        await trio.pump(1, cid, 150)
        await asyncio.sleep(0.5)
        proxy.target = ports[1]
        trio.servers[0].kill(signal.SIGKILL)
        reconnecting = await client.wait_for("reconnecting", 15)
        assert reconnecting["error"], reconnecting
        back = await client.wait_for("reconnected", 20)
        assert back["connectionId"] != cid  # a new connection: the gap is not hidden
        # what arrived came once and in order; the new connection joined g1 again and gets the rest
        await _until(all_arrived_n(client, 1), 10, "messages")
        nums = [n for n, _ in (await client.report())["nums"]]
        assert nums == sorted(set(nums)), nums
        assert nums[-1] < 149 or len(nums) < 150, nums  # something was missed, and the client was told
        assert await trio.total("moved_in", alive=(1, 2)) == 0
        refused = "no instance handed over " + cid
        assert refused in trio.servers[1].output() + trio.servers[2].output(), trio.logs()
        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)


@requires(*NODE_CLIENT)
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_durable_owner_killed_the_client_resumes_on_a_survivor(
    durable_trio: Trio, protocol: str
) -> None:
    """Durable resume: the holder is SIGKILLed while the others send to the connection directly,
    to its group, to all and to its user; the client resumes on a survivor, same connection id,
    no automatic reconnect, and has every message exactly once, in order per sender."""
    trio = durable_trio
    ports = [s.port for s in trio.servers]
    async with (
        cutting_proxy(ports[0]) as proxy,
        node_client(f"{proxy.url}/hub?user=alice&group=g1", protocol) as client,
    ):
        cid = (await client.wait_for("ready", 20))["connectionId"]
        assert await trio.holder() == 0
        kinds = ["direct", "group", "all", "user"]
        await trio.pump(1, cid, 120, kinds=kinds)  # two senders, 240 messages over ~2.4 s
        await trio.pump(2, cid, 120, kinds=kinds, first=1000)
        await asyncio.sleep(0.8)
        proxy.target = ports[1]
        trio.servers[0].kill(signal.SIGKILL)
        expected = list(range(120)) + list(range(1000, 1120))
        try:
            await _until(all_arrived_n(client, len(expected)), 30, "every message after the resume")
        except AssertionError:
            report = await client.report()
            nums = [n for n, _ in report["nums"]]
            missing = sorted(set(expected) - set(nums))
            raise AssertionError(
                f"{len(nums)} arrived, missing {missing}; events {client.events[-5:]}\n{trio.logs()}"
            ) from None
        report = await client.report()
        nums = [n for n, _ in report["nums"]]
        assert sorted(nums) == expected, trio.logs()  # each exactly once
        assert [n for n in nums if n < 1000] == list(range(120))  # in order per sender
        assert [n for n in nums if n >= 1000] == list(range(1000, 1120))
        assert report["connectionId"] == cid and report["state"] == "Connected"
        assert client.lifecycle_events() == [], trio.logs()
        assert "resumed here after its instance died" in trio.servers[1].output(), trio.logs()
        assert await trio.lifecycle(cid, alive=(1, 2)) == {"connected": 0, "disconnected": 0}
        who = await client.invoke("Whoami")
        result = await client.wait_for("result", 10, lambda e: e["id"] == who)
        assert result["result"] == {"connectionId": cid, "user": "alice"}
        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)


@requires(*NODE_CLIENT)
async def test_js_client_without_stateful_reconnect_is_unchanged(trio: Trio) -> None:
    ports = [s.port for s in trio.servers]
    async with (
        cutting_proxy(ports[0]) as proxy,
        node_client(f"{proxy.url}/hub?user=alice", "json", "plain") as client,
    ):
        ready = await client.wait_for("ready", 20)
        assert ready["features"]["reconnect"] is False
        proxy.target = ports[1]
        assert proxy.cut() >= 1
        await client.wait_for("reconnecting", 10)
        back = await client.wait_for("reconnected", 20)
        assert back["connectionId"] != ready["connectionId"]
        assert await trio.total("moved_in") == 0
        await client.command(cmd="stop")
        await client.wait_for("stopped", 10)


# -- raw clients: the wire and the checks ---------------------------------------------------------


async def test_resume_on_another_instance_replays_and_checks_the_user(trio: Trio) -> None:
    a, b = trio.servers[0], trio.servers[1]
    negotiated = await _negotiate(trio.http[0], "user=alice&useStatefulReconnect=true")
    token, cid = negotiated["connectionToken"], negotiated["connectionId"]
    hub = await _open(a, token, "json")
    assert await hub.handshake("json", 2) == {}
    assert await hub.invoke("Echo", "before") == "before"  # server message 1, unacknowledged
    await _drop(hub)
    await _suspended(trio.http[0])

    # another user, or none, cannot take it over from another instance either
    for user, status in (("bob", 403), (None, 401)):
        with pytest.raises(InvalidStatus) as refused:
            await _open(b, token, "json", user=user)
        assert refused.value.response.status_code == status, user
    # a token for the same id that is not the connection's: nobody answers, 404
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidStatus) as refused:
        await _open(b, forged, "json")
    assert refused.value.response.status_code == 404
    assert (await trio.stats(0))["suspended"] == 1  # still held by the first instance

    again = await _open(b, token, "json")
    sequence = await again.next_message()
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 1, sequence
    assert await again.next_message() == {"type": 3, "invocationId": "1", "result": "before"}
    await again.send(_sequence(again, 1))
    await again.send(again.invocation("Echo", ["before"], "1"))  # resent: handled already, dropped
    assert await again.invoke("Whoami") == {"connectionId": cid, "user": "alice"}
    assert (await trio.stats(1))["moved_in"] == 1 and (await trio.stats(0))["moved_out"] == 1
    assert (await trio.stats(0))["connected"] == 0
    assert await trio.lifecycle(cid) == {"connected": 1, "disconnected": 0}

    # and back to the first instance, with a socket the second one still holds (replaced)
    third = await _open(a, token, "json")
    sequence = await third.next_message()
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 1, sequence  # nothing acknowledged yet
    assert (await third.next_message())["result"] == "before"
    assert (await third.next_message())["result"] == {"connectionId": cid, "user": "alice"}
    await again.expect_closed(10)
    await third.send(_sequence(third, 3))
    assert await third.invoke("Echo", "back") == "back"
    await third.close()

    async def ended() -> bool:
        return (await trio.lifecycle(cid))["disconnected"] == 1

    await _until(ended, 10, "the end, once")


# -- durable resume on the wire ---------------------------------------------------------------------


async def _nums_until(hub: Any, count: int) -> list[int]:
    """Read ``count`` Num invocations (their first argument), skipping anything else."""
    nums: list[int] = []
    for _ in range(count * 3 + 10):
        if len(nums) >= count:
            break
        message = await hub.next_message(timeout=10)
        if _kind(message) == 1 and message["target"] == "Num":
            nums.append(int(message["arguments"][0]))
    return nums


async def test_durable_resume_replays_the_journal_then_the_gap(durable_trio: Trio) -> None:
    trio = durable_trio
    negotiated = await _negotiate(trio.http[0], "user=alice&useStatefulReconnect=true")
    token, cid = negotiated["connectionToken"], negotiated["connectionId"]
    hub = await _open(trio.servers[0], token, "json")  # joins group "g"
    assert await hub.handshake("json", 2) == {}
    await trio.pump(1, cid, 6, group="g", kinds=["direct", "group", "all"])
    assert await _nums_until(hub, 6) == list(range(6))  # numbered 1-6, never acknowledged
    trio.servers[0].kill(signal.SIGKILL)
    # the gap: sends to it while no instance holds it
    await trio.pump(2, cid, 6, group="g", kinds=["direct", "group", "all", "user"], first=100)
    await asyncio.sleep(0.5)

    again = await _open(trio.servers[1], token, "json")
    sequence = await again.next_message(timeout=15)
    assert _kind(sequence) == 9 and _sequence_id(sequence) == 1, sequence  # as the client numbered them
    assert await _nums_until(again, 12) == [*range(6), *range(100, 106)]
    await again.send(_sequence(again, 1))
    assert await again.invoke("Whoami") == {"connectionId": cid, "user": "alice"}
    # it is a member of "g" here now: a group send from the third instance reaches it once
    await trio.pump(2, cid, 1, group="g", kinds=["group"], first=200)
    assert await _nums_until(again, 1) == [200]
    await again.close()


@pytest.fixture
async def short_window_trio(redis_url: str) -> AsyncIterator[Trio]:
    instances = Trio(redis_url, env={"HUBWIRE_DURABLE_RESUME": "1", "HUBWIRE_DURABLE_WINDOW": "1.5"})
    try:
        yield instances
    finally:
        await instances.aclose()


async def test_durable_resume_after_a_gap_longer_than_the_window_is_refused(
    short_window_trio: Trio,
) -> None:
    """Past the window the record and the history are gone: the resume is refused (404) so the
    client starts a new connection, never resumes with a silent hole."""
    trio = short_window_trio
    negotiated = await _negotiate(trio.http[0], "user=alice&useStatefulReconnect=true")
    token = negotiated["connectionToken"]
    hub = await _open(trio.servers[0], token, "json")
    assert await hub.handshake("json", 2) == {}
    assert await hub.invoke("Echo", 1) == 1
    trio.servers[0].kill(signal.SIGKILL)
    await asyncio.sleep(3.5)
    with pytest.raises(InvalidStatus) as refused:
        await _open(trio.servers[1], token, "json")
    assert refused.value.response.status_code == 404
    assert "no durable record" in trio.servers[1].output(), trio.logs()


async def test_takeover_messages_from_redis_are_untrusted(trio: Trio, redis_url: str) -> None:
    """Garbage and forged takeover messages on Redis are dropped: no crash, no forged delivery."""
    negotiated = await _negotiate(trio.http[0], "user=alice&useStatefulReconnect=true")
    token, cid = negotiated["connectionToken"], negotiated["connectionId"]
    hub = await _open(trio.servers[0], token, "json")
    assert await hub.handshake("json", 2) == {}
    assert await hub.invoke("Echo", 1) == 1
    await _drop(hub)
    await _suspended(trio.http[0])
    again = await _open(trio.servers[1], token, "json")  # moved to instance 1
    assert _sequence_id(await again.next_message()) == 1
    assert (await again.next_message())["result"] == 1
    await again.send(_sequence(again, 2))  # its message 1 was handled: the next one is 2

    client = redis.Redis.from_url(redis_url)
    try:
        names = [n.decode() for n in client.hkeys(f"{trio.prefix}hubwire:internal:instances")]
        assert len(names) == 3
        requests = f"{trio.prefix}hubwire:internal:takeover"
        frame = b'{"type":1,"target":"Num","arguments":[999,""]}\x1e'
        for name in names:
            own = f"{requests}:{name}"
            client.publish(own, b"\xc1 not msgpack")
            client.publish(own, msgspec.msgpack.encode(["fwd", "someone-else", cid, frame]))
            client.publish(own, msgspec.msgpack.encode(["final", 12345, names[0], b"x"]))
        client.publish(requests, b"\x93\x01\x02")
        # a request with the right id but not the token's digest: never answered
        forged = ["req", 1, "attacker", cid, b"\x00" * 32, "alice", "/hub"]
        client.publish(requests, msgspec.msgpack.encode(forged))
    finally:
        client.close()
    assert await again.invoke("Echo", "still") == "still"  # no Num 999 came before the answer
    health = [(await h.get("/debug/stats")).json()["backplane"] for h in trio.http]
    assert sum(h["takeover_malformed"] for h in health) >= 4, health
    assert (await trio.stats(1))["connected"] == 1
    await again.close()


async def test_a_refused_resume_is_refused_again_without_asking_the_cluster(trio: Trio) -> None:
    """A token replayed after its connection is gone must not make every instance work each time."""
    negotiated = await _negotiate(trio.http[0], "user=alice&useStatefulReconnect=true")
    token = negotiated["connectionToken"]
    hub = await _open(trio.servers[0], token, "json")
    assert await hub.handshake("json", 2) == {}
    trio.servers[0].kill(signal.SIGKILL)

    async def asked() -> int:
        return int((await trio.http[1].get("/debug/stats")).json()["backplane"]["takeover_requests"])

    for attempt in range(3):
        with pytest.raises(InvalidStatus) as refused:
            await _open(trio.servers[1], token, "json")
        assert refused.value.response.status_code == 404
        assert await asked() == 1, attempt  # only the first attempt asked the other instances


async def test_durable_resume_from_a_tampered_record_is_refused(durable_trio: Trio, redis_url: str) -> None:
    """What Redis holds is untrusted: a garbled record, or one naming another token, refuses the
    resume cleanly (404) instead of crashing the upgrade or carrying on someone else's state."""
    trio = durable_trio
    client = redis.Redis.from_url(redis_url)
    try:
        for holder, tamper in ((0, "garbage"), (2, "other-token")):
            negotiated = await _negotiate(trio.http[holder], "user=alice&useStatefulReconnect=true")
            token, cid = negotiated["connectionToken"], negotiated["connectionId"]
            hub = await _open(trio.servers[holder], token, "json")
            assert await hub.handshake("json", 2) == {}
            assert await hub.invoke("Echo", 1) == 1
            key = f"{trio.prefix}hubwire:internal:record:{{{cid}}}"
            await _until(lambda k=key: bool(client.exists(k)), 10, "the durable record")
            trio.servers[holder].kill(signal.SIGKILL)
            if tamper == "garbage":
                client.set(key, b"\xc1\xc1 not a record")
            else:
                record = msgspec.msgpack.decode(client.get(key))
                record["digest"] = b"\x00" * 32
                client.set(key, msgspec.msgpack.encode(record))
            with pytest.raises(InvalidStatus) as refused:
                await _open(trio.servers[1], token, "json")
            assert refused.value.response.status_code == 404, tamper
        assert "Traceback" not in trio.servers[1].output(), trio.logs()
        assert "malformed durable record" in trio.servers[1].output(), trio.logs()
    finally:
        client.close()
