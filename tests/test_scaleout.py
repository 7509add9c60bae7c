"""Acceptance tests of the Redis backplane: several real ``hubwire run`` processes, real redis-server.

Clients are the official SignalR JS client (Node scripts in ``tests/scaleout/``, one JSON line per
check) and, for negotiate/transport splits, raw HTTP + ``websockets``. Each Node script runs once per
module (cached in a fixture); every check it reports is its own pytest test, so a failure names the
broken behaviour. Scripts that need the test to act mid-run (kill Redis, read ``PUBSUB``) emit an
``{"event": ...}`` line and wait for one answer line on stdin.

Layout:

* ``cluster``: three instances on the session's private redis-server, started once for the module;
  the non-destructive scenarios share it (each with its own channel prefix, groups and users).
* ``app2``: a second app (other channel prefix) on that same redis-server, for isolation.
* Outage, ``CLIENT KILL`` and buffer-overflow scenarios each get their own killable redis-server and
  instances, and stop them as soon as their scenario has run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from hubwire.connections.tokens import TokenIssuer
from tests.conftest import ROOT, RedisServer, ServerProcess
from tests.requirements import NODE_CLIENT, requires

APP = "tests.apps.scaleout:app"
HUB = "ScaleHub"
SCRIPTS = ROOT / "tests" / "scaleout"
NODE = shutil.which("node")
ACK_TIMEOUT = 2  # seconds, for the cluster's instances (HUBWIRE_ACK_TIMEOUT)
SCENARIO_TIMEOUT = 90.0
OVERFLOW_TOTAL, OVERFLOW_BUFFER = 12, 5

needs_node = requires(*NODE_CLIENT)


# -- processes ---------------------------------------------------------------------------------------


class Cluster:
    """``n`` instances of the scale-out app on one Redis and one channel prefix (started in parallel)."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        n: int,
        env: dict[str, str] | None = None,
        envs: list[dict[str, str]] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        args = ["--redis", redis_url, "--channel-prefix", prefix]
        per_instance = [{**(env or {}), **(envs[i] if envs and i < len(envs) else {})} for i in range(n)]
        with ThreadPoolExecutor(n) as pool:
            futures = [pool.submit(ServerProcess, APP, env=e, args=args) for e in per_instance]
        self.instances: list[ServerProcess] = []
        errors: list[BaseException] = []
        for future in futures:
            try:
                self.instances.append(future.result())
            except Exception as exc:
                errors.append(exc)
        if errors:
            self.close()
            raise errors[0]
        self.urls = [s.url for s in self.instances]

    def channel(self, suffix: str) -> str:
        return f"{self.prefix}{HUB}:{suffix}"

    def logs(self) -> str:
        parts = []
        for i, server in enumerate(self.instances, 1):
            text = server.output()
            parts.append(f"--- instance {i} ({server.url}) log tail ---\n{text[-3000:]}")
        return "\n".join(parts)

    def health(self) -> list[dict[str, Any]]:
        return [httpx.get(f"{url}/health", timeout=5).json() for url in self.urls]

    def close(self) -> None:
        for server in self.instances:
            server.close()


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, describe: Callable[[], object] | None = None
) -> float:
    """Polls ``predicate`` (bounded); returns the seconds it took."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            state = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{state}")
        time.sleep(0.05)


# -- Node scenarios ----------------------------------------------------------------------------------

Checks = dict[str, dict[str, Any]]
EventHandler = Callable[[str, dict[str, Any], Checks], dict[str, Any] | None]


def record(checks: Checks, name: str, fn: Callable[[], object]) -> bool:
    """Runs a Python-side check inside a scenario step and records it like a Node check."""
    start = time.monotonic()
    try:
        detail = fn()
    except Exception as exc:
        detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, AssertionError) else traceback.format_exc()
        checks[name] = {"name": name, "ok": False, "detail": detail}
        return False
    ms = int((time.monotonic() - start) * 1000)
    checks[name] = {"name": name, "ok": True, "detail": "" if detail is None else str(detail), "ms": ms}
    return True


@dataclass
class ScenarioRun:
    script: str
    checks: Checks = field(default_factory=dict)
    stderr: str = ""
    stray: list[str] = field(default_factory=list)
    context: str = ""  # server logs, kept for failure messages
    seconds: float = 0.0

    def require(self, name: str) -> None:
        crashed = self.checks.get("scenario_crashed")
        if crashed is not None:  # e.g. stopping the clients failed at the end: every check is suspect
            pytest.fail(f"{self.script} crashed: {crashed['detail']}\nstderr: {self.stderr[-3000:]}")
        result = self.checks.get(name)
        if result is None:
            crashed = {k: v for k, v in self.checks.items() if not v.get("ok")}
            pytest.fail(
                f"{self.script}: check {name!r} was not reported.\nfailed: {json.dumps(crashed, indent=1)}\n"
                f"stray output: {self.stray[-20:]}\nstderr: {self.stderr[-3000:]}\n{self.context}"
            )
        if not result["ok"]:
            pytest.fail(f"{self.script}: {name}: {result['detail']}\n{self.context}")


def run_scenario(
    script: str, args: list[str], on_event: EventHandler | None = None, timeout: float = SCENARIO_TIMEOUT
) -> ScenarioRun:
    """Runs ``tests/scaleout/<script>`` to completion (bounded), answering its steps."""
    assert NODE is not None
    run = ScenarioRun(script)
    start = time.monotonic()
    proc = subprocess.Popen(
        [NODE, str(SCRIPTS / script), *args],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None and proc.stdin is not None
    lines: queue.Queue[str | None] = queue.Queue()
    errors: list[str] = []

    def pump_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def pump_stderr() -> None:
        assert proc.stderr is not None
        errors.extend(proc.stderr)

    threads = [
        threading.Thread(target=pump_stdout, daemon=True),
        threading.Thread(target=pump_stderr, daemon=True),
    ]
    for thread in threads:
        thread.start()
    deadline = start + timeout
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                run.checks["scenario_timeout"] = {"ok": False, "detail": f"{script} ran over {timeout}s"}
                break
            if line is None:
                break
            try:
                message = json.loads(line)
            except ValueError:
                run.stray.append(line.rstrip())
                continue
            if "event" in message:
                event = message["event"]
                try:
                    reply = on_event(event, message, run.checks) if on_event is not None else None
                except Exception:
                    run.checks[f"step_{event}"] = {"ok": False, "detail": traceback.format_exc()}
                    break
                proc.stdin.write(json.dumps(reply or {}) + "\n")
                proc.stdin.flush()
            elif "name" in message:
                run.checks[message["name"]] = message
            else:
                run.stray.append(line.rstrip())
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for thread in threads:
            thread.join(5)
        with contextlib.suppress(OSError):
            proc.stdin.close()
    run.stderr = "".join(errors)
    run.seconds = time.monotonic() - start
    return run


# -- fixtures ----------------------------------------------------------------------------------------


def new_prefix(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    """Three instances of one app on the session's redis-server (non-destructive tests only)."""
    group = Cluster(redis_server.url, new_prefix("so"), 3, env={"HUBWIRE_ACK_TIMEOUT": str(ACK_TIMEOUT)})
    yield group
    group.close()


