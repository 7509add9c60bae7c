"""Instance death: three instances on Redis behind the round-robin front, one killed (SIGKILL) or
stopped (SIGTERM).

Official JS clients (``withAutomaticReconnect()``, through Node) receive a stream of broadcasts and
group sends while one instance dies: its clients reconnect to the survivors and keep receiving
(their group membership comes back through the rejoin pattern: ``on_connected`` joins the group
named in the query string), the other clients do not miss a single message, and nothing of the
dead instance lingers in Redis: its subscriber connection is gone (Redis drops a client's
subscriptions when its socket closes, which the kernel does for a killed process) and the
channels subscribed are exactly what the live instances report needing. On SIGTERM the server closes
each WebSocket with the SignalR Close message "reconnect allowed" (checked on the wire too), so the
official client reconnects without an error.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from .conftest import RedisServer, ServerProcess
from .hwtools import APP, stats
from .nodeclients import node_clients, round_robin_front
from .rawhub import RawHub
from .requirements import NODE_CLIENT, requires

SCRIPT = Path(__file__).parent / "hardening" / "death.cjs"
CLIENTS = 12
PREFIX = "Death:"
HUB = f"{PREFIX}HardHub"
#: the serving mode of the instances ``hubwire run`` starts (its default, as ./run test's two passes set it)
SERVING = os.environ.get("HUBWIRE_SERVING", "native")

pytestmark = requires(*NODE_CLIENT)


@pytest.fixture
def front(start_server: Any, redis_server: RedisServer) -> Any:
    """Three instances (native serving) and the round-robin front before them."""
    instances: list[ServerProcess] = [
        start_server(APP, args=["--redis", redis_server.url, "--channel-prefix", PREFIX]) for _ in range(3)
    ]
    with round_robin_front([i.url for i in instances]) as url:
        yield instances, url


def _subscriptions(r: redis.Redis) -> dict[str, int]:
    """Every channel of this test's prefix with its subscriber count."""
    channels = [c.decode() for c in r.pubsub_channels(f"{PREFIX}*")]
    if not channels:
        return {}
    return {c.decode() if isinstance(c, bytes) else c: n for c, n in r.pubsub_numsub(*channels)}


def _missing(received: list[int], first: int, last: int) -> list[int]:
    got = set(received)
    return [seq for seq in range(first, last + 1) if seq not in got]


async def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait (bounded) for a condition of this test's own state."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


