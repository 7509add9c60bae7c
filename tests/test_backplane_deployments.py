"""The backplane on every kind of Redis deployment, each one real (tests/redisdeploy.py).

For each URL form the README documents (TLS with client certificates, a unix socket, a
least-privilege ACL user, Sentinel, Redis Cluster) hubwire instances of the scale-out app run on
the deployment, and clients on different instances check every target kind once: all (from an
HTTP handler), a group joined through another instance (remote group add), a user with
connections on two instances, one remote connection, and a client result asked across instances.
Sentinel and Cluster are then failed over (SIGKILL of the master): the instances follow by
themselves, and messages sent during the failover arrive after it, once each, in order. On a
cluster the channels are sharded (SSUBSCRIBE on the shard owning each one; no classic
subscriptions), and a slot moved to another master takes its subscriptions with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import AsyncIterator, Collection, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from hubwire.backplane.deployment import parse_deployment, redact

from .conftest import PYTHON, ROOT, free_port
from .redisdeploy import (
    AclUser,
    RedisClusterDeployment,
    SentinelDeployment,
    StandaloneRedis,
    TlsRedis,
    UnixRedis,
)
from .test_scaleout import Cluster, new_prefix

RS = "\x1e"
README = (ROOT / "README.md").read_text()
#: the commands of the README's least-privilege line (the Redis Cluster one: it has them all)
README_ACL = next(line for line in README.splitlines() if line.startswith("ACL SETUSER hw on >secret"))
README_COMMANDS = tuple(word[1:] for word in README_ACL.split() if word.startswith("+"))


# -- URL forms, without a server -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "nodes"),
    [
        ("redis://127.0.0.1:7000/2", "standalone", {"127.0.0.1:7000"}),
        ("redis://:pw@example.com", "standalone", {"example.com:6379"}),
        ("rediss://user:pw@10.0.0.1:6380/0?ssl_cert_reqs=none", "standalone", {"10.0.0.1:6380"}),
        ("unix:///run/redis/redis.sock?db=3", "standalone", {"/run/redis/redis.sock"}),
        ("redis+sentinel://s1:26379,s2:26380/0/cache", "sentinel", set()),
        ("redis+cluster://user:pw@n1:7000,n2:7001", "cluster", set()),
    ],
)
def test_url_forms(url: str, kind: str, nodes: set[str]) -> None:
    deployment = parse_deployment(url)
    assert deployment.kind == kind
    assert deployment.nodes() == nodes  # Sentinel and Cluster learn theirs from the deployment
    assert "pw" not in deployment.url


def test_url_details() -> None:
    unix = parse_deployment("unix:///tmp/r.sock?db=3").settings
    assert (unix.path, unix.db) == ("/tmp/r.sock", 3)
    tls = parse_deployment("rediss://u:p@h:1/4?ssl_cert_reqs=none").settings
    assert (tls.username, tls.password, tls.db, tls.tls is not None) == ("u", "p", 4, True)
    sentinel = parse_deployment("redis+sentinel://u:p@a:1,b:2/5/svc")
    assert sentinel.service == "svc" and sentinel.settings.db == 5
    assert parse_deployment("redis+sentinel://a:1").service == "mymaster"
    assert parse_deployment("redis+cluster://a:1").sharded


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://u:secret@h:1", "unsupported Redis URL scheme"),
        ("redis://u:secret@h:1/0?ssl_ca_certs=/x", "need the rediss:// scheme"),
        ("redis://u:secret@h:1/0?colour=blue", "unsupported option"),
        ("unix://u:secret@", "names no socket path"),
        ("redis+sentinel://u:secret@h:notaport", "invalid host:port"),
        ("redis+sentinel://u:secret@h:1/x", "must be a number"),
        ("redis+cluster://u:secret@h:1/3", "only database 0"),
        ("redis+cluster://u:secret@h:1?ssl_ca_certs=/x", "need the rediss\\+ scheme"),
        (f"redis://u:secret@{'x' * 70}.example:1/0", "invalid host"),
        (f"redis+cluster://u:secret@{'x' * 70}.example:1", "invalid host"),
    ],
)
def test_bad_urls_say_what_and_never_the_password(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as info:
        parse_deployment(url)
    assert "secret" not in str(info.value)
    assert redact(url).split("//")[0] in str(info.value) or "scheme" in str(info.value)


def test_redact() -> None:
    assert redact("redis://user:pa%40ss@h:1/0") == "redis://user:***@h:1/0"
    assert redact("redis://:pw@h") == "redis://:***@h"
    assert redact("redis+cluster://u:pw@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    assert redact("redis://h:1") == "redis://h:1"
    assert redact("redis://h:1/0?password=pw&db=1") == "redis://h:1/0?password=***&db=1"
    assert (
        redact("redis+sentinel://h:1/0/m?sentinel_password=pw")
        == "redis+sentinel://h:1/0/m?sentinel_password=***"
    )
    assert "pw" not in repr(parse_deployment("redis://u:pw@h:1/0").settings)


def test_a_bad_url_stops_the_server_at_startup_with_the_url_redacted() -> None:
    url = "redis+cluster://hw:topsecret@127.0.0.1:1/7"
    port = free_port()
    done = subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "run", "tests.apps.scaleout:app", "--port", str(port), "--redis", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "redis+cluster://hw:***@127.0.0.1:1/7" in output and "only database 0" in output, output
    assert "topsecret" not in output and "Traceback" not in output, output


async def test_an_unreachable_redis_is_an_error_naming_the_url_without_its_password() -> None:
    url = f"redis://hw:topsecret@127.0.0.1:{free_port()}/0"
    with instances(url, 1) as group:
        health = group.health()[0]
        assert health["state"] == "degraded" and not health["publisher_connected"], health
        logs = group.logs()
        assert f"Redis at {redact(url)} is not reachable yet" in logs, logs
        assert "topsecret" not in logs and "topsecret" not in json.dumps(health)


# -- clients ---------------------------------------------------------------------------------------


class Client:
    """A hub connection (JSON over WebSocket) that answers client-result calls with its name."""

    def __init__(self, ws: ClientConnection, name: str) -> None:
        self.ws = ws
        self.name = name
        self.messages: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.replies: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.ids = 0
        self.connection_id = ""
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for data in self.ws:
            text = data.decode() if isinstance(data, bytes) else data
            for part in filter(None, text.split(RS)):
                await self._on(json.loads(part))

    async def _on(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == 1 and message.get("target") == "Result" and message.get("invocationId"):
            answer = {"type": 3, "invocationId": message["invocationId"], "result": f"from {self.name}"}
            await self.ws.send(json.dumps(answer) + RS)
        elif kind == 1 and message.get("target") == "Message":
            self.messages.put_nowait(message["arguments"])
        elif kind == 3:
            future = self.replies.get(message.get("invocationId", ""))
            if future is not None and not future.done():
                future.set_result(message)

    async def invoke(self, target: str, *args: Any, timeout: float = 15.0) -> Any:
        self.ids += 1
        invocation_id = str(self.ids)
        future = self.replies[invocation_id] = asyncio.get_running_loop().create_future()
        frame = {"type": 1, "invocationId": invocation_id, "target": target, "arguments": list(args)}
        await self.ws.send(json.dumps(frame) + RS)
        reply = await asyncio.wait_for(future, timeout)
        assert "error" not in reply, reply
        return reply.get("result")

    async def until_end(self, end: str, timeout: float) -> list[list[Any]]:
        """Every Message received up to (and without) the one whose value is ``end``."""
        got: list[list[Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(self.messages.get(), max(0.01, remaining))
            except TimeoutError:
                raise AssertionError(f"{self.name}: no {end!r} within {timeout}s; got {got}") from None
            if message[1] == end:
                return got
            got.append(message)

    async def until_ends(self, end: str, kinds: Collection[str], timeout: float) -> list[list[Any]]:
        """Every Message received until ``end`` came through each of ``kinds`` (the ends left out).

        Why one end per kind: hubwire keeps order per channel and sender, not between channels. On a
        Redis Cluster the channels are on different shards, and for a while after a failover the new
        master's link holds what is published to it (README, Redis Cluster): an end sent through
        another channel may arrive before a message held there.
        """
        got: list[list[Any]] = []
        missing = set(kinds)
        deadline = time.monotonic() + timeout
        while missing:
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(self.messages.get(), max(0.01, remaining))
            except TimeoutError:
                ends = sorted(missing)
                raise AssertionError(f"{self.name}: no {end!r} as {ends} in {timeout}s; got {got}") from None
            if message[1] == end and message[0] in missing:
                missing.discard(message[0])
            else:
                got.append(message)
        return got


@contextlib.asynccontextmanager
async def connect(base: str, name: str, user: str) -> AsyncIterator[Client]:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(f"{base}/hub/negotiate?negotiateVersion=1&user={user}")
        response.raise_for_status()
        token = response.json()["connectionToken"]
    url = base.replace("http://", "ws://", 1) + f"/hub?id={token}&user={user}"
    async with ws_connect(url, open_timeout=10, close_timeout=2) as ws:
        await ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
        handshake = await asyncio.wait_for(ws.recv(), 10)
        assert handshake == "{}" + RS, handshake
        client = Client(ws, name)
        try:
            client.connection_id = (await client.invoke("Whoami"))["connectionId"]
            yield client
        finally:
            client.reader.cancel()
            await asyncio.gather(client.reader, return_exceptions=True)


async def publish(base: str, value: str) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        (await http.post(f"{base}/publish/{value}")).raise_for_status()


async def every_target_once(group: Cluster, label: str, timeout: float = 15.0) -> None:
    """Clients on different instances; every target kind delivered to exactly whom it names, once."""
    urls = group.urls
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(connect(urls[0], "a", "alice"))
        b = await stack.enter_async_context(connect(urls[1 % len(urls)], "b", "bob"))
        c = await stack.enter_async_context(connect(urls[2 % len(urls)], "c", "alice"))
        await publish(urls[0], f"{label}-all")
        assert await a.invoke("AddToGroup", b.connection_id, f"{label}-g") == "ok"  # b is elsewhere
        await a.invoke("SendGroup", f"{label}-g", f"{label}-group")
        await b.invoke("SendUser", "alice", f"{label}-user")
        await c.invoke("SendClient", b.connection_id, f"{label}-client")
        assert await a.invoke("AskClient", b.connection_id) == "from b"
        assert await b.invoke("AskClient", c.connection_id) == "from c"
        # an end through each channel, from that channel's sender: order is kept per channel and
        # sender only (on a cluster a held shard's messages come after the others': until_ends)
        end = f"{label}-end"
        await publish(urls[0], end)
        await a.invoke("SendGroup", f"{label}-g", end)
        await b.invoke("SendUser", "alice", end)
        await c.invoke("SendClient", b.connection_id, end)
        ends = {"a": ("http", "user"), "b": ("http", "group", "client"), "c": ("http", "user")}
        # once each; in any order (different senders, different shards: no order between them)
        got = {
            client.name: sorted(await client.until_ends(end, ends[client.name], timeout))
            for client in (a, b, c)
        }
    expected = {
        "a": sorted([["http", f"{label}-all"], ["user", f"{label}-user"]]),
        "b": sorted([["http", f"{label}-all"], ["group", f"{label}-group"], ["client", f"{label}-client"]]),
        "c": sorted([["http", f"{label}-all"], ["user", f"{label}-user"]]),
    }
    assert got == expected, group.logs()


@contextlib.contextmanager
def instances(url: str, n: int, prefix: str | None = None) -> Iterator[Cluster]:
    group = Cluster(url, prefix or new_prefix("dep"), n)
    try:
        yield group
    finally:
        group.close()


def _problems(group: Cluster) -> list[str]:
    """Warnings and errors the instances logged about Redis (a quiet degrade logs none)."""
    lines = group.logs().splitlines()
    return [line for line in lines if "backplane" in line.lower() or "redis" in line.lower()]


# -- one Redis -------------------------------------------------------------------------------------


async def test_tls_with_client_certificates() -> None:
    with TlsRedis(tls_auth_clients=True) as server, instances(server.url, 2) as group:
        assert "ssl_ca_certs=" in server.url and "ssl_certfile=" in server.url
        await every_target_once(group, "tls")
        assert all(h["state"] == "connected" for h in group.health())
        assert not _problems(group), group.logs()


async def test_tls_refused_without_the_ca_is_an_error_naming_the_url() -> None:
    with TlsRedis(tls_auth_clients=False) as server:
        url = server.url.split("?")[0] + "?ssl_cert_reqs=required"  # no CA: the server cert fails
        with instances(url, 1) as group:
            health = group.health()[0]
            assert health["state"] == "degraded" and not health["publisher_connected"]
            logs = group.logs()
            assert "CERTIFICATE_VERIFY_FAILED" in logs and url.split("?")[0] in logs, logs


async def test_unix_socket() -> None:
    with UnixRedis() as server, instances(server.url, 2) as group:
        assert server.url.startswith("unix://")
        await every_target_once(group, "unix")
        nodes = group.health()[0]["nodes"]
        assert nodes == [str(server.socket)], nodes


async def test_least_privilege_acl_user_degrades_quietly() -> None:
    """The README's ACL line (no CLIENT SETNAME): everything works, nothing is logged about it."""
    prefix = new_prefix("acl")
    acl = AclUser(prefix=prefix, commands=README_COMMANDS)
    with StandaloneRedis(acl=acl) as server, instances(server.url, 2, prefix) as group:
        assert server.url.startswith("redis://hw:")
        await every_target_once(group, "acl")
        assert not _problems(group), group.logs()
        clients = [
            dict(field.split("=", 1) for field in line.split())
            for line in server.call(server.port, "CLIENT", "LIST").splitlines()
        ]
        ours = [c for c in clients if c["user"] == "hw"]
        assert ours and all(c["name"] == "" for c in ours), ours  # SETNAME was refused, quietly
        log = server.call(server.port, "ACL", "LOG")
        denied = {dict(zip(entry[::2], entry[1::2], strict=True))["object"] for entry in log}
        assert denied <= {"client|setname", "client|setinfo"}, denied