@pytest.fixture(scope="module")
def app2(redis_server: RedisServer) -> Iterator[Cluster]:
    """A second app (two instances, another channel prefix) on the same redis-server."""
    group = Cluster(redis_server.url, new_prefix("other"), 2)
    yield group
    group.close()


@pytest.fixture(scope="module")
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    client.close()


def numsub(client: redis.Redis, *channels: str) -> dict[str, int]:
    return {str(name): int(count) for name, count in client.pubsub_numsub(*channels)}


# ====================================================================================================
# 1-3. Fan-out across three instances: the seed's check, groups, every target kind, remote group
#      changes, client results (tests/scaleout/cluster.cjs)
# ====================================================================================================

CLUSTER_CHECKS = (
    "setup_clients_on_three_instances",
    "seed_http_publish_reaches_every_client_once",
    "http_publish_from_each_instance",
    "group_send_from_instance2_reaches_members_only",
    "http_group_send_reaches_members_only",
    "target_all",
    "target_others_excludes_caller_only",
    "target_all_except_remote_ids",
    "target_client_on_other_instance",
    "target_client_on_same_instance",
    "target_clients_local_and_remote",
    "target_groups",
    "target_group_except_remote_member",
    "target_others_in_group",
    "target_user_with_connections_on_three_instances",
    "target_users",
    "target_unknown_user_and_empty_group_reach_nobody",
    "group_names_unicode_and_pattern_characters_are_literal",
    "leave_group_on_one_instance_then_rejoin",
    "add_to_group_remote_connection",
    "add_to_group_unknown_connection_clear_error",
    "client_result_from_other_instance",
    "client_result_same_instance",
    "client_result_unknown_connection",
    "client_result_remote_connection_disconnects",
)


