"""Cluster inspection (``hubwire inspect``) and cluster-wide presence, on real instances.

Three ``hubwire run`` instances of tests/apps/scaleout.py on the session's redis-server, each with
members (WebSocket JSON and MessagePack, and one Server-Sent Events connection) in one group, and one
user connected to every instance:

* presence asked from hub code on each instance (``self.clients.group(g).connections()`` /
  ``.count()``, ``self.clients.user(u).connections()``) and from an HTTP handler
  (``hub_context(...).presence``) gives the same set everywhere, each connection with its user and
  the instance holding it;
* ``hubwire inspect`` (table and ``--json``) lists the three instances with their addresses and
  connections per transport, a group's / a user's / one connection's entries, and never a token;
* after a SIGKILL of one instance its members are never in an answer, and once its lease expired
  (1.5 s here) the answers are complete again without it, and ``hubwire inspect`` lists two instances;
* forged and malformed messages on the inspection channels change nothing; answers are bounded;
* one instance without Redis answers presence on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import msgspec
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.backplane.bus import RedisBus
from hubwire.backplane.inspect import Entry, Inspector, InstanceInfo, bounded
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.rawhub import RawHub
from tests.test_scaleout import APP, Cluster, new_prefix

GROUP = "room"
SHARED_USER = "shared"
#: short leases: a killed instance is known dead within 1.5 s
LEASES = {"HUBWIRE_LEASE_INTERVAL": "0.5", "HUBWIRE_LEASE_TTL": "1.5"}
HANDSHAKE = b'{"protocol":"json","version":1}\x1e'


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    group = Cluster(redis_server.url, new_prefix("inspect"), 3, env=LEASES)
    yield group
    group.close()


def names(cluster: Cluster) -> list[str]:
    return [httpx.get(f"{url}/instance", timeout=5).text for url in cluster.urls]


@dataclass
class Members:
    """The connections a test opened: [id, user, instance name] of each group member, and more."""

    room: list[list[str]] = field(default_factory=list)
    shared: list[list[str]] = field(default_factory=list)
    hubs: list[RawHub] = field(default_factory=list)
    #: the SSE member's connection token (must never show in an answer)
    token: str = ""


@contextlib.asynccontextmanager
async def members(cluster: Cluster, label: str) -> AsyncIterator[Members]:
    """On each instance: two group members (JSON, MessagePack) and one connection of the shared user;
    on the first one also an SSE member (joined by another connection: a group add through the hub)."""
    found = Members()
    instance_names = names(cluster)
    async with contextlib.AsyncExitStack() as stack, httpx.AsyncClient(timeout=10) as http:
        for url, name in zip(cluster.urls, instance_names, strict=True):
            for protocol in ("json", "messagepack"):
                user = f"{label}-{protocol}-{name[-6:]}"
                hub = await RawHub.open(url, protocol=protocol, query=f"user={user}")
                stack.push_async_callback(hub.close)
                found.hubs.append(hub)
                cid = (await hub.invoke("whoami"))["connectionId"]
                await hub.invoke("join_group", GROUP)
                found.room.append([cid, user, name])
            hub = await RawHub.open(url, query=f"user={SHARED_USER}")
            stack.push_async_callback(hub.close)
            found.shared.append([(await hub.invoke("whoami"))["connectionId"], SHARED_USER, name])
        # a Server-Sent Events member on the first instance, added to the group by a WebSocket client
        sse_user = {"user": f"{label}-sse"}
        negotiated = (
            await http.post(f"{cluster.urls[0]}/hub/negotiate", params={"negotiateVersion": "1", **sse_user})
        ).json()
        found.token = negotiated["connectionToken"]
        sse = http.stream(
            "GET",
            f"{cluster.urls[0]}/hub",
            params={"id": found.token, **sse_user},
            headers={"accept": "text/event-stream"},
        )
        stream = await stack.enter_async_context(sse)
        post = await http.post(
            f"{cluster.urls[0]}/hub", params={"id": found.token, **sse_user}, content=HANDSHAKE
        )
        assert post.status_code == 200
        async with asyncio.timeout(10):  # the handshake answered: the connection is registered
            lines = stream.aiter_lines()
            while not (await anext(lines)).startswith("data:"):
                pass
        assert await found.hubs[0].invoke("add_to_group", negotiated["connectionId"], GROUP) == "ok"
        found.room.append([negotiated["connectionId"], f"{label}-sse", instance_names[0]])
        found.room.sort()
        found.shared.sort()
        yield found


async def test_presence_is_the_same_from_every_instance(cluster: Cluster) -> None:
    async with members(cluster, "same") as m:
        asked_from = [m.hubs[0], m.hubs[2], m.hubs[4]]  # one JSON member on each instance
        for hub in asked_from:
            room = await hub.invoke("presence_group", GROUP)
            assert room == {"connections": m.room, "missing": [], "complete": True}
            shared = await hub.invoke("presence_user", SHARED_USER)
            assert shared["connections"] == m.shared
            assert len({c[2] for c in shared["connections"]}) == 3  # one on each instance
            assert await hub.invoke("presence_count", GROUP) == 7
        # outside hub code: hub_context(...).presence, from every instance's HTTP handler
        async with httpx.AsyncClient(timeout=10) as http:
            for url in cluster.urls:
                answer = (await http.get(f"{url}/presence/group/{GROUP}")).json()
                assert (answer["connections"], answer["count"], answer["missing"]) == (m.room, 7, [])
        # one connection, with its groups, from an instance that does not hold it
        sse_id, _, sse_instance = next(c for c in m.room if c[1].endswith("-sse"))
        one = await m.hubs[4].invoke("presence_connection", sse_id)
        assert one["connection_id"] == sse_id and one["groups"] == [GROUP]
        assert (one["transport"], one["instance"]) == ("ServerSentEvents", sse_instance)
        assert await m.hubs[4].invoke("presence_connection", "no-such-connection") is None
        # a member leaving is gone from the next answer, wherever it is asked
        await m.hubs[1].invoke("leave_group", GROUP)
        left = await m.hubs[5].invoke("presence_group", GROUP)
        assert len(left["connections"]) == 6 and left["missing"] == []
    assert m.token not in json.dumps(room)


def inspect_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "hubwire.cli",
            "inspect",
            "--redis",
            cluster.redis_url,
            "--channel-prefix",
            cluster.prefix,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )


async def test_hubwire_inspect_table_and_json(cluster: Cluster) -> None:
    async with members(cluster, "cli") as m:
        instance_names = names(cluster)
        run = await asyncio.to_thread(inspect_cli, cluster, "--json")
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["missing"] == []
        listed = {i["name"]: i for i in report["instances"]}
        assert sorted(listed) == sorted(instance_names)
        for name, url in zip(instance_names, cluster.urls, strict=True):
            info = listed[name]["info"]
            assert info["address"] == url.removeprefix("http://")
            assert info["backplane"]["state"] == "connected" and info["backplane"]["subscriptions"] > 0
            assert info["version"] and info["pid"] > 0 and info["started"] > time.time() - 600
            counts = {(c["hub"], c["transport"]): c["connections"] for c in info["connections"]}
            expected = {("ScaleHub", "WebSockets"): 3}
            if name == instance_names[0]:
                expected[("ScaleHub", "ServerSentEvents")] = 1
            assert counts == expected
        group = json.loads((await asyncio.to_thread(inspect_cli, cluster, "--group", GROUP, "--json")).stdout)
        got = sorted([c["connection_id"], c["user"], c["instance"]] for c in group["connections"])
        assert (got, group["missing"], group["truncated"]) == (m.room, [], False)
        transports = {c["transport"] for c in group["connections"]}
        assert transports == {"WebSockets", "ServerSentEvents"}
        user = json.loads(
            (await asyncio.to_thread(inspect_cli, cluster, "--user", SHARED_USER, "--json")).stdout
        )
        assert sorted([c["connection_id"], c["user"], c["instance"]] for c in user["connections"]) == m.shared
        cid = m.room[0][0]
        one = await asyncio.to_thread(inspect_cli, cluster, "--connection", cid)  # ids may start with "-"
        assert one.returncode == 0 and cid in one.stdout and f"groups: {GROUP}" in one.stdout
        gone = await asyncio.to_thread(inspect_cli, cluster, "--connection", "nobody")
        assert gone.returncode == 1 and "0 connections" in gone.stdout
        other_hub = json.loads(
            (
                await asyncio.to_thread(inspect_cli, cluster, "--group", GROUP, "--hub", "Other", "--json")
            ).stdout
        )
        assert other_hub["connections"] == []
        # the tables
        table = await asyncio.to_thread(inspect_cli, cluster)
        assert table.returncode == 0, table.stderr
        assert "3 live instances" in table.stdout and "SUBSCRIPTIONS" in table.stdout
        assert all(name in table.stdout for name in instance_names)
        assert "ServerSentEvents" in table.stdout
        rows = await asyncio.to_thread(inspect_cli, cluster, "--group", GROUP)
        assert all(c[0] in rows.stdout for c in m.room) and "7 connections of group 'room'" in rows.stdout
        print(f"\n{table.stdout}\n{rows.stdout}", file=sys.stderr)
        for output in (run.stdout, table.stdout, rows.stdout, json.dumps(group), one.stdout):
            assert m.token not in output  # never a connection token


def test_hubwire_inspect_says_when_redis_is_unreachable() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "hubwire.cli", "inspect", "--redis", "redis://:secret@127.0.0.1:1/0"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        check=False,
    )
    assert run.returncode == 1 and "cannot reach Redis" in run.stderr, run.stderr
    assert "secret" not in run.stderr and "Traceback" not in run.stderr


async def test_killed_instance_is_gone_from_answers_within_the_lease_ttl(redis_server: RedisServer) -> None:
    group = Cluster(redis_server.url, new_prefix("inspect-kill"), 3, env=LEASES)
    try:
        async with members(group, "kill") as m:
            before = names(group)
            victim = before[2]
            survivors = [c for c in m.room if c[2] != victim]
            group.instances[2].kill(signal.SIGKILL)
            killed = time.monotonic()
            asker = m.hubs[0]
            answers = []
            for _ in range(40):  # bounded: each answer waits at most the 2 s timeout
                room = await asker.invoke("presence_group", GROUP)
                answers.append((round(time.monotonic() - killed, 2), room["missing"]))
                assert all(c[2] != victim for c in room["connections"])  # never a dead instance's
                if not room["missing"]:
                    break
            assert room == {"connections": survivors, "missing": [], "complete": True}, answers
            print(f"\nafter the kill (s since, missing): {answers}", file=sys.stderr)
            assert await asker.invoke("presence_count", GROUP) == len(survivors)
            run = await asyncio.to_thread(inspect_cli, group, "--json")
            assert sorted(i["name"] for i in json.loads(run.stdout)["instances"]) == sorted(before[:2])
    finally:
        group.close()


async def test_forged_and_malformed_messages_change_nothing(cluster: Cluster) -> None:
    """Garbage on the query channel, and answers forged for an instance without a lease sprayed on
    every instance's answer channel while presence is asked: the answers stay exact."""
    queries = f"{cluster.prefix}hubwire:internal:inspect"
    ghost = Entry("ScaleHub", "ghost-connection", "ghost", "WebSockets")
    forged = [
        msgspec.msgpack.encode(["a", rid, "ghost-instance", [ghost], 1, False, None]) for rid in range(200)
    ]
    garbage = [b"", b"\xc1", b"\x93\xa1q", msgspec.msgpack.encode(["q", 1, "x", "nope", None, None, 5])]
    garbage.append(b"\x00" * 100_000)  # over the query bound: dropped unread
    stop = asyncio.Event()

    def spray(channels: list[str]) -> None:
        r = redis.Redis.from_url(cluster.redis_url)
        try:
            for _ in range(50):  # bounded
                if stop.is_set():
                    break
                with r.pipeline(transaction=False) as pipe:
                    for data in garbage:
                        pipe.publish(queries, data)
                    for channel in channels:
                        for data in [*forged, b"\x92\xa1a"]:
                            pipe.publish(channel, data)
                    pipe.execute()
        finally:
            r.close()

    async with members(cluster, "forged") as m:
        sprayer = asyncio.ensure_future(asyncio.to_thread(spray, [f"{queries}:{n}" for n in names(cluster)]))
        try:
            for hub in (m.hubs[0], m.hubs[2], m.hubs[4]) * 3:
                room = await hub.invoke("presence_group", GROUP)
                assert room == {"connections": m.room, "missing": [], "complete": True}
        finally:
            stop.set()
            await sprayer
    async with httpx.AsyncClient(timeout=10) as http:
        health = [(await http.get(f"{i.url}/health")).json() for i in cluster.instances]
    # what was dropped is counted on every instance (``hubwire_backplane_inspect_malformed_total``)
    assert all(h["inspect_malformed"] > 0 for h in health), health
    for instance in cluster.instances:
        assert "Traceback" not in instance.output()


