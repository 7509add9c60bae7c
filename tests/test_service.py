"""The connection service: nodes hold the clients, app servers run the hubs, restarts go unseen.

Everything is a real process: a private ``redis-server``, two nodes (``hubwire service``), two app
servers (``hubwire run tests.apps.service_app:app --service ...``) behind a round-robin front for
negotiates, and the official JS client (``tests/js/service_fleet.cjs``) over every transport and
both protocols. Clients negotiate at the app servers and follow the redirect to a node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from hubwire import Principal
from hubwire.emitter import AsyncEmitter
from hubwire.service.rest import rest_token
from hubwire.service.serverless import NO_APP_SERVER
from hubwire.service.tokens import client_audience, client_token
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.requirements import NODE_CLIENT, requires
from tests.stateful_tools import cutting_proxy
from tests.test_drain import Fleet, stop
from tests.test_drain import fleet as drain_fleet
from tests.test_scaleout import new_prefix

APP = "tests.apps.service_app:app"
FLEET = ROOT / "tests" / "js" / "service_fleet.cjs"
KEY = "service-test-access-key-0123456789abcdef"


class Cluster:
    """Nodes and app servers of one test (closed at its end)."""

    def __init__(self, redis: RedisServer, nodes: int = 2) -> None:
        self.redis = redis
        self.prefix = new_prefix("svc")
        self.every: list[ServerProcess] = []
        self.nodes = [self.node() for _ in range(nodes)]
        self.apps: dict[str, ServerProcess] = {}

    def node(self, port: int | None = None, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        args = ["--redis", self.redis.url, "--channel-prefix", self.prefix, "--log-level", "info", *extra]
        env = {"HUBWIRE_SERVICE_ACCESS_KEY": KEY, **(env or {})}
        server = ServerProcess("", port=port, args=args, env=env, command="service")
        self.every.append(server)
        return server

    def app(self, name: str, port: int | None = None, **extra: str) -> ServerProcess:
        urls = ",".join(n.url for n in self.nodes)
        env = {"HUBWIRE_SERVICE_ACCESS_KEY": KEY, "HUBWIRE_SERVICE_SERVER_ID": name, **extra}
        server = ServerProcess(APP, port=port, args=["--service", urls, "--log-level", "info"], env=env)
        self.every.append(server)
        self.apps[name] = server
        return server

    async def linked(self, name: str, links: int, timeout: float = 15.0) -> None:
        """Until app server ``name`` has ``links`` links up."""
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    health = (await http.get(f"{self.apps[name].url}/debug/links")).json()
                    if health["links_up"] == links:
                        return
                assert time.monotonic() < deadline, f"app server {name} not linked to {links} nodes"
                await asyncio.sleep(0.1)

    def close(self) -> str:
        """Stop everything; the logs of every process (for a failure's message)."""
        logs = []
        for server in self.every:
            server.kill()
            with contextlib.suppress(OSError):
                logs.append(server.output()[-3000:])
            server.close()
        return "\n---\n".join(logs)


@pytest.fixture
def cluster(private_redis: RedisServer) -> Iterator[Cluster]:
    made = Cluster(private_redis)
    try:
        yield made
    finally:
        made.close()


class ServiceFleet(Fleet):
    """The Node process of ``service_fleet.cjs``: commands on stdin, JSON lines back."""

    async def command(
        self, cmd: dict[str, Any], answer: str | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd).encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.event(answer, timeout) if answer else {}

    async def report(self) -> list[dict[str, Any]]:
        clients: list[dict[str, Any]] = (await self.command({"cmd": "report"}, "report"))["clients"]
        return clients


def fleet(url: str, kinds: list[dict[str, Any]], groups: int = 10) -> Any:
    """Official JS clients (``service_fleet.cjs``) of ``kinds``, in ``groups`` groups."""
    return drain_fleet(url, kinds, str(groups), script=FLEET, cls=ServiceFleet)


def kinds(ws_json: int, ws_mp: int, sse: int, lp_json: int, lp_mp: int) -> list[dict[str, Any]]:
    return (
        [{"transport": "ws", "protocol": "json"}] * ws_json
        + [{"transport": "ws", "protocol": "messagepack"}] * ws_mp
        + [{"transport": "sse", "protocol": "json"}] * sse
        + [{"transport": "lp", "protocol": "json"}] * lp_json
        + [{"transport": "lp", "protocol": "messagepack"}] * lp_mp
    )


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@requires(*NODE_CLIENT)
async def test_rolling_restart_of_both_app_servers_goes_unseen(cluster: Cluster) -> None:
    """300 clients echo every 200 ms and get a numbered broadcast every 100 ms while each app server
    in turn gets SIGTERM and starts again: no client notices anything."""
    a, b = cluster.app("A"), cluster.app("B")
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)
    clients_kinds = kinds(100, 60, 60, 40, 40)
    async with cutting_proxy(a.port) as front:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", clients_kinds, groups=30) as clients:
            ready = await clients.event("ready", 120)
            assert len(ready["clients"]) == 300
            await clients.command({"cmd": "start", "echoMs": 200, "tickMs": 100})
            await asyncio.sleep(2.0)
            during = []  # ticks sent while each app server stopped and came back
            for name in ("A", "B"):
                server = cluster.apps[name]
                before = (await clients.command({"cmd": "sent"}, "sent"))["sent"]
                await stop(server)
                await asyncio.to_thread(cluster.app, name, server.port)
                await cluster.linked(name, 2)
                await asyncio.sleep(2.0)
                during.append((await clients.command({"cmd": "sent"}, "sent"))["sent"] - before)
            stopped = await clients.command({"cmd": "stopticks"}, "ticksStopped")
            sent = stopped["sent"]
            assert stopped["tickErrors"] == []
            report: list[dict[str, Any]] = []

            async def all_ticks() -> bool:
                nonlocal report
                report = await clients.report()
                return all(c["ticks"]["last"] == sent for c in report)

            await until(all_ticks, 15, f"every client to get tick {sent}")
            await clients.command({"cmd": "stopechoes"}, "echoesStopped")
            report = await clients.report()
            groups = (await clients.command({"cmd": "groups"}, "groups"))["results"]
            where = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            await clients.command({"cmd": "stop"})
    assert all(n > 0 for n in during), during  # the broadcasts went on through both restarts
    for c in report:
        assert c["reconnecting"] == 0 and c["closed"] == 0, c
        assert c["connectionId"] == c["firstId"], c
        assert c["echoFailCount"] == 0 and c["echoes"] > 10, c
        assert c["ticks"] == {
            "first": 1,
            "last": sent,
            "count": sent,
            "duplicates": 0,
            "missing": 0,
            "outOfOrder": 0,
        }, c
    for g in groups:
        assert g["got"] == g["expected"], g
    assert all(w["ok"] for w in where), [w for w in where if not w["ok"]][:3]
    # both app servers restarted: every connection moved at least once, keeping its id
    moved = [w["value"]["migratedFrom"] for w in where]
    assert all(m in ("A", "B") for m in moved), moved
    print(f"\nrolling restart: {sent} ticks to 300 clients, every connection moved, none noticed")