@pytest.fixture(scope="module")
def cluster_run(cluster: Cluster) -> ScenarioRun:
    run = run_scenario("cluster.cjs", [*cluster.urls, str(ACK_TIMEOUT)])
    run.context = cluster.logs() if any(not c.get("ok") for c in run.checks.values()) else ""
    return run


@needs_node
@pytest.mark.parametrize("check", CLUSTER_CHECKS)
def test_cluster(cluster_run: ScenarioRun, check: str) -> None:
    cluster_run.require(check)


@needs_node
def test_cluster_reports_nothing_unexpected(cluster_run: ScenarioRun) -> None:
    assert set(cluster_run.checks) == set(CLUSTER_CHECKS), cluster_run.stderr
    assert not cluster_run.stray, cluster_run.stray


# ====================================================================================================
# 4. Negotiate on one instance, transport on another (no sticky sessions)
# ====================================================================================================


class RawHub:
    """A minimal JSON-protocol hub client over a raw WebSocket."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending: list[dict[str, Any]] = []
        self.ids = 0

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        while not self.pending:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            text = data.decode() if isinstance(data, bytes) else data
            self.pending.extend(json.loads(part) for part in text.split("\x1e") if part)
        return self.pending.pop(0)

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            message = await self.next(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message

    async def invoke(self, target: str, *args: Any, timeout: float = 5.0) -> Any:
        self.ids += 1
        invocation_id = str(self.ids)
        frame = {"type": 1, "invocationId": invocation_id, "target": target, "arguments": list(args)}
        await self.ws.send(json.dumps(frame) + "\x1e")
        reply = await self.until(
            lambda m: m.get("type") == 3 and m.get("invocationId") == invocation_id, timeout
        )
        assert "error" not in reply, reply
        return reply.get("result")


def ws_url(base: str, query: str) -> str:
    return base.replace("http://", "ws://", 1) + f"/hub?{query}"


async def negotiate(base: str, version: int | None) -> dict[str, Any]:
    url = f"{base}/hub/negotiate" + ("" if version is None else f"?negotiateVersion={version}")
    async with httpx.AsyncClient() as http:
        response = await http.post(url, timeout=5)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@contextlib.asynccontextmanager
async def open_hub(base: str, token: str) -> Any:
    async with ws_connect(ws_url(base, f"id={token}"), open_timeout=5, close_timeout=2) as ws:
        await ws.send('{"protocol":"json","version":1}\x1e')
        hub = RawHub(ws)
        handshake = await hub.next()
        assert handshake == {}, handshake
        yield hub


async def refused_status(base: str, token: str) -> int | str:
    """The HTTP status a WebSocket request with ``id=token`` is refused with (or "accepted")."""
    try:
        async with ws_connect(ws_url(base, f"id={token}"), open_timeout=5, close_timeout=1):
            return "accepted"
    except InvalidStatus as exc:
        return exc.response.status_code


def pid_of(base: str) -> int:
    return int(httpx.get(f"{base}/whoami", timeout=5).text)


async def takeover_roundtrip(cluster: Cluster, version: int | None) -> None:
    a, b, c = cluster.urls
    body = await negotiate(a, version)
    if version == 1:
        assert body["negotiateVersion"] == 1
        token = body["connectionToken"]
        assert token != body["connectionId"]
    else:
        assert "connectionToken" not in body, body
        token = body["connectionId"]
    assert any(t["transport"] == "WebSockets" for t in body["availableTransports"]), body
    async with open_hub(b, token) as hub:
        me = await hub.invoke("Whoami")
        assert me == {"connectionId": body["connectionId"], "pid": pid_of(b)}
        # the taken-over connection is a full member of the app: reached from the third instance...
        async with httpx.AsyncClient() as http:
            assert (await http.post(f"{c}/publish/takeover-{version}", timeout=5)).status_code == 200
        message = await hub.until(lambda m: m.get("type") == 1)
        assert message["target"] == "Message" and message["arguments"] == ["http", f"takeover-{version}"]
        # ...and reachable by its id from the instance that negotiated it
        async with open_hub(a, (await negotiate(a, 1))["connectionToken"]) as other:
            await other.invoke("SendClient", body["connectionId"], "direct")
            message = await hub.until(lambda m: m.get("type") == 1)
            assert message["arguments"] == ["client", "direct"]
        # the token is in use: a second WebSocket with it on the same instance is refused
        assert await refused_status(b, token) == 409


async def test_negotiate_v1_on_one_instance_websocket_on_another(cluster: Cluster) -> None:
    await takeover_roundtrip(cluster, 1)


async def test_negotiate_v0_on_one_instance_websocket_on_another(cluster: Cluster) -> None:
    await takeover_roundtrip(cluster, None)


async def test_forged_and_garbled_tokens_get_404_on_another_instance(cluster: Cluster) -> None:
    a, b, _ = cluster.urls
    v1 = await negotiate(a, 1)
    v0 = await negotiate(a, None)
    token, cid0 = v1["connectionToken"], v0["connectionId"]

    def flip(text: str, at: int) -> str:
        return text[:at] + ("A" if text[at] != "A" else "B") + text[at + 1 :]

    forged = {
        "v1 token, one char changed in the id": flip(token, 3),
        "v1 token, one char changed in the mac": flip(token, 40),
        "v1 public connectionId used as token": v1["connectionId"],
        "v0 id, one char changed": flip(cid0, 8),
        "random 48 chars": base64.urlsafe_b64encode(os.urandom(36)).decode(),
        "random 22 chars": base64.urlsafe_b64encode(os.urandom(16)).decode().rstrip("="),
        "not base64": "!!not-a-token!!",
        "truncated v1 token": token[:-1],
    }
    statuses = {what: await refused_status(b, value) for what, value in forged.items()}
    assert statuses == dict.fromkeys(forged, 404)
    # the genuine ones still work afterwards (they were not consumed by the forgeries)
    for genuine in (token, cid0):
        async with open_hub(b, genuine) as hub:
            assert (await hub.invoke("Whoami"))["pid"] == pid_of(b)


async def test_expired_and_self_signed_tokens(cluster: Cluster, redis_client: redis.Redis) -> None:
    """Tokens are signed with the key the instances agreed on in Redis and expire."""
    _, b, _ = cluster.urls
    stored = redis_client.get(f"{cluster.prefix}hubwire:internal:token-key")
    assert stored, "no shared token key under the app's prefix"
    issuer = TokenIssuer(base64.b64decode(stored))
    # signed with the app's key and fresh: accepted (the key in Redis is the one in use)
    cid, fresh = issuer.issue(1)
    async with open_hub(b, fresh) as hub:
        assert (await hub.invoke("Whoami"))["connectionId"] == cid
    # signed with the app's key but issued long ago: refused
    _, old = issuer.issue(1, now=time.time() - 3600)
    _, old0 = issuer.issue(0, now=time.time() - 3600)
    # signed with another key: refused
    _, foreign = TokenIssuer(os.urandom(32)).issue(1)
    assert [await refused_status(b, t) for t in (old, old0, foreign)] == [404, 404, 404]


@pytest.fixture(scope="module")
def no_sticky_run(cluster: Cluster) -> ScenarioRun:
    run = run_scenario("no_sticky.cjs", cluster.urls)
    run.context = cluster.logs() if any(not c.get("ok") for c in run.checks.values()) else ""
    return run


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "no_sticky_negotiate_and_websocket_on_different_instances",
        "no_sticky_invocations_served_by_websocket_instance",
        "no_sticky_broadcast_reaches_proxied_clients_once",
        "no_sticky_client_and_user_sends",
    ],
)
def test_js_client_behind_round_robin_proxy(no_sticky_run: ScenarioRun, check: str) -> None:
    no_sticky_run.require(check)


@pytest.mark.parametrize("version", [1, None])
async def test_a_started_connection_cannot_be_started_again_elsewhere(
    cluster: Cluster, version: int | None
) -> None:
    """A replayed token (still within its validity) is refused by every other instance: starts are claimed."""
    a, b, c = cluster.urls
    body = await negotiate(a, version)
    token = body["connectionToken"] if version == 1 else body["connectionId"]
    async with open_hub(b, token) as hub:
        assert (await hub.invoke("Whoami"))["connectionId"] == body["connectionId"]
        assert await refused_status(c, token) == 409
        assert await refused_status(a, token) == 409
    # after it ended, the token stays spent everywhere (no second connection with that id)
    assert await refused_status(c, token) in (404, 409)


@pytest.fixture(scope="module")
def http_no_sticky_run(cluster: Cluster) -> ScenarioRun:
    run = run_scenario("http_no_sticky.cjs", cluster.urls)
    run.context = cluster.logs() if any(not c.get("ok") for c in run.checks.values()) else ""
    return run


@needs_node
@pytest.mark.parametrize("mode", ["longpolling_json", "longpolling_messagepack", "sse_json"])
@pytest.mark.parametrize(
    "check",
    [
        "connect_through_round_robin",
        "invocations_answered_by_owner",
        "broadcast_once",
        "group_and_client_sends",
        "stop_ends_the_connection",
    ],
)
def test_http_transports_behind_round_robin_proxy(
    http_no_sticky_run: ScenarioRun, mode: str, check: str
) -> None:
    """SSE and long polling with every request on the next instance: relayed to the connection's owner."""
    http_no_sticky_run.require(f"{mode}_{check}")