def _delivered(client: dict[str, Any], last: int) -> bool:
    """The client has the last broadcast and its group's last send (each stream arrives in order)."""
    group = client["group"]
    mine = [seq for seq in range(1, last + 1) if f"g{seq % 3}" == group]
    return last in client["broadcasts"] and (not mine or [group, mine[-1]] in client["groups"])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_one_instance_dies(front: Any, redis_server: RedisServer, sig: signal.Signals) -> None:
    instances, front_url = front
    survivor, _, victim = instances
    pids = {i.proc.pid for i in instances}
    r = redis.Redis.from_url(redis_server.url)
    async with (
        node_clients(SCRIPT, front_url, str(CLIENTS)) as clients,
        httpx.AsyncClient(base_url=survivor.url, timeout=5) as http,
    ):
        ready = await clients.wait_for("ready", 30)
        on = {c["client"]: c["pid"] for c in ready["clients"]}
        assert set(on.values()) == pids, f"the front spread the clients over {set(on.values())}"
        on_victim = {c for c, pid in on.items() if pid == victim.proc.pid}
        sent = 0
        stop = asyncio.Event()

        async def broadcaster() -> None:
            nonlocal sent
            while not stop.is_set():  # stops when told; each request is bounded by the client timeout
                seq = sent + 1
                assert (await http.post(f"/broadcast/{seq}")).status_code == 200
                assert (await http.post(f"/group/g{seq % 3}/{seq}")).status_code == 200
                sent = seq
                await asyncio.sleep(0.03)

        sender = asyncio.create_task(broadcaster())
        try:
            await _until(lambda: sent >= 20 or sender.done(), 15, "traffic before the death")
            killed_at = sent
            victim.kill(sig)  # SIGTERM: waits (bounded) for the graceful exit
            # uvicorn re-raises the signal once its graceful shutdown is over; -SIGKILL after a SIGTERM
            # would mean the shutdown hung and was cut short
            assert victim.proc.returncode == -sig
            back: dict[int, int] = {}
            lost_with: dict[int, str | None] = {}
            deadline = time.monotonic() + 30
            while set(back) != on_victim:
                event = await clients.next_event(max(0.01, deadline - time.monotonic()))
                if event["event"] == "reconnecting":
                    lost_with[event["client"]] = event["error"]
                elif event["event"] == "reconnected":
                    back[event["client"]] = event["pid"]
            assert set(back.values()) <= pids - {victim.proc.pid}
            assert set(lost_with) == on_victim
            # every client is connected again: the broadcast after the one that may be in flight is the
            # first that none may miss
            settled = sent + 2
            await _until(lambda: sent >= settled + 20 or sender.done(), 15, "traffic after the recovery")
        finally:
            stop.set()
            await asyncio.wait_for(sender, 10)
        last = sent
        if sig == signal.SIGKILL:
            # the socket just died: every client saw its connection fail
            assert all(error is not None for error in lost_with.values()), lost_with
        elif SERVING == "native":
            # the server's SignalR Close with "reconnect allowed" and no error: the client reconnects
            # without an error (ASGI serving: see test_sigterm_closes_websockets_reconnect_allowed)
            assert all(error is None for error in lost_with.values()), lost_with
        # deliveries in flight: ask until every client has the last broadcast and its group's last send
        report_deadline = time.monotonic() + 10
        while True:
            await clients.command("report")
            report = (await clients.wait_for("report", 10))["clients"]
            if all(_delivered(client, last) for client in report) or time.monotonic() > report_deadline:
                break
            await asyncio.sleep(0.1)
        assert len(report) == CLIENTS
        for client in report:
            number = client["client"]
            group = client["group"]
            group_seqs = [seq for name, seq in client["groups"] if name == group]
            assert all(name == group for name, _ in client["groups"]), client["groups"]
            mine = [seq for seq in range(1, last + 1) if f"g{seq % 3}" == group]
            if number in on_victim:
                assert client["reconnects"] >= 1
                assert client["pids"][-1] != victim.proc.pid
                # back on a survivor: every message since everyone was reconnected arrived
                assert _missing(client["broadcasts"], settled, last) == []
                assert [s for s in mine if s >= settled and s not in group_seqs] == []
            else:
                # the other clients did not notice: not one message missed, none twice, in order
                assert client["reconnects"] == 0
                assert client["broadcasts"] == list(range(1, last + 1))
                assert group_seqs == mine
        assert killed_at < settled <= last

        # Redis: the dead instance's subscriber is gone and so are all its subscriptions
        names = [c.get("name", "") for c in r.client_list()]
        assert sum(1 for n in names if n == "hubwire-sub") == 2, names
        live = [await stats(i.url) for i in instances[:2]]
        needed = sum(s["subscriptions"] for s in live)
        subscribed = _subscriptions(r)
        assert sum(subscribed.values()) == needed, (subscribed, live)
        connection_channels = [c for c in subscribed if c.startswith(f"{HUB}:connection:")]
        assert len(connection_channels) == CLIENTS
        assert all(subscribed[c] == 1 for c in connection_channels)
        for group in ("g0", "g1", "g2"):
            holders = {client["pids"][-1] for client in report if client["group"] == group}
            assert subscribed.get(f"{HUB}:group:{group}", 0) == len(holders), (group, subscribed)

        # everyone leaves: only the live instances' own channels remain
        await clients.command("stop")
        assert (await clients.wait_for("stopped", 15))["errors"] == []
    deadline = time.monotonic() + 10
    while True:
        subscribed = _subscriptions(r)
        leftovers = [c for c in subscribed if ":connection:" in c or ":group:" in c]
        live = [await stats(i.url) for i in instances[:2]]
        if not leftovers and sum(subscribed.values()) == sum(s["subscriptions"] for s in live):
            break
        assert time.monotonic() < deadline, (leftovers, subscribed, live)
        await asyncio.sleep(0.2)
    assert all(s["hub_connections"] == 0 for s in live)
    r.close()
    for instance in instances[:2]:
        assert "Traceback" not in instance.output(), instance.output()[-3000:]
    print(f"{sig.name}: died at broadcast {killed_at}, all back by {settled}, last {last}", file=sys.stderr)


@pytest.mark.parametrize("serving", ["native", "asgi"])
@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_sigterm_closes_websockets_reconnect_allowed(
    start_server: Any, serving: str, protocol: str
) -> None:
    """SIGTERM: every hub WebSocket gets the SignalR Close message with allowReconnect true (and no
    error), then the socket closes: clients reconnect, to another replica behind a balancer."""
    proc: ServerProcess = start_server(APP, args=["--serving", serving])
    hubs = [await RawHub.open(proc.url, protocol=protocol) for _ in range(2)]
    for hub in hubs:
        assert await hub.invoke("echo", "up") == "up"
    proc.proc.send_signal(signal.SIGTERM)
    expected = {"type": 7, "allowReconnect": True} if protocol == "json" else [7, None, True]
    for hub in hubs:
        assert await hub.expect_close_message(timeout=10) == expected
        await hub.expect_closed()
    await asyncio.to_thread(proc.proc.wait, 10)