async def lifecycle(server: ServerProcess) -> dict[str, dict[str, int]]:
    async with httpx.AsyncClient(timeout=5) as http:
        answer: dict[str, dict[str, int]] = (await http.get(f"{server.url}/debug/lifecycle")).json()
        return answer


@requires(*NODE_CLIENT)
async def test_a_killed_app_server_fails_its_calls_at_once_and_its_clients_carry_on(cluster: Cluster) -> None:
    """SIGKILL: every call the dead app server was running is answered with an error within
    seconds (none hangs); its clients keep their connections and ids, on the other app server."""
    a, b = cluster.app("A"), cluster.app("B")
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)
    async with cutting_proxy(a.port) as front:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", kinds(10, 10, 10, 5, 5)) as clients:
            ready = await clients.event("ready", 60)
            before = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            on_a = [r["value"]["server"] == "A" for r in before]
            assert 0 < sum(on_a) < len(on_a), "the clients should be spread over both app servers"
            await clients.command({"cmd": "call", "method": "Slow", "args": [6000]})
            await asyncio.sleep(1.0)
            killed = time.monotonic()
            a.kill(signal.SIGKILL)
            slow = (await clients.event("call", 30))["results"]
            waited = time.monotonic() - killed
            after = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            report = await clients.report()
            await clients.command({"cmd": "stop"})
    for was_on_a, result in zip(on_a, slow, strict=True):
        if was_on_a:
            assert not result["ok"] and "app server" in result["error"], result
            assert result["ms"] < 4000, result  # answered at the kill, not when the call would end
        else:
            assert result == {"ok": True, "value": "B", "ms": result["ms"]}, result
    assert waited < 10
    assert all(r["ok"] and r["value"]["server"] == "B" for r in after), after
    for was_on_a, r in zip(on_a, after, strict=True):
        assert r["value"]["migratedFrom"] == ("A" if was_on_a else None), r
    ids = [c["connectionId"] for c in ready["clients"]]
    assert [c["connectionId"] for c in report] == ids
    assert all(c["reconnecting"] == 0 and c["closed"] == 0 for c in report), report
    async with httpx.AsyncClient() as http:
        metrics = "".join([(await http.get(f"{n.url}/metrics")).text for n in cluster.nodes])
        app_metrics = (await http.get(f"{b.url}/metrics")).text
    crashed = sum(on_a)
    assert _metric(metrics, "hubwire_service_synthesized_errors_total") == crashed
    assert _metric(metrics, "hubwire_service_migrations_after_crash_total") == crashed
    assert _metric(app_metrics, 'hubwire_migrated_in_total{hub="ChatHub",path="/chat"}') == crashed
    assert _metric(app_metrics, "hubwire_service_links_up") == 2


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples (over the nodes' pages put together)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


@requires(*NODE_CLIENT)
async def test_a_killed_node_s_clients_reconnect_to_the_other_node(cluster: Cluster) -> None:
    """SIGKILL of a node: its clients reconnect (their own automatic reconnect, through an app
    server's negotiate, to the node still there) and keep working; the app servers end each lost
    connection once (``on_disconnected``)."""
    a, b = cluster.app("A"), cluster.app("B")
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)
    async with cutting_proxy(a.port) as front:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", kinds(10, 10, 10, 5, 5)) as clients:
            await clients.event("ready", 60)
            cluster.nodes[0].kill(signal.SIGKILL)
            report: list[dict[str, Any]] = []

            async def all_back() -> bool:
                nonlocal report
                report = await clients.report()
                return all(c["state"] == "Connected" for c in report) and any(
                    c["reconnecting"] for c in report
                )

            await until(all_back, 30, "every client to be connected again")
            echo = (await clients.command({"cmd": "call", "method": "Echo", "args": [7]}, "call"))["results"]
            moved = [c for c in report if c["reconnecting"]]
            stayed = [c for c in report if not c["reconnecting"]]
            ran: dict[str, dict[str, int]] = {}

            async def ended_once() -> bool:
                ran.update({**(await lifecycle(a)), **(await lifecycle(b))})
                return all(ran[c["firstId"]]["disconnected"] == 1 for c in moved)

            await until(ended_once, 10, "the app servers to end the lost connections")
            await clients.command({"cmd": "stop"})
    assert all(r == {"ok": True, "value": 7, "ms": r["ms"]} for r in echo), echo
    assert moved and stayed, "both nodes should have held clients"
    assert all(c["connectionId"] != c["firstId"] for c in moved)
    assert all(c["connectionId"] == c["firstId"] for c in stayed)
    assert all(ran[c["firstId"]] == {"connected": 1, "disconnected": 0} for c in stayed)
    assert all(ran[c["firstId"]] == {"connected": 1, "disconnected": 1} for c in moved)