# ====================================================================================================
# 5. Two apps (two channel prefixes) on one Redis
# ====================================================================================================


@pytest.fixture(scope="module")
def isolation_run(cluster: Cluster, app2: Cluster, redis_client: redis.Redis) -> ScenarioRun:
    def on_event(event: str, data: dict[str, Any], checks: Checks) -> None:
        assert event == "connected", event

        def channels() -> str:
            names = set(redis_client.pubsub_channels("*"))
            for app, other, ids in ((cluster, app2, data["app1"]), (app2, cluster, data["app2"])):
                for cid in ids:
                    assert app.channel(f"connection:{cid}") in names
                    # no channel of the other app, nor any channel outside both prefixes, carries it
                    strays = {n for n in names if cid in n} - {app.channel(f"connection:{cid}")}
                    assert not strays, strays
                    assert other.channel(f"connection:{cid}") not in names
            return f"{len(names)} channels"

        def counts() -> str:
            got = numsub(
                redis_client,
                cluster.channel("all"),
                app2.channel("all"),
                cluster.channel(f"group:{data['group']}"),
                app2.channel(f"group:{data['group']}"),
                cluster.channel(f"user:{data['user']}"),
                app2.channel(f"user:{data['user']}"),
            )
            assert list(got.values()) == [3, 2, 3, 2, 3, 2], got
            return json.dumps(got)

        record(checks, "isolation_pubsub_channels_carry_each_apps_prefix_only", channels)
        record(checks, "isolation_pubsub_numsub_per_app", counts)

    run = run_scenario("isolation.cjs", [",".join(cluster.urls), ",".join(app2.urls)], on_event)
    if any(not c.get("ok") for c in run.checks.values()):
        run.context = cluster.logs() + "\n" + app2.logs()
    return run


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "isolation_setup",
        "isolation_pubsub_channels_carry_each_apps_prefix_only",
        "isolation_pubsub_numsub_per_app",
        "isolation_publish_in_app1_stays_in_app1",
        "isolation_publish_in_app2_stays_in_app2",
        "isolation_same_group_name_stays_in_app",
        "isolation_same_user_name_stays_in_app",
        "isolation_connection_of_other_app_unreachable",
    ],
)
def test_prefix_isolation(isolation_run: ScenarioRun, check: str) -> None:
    isolation_run.require(check)


