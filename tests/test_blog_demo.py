"""The blog demo as the README runs it: ``hubwire demo`` (one in-memory instance) and
``hubwire demo --instances 3`` (three instances on a private redis-server behind the round-robin front).

Real processes on free loopback ports; hub clients are ``examples.blog.verify.HubClient`` (the
SignalR JSON protocol over ``websockets``), so every check goes through negotiate, the WebSocket and
the REST API exactly as a browser's would.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from examples.blog.verify import HubClient

from tests.blog import Demo, pid_alive, start_demo

WAIT = 5.0
QUIET = 0.5  # how long "nothing arrives" is watched


async def login(http: httpx.AsyncClient, base: str, user: str, admin: bool = False) -> str:
    response = await http.post(f"{base}/api/login", json={"user": user, "admin": admin})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def publish(http: httpx.AsyncClient, base: str, token: str, title: str, via: str | None = None) -> int:
    """Create a draft through ``base``, publish it through ``via`` (default the same instance)."""
    created = await http.post(f"{base}/api/posts", json={"title": title}, headers=bearer(token))
    assert created.status_code == 201, created.text
    post_id = int(created.json()["id"])
    published = await http.post(f"{via or base}/api/posts/{post_id}/publish", headers=bearer(token))
    assert published.status_code == 200, published.text
    assert published.json()["publishedAt"]
    return post_id


def has_post(post_id: int) -> Any:
    return lambda args: bool(args) and args[0].get("id") == post_id


# -- one instance, in memory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    running = start_demo()
    yield running
    running.stop()
    running.kill_all()


def test_demo_serves_the_page_and_the_bundle(demo: Demo) -> None:
    assert "in memory" in demo.output()
    page = httpx.get(f"{demo.url}/", timeout=5)
    assert page.status_code == 200
    assert '<script src="/lib/signalr.min.js"></script>' in page.text
    bundle = httpx.get(f"{demo.url}/lib/signalr.min.js", timeout=5)
    assert bundle.status_code == 200 and "HubConnectionBuilder" in bundle.text
    script = httpx.get(f"{demo.url}/blog.js", timeout=5)
    assert script.status_code == 200 and "withAutomaticReconnect()" in script.text
    health = httpx.get(f"{demo.url}/healthz", timeout=5).json()
    assert health["status"] == "ok" and health["store"] == "MemoryPostStore"
    assert health["backplane"] == "in-memory"


async def test_demo_hub_requires_a_login(demo: Demo) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        anonymous = await http.post(f"{demo.url}/hubs/blog/negotiate?negotiateVersion=1")
        assert anonymous.status_code == 401
        token = await login(http, demo.url, "reader")
        negotiated = await http.post(
            f"{demo.url}/hubs/blog/negotiate?negotiateVersion=1", headers=bearer(token)
        )
        assert negotiated.status_code == 200 and negotiated.json()["connectionId"]


async def test_demo_publish_follow_and_alerts(demo: Demo) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        alice = await login(http, demo.url, "alice")
        fan = await HubClient.open("fan", demo.url, await login(http, demo.url, "fan"), WAIT)
        other = await HubClient.open("other", demo.url, await login(http, demo.url, "other"), WAIT)
        admin = await HubClient.open("root", demo.url, await login(http, demo.url, "root", admin=True), WAIT)
        try:
            assert (await fan.invoke("Instance", timeout=WAIT))["name"]
            assert await fan.invoke("Follow", "alice", timeout=WAIT) == ["alice"]
            who = await fan.invoke("WhoAmI", timeout=WAIT)
            assert who["user"] == "fan" and who["follows"] == ["alice"] and who["admin"] is False
            post_id = await publish(http, demo.url, alice, "hello from alice")
            for client in (fan, other, admin):
                assert await client.wait_published(post_id, WAIT), client.name
            post = fan.calls("PostPublished")[-1][0]
            assert post["title"] == "hello from alice" and post["author"] == "alice" and post["publishedAt"]
            assert await fan.wait_for("AuthorPosted", has_post(post_id), WAIT)
            await asyncio.sleep(QUIET)
            assert other.calls("AuthorPosted") == [] and admin.calls("AuthorPosted") == []

            root = await login(http, demo.url, "root", admin=True)
            sent = await http.post(
                f"{demo.url}/api/alerts", json={"message": "disk full"}, headers=bearer(root)
            )
            assert sent.status_code == 202, sent.text
            assert await admin.wait_for("Alert", lambda args: args[0]["message"] == "disk full", WAIT)
            await asyncio.sleep(QUIET)
            assert fan.calls("Alert") == [] and other.calls("Alert") == []
        finally:
            for client in (fan, other, admin):
                await client.close()


async def test_demo_rest_rules(demo: Demo) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as http:
        alice = await login(http, demo.url, "alice")
        bob = await login(http, demo.url, "bob")
        assert (await http.post(f"{demo.url}/api/posts", json={"title": "x"})).status_code == 401
        assert (await http.post(f"{demo.url}/api/login", json={"user": "no spaces"})).status_code == 422
        created = await http.post(f"{demo.url}/api/posts", json={"title": "draft"}, headers=bearer(alice))
        post_id = created.json()["id"]
        assert created.json()["publishedAt"] is None
        publish_url = f"{demo.url}/api/posts/{post_id}/publish"
        assert (await http.post(publish_url, headers=bearer(bob))).status_code == 403
        assert (await http.post(publish_url, headers=bearer(alice))).status_code == 200
        assert (await http.post(publish_url, headers=bearer(alice))).status_code == 409
        assert (
            await http.post(f"{demo.url}/api/posts/999999/publish", headers=bearer(alice))
        ).status_code == 404
        alert = await http.post(f"{demo.url}/api/alerts", json={"message": "hi"}, headers=bearer(bob))
        assert alert.status_code == 403
        listed = (await http.get(f"{demo.url}/api/posts")).json()
        assert any(p["id"] == post_id and p["publishedAt"] for p in listed)


# -- three instances on Redis behind the front ----------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Demo]:
    running = start_demo("--instances", "3")  # no --redis: it starts its own redis-server
    yield running
    running.stop()
    running.kill_all()


def test_cluster_starts_its_own_redis_never_6379(cluster: Demo) -> None:
    assert cluster.redis_url is not None and cluster.redis_url.startswith("redis://127.0.0.1:")
    assert ":6379/" not in cluster.redis_url
    assert len({i.name for i in cluster.instances}) == 3
    for instance in cluster.instances:
        health = httpx.get(f"{instance.url}/healthz", timeout=5).json()
        assert health["store"] == "RedisPostStore" and health["backplane"]["state"] == "connected"


def test_front_round_robin_without_affinity(cluster: Demo) -> None:
    with httpx.Client(timeout=5) as http:  # one keep-alive connection: still the next instance each time
        names = [http.get(f"{cluster.url}/api/instance").json()["name"] for _ in range(6)]
    assert set(names) == {i.name for i in cluster.instances}
    assert names[:3] == names[3:], "strict rotation"


async def test_post_created_on_one_instance_is_published_on_another(cluster: Demo) -> None:
    first, second, third = cluster.instances
    async with httpx.AsyncClient(timeout=WAIT) as http:
        writer = await login(http, first.url, "writer")
        on_second = await HubClient.open("second", second.url, await login(http, second.url, "r2"), WAIT)
        try:
            post_id = await publish(http, first.url, writer, "across instances", via=third.url)
            assert await on_second.wait_published(post_id, WAIT)
            stored = (await http.get(f"{second.url}/api/posts/{post_id}")).json()
            assert stored["publishedAt"] and stored["author"] == "writer"
        finally:
            await on_second.close()


async def test_clients_through_the_front_land_on_different_instances(cluster: Demo) -> None:
    """Negotiate and WebSocket each go to the next instance; every client still gets every post."""
    async with httpx.AsyncClient(timeout=WAIT) as http:
        tokens = [await login(http, cluster.url, f"c{i}") for i in range(3)]
        # negotiate + WebSocket = two turns of three: the WebSockets land on three different instances
        clients = [await HubClient.open(f"c{i}", cluster.url, token, WAIT) for i, token in enumerate(tokens)]
        try:
            names = {(await c.invoke("Instance", timeout=WAIT))["name"] for c in clients}
            assert len(names) == 3, names
            post_id = await publish(http, cluster.url, await login(http, cluster.url, "w"), "via the front")
            for client in clients:
                assert await client.wait_published(post_id, WAIT), client.name
        finally:
            for client in clients:
                await client.close()


def test_cluster_stops_everything_it_started(cluster: Demo) -> None:
    """Last in this module: SIGTERM to the demo ends its instances and its redis-server."""
    assert cluster.redis_url is not None
    redis_port = int(cluster.redis_url.rsplit(":", 1)[1].split("/")[0])
    assert cluster.stop() == 0, cluster.output()
    deadline = time.monotonic() + 10
    while any(pid_alive(i.pid) for i in cluster.instances) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_alive(i.pid) for i in cluster.instances)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", redis_port), timeout=1):
        pass