@requires(*NODE_CLIENT)
async def test_the_rest_api_of_a_node_reaches_clients_of_every_node(cluster: Cluster) -> None:
    """Serverless sends through one node's REST API reach the clients of both nodes; a bad token
    is refused (401) and delivers nothing; the emitter's sends reach them as well."""
    a = cluster.app("A")
    await cluster.linked("A", 2)
    node = cluster.nodes[1]
    async with fleet(f"{a.url}/chat", kinds(6, 4, 4, 3, 3), groups=2) as clients, httpx.AsyncClient() as http:
        await clients.event("ready", 60)
        url = f"{node.url}/api/v1/hubs/chathub"
        good = {"Authorization": f"Bearer {rest_token(KEY, url)}"}
        bad = {"Authorization": f"Bearer {rest_token('another-key-of-the-same-length-000000', url)}"}
        refused = await http.post(url, json={"target": "Tick", "arguments": [99]}, headers=bad)
        assert refused.status_code == 401
        for n in (1, 2, 3):
            answer = await http.post(url, json={"target": "Tick", "arguments": [n]}, headers=good)
            assert answer.status_code == 202, answer.text
        # the emitter (another process publishing to the nodes' Redis) reaches them too: nodes name
        # hubs in lower case on the backplane
        async with AsyncEmitter(cluster.redis.url, cluster.prefix, hub="chathub") as emitter:
            await emitter.all.send("Tick", 4)
        report: list[dict[str, Any]] = []

        async def all_four() -> bool:
            nonlocal report
            report = await clients.report()
            return all(c["ticks"]["count"] >= 4 for c in report)

        await until(all_four, 10, "every client to get the three REST sends and the emitter's")
        await clients.command({"cmd": "stop"})
    assert all(
        c["ticks"] == {"first": 1, "last": 4, "count": 4, "duplicates": 0, "missing": 0, "outOfOrder": 0}
        for c in report
    ), report