async def test_token_of_one_app_refused_by_the_other(
    cluster: Cluster, app2: Cluster, redis_client: redis.Redis
) -> None:
    body = await negotiate(cluster.urls[0], 1)
    assert await refused_status(app2.urls[0], body["connectionToken"]) == 404
    v0 = await negotiate(cluster.urls[0], None)
    assert await refused_status(app2.urls[1], v0["connectionId"]) == 404
    # and the other way round
    body2 = await negotiate(app2.urls[1], 1)
    assert await refused_status(cluster.urls[2], body2["connectionToken"]) == 404
    # control: the same token is good on another instance of its own app
    async with open_hub(cluster.urls[1], body["connectionToken"]) as hub:
        assert (await hub.invoke("Whoami"))["connectionId"] == body["connectionId"]
    keys = [redis_client.get(f"{app.prefix}hubwire:internal:token-key") for app in (cluster, app2)]
    assert all(keys) and keys[0] != keys[1]


# ====================================================================================================
# 8. Subscriptions follow membership and do not leak
# ====================================================================================================


@pytest.fixture(scope="module")
def leak_run(cluster: Cluster, redis_client: redis.Redis) -> ScenarioRun:
    def subs(data: dict[str, Any]) -> dict[str, int]:
        got = numsub(
            redis_client,
            cluster.channel(f"group:{data['group']}"),
            cluster.channel(f"group:{data['remoteGroup']}"),
            cluster.channel(f"user:{data['user']}"),
            *(cluster.channel(f"connection:{cid}") for cid in data["ids"]),
        )
        return dict(
            zip(["group", "remote_group", "user", "l1a", "l1b", "l2", "l3"], got.values(), strict=True)
        )

    def on_event(event: str, data: dict[str, Any], checks: Checks) -> None:
        if event == "joined":
            # one subscription per instance with members (l1a and l1b share instance 1's)
            want = {"group": 3, "remote_group": 2, "user": 3, "l1a": 1, "l1b": 1, "l2": 1, "l3": 1}
            record(
                checks,
                "leak_channels_subscribed_while_members_connected",
                lambda: assert_equal(subs(data), want),
            )
        elif event == "one_left":
            record(
                checks,
                "leak_group_kept_while_a_local_member_remains",
                lambda: assert_equal(subs(data)["group"], 3),
            )
        elif event == "instance1_left":
            # the instance unsubscribes when it has processed the disconnect: poll, bounded
            record(
                checks,
                "leak_group_unsubscribed_when_last_local_member_leaves",
                lambda: wait_until(
                    lambda: subs(data)["group"] == 2, 5.0, "group channel released", lambda: subs(data)
                ),
            )
        elif event == "stopped":
            zero = dict.fromkeys(["group", "remote_group", "user", "l1a", "l1b", "l2", "l3"], 0)

            def released() -> str:
                seconds = wait_until(
                    lambda: subs(data) == zero, 5.0, "all channels released", lambda: subs(data)
                )
                leftovers = [
                    n
                    for n in redis_client.pubsub_channels(f"{cluster.prefix}*connection*")
                    if any(cid in n for cid in data["ids"])
                ]
                assert leftovers == []
                base = numsub(redis_client, cluster.channel("all"), cluster.channel("internal:groups"))
                assert list(base.values()) == [3, 3], base
                return f"released within {seconds:.2f}s"

            record(checks, "leak_all_channels_released_after_disconnect", released)

    run = run_scenario("leak.cjs", cluster.urls, on_event)
    run.context = cluster.logs() if any(not c.get("ok") for c in run.checks.values()) else ""
    return run


