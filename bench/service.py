"""What the connection service costs and saves: app-server memory and CPU apart from the client count.

    .venv/bin/python bench/service.py [--counts 1000,10000] [--broadcasts 300] [--echoes 2000]

One Redis, one node (``hubwire service``), one app server (``hubwire run
bench.servers.hubwire_app:app --service ...``) and, for the latency comparison, the same app served
directly (one plain hubwire instance). Clients are the raw WebSocket clients of bench/loadgen.py: they
get the node's URL and token from the app server's negotiate once, then connect to the node without
negotiating (as pysignalr does). For each client count the table shows:

- the app server's and the node's RSS with the clients idle (settled 15 s: the app server parks
  connections idle for 10 s), and their idle CPU; and
  the RSS of a plain instance holding as many clients itself (for comparison);
- broadcasts from two clients (``Broadcast(payload)``: the app server sends one frame to the node,
  the node delivers), 50 a second: the app server's CPU per broadcast (total, and beyond its idle
  rate) and the node's CPU per delivery, deliveries lost or duplicated;
- the echo round trip of one more client (an invocation answered by the hub, 1 at a time) through
  the service and against the plain instance, p50 / p99.

Then what waking a parked connection costs: another node and app server with
``HUBWIRE_SERVICE_AWAKE_MAX=1``, two clients calling in turn, so every call wakes its connection
and parks the other one: the round trip p50 / p99 and the app server's CPU per call, beside the
same with the default bound (both stay awake).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402 - after the path fix, as a script
    PY,
    LoadGen,
    Processes,
    Redis,
    cpu_seconds,
    free_port,
    rss_kb,
    split,
    wait_port,
)

KEY = "bench-service-access-key-0123456789abcdef"
#: the app server parks connections idle for 10 s: its RSS is read after that
PARKED_AFTER = 15.0
APP = "bench.servers.hubwire_app:app"


def start(procs: Processes, name: str, argv: list[str], env: dict[str, str]) -> tuple[int, int]:
    port = free_port()
    full = dict(os.environ, HUBWIRE_SERVICE_ACCESS_KEY=KEY, **env)
    full["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), full.get("PYTHONPATH", "")])
    proc = procs.start(
        name, [PY, "-m", "hubwire.cli", *argv, "--port", str(port), "--log-level", "warning"], env=full
    )
    wait_port(port, proc)
    return port, proc.pid


def negotiate(port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/hub/negotiate?negotiateVersion=1", method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        body: dict[str, Any] = json.loads(answer.read())
    return body


async def echo_rtts(port: int, path: str, count: int, clients: int = 1) -> list[float]:
    """Round trips (ms) of ``count`` invocations, one at a time, made in turn by ``clients`` fresh
    WebSockets."""
    import websockets

    async with contextlib.AsyncExitStack() as stack:
        sockets = []
        for _ in range(clients):
            ws = await stack.enter_async_context(
                websockets.connect(f"ws://127.0.0.1:{port}{path}", compression=None)
            )
            await ws.send('{"protocol":"json","version":1}\x1e')
            await ws.recv()  # the handshake answer
            sockets.append(ws)
        rtts = []
        for i in range(count):
            ws = sockets[i % clients]
            started = time.perf_counter()
            call = {"type": 1, "invocationId": str(i), "target": "ConnectionId", "arguments": []}
            await ws.send(json.dumps(call) + "\x1e")
            while True:
                records = str(await ws.recv()).split("\x1e")
                if any(r and json.loads(r).get("type") == 3 for r in records):
                    break
            rtts.append((time.perf_counter() - started) * 1000)
    return rtts


def churn(procs: Processes, redis: Redis, count: int) -> list[dict[str, Any]]:
    """Two clients calling in turn, with every call waking a parked connection and without."""
    rows = []
    for label, awake in (("awake (default bound)", ""), ("woken each call (bound 1)", "1")):
        prefix = f"bench-churn-{awake or 'default'}"
        node_port, _ = start(
            procs, f"churn-node-{awake}", ["service", "--redis", redis.url, "--channel-prefix", prefix], {}
        )
        env = {"HUBWIRE_SERVICE_AWAKE_MAX": awake} if awake else {}
        app_port, app_pid = start(
            procs, f"churn-app-{awake}", ["run", APP, "--service", f"http://127.0.0.1:{node_port}"], env
        )
        time.sleep(2.0)  # the app server links to the node
        path = "/client/?hub=BenchHub&access_token=" + negotiate(app_port)["accessToken"]
        asyncio.run(echo_rtts(node_port, path, 200, clients=2))  # warm up
        before = cpu_seconds([app_pid])
        rtts = asyncio.run(echo_rtts(node_port, path, count, clients=2))
        used = cpu_seconds([app_pid]) - before
        p50, p99 = quantiles(rtts)
        rows.append({"label": label, "p50": p50, "p99": p99, "app_us_per_call": used / count * 1e6})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def churn_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| two clients calling in turn | echo p50 / p99 ms | app server µs CPU / call |",
        "|---|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['p50']:.2f} / {r['p99']:.2f} | {r['app_us_per_call']:.0f} |")
    return "\n".join(lines)


def quantiles(rtts: list[float]) -> tuple[float, float]:
    points = statistics.quantiles(rtts, n=100)
    return points[49], points[98]


def settle_and_measure(pids: dict[str, int], seconds: float = 3.0) -> dict[str, float]:
    time.sleep(seconds)
    before = {k: cpu_seconds([p]) for k, p in pids.items()}
    time.sleep(5.0)
    out: dict[str, float] = {
        f"{k}_idle_cpu_pct": (cpu_seconds([p]) - before[k]) / 5.0 * 100 for k, p in pids.items()
    }
    out.update({f"{k}_rss_mb": rss_kb([p]) / 1024 for k, p in pids.items()})
    return out


def broadcasts(
    lg: LoadGen, pids: dict[str, int], count: int, phase: int, idle: dict[str, float], rate: float
) -> dict[str, float]:
    """Broadcasts through the service; the app server's CPU per broadcast is what it spent beyond
    its idle rate (measured just before) over the same time."""
    lg.all({"cmd": "begin", "phase": phase})
    before = {k: cpu_seconds([p]) for k, p in pids.items()}
    started = time.monotonic()
    # open loop at a fixed rate: the same time per broadcast whatever the client count, so the app
    # server's idle cost weighs the same on both rows
    sent = lg.first({"cmd": "send", "duration": 120, "count": count, "rate": rate, "senders": 2}, 150)["sent"]
    ends = lg.all({"cmd": "end", "sent": sent, "drain_timeout": 30}, 60)
    seconds = time.monotonic() - started
    used = {k: cpu_seconds([p]) - before[k] for k, p in pids.items()}
    delivered = sum(e["distinct"] for e in ends)
    app_net = max(0.0, used["app"] - idle["app_idle_cpu_pct"] / 100 * seconds)
    return {
        "sent": sent,
        "seconds": seconds,
        "delivered": delivered,
        "lost": sum(e["lost"] for e in ends),
        "dups": sum(e["dups"] for e in ends),
        "app_ms_per_broadcast": used["app"] / max(1, sent) * 1000,
        "app_net_ms_per_broadcast": app_net / max(1, sent) * 1000,
        "node_us_per_delivery": used["node"] / max(1, delivered) * 1e6,
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="hubwire-bench-service-"))
    procs = Processes(workdir)
    rows: list[dict[str, Any]] = []
    try:
        redis = Redis(procs, workdir)
        node_port, node_pid = start(
            procs, "node", ["service", "--redis", redis.url, "--channel-prefix", "bench"], {}
        )
        app_port, app_pid = start(
            procs, "app", ["run", APP, "--service", f"http://127.0.0.1:{node_port}"], {}
        )
        direct_port, direct_pid = start(procs, "direct", ["run", APP], {"HUBWIRE_SERVICE_URLS": ""})
        time.sleep(2.0)  # the app server links to the node
        redirect = negotiate(app_port)
        path = "/client/?hub=BenchHub&access_token=" + redirect["accessToken"]
        pids = {"app": app_pid, "node": node_pid}
        lg = LoadGen(procs, args.loadgens)
        lg_direct = LoadGen(procs, args.loadgens, tag="direct-loadgen")
        connected = direct_connected = 0
        for phase, count in enumerate(args.counts, start=1):
            jobs = split(count - connected, len(lg))
            lg.call(
                [
                    {"cmd": "connect", "kind": "signalr", "targets": [["127.0.0.1", node_port, path]],
                     "first": connected + first, "count": n, "concurrency": 200, "timeout": 60}
                    for first, n in jobs
                ],
                600,
            )  # fmt: skip
            connected = count
            row: dict[str, Any] = {"clients": count}
            row.update(settle_and_measure(pids, PARKED_AFTER))
            row.update(broadcasts(lg, pids, args.broadcasts, phase, row, args.rate))
            # the same clients held by a plain instance (it runs the hub and holds the sockets)
            lg_direct.call(
                [
                    {"cmd": "connect", "kind": "signalr", "targets": [["127.0.0.1", direct_port, "/hub"]],
                     "first": direct_connected + first, "count": n, "concurrency": 200, "timeout": 60}
                    for first, n in split(count - direct_connected, len(lg_direct))
                ],
                600,
            )  # fmt: skip
            direct_connected = count
            row["direct_rss_mb"] = settle_and_measure({"direct": direct_pid})["direct_rss_mb"]
            service = asyncio.run(echo_rtts(node_port, path, args.echoes))
            direct = asyncio.run(echo_rtts(direct_port, "/hub", args.echoes))
            row["echo_service_p50"], row["echo_service_p99"] = quantiles(service)
            row["echo_direct_p50"], row["echo_direct_p99"] = quantiles(direct)
            rows.append(row)
            print(json.dumps(row), flush=True)
        lg.close()
        lg_direct.close()
        if args.churn_calls:
            rows.append({"churn": churn(procs, redis, args.churn_calls)})
    finally:
        procs.stop_all()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | app server RSS MB | node RSS MB | plain instance RSS MB | app idle CPU % "
        "| app ms CPU / broadcast (beyond idle) | node µs CPU / delivery | lost / dup "
        "| echo p50 / p99 ms via service | echo p50 / p99 ms plain |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        if "churn" in r:
            continue
        lines.append(
            f"| {r['clients']:,} | {r['app_rss_mb']:.1f} | {r['node_rss_mb']:.1f} | {r['direct_rss_mb']:.1f} "
            f"| {r['app_idle_cpu_pct']:.1f} "
            f"| {r['app_ms_per_broadcast']:.3f} ({r['app_net_ms_per_broadcast']:.3f}) "
            f"| {r['node_us_per_delivery']:.2f} | {r['lost']} / {r['dups']} "
            f"| {r['echo_service_p50']:.2f} / {r['echo_service_p99']:.2f} "
            f"| {r['echo_direct_p50']:.2f} / {r['echo_direct_p99']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 10000])
    parser.add_argument("--broadcasts", type=int, default=300)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0, help="broadcasts per second")
    parser.add_argument("--loadgens", type=int, default=2)
    parser.add_argument("--churn-calls", type=int, default=2000, help="0: no wake-cost measurement")
    args = parser.parse_args()
    rows = run(args)
    print()
    print(table(rows))
    for r in rows:
        if "churn" in r:
            print()
            print(churn_table(r["churn"]))


if __name__ == "__main__":
    main()