async def test_an_app_server_in_service_mode_serves_no_client_transport(cluster: Cluster) -> None:
    """Clients only ever reach nodes: a WebSocket straight to the app server gets 404, and its
    negotiate answers with the node's URL and a token."""
    import websockets

    a = cluster.app("A")
    await cluster.linked("A", 2)
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(f"ws://127.0.0.1:{a.port}/chat?id=anything"):
            pass
    assert refused.value.response.status_code == 404
    async with httpx.AsyncClient() as http:
        answer = (await http.post(f"{a.url}/chat/negotiate?negotiateVersion=1&room=r1")).json()
    assert answer["url"].split("/client/?hub=ChatHub")[0] in [n.url for n in cluster.nodes]
    assert answer["url"].endswith("&room=r1") and answer["accessToken"]


@requires(*NODE_CLIENT)
async def test_a_serverless_node_serves_listen_only_clients_of_a_hub_no_app_server_runs(
    cluster: Cluster,
) -> None:
    """``hubwire service --serverless``: clients with a token minted from the access key connect
    to a hub no app server runs, get what the REST API sends, and a call gets a clear error; a
    node without ``--serverless`` refuses them."""
    serverless = cluster.node(None, "--serverless")
    hub = "Feed"
    audience = client_audience(serverless.url, hub)
    token = client_token(KEY, audience, Principal("u1", {"sub": "u1"}))
    url = f"{serverless.url}/client/?hub={hub}&access_token={token}"
    async with fleet(url, kinds(2, 2, 2, 1, 1)) as clients, httpx.AsyncClient() as http:
        await clients.event("ready", 60)
        rest = f"{cluster.nodes[0].url}/api/v1/hubs/{hub.lower()}"  # another node: over Redis
        headers = {"Authorization": f"Bearer {rest_token(KEY, rest)}"}
        for n in (1, 2):
            answer = await http.post(rest, json={"target": "Tick", "arguments": [n]}, headers=headers)
            assert answer.status_code == 202
        user = f"{serverless.url}/api/v1/hubs/{hub.lower()}/users/u1"
        answer = await http.post(
            user,
            json={"target": "Tick", "arguments": [3]},
            headers={"Authorization": f"Bearer {rest_token(KEY, user)}"},
        )
        assert answer.status_code == 202
        report: list[dict[str, Any]] = []

        async def all_three() -> bool:
            nonlocal report
            report = await clients.report()
            return all(c["ticks"]["count"] >= 3 for c in report)

        await until(all_three, 10, "every client to get the REST sends")
        calls = (await clients.command({"cmd": "call", "method": "Echo", "args": [1]}, "call"))["results"]
        await clients.command({"cmd": "stop"})
    assert all(c["ticks"]["last"] == 3 and c["ticks"]["count"] == 3 for c in report), report
    assert all(not r["ok"] and NO_APP_SERVER in r["error"] for r in calls), calls
    # the same token's hub on a node that is not serverless: refused, nothing runs it
    refused_url = f"{cluster.nodes[1].url}/client/?hub={hub}&access_token={token}"
    async with fleet(refused_url, kinds(1, 0, 0, 0, 0)) as clients:
        with pytest.raises(AssertionError, match="error"):
            await clients.event("ready", 30)