# -- Sentinel --------------------------------------------------------------------------------------


async def test_sentinel_follows_a_failover_by_itself() -> None:
    with SentinelDeployment() as sentinel, instances(sentinel.url, 3) as group:
        await every_target_once(group, "before")
        old = sentinel.master_port()
        assert group.health()[0]["nodes"] == [f"127.0.0.1:{old}"]
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(connect(url, f"s{i}", f"u{i}"))
                for i, url in enumerate(group.urls)
            ]
            sentinel.kill_master()
            for i in range(10):  # during the failover: buffered, sent after it
                await publish(group.urls[0], f"during-{i}")
            took = await asyncio.to_thread(sentinel.wait_promoted, old, 30.0)
            await publish(group.urls[0], "after")  # one sender: its order is kept
            for client in clients:
                try:
                    got = await client.until_end("after", 20.0)
                except AssertionError as exc:
                    raise AssertionError(f"{exc}\n{group.logs()}\n{group.health()}") from None
                values = [m[1] for m in got]
                assert values == [f"during-{i}" for i in range(10)], (client.name, values, group.health())
        new = sentinel.master_port()
        assert new != old
        await _wait_nodes(group, [f"127.0.0.1:{new}"], 15.0)
        await every_target_once(group, "after")
        print(f"sentinel promotion took {took:.2f}s")