def assert_equal(actual: object, expected: object) -> None:
    assert actual == expected, f"expected {expected!r}, got {actual!r}"


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "leak_setup",
        "leak_channels_subscribed_while_members_connected",
        "leak_group_kept_while_a_local_member_remains",
        "leak_group_unsubscribed_when_last_local_member_leaves",
        "leak_all_channels_released_after_disconnect",
    ],
)
def test_subscriptions_do_not_leak(leak_run: ScenarioRun, check: str) -> None:
    leak_run.require(check)


# ====================================================================================================
# 6, 7, 9. Destructive: each with its own killable redis-server and instances
# ====================================================================================================


def wait_degraded(group: Cluster, checks: Checks) -> None:
    def detected() -> str:
        seconds = wait_until(
            lambda: all(
                not h["publisher_connected"] and not h["subscriber_connected"] for h in group.health()
            ),
            10.0,
            "every instance to report the outage",
            group.health,
        )
        return f"{seconds:.2f}s"

    record(checks, "outage_detected_by_every_instance", detected)


def run_fault_scenario(
    script: str,
    n: int,
    args: Callable[[Cluster], list[str]],
    on_event: Callable[[str, RedisServer, Cluster, Checks], None],
    envs: list[dict[str, str]] | None = None,
) -> ScenarioRun:
    """Own redis-server + ``n`` instances, run the script, stop everything, return the results."""
    private = RedisServer()  # like the private_redis fixture, at module scope: killable, restartable
    group: Cluster | None = None
    try:
        group = Cluster(private.url, new_prefix("fault"), n, envs=envs)
        run = run_scenario(script, args(group), lambda ev, data, checks: on_event(ev, private, group, checks))
        if any(not c.get("ok") for c in run.checks.values()):
            run.context = group.logs()
        return run
    finally:
        if group is not None:
            group.close()
        private.close()