async def test_keep_alive_is_the_node_s(private_redis: RedisServer) -> None:
    """Nodes ping idle clients and close silent ones that have pinged before (reconnect allowed),
    as a hub server does; app servers do neither, so an idle client costs them nothing."""
    import websockets

    made = Cluster(private_redis, nodes=0)
    try:
        # the heartbeat ticks about once a second: a keep-alive under it means a Ping every tick
        env = {"HUBWIRE_SERVICE_KEEP_ALIVE": "0.5", "HUBWIRE_SERVICE_CLIENT_TIMEOUT": "4"}
        made.nodes = [made.node(None, env=env)]
        made.app("A")
        await made.linked("A", 1)
        async with httpx.AsyncClient() as http:
            redirect = (await http.post(f"{made.apps['A'].url}/chat/negotiate?negotiateVersion=1")).json()
        url = redirect["url"].replace("http://", "ws://") + "&access_token=" + redirect["accessToken"]
        async with websockets.connect(url) as ws:
            await ws.send('{"protocol":"json","version":1}\x1e')
            assert await ws.recv() == "{}\x1e"
            await ws.send('{"type":6}\x1e')  # a client that pings: from now on it must keep doing so
            started = time.monotonic()
            records: list[dict[str, Any]] = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while time.monotonic() - started < 15:
                    frame = await asyncio.wait_for(ws.recv(), 10)
                    records += [json.loads(r) for r in str(frame).split("\x1e") if r]
            waited = time.monotonic() - started
        pings = [r for r in records if r["type"] == 6]
        assert len(pings) >= 2, records  # one a tick while the client said nothing
        assert records[-1] == {"type": 7, "error": "Connection closed with an error.", "allowReconnect": True}
        assert 3.5 < waited < 10, waited
    finally:
        made.close()


@requires(*NODE_CLIENT)
async def test_client_results_reach_connections_run_by_other_app_servers(cluster: Cluster) -> None:
    """``clients.client(id).invoke`` from either app server reaches every client, whichever app
    server runs it and whichever node holds it; an unknown id fails at once."""
    a, b = cluster.app("A"), cluster.app("B")
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)
    async with cutting_proxy(a.port) as front, httpx.AsyncClient(timeout=20) as http:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", kinds(3, 3, 2, 2, 2)) as clients:
            ready = await clients.event("ready", 60)
            where = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            answers = {}
            for i, client in enumerate(ready["clients"]):
                for app in (a, b):
                    answers[(i, app.url)] = (await http.get(f"{app.url}/ask/{client['connectionId']}")).json()
            started = time.monotonic()
            missing = (await http.get(f"{a.url}/ask/no-such-connection")).json()
            waited = time.monotonic() - started
            await clients.command({"cmd": "stop"})
    runs = {w["value"]["server"] for w in where}
    assert runs == {"A", "B"}, "the clients should be run by both app servers"
    for (i, _), answer in answers.items():
        assert answer.get("value") == i * 10, answer
    assert "does not exist" in missing["error"] and waited < 5, (missing, waited)


def test_a_node_refuses_workers() -> None:
    """App servers link to each node: node workers sharing a port could not all be reached."""
    import subprocess

    from tests.conftest import PYTHON

    env = dict(os.environ, HUBWIRE_SERVICE_ACCESS_KEY=KEY)
    done = subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "service", "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "run more nodes on their own ports" in done.stderr