async def _wait_nodes(group: Cluster, nodes: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = await asyncio.to_thread(group.health)
        if all(h["nodes"] == nodes and h["state"] == "connected" for h in health):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"instances not on {nodes} after {timeout}s: {health}")
        await asyncio.sleep(0.2)


# -- Redis Cluster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterDeployment]:
    with RedisClusterDeployment(acl=AclUser(prefix="", commands=README_COMMANDS)) as cluster:
        yield cluster


def _shard_channels(cluster: RedisClusterDeployment, prefix: str) -> dict[int, set[str]]:
    """Per master port: the sharded channels of ``prefix`` subscribed there."""
    out: dict[int, set[str]] = {}
    for master in cluster.masters():
        channels = cluster.call(master.port, "PUBSUB", "SHARDCHANNELS", f"{prefix}*")
        out[master.port] = set(channels)
    return out


async def test_cluster_every_target_over_sharded_pub_sub(redis_cluster: RedisClusterDeployment) -> None:
    prefix = new_prefix("shard")
    with instances(redis_cluster.url, 3, prefix) as group:
        await every_target_once(group, "cluster")
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(connect(group.urls[0], "g", "gina"))
            for i in range(30):  # groups whose channels land on every shard
                await client.invoke("JoinGroup", f"room-{i}")
            placed = _shard_channels(redis_cluster, prefix)
            assert all(placed.values()), placed  # every shard carries some of our channels
            for port, channels in placed.items():
                assert all(redis_cluster.master_for_key(ch) == port for ch in channels)
            classic = [
                c
                for m in redis_cluster.masters()
                for c in redis_cluster.call(m.port, "PUBSUB", "CHANNELS", "*")
            ]
            assert classic == [], classic  # nothing on classic pub/sub, which every node would carry
            for i in range(30):
                await client.invoke("SendGroup", f"room-{i}", f"r{i}")
            for i in range(20):
                await client.invoke("SendGroup", "room-0", f"again-{i}")
            await publish(group.urls[0], "rooms-end")
            values = [m[1] for m in await client.until_end("rooms-end", 15.0)]
            # once each; in order per channel (across shards there is no order between channels)
            assert sorted(values) == sorted([f"r{i}" for i in range(30)] + [f"again-{i}" for i in range(20)])
            assert [v for v in values if v.startswith("again-")] == [f"again-{i}" for i in range(20)]
        assert all(h["deployment"] == "cluster" and len(h["nodes"]) == 3 for h in group.health())