# -- in process: bounds and decoding ---------------------------------------------------------------


class _Many:
    """A LocalSource with ``n`` members in one group (what an instance's tables would give)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            name="many",
            address=None,
            host="h",
            pid=1,
            version="0",
            started=0.0,
            backplane=None,
            connections=[],
        )

    def find(self, what: str, hub: str | None, key: str) -> Iterator[Entry]:
        for i in range(self.n):
            yield Entry("Hub", f"connection-{i:06d}", f"user-{i}", "WebSockets", "json")

    def count(self, hub: str | None, group: str) -> int:
        return self.n


async def test_answers_are_bounded_in_bytes(redis_server: RedisServer) -> None:
    """An instance with more members than fit in one answer sends the first ones and says so; the
    requester refuses an answer over its own bound."""
    prefix = new_prefix("bounds")
    bus_a, bus_b = RedisBus(redis_server.url), RedisBus(redis_server.url)
    await bus_a.start()
    await bus_b.start()
    r = redis.Redis.from_url(redis_server.url)
    try:
        # "b" is a live instance; "a" only asks (as hubwire inspect does); "old" stopped, "dead" has no lease
        listing = {"b": '{"started": 2}', "old": '{"started": 1, "stopped": 2}', "dead": '{"started": 1}'}
        r.hset(f"{prefix}hubwire:internal:instances", mapping=listing)
        r.set(f"{prefix}hubwire:internal:lease:b", "{}", px=60_000)
        r.set(f"{prefix}hubwire:internal:lease:old", "{}", px=60_000)
        asker = Inspector(bus_a, prefix, "a", timeout=2.0, answer_bytes=20_000)
        answerer = Inspector(bus_b, prefix, "b", timeout=2.0, answer_bytes=20_000)
        answerer.source = _Many(5000)
        await asker.start()
        await answerer.start()
        gathered = await asker.gather("group", None, "g")
        assert gathered.live == {"b": 2.0} and gathered.missing == []
        answer = gathered.answers["b"]
        assert answer.truncated and 0 < len(answer.entries) < 5000
        assert 19_000 < len(msgspec.msgpack.encode(answer.entries)) <= 20_000
        assert [e.connection_id for e in answer.entries] == [
            f"connection-{i:06d}" for i in range(len(answer.entries))
        ]
        counted = await asker.gather("count", None, "g")
        assert counted.answers["b"].count == 5000 and counted.missing == []
        # an answer over the asker's bound (one that did not honour the query's limit) is dropped, and
        # so are answers of instances without a lease ("dead": listed, its lease gone; "ghost": unlisted)
        small = Inspector(bus_a, prefix, "c", timeout=1.0, answer_bytes=1000)
        await small.start()
        answerer.source = None
        asking = asyncio.ensure_future(small.gather("group", None, "g"))
        huge = [Entry("Hub", f"x{i}", None, "WebSockets") for i in range(5000)]
        one = [Entry("Hub", "forged", None, "WebSockets")]
        for _ in range(20):  # while the query is out (bounded)
            await asyncio.sleep(0.02)
            r.publish(small.own_channel, msgspec.msgpack.encode(["a", 1, "b", huge, 5000, False, None]))
            for origin in ("dead", "ghost"):
                r.publish(small.own_channel, msgspec.msgpack.encode(["a", 1, origin, one, 1, False, None]))
        late = await asking
        assert late.missing == ["b"] and late.answers == {} and small.malformed >= 1
        await small.close()
        await asker.close()
        await answerer.close()
    finally:
        r.delete(f"{prefix}hubwire:internal:instances")
        r.close()
        await bus_a.close()
        await bus_b.close()


def test_bounded_keeps_order_and_stops_at_the_limit() -> None:
    entries = [Entry("H", f"c{i}", None, "LongPolling", groups=["g"] * (i % 7)) for i in range(1000)]
    for limit in (0, 7, 100, 1000, 12_345):
        kept, cut = bounded(iter(entries), limit)
        size = len(msgspec.msgpack.encode(kept))
        assert kept == entries[: len(kept)] and cut and size <= max(limit, 1)  # [] takes 1 byte
        assert len(msgspec.msgpack.encode(entries[: len(kept) + 1])) > limit * 0.9  # not cut much short
    assert bounded(iter(entries), 10**9) == (entries, False)
    assert bounded([], 0) == ([], False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_on_the_inspection_channels_are_handled(data: bytes) -> None:
    async def run() -> None:
        inspector = Inspector(RedisBus("redis://127.0.0.1:1/0"), "p:", "me")
        inspector.source = _Many(3)
        inspector._on_query(b"p:hubwire:internal:inspect", data)
        inspector._on_answer(b"p:hubwire:internal:inspect:me", data)

    asyncio.run(run())


async def test_presence_in_memory_is_one_instance() -> None:
    """No Redis: the instance is the whole cluster; presence answers from its own tables."""
    server = ServerProcess(APP)
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            name = (await http.get(f"{server.url}/instance")).text
        a = await RawHub.open(server.url, query="user=alice")
        b = await RawHub.open(server.url, protocol="messagepack", query="user=bob")
        ids = [(await h.invoke("whoami"))["connectionId"] for h in (a, b)]
        for hub in (a, b):
            await hub.invoke("join_group", GROUP)
        room = await a.invoke("presence_group", GROUP)
        assert room == {
            "connections": sorted([[ids[0], "alice", name], [ids[1], "bob", name]]),
            "missing": [],
            "complete": True,
        }
        assert await b.invoke("presence_count", GROUP) == 2
        assert (await b.invoke("presence_user", "alice"))["connections"] == [[ids[0], "alice", name]]
        await asyncio.gather(a.close(), b.close())
    finally:
        server.close()