async def _raw_client(app: ServerProcess) -> Any:
    """A WebSocket client through the service (the redirect's URL and token), handshake done."""
    import websockets

    async with httpx.AsyncClient() as http:
        redirect = (await http.post(f"{app.url}/chat/negotiate?negotiateVersion=1")).json()
    url = redirect["url"].replace("http://", "ws://") + "&access_token=" + redirect["accessToken"]
    ws = await websockets.connect(url)
    await ws.send('{"protocol":"json","version":1}\x1e')
    assert await asyncio.wait_for(ws.recv(), 10) == "{}\x1e"
    return ws


async def _records(ws: Any, until_type: int, timeout: float = 10) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    while not any(r.get("type") == until_type for r in records):
        frame = await asyncio.wait_for(ws.recv(), timeout)
        records += [json.loads(r) for r in str(frame).split("\x1e") if r]
    return records


async def test_what_a_hub_method_sends_arrives_in_its_order(cluster: Cluster) -> None:
    """A send to the caller, then to a group it joined, then the completion: in that order, as
    without the service (the caller's bytes go out before a fan-out frame)."""
    a = cluster.app("A")
    await cluster.linked("A", 2)
    for _ in range(5):
        ws = await _raw_client(a)
        try:
            call = {"type": 1, "invocationId": "1", "target": "MeThenGroup", "arguments": ["order"]}
            await ws.send(json.dumps(call) + "\x1e")
            records = [r for r in await _records(ws, 3) if r["type"] in (1, 3)]
        finally:
            await ws.close()
        assert [r.get("target", r["type"]) for r in records] == ["Me", "Group", 3], records


async def test_a_client_of_the_last_app_server_ends_there_when_it_stops(
    private_redis: RedisServer, tmp_path: Any
) -> None:
    """No other app server to move to: the client is closed with reconnect allowed, and the app
    server it ran on runs on_disconnected for it before it exits."""
    made = Cluster(private_redis, nodes=1)
    events = tmp_path / "events"
    try:
        urls = made.nodes[0].url
        env = {
            "HUBWIRE_SERVICE_ACCESS_KEY": KEY,
            "HUBWIRE_SERVICE_SERVER_ID": "A",
            "SERVICE_APP_EVENTS": str(events),
        }
        a = ServerProcess(APP, args=["--service", urls, "--log-level", "info"], env=env)
        made.every.append(a)
        made.apps["A"] = a
        await made.linked("A", 1)
        ws = await _raw_client(a)
        who = {"type": 1, "invocationId": "1", "target": "Where", "arguments": []}
        await ws.send(json.dumps(who) + "\x1e")
        cid = next(r for r in await _records(ws, 3) if r["type"] == 3)["result"]["connectionId"]
        await stop(a)
        records = await _records(ws, 7)
        await ws.close()
        assert records[-1] == {"type": 7, "allowReconnect": True}, records
        assert events.read_text().split("\n").count(f"disconnected {cid}") == 1
    finally:
        made.close()