def kill_and_restart(event: str, private: RedisServer, group: Cluster, checks: Checks) -> None:
    if event == "kill_redis":
        private.kill()
        wait_degraded(group, checks)
    elif event == "restart_redis":
        private.start()
    else:
        raise AssertionError(f"unexpected step {event}")


@pytest.fixture(scope="module")
def outage_run() -> ScenarioRun:
    return run_fault_scenario(
        "outage.cjs", 3, lambda g: g.urls, kill_and_restart, envs=[{"SCALEOUT_ASK_TIMEOUT": "1"}]
    )


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "outage_setup",
        "outage_detected_by_every_instance",
        "outage_http_publish_returns_during_outage",
        "outage_sender_clients_get_sends_at_once",
        "outage_local_clients_served_during_outage",
        "outage_client_result_times_out_during_outage",
        "outage_health_shows_buffered",
        "outage_buffered_messages_arrive_in_order_exactly_once",
        "outage_client_result_requested_during_outage_completes",
        "outage_cross_instance_traffic_recovers",
        "outage_health_after_recovery",
    ],
)
def test_redis_outage(outage_run: ScenarioRun, check: str) -> None:
    outage_run.require(check)


@pytest.fixture(scope="module")
def client_kill_run() -> ScenarioRun:
    def on_event(event: str, private: RedisServer, group: Cluster, checks: Checks) -> None:
        assert event == "kill_pubsub", event
        client = redis.Redis.from_url(private.url)
        try:
            killed = client.client_kill_filter(_type="pubsub")
        finally:
            client.close()

        def reconnected() -> str:
            assert killed == 3, f"CLIENT KILL TYPE pubsub killed {killed} clients, expected 3 subscribers"
            seconds = wait_until(
                lambda: all(
                    h["subscriber_reconnects"] >= 1 and h["subscriber_connected"] for h in group.health()
                ),
                5.0,
                "every subscriber to reconnect",
                group.health,
            )
            return f"{killed} subscribers killed, all back within {seconds:.2f}s"

        record(checks, "client_kill_every_subscriber_reconnects", reconnected)

    return run_fault_scenario("clientkill.cjs", 3, lambda g: g.urls, on_event)


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "client_kill_setup",
        "client_kill_every_subscriber_reconnects",
        "client_kill_publish_reaches_all_clients_again",
        "client_kill_group_user_connection_subscriptions_renewed",
        "client_kill_health_after",
    ],
)
def test_client_kill_pubsub(client_kill_run: ScenarioRun, check: str) -> None:
    client_kill_run.require(check)


@pytest.fixture(scope="module")
def overflow_run() -> ScenarioRun:
    return run_fault_scenario(
        "overflow.cjs",
        2,
        lambda g: [*g.urls, str(OVERFLOW_TOTAL), str(OVERFLOW_BUFFER)],
        kill_and_restart,
        envs=[{"HUBWIRE_BACKPLANE_BUFFER": str(OVERFLOW_BUFFER)}],
    )