async def test_cluster_slot_move_takes_the_subscriptions_along(redis_cluster: RedisClusterDeployment) -> None:
    prefix = new_prefix("move")
    with instances(redis_cluster.url, 2, prefix) as group:
        async with contextlib.AsyncExitStack() as stack:
            member = await stack.enter_async_context(connect(group.urls[1], "m", "mia"))
            sender = await stack.enter_async_context(connect(group.urls[0], "s", "sam"))
            await member.invoke("JoinGroup", "moving")
            channel = group.channel("group:moving")
            slot = redis_cluster.slot(channel)
            source = redis_cluster.master_for_slot(slot)
            target = next(m.port for m in redis_cluster.masters() if m.port != source)
            await asyncio.to_thread(redis_cluster.migrate_slot, slot, target)
            for i in range(5):
                await sender.invoke("SendGroup", "moving", f"m{i}")
            await sender.invoke("SendGroup", "moving", "moved-end")  # same channel: after them
            values = [m[1] for m in await member.until_end("moved-end", 15.0)]
            assert values == [f"m{i}" for i in range(5)], (values, group.logs())
            assert channel in _shard_channels(redis_cluster, prefix)[target]


async def test_cluster_master_killed_replica_promoted_delivery_continues() -> None:
    with RedisClusterDeployment() as cluster:
        prefix = new_prefix("fail")
        with instances(cluster.url, 3, prefix) as group:
            await every_target_once(group, "before")
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(connect(url, f"f{i}", f"f{i}"))
                    for i, url in enumerate(group.urls)
                ]
                for client in clients:
                    await client.invoke("JoinGroup", "doomed")
                channel = group.channel("group:doomed")
                victim = cluster.master_for_key(channel)
                cluster.kill_master(victim)
                for i in range(10):  # during the failover: these behave as in an outage
                    await clients[0].invoke("SendGroup", "doomed", f"d{i}")
                took = await asyncio.to_thread(cluster.wait_failover, victim, 30.0)
                await clients[0].invoke("SendGroup", "doomed", "doomed-end")
                for client in clients:
                    values = [m[1] for m in await client.until_end("doomed-end", 20.0)]
                    assert values == [f"d{i}" for i in range(10)], (client.name, values, group.logs())
            await every_target_once(group, "after")
            print(f"cluster failover took {took:.2f}s")