@requires(*NODE_CLIENT)
async def test_idle_connections_are_parked_and_come_back_whole(cluster: Cluster) -> None:
    """An app server keeps idle connections as compact records: a call wakes one with its items,
    user and groups (no on_connected again), a group send reaches parked ones through the nodes,
    and a drain moves parked connections like the others."""
    park = {"HUBWIRE_SERVICE_PARK_AFTER": "1"}
    a, b = cluster.app("A", **park), cluster.app("B", **park)
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)

    async def parked(http: httpx.AsyncClient, count: int) -> bool:
        """``count`` connections parked (the fleet's 12 clients and its broadcaster: 13)."""
        links = [(await http.get(f"{app.url}/debug/links")).json() for app in cluster.apps.values()]
        return sum(h["parked"] for h in links) == count

    async with cutting_proxy(a.port) as front, httpx.AsyncClient(timeout=10) as http:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", kinds(4, 2, 2, 2, 2), groups=3) as clients:
            ready = await clients.event("ready", 60)
            await clients.command({"cmd": "call", "method": "SetItem", "args": ["k", "v"]}, "call")
            await until(lambda: parked(http, 13), 20, "every connection to be parked")
            where = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            await until(lambda: parked(http, 13), 20, "every connection to be parked again")
            groups = (await clients.command({"cmd": "groups"}, "groups"))["results"]
            ran = {**(await lifecycle(a)), **(await lifecycle(b))}
            await until(lambda: parked(http, 13), 20, "every connection to be parked once more")
            await stop(a)  # its connections are parked: they move to B like awake ones
            after = (await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]
            report = await clients.report()
            await clients.command({"cmd": "stop"})
    ids = [c["connectionId"] for c in ready["clients"]]
    assert all(
        w["ok"] and w["value"]["items"]["k"] == "v" and w["value"]["migratedFrom"] is None for w in where
    )
    assert [w["value"]["connectionId"] for w in where] == ids
    assert all(ran[cid] == {"connected": 1, "disconnected": 0} for cid in ids), ran
    for g in groups:
        assert g["got"] == g["expected"], g
    was_on_a = [w["value"]["server"] == "A" for w in where]
    assert any(was_on_a) and not all(was_on_a)
    for on_a, w in zip(was_on_a, after, strict=True):
        assert w["ok"] and w["value"]["server"] == "B" and w["value"]["items"]["k"] == "v", w
        assert w["value"]["migratedFrom"] == ("A" if on_a else None), w
    assert all(c["reconnecting"] == 0 and c["closed"] == 0 for c in report), report
    assert [c["connectionId"] for c in report] == ids


@requires(*NODE_CLIENT)
async def test_connections_sleep_past_the_awake_bound_and_keep_working(cluster: Cluster) -> None:
    """New connections are parked once their handshake is handled, and past
    ``HUBWIRE_SERVICE_AWAKE_MAX`` awake ones per link the least recently active are parked
    whatever their idle time (the idle rule is out of play here: 600 s). Clients that call and
    get group sends all the while see nothing of it: every call answered with the items it set,
    every group send once, no on_connected again, no reconnect."""
    bound = {"HUBWIRE_SERVICE_PARK_AFTER": "600", "HUBWIRE_SERVICE_AWAKE_MAX": "1"}
    a, b = cluster.app("A", **bound), cluster.app("B", **bound)
    await cluster.linked("A", 2)
    await cluster.linked("B", 2)

    async def parked_at_least(http: httpx.AsyncClient, count: int) -> bool:
        links = [(await http.get(f"{app.url}/debug/links")).json() for app in (a, b)]
        return sum(h["parked"] for h in links) >= count

    async with cutting_proxy(a.port) as front, httpx.AsyncClient(timeout=10) as http:
        front.rotation = [a.port, b.port]
        async with fleet(f"{front.url}/chat", kinds(4, 2, 2, 2, 2), groups=3) as clients:
            ready = await clients.event("ready", 60)
            # 13 connections (12 clients, the broadcaster) over 4 links with at most 1 awake on each
            await until(lambda: parked_at_least(http, 9), 20, "connections past the bound parked")
            await clients.command({"cmd": "call", "method": "SetItem", "args": ["k", "v"]}, "call")
            rounds = [(await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"]]
            rounds.append((await clients.command({"cmd": "call", "method": "Where"}, "call"))["results"])
            groups = (await clients.command({"cmd": "groups"}, "groups"))["results"]
            await until(lambda: parked_at_least(http, 9), 20, "the woken ones parked again")
            ran = {**(await lifecycle(a)), **(await lifecycle(b))}
            report = await clients.report()
            await clients.command({"cmd": "stop"})
    ids = [c["connectionId"] for c in ready["clients"]]
    for where in rounds:
        assert [w["value"]["connectionId"] for w in where] == ids
        assert all(w["ok"] and w["value"]["items"]["k"] == "v" for w in where), where
    for g in groups:
        assert g["got"] == g["expected"], g
    assert all(ran[cid] == {"connected": 1, "disconnected": 0} for cid in ids), ran
    assert all(c["reconnecting"] == 0 and c["closed"] == 0 for c in report), report