@needs_node
@pytest.mark.parametrize(
    "check",
    [
        "overflow_setup",
        "outage_detected_by_every_instance",
        "overflow_health_counts_drops",
        "overflow_remote_clients_get_the_last_buffer_messages_in_order",
        "overflow_sender_clients_get_every_message",
        "overflow_health_after_recovery",
    ],
)
def test_buffer_overflow(overflow_run: ScenarioRun, check: str) -> None:
    overflow_run.require(check)


# ====================================================================================================
# Beyond the list: Redis restarts lose the token key; a frozen Redis (stalled sockets)
# ====================================================================================================


async def test_token_key_survives_redis_restart(private_redis: RedisServer) -> None:
    """Redis restarted without persistence forgets the agreed token key; the running instances put it
    back, so an instance started afterwards accepts their tokens (and they accept its tokens)."""
    old = Cluster(private_redis.url, new_prefix("tk"), 2)
    try:
        private_redis.kill()
        private_redis.start()
        key = f"{old.prefix}hubwire:internal:token-key"
        client = redis.Redis.from_url(private_redis.url)
        try:
            wait_until(
                lambda: client.exists(key) == 1, 10.0, "the token key to be restored", lambda: old.health()
            )
        finally:
            client.close()
        new = Cluster(private_redis.url, old.prefix, 1)
        try:
            body = await negotiate(old.urls[0], 1)
            async with open_hub(new.urls[0], body["connectionToken"]) as hub:
                assert (await hub.invoke("Whoami"))["connectionId"] == body["connectionId"]
            body = await negotiate(new.urls[0], 1)
            async with open_hub(old.urls[1], body["connectionToken"]) as hub:
                assert (await hub.invoke("Whoami"))["connectionId"] == body["connectionId"]
        finally:
            new.close()
    finally:
        old.close()


async def test_frozen_redis_detected_and_nothing_lost(private_redis: RedisServer) -> None:
    """SIGSTOP on redis-server: sockets stay open but nothing answers. Every instance's watchdog
    notices (stalls_detected); the sending instance's own client gets the messages sent meanwhile at
    once, the other instance's client once, in order, after SIGCONT."""
    group = Cluster(private_redis.url, new_prefix("frozen"), 2)
    assert private_redis.proc is not None
    pid = private_redis.proc.pid
    frozen = False
    try:
        hubs = []
        async with contextlib.AsyncExitStack() as stack:
            for url in group.urls:
                hub = await stack.enter_async_context(
                    open_hub(url, (await negotiate(url, 1))["connectionToken"])
                )
                await hub.invoke("Whoami")
                hubs.append(hub)
            os.kill(pid, signal.SIGSTOP)
            frozen = True
            async with httpx.AsyncClient() as http:
                for i in range(3):
                    assert (
                        await http.post(f"{group.urls[0]}/publish/frozen-{i}", timeout=2)
                    ).status_code == 200
            want = [["http", f"frozen-{n}"] for n in range(3)]
            # instance 1 delivered its sends to its own client when they were made
            got = [(await hubs[0].until(lambda m: m.get("type") == 1, 1.0))["arguments"] for _ in range(3)]
            assert got == want, f"instance 1, while Redis is frozen: {got}"
            await asyncio.to_thread(
                wait_until,
                lambda: all(h["stalls_detected"] >= 1 for h in group.health()),
                10.0,
                "every instance to detect the stall",
                group.health,
            )
            with pytest.raises(TimeoutError):
                early = await hubs[1].until(lambda m: m.get("type") == 1, 0.1)
                pytest.fail(f"instance 2 got a message while Redis is frozen: {early}")
            os.kill(pid, signal.SIGCONT)
            frozen = False
            got = [(await hubs[1].until(lambda m: m.get("type") == 1, 15.0))["arguments"] for _ in range(3)]
            assert got == want, f"instance 2: {got}"
            for hub in hubs:
                with pytest.raises(TimeoutError):
                    extra = await hub.until(lambda m: m.get("type") == 1, 0.3)
                    pytest.fail(f"duplicate or stray message: {extra}")
        health = group.health()
        assert all(h["state"] == "connected" and h["buffered"] == 0 for h in health), health
    except BaseException:
        print(group.logs())
        raise
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        group.close()