# -- many channels ---------------------------------------------------------------------------------


async def test_twenty_thousand_group_channels_restored_after_redis_restarts() -> None:
    """One instance holds 20,000 group channels; redis-server is killed and started again: every
    subscription is restored and a send to the last group is delivered (the time it took is printed)."""
    count = 20_000
    with StandaloneRedis() as server:
        prefix = new_prefix("many")
        group = Cluster(server.url, prefix, 2, env={"SCALEOUT_MAX_GROUPS": str(count + 10)})
        try:
            async with connect(group.urls[0], "m", "many") as member:
                started = time.monotonic()
                assert await member.invoke("JoinGroups", "big-", count, timeout=120) == count
                joined = time.monotonic() - started
                pattern = group.channel("group:big-*")
                assert len(server.call(server.port, "PUBSUB", "CHANNELS", pattern)) == count
                server.kill()
                await asyncio.to_thread(server.restart)
                restarted = time.monotonic()
                deadline = restarted + 60
                while len(server.call(server.port, "PUBSUB", "CHANNELS", pattern)) < count:
                    assert time.monotonic() < deadline, group.health()
                    await asyncio.sleep(0.05)
                restored = time.monotonic() - restarted
                async with httpx.AsyncClient(timeout=10) as http:
                    for value in ("last", "end"):
                        url = f"{group.urls[1]}/group/big-{count - 1}/{value}"
                        (await http.post(url)).raise_for_status()
                assert await member.until_end("end", 15.0) == [["group", "last"]]
            print(f"20,000 groups: joined in {joined:.1f}s; subscribed again {restored:.2f}s after a restart")
        except BaseException:
            print(group.logs())
            raise
        finally:
            group.close()
