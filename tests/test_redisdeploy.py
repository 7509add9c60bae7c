"""The real Redis deployments of tests/redisdeploy.py work the way the backplane will use them.

Through redis-py (``redis.asyncio``, its ``RedisCluster`` and ``Sentinel``), and with plain
connections to single nodes where the backplane's own data path will talk to one node: sharded
pub/sub on the slot owner and MOVED elsewhere, a slot move, a cluster failover, a Sentinel
promotion, TLS with client certificates (and what fails without them), a unix socket, and the
least-privilege ACL user (NOPERM outside its prefix and for CLIENT SETNAME). The failover times are
printed (``pytest -s``).
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, MovedError, NoPermissionError

from .redisdeploy import (
    AclUser,
    RedisClusterDeployment,
    SentinelDeployment,
    StandaloneRedis,
    TlsRedis,
    UnixRedis,
)
from .requirements import requires

pytestmark = requires("redis-server", "openssl")

ACL = AclUser(prefix="hw:")
NO_RETRY = Retry(NoBackoff(), 0)


async def next_of(pubsub: aioredis.client.PubSub, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next pub/sub message of type ``kind`` (``message``, ``smessage``, ``sunsubscribe``...)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = await pubsub.get_message(timeout=min(left, 0.5))
        if message is not None and message["type"] in (kind, kind.encode()):
            return dict(message)
    raise AssertionError(f"no {kind} message within {timeout} s")


def node_client(port: int, **kwargs: Any) -> aioredis.Redis:
    """A plain connection to one node; no retries (redis-py 8 retries even an AuthenticationError,
    with backoff: ~3 s before a refused login surfaces)."""
    return aioredis.Redis(host="127.0.0.1", port=port, retry=NO_RETRY, **kwargs)


async def sharded_roundtrip(deployment: RedisClusterDeployment, rc: RedisCluster, channel: str) -> None:
    """SSUBSCRIBE on the slot owner, SPUBLISH through RedisCluster: one receiver, message arrives."""
    owner = deployment.master_for_key(channel)
    async with node_client(owner, **deployment.client_kwargs()) as sub, sub.pubsub() as pubsub:
        await pubsub.ssubscribe(channel)
        await next_of(pubsub, "ssubscribe")
        assert await rc.spublish(channel, b"hello") == 1
        message = await next_of(pubsub, "smessage")
        assert (message["channel"], message["data"]) == (channel.encode(), b"hello")


def cluster_client(deployment: RedisClusterDeployment) -> RedisCluster:
    nodes = [ClusterNode(host, port) for host, port in deployment.startup_nodes[:2]]
    return RedisCluster(startup_nodes=nodes, **deployment.client_kwargs())


# ---- Cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterDeployment]:
    """One ACL-protected 3x2 cluster for the module (the failover test, last, kills a master)."""
    started = time.monotonic()
    with RedisClusterDeployment(acl=ACL) as deployment:
        print(f"\ncluster of 6 up in {time.monotonic() - started:.2f} s: {deployment.url}")
        yield deployment


async def test_cluster_sharded_pubsub_and_acl(cluster: RedisClusterDeployment) -> None:
    masters = cluster.masters()
    assert len(masters) == 3 and all(len(m.replicas) == 1 for m in masters)
    assert sum(hi - lo + 1 for m in masters for lo, hi in m.slots) == 16384
    assert cluster.url.startswith("redis+cluster://hw:hw-secret@127.0.0.1:")
    rc = cluster_client(cluster)
    try:
        await sharded_roundtrip(cluster, rc, "hw:chan-a")
        await sharded_roundtrip(cluster, rc, "hw:chan-b{other-slot}")
        await rc.set("hw:key", b"v")
        assert await rc.get("hw:key") == b"v"
        with pytest.raises(NoPermissionError):
            await rc.set("other:key", b"v")
        with pytest.raises(NoPermissionError):
            await rc.spublish("other:chan", b"x")
    finally:
        await rc.aclose()

    # SPUBLISH on a node that does not own the channel's slot: MOVED to the owner
    owner = cluster.master_for_key("hw:chan-a")
    elsewhere = next(m.port for m in masters if m.port != owner)
    async with node_client(elsewhere, **cluster.client_kwargs()) as other:
        with pytest.raises(MovedError) as moved:
            await other.execute_command("SPUBLISH", "hw:chan-a", "x")
        assert moved.value.node_addr == ("127.0.0.1", owner)
        with pytest.raises(NoPermissionError):
            await other.execute_command("CLIENT", "SETNAME", "hubwire")


async def test_cluster_slot_move(cluster: RedisClusterDeployment) -> None:
    channel = "hw:moving"
    slot = cluster.slot(channel)
    source = cluster.master_for_slot(slot)
    target = next(m.port for m in cluster.masters() if m.port != source)
    cluster.call(source, "SET", "hw:{moving}key", "kept")  # same slot: MIGRATEd along
    kwargs = cluster.client_kwargs()
    async with node_client(source, **kwargs) as old, old.pubsub() as pubsub:
        await pubsub.ssubscribe(channel)
        await next_of(pubsub, "ssubscribe")
        took = cluster.migrate_slot(slot, target)
        print(f"\nslot {slot} moved {source} -> {target} in {took:.2f} s")
        # the old owner drops its subscribers of the slot's channels (they must go to the new one)
        assert (await next_of(pubsub, "sunsubscribe"))["channel"] == channel.encode()
        with pytest.raises(MovedError) as moved:
            await old.execute_command("SPUBLISH", channel, "x")
        assert moved.value.node_addr == ("127.0.0.1", target)
    assert cluster.master_for_slot(slot) == target
    rc = cluster_client(cluster)
    try:
        await sharded_roundtrip(cluster, rc, channel)
        assert await rc.get("hw:{moving}key") == b"kept"
    finally:
        await rc.aclose()


async def test_cluster_failover(cluster: RedisClusterDeployment) -> None:
    channel = "hw:failover"
    victim = cluster.master_for_key(channel)
    replica = next(m.replicas for m in cluster.masters() if m.port == victim)
    cluster.kill_master(victim)
    took = cluster.wait_failover(victim, timeout=15)
    print(f"\ncluster failover of {victim}: {took:.2f} s from SIGKILL to cluster_state:ok everywhere")
    assert cluster.master_for_key(channel) in replica
    rc = cluster_client(cluster)
    try:
        await sharded_roundtrip(cluster, rc, channel)
    finally:
        await rc.aclose()
    rejoined = cluster.restart(victim)
    print(f"killed master back as a replica in {rejoined:.2f} s")
    assert any(victim in m.replicas for m in cluster.masters())


async def test_cluster_tls_with_acl() -> None:
    with RedisClusterDeployment(tls=True, acl=ACL) as deployment:
        assert deployment.url.startswith("rediss+cluster://")
        assert "ssl_ca_certs=" in deployment.url
        rc = cluster_client(deployment)
        try:
            await sharded_roundtrip(deployment, rc, "hw:tls")
        finally:
            await rc.aclose()


# ---- Sentinel -----------------------------------------------------------------------------------


async def test_sentinel_discovery_failover_and_acl() -> None:
    with SentinelDeployment("hw-service", acl=ACL, protect_sentinels=True) as deployment:
        assert deployment.url == (
            "redis+sentinel://hw:hw-secret@"
            + ",".join(f"127.0.0.1:{p}" for p in deployment.sentinel_ports)
            + "/0/hw-service"
        )
        sentinel = Sentinel(
            deployment.sentinel_addresses,
            sentinel_kwargs=deployment.sentinel_kwargs(),
            **deployment.client_kwargs(),
        )
        first = deployment.master_port()
        assert await sentinel.discover_master("hw-service") == ("127.0.0.1", first)
        await roundtrip_on_master(sentinel, "hw:before")

        async with node_client(deployment.sentinel_ports[0]) as anonymous:  # sentinels are protected too
            with pytest.raises(AuthenticationError):
                await anonymous.execute_command("SENTINEL", "MASTERS")

        old = deployment.kill_master()
        assert old == first
        took = deployment.wait_promoted(old, timeout=15)
        print(f"\nsentinel promotion after SIGKILL of {old}: {took:.2f} s")
        new = deployment.master_port()
        assert new != old
        assert await sentinel.discover_master("hw-service") == ("127.0.0.1", new)
        await roundtrip_on_master(sentinel, "hw:after")

        back = deployment.restart(old)
        print(f"old master {old} back as a replica in {back:.2f} s")
        assert deployment.master_port() == new


async def roundtrip_on_master(sentinel: Sentinel, channel: str) -> None:
    """Through the discovered master: SET/GET a prefixed key, PUBLISH/SUBSCRIBE, NOPERM outside."""
    master = sentinel.master_for("hw-service")
    try:
        await master.set(f"{channel}:key", b"v")
        assert await master.get(f"{channel}:key") == b"v"
        async with master.pubsub() as pubsub:
            await pubsub.subscribe(channel)
            await next_of(pubsub, "subscribe")
            assert await master.publish(channel, b"m") == 1
            assert (await next_of(pubsub, "message"))["data"] == b"m"
        with pytest.raises(NoPermissionError):
            await master.get("other:key")
    finally:
        await master.aclose()


async def test_sentinel_tls() -> None:
    with SentinelDeployment(tls=True) as deployment:
        assert deployment.url.startswith("rediss+sentinel://127.0.0.1:")
        kwargs = deployment.client_kwargs()
        sentinel = Sentinel(
            deployment.sentinel_addresses, sentinel_kwargs=deployment.sentinel_kwargs(), **kwargs
        )
        assert await sentinel.discover_master("hubwire") == ("127.0.0.1", deployment.master_port())
        master = sentinel.master_for("hubwire")
        try:
            assert await master.ping()
        finally:
            await master.aclose()


# ---- TLS, unix socket, ACL on a single server ---------------------------------------------------


async def test_tls_with_client_certificates() -> None:
    with TlsRedis() as server:
        assert server.url.startswith(f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs=")
        async with aioredis.Redis.from_url(server.url) as client:
            assert await client.ping()
        # without our CA the server's certificate does not verify
        no_ca = server.url.replace(f"ssl_ca_certs={server.ca_cert}&", "")
        async with aioredis.Redis.from_url(no_ca, retry=NO_RETRY) as client:
            with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.ping()
        # without a client certificate the server (tls-auth-clients yes) refuses the connection
        async with aioredis.Redis.from_url(
            f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={server.ca_cert}&ssl_cert_reqs=required",
            retry=NO_RETRY,
        ) as client:
            with pytest.raises(redis.ConnectionError):
                await client.ping()


async def test_tls_without_client_certificates() -> None:
    with TlsRedis(tls_auth_clients=False) as server:
        url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={server.ca_cert}&ssl_cert_reqs=required"
        async with aioredis.Redis.from_url(url) as client:
            assert await client.ping()


async def test_unix_socket() -> None:
    with UnixRedis() as server:
        assert server.socket is not None
        assert server.url == f"unix://{server.socket}?db=0"
        assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o700
        async with aioredis.Redis.from_url(server.url) as client:
            assert await client.ping()
            assert (await client.config_get("port"))["port"] == "0"  # no TCP port at all


async def test_acl_user_least_privilege() -> None:
    with StandaloneRedis(acl=AclUser(prefix="app1:")) as server:
        assert server.url.startswith("redis://hw:hw-secret@127.0.0.1:")
        async with aioredis.Redis.from_url(server.url) as client:
            await client.set("app1:k", b"v", ex=30)
            assert await client.get("app1:k") == b"v"
            assert await client.exists("app1:k") == 1
            assert await client.expire("app1:k", 60)
            assert await client.delete("app1:k") == 1
            async with client.pubsub() as pubsub:
                await pubsub.subscribe("app1:chan")
                await next_of(pubsub, "subscribe")
                assert await client.publish("app1:chan", b"m") == 1
                assert (await next_of(pubsub, "message"))["data"] == b"m"
            # what the backplane's claim does: set when absent, else say who holds it (one round trip)
            assert await client.set("app1:claim", b"me", nx=True, get=True, ex=30) is None
            assert await client.set("app1:claim", b"other", nx=True, get=True, ex=30) == b"me"
            denied: list[Callable[[], Awaitable[object]]] = [
                lambda: client.get("other:k"),
                lambda: client.set("other:k", b"v"),
                lambda: client.publish("other:chan", b"m"),
                lambda: client.client_setname("hubwire"),
                lambda: client.flushall(),
            ]
            for command in denied:
                with pytest.raises(NoPermissionError):
                    await command()
            async with client.pubsub() as pubsub:
                with pytest.raises(NoPermissionError):
                    await pubsub.subscribe("other:chan")
                    await next_of(pubsub, "subscribe", timeout=2)
        # the default user is password-protected
        async with node_client(server.port) as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.ping()


async def test_requirepass_only() -> None:
    with StandaloneRedis(requirepass="s3cret") as server:
        assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
        async with aioredis.Redis.from_url(server.url) as client:
            assert await client.ping()


def test_logs_and_cleanup() -> None:
    server = UnixRedis()
    directory, proc = server.dir, server.nodes[server.port]
    try:
        assert "ready to accept connections" in server.logs()
    finally:
        server.close()
    assert proc.poll() is not None and not directory.exists()
