"""What stateful reconnect across instances costs: per delivery, per connection, per move.

    .venv/bin/python -m bench.durable_resume [--connections 500] [--messages 200] [--size 100]
                                            [--moves 50]

Starts a private ``redis-server`` and ``hubwire run bench.servers.stateful_app:app`` instances on
free loopback ports (native serving, Redis backplane). Stateful clients (``websockets``; negotiate
with ``useStatefulReconnect=true``, JSON handshake version 2) read everything and acknowledge what
they received every 100 ms, as the JS client does about once a second. Modes:

* ``redis``: the Redis backplane, stateful reconnect on, durable resume off (the default);
* ``durable``: ``HUBWIRE_DURABLE_RESUME=1`` (journal, record, channel histories).

For each mode it prints, for ``--messages`` broadcasts of ``--size`` characters to every client:
server CPU and Redis CPU per delivery, Redis commands per delivery, and Redis memory per idle
connection. Then, with two instances, ``--moves`` resumes of a dropped connection on the other
instance: the time from the new WebSocket's upgrade request to the replay's first byte (median and
p90) and the Redis commands per move. CPU comes from ``/proc`` (server) and ``INFO`` (Redis); the
machine's figures move by some percent between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"process on port {port} did not start")


def _redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*cmd, "--dir", workdir], stdout=subprocess.DEVNULL, start_new_session=True)
    _wait_port(port, proc)
    return proc


def _server(port: int, redis_url: str, prefix: str, durable: bool) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    if durable:
        env["HUBWIRE_DURABLE_RESUME"] = "1"
    cmd = [sys.executable, "-m", "hubwire.cli", "run", "bench.servers.stateful_app:app", "--port", str(port)]
    cmd += ["--redis", redis_url, "--channel-prefix", prefix, "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    _wait_port(port, proc)
    return proc


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _redis_commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


class _Client:
    """One stateful client: counts invocations, acknowledges them every 100 ms."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received = 0
        self.acked = 0

    async def run(self, total: list[int]) -> None:
        async def acker() -> None:
            while True:
                await asyncio.sleep(0.1)
                if self.received > self.acked:
                    self.acked = self.received
                    await self.ws.send(json.dumps({"type": 8, "sequenceId": self.acked}) + "\x1e")

        task = asyncio.create_task(acker())
        try:
            async for frame in self.ws:
                n = str(frame).count('"type":1,')
                self.received += n
                total[0] += n
        except Exception:
            pass
        finally:
            task.cancel()


async def _open(http: httpx.AsyncClient, port: int) -> tuple[ClientConnection, str]:
    token = (await http.post("/hub/negotiate?negotiateVersion=1&useStatefulReconnect=true")).json()[
        "connectionToken"
    ]
    ws = await connect(f"ws://127.0.0.1:{port}/hub?id={token}", max_size=None, ping_interval=None)
    await ws.send('{"protocol":"json","version":2}\x1e')
    await ws.recv()
    return ws, token


async def _deliveries(
    port: int, pid: int, rclient: redis.Redis, n: int, messages: int, size: int
) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        rss0 = (await http.get("/gc")).json()["rss_kb"]
        mem0 = int(rclient.info("memory")["used_memory"])
        clients: list[_Client] = []
        for start in range(0, n, 100):
            batch = min(n, start + 100) - start
            opened = await asyncio.gather(*(_open(http, port) for _ in range(batch)))
            clients += [_Client(ws) for ws, _ in opened]
        total = [0]
        tasks = [asyncio.create_task(c.run(total)) for c in clients]
        await asyncio.sleep(1.5)
        rss1 = (await http.get("/gc")).json()["rss_kb"]
        mem1 = int(rclient.info("memory")["used_memory"])
        durable_keys = [k for k in rclient.scan_iter(match="*hubwire:internal:record:*", count=1000)]
        durable_keys += [k for k in rclient.scan_iter(match="*hubwire:internal:journal:*", count=1000)]
        key_bytes = sum(int(rclient.memory_usage(k) or 0) for k in durable_keys)
        cpu0, rcpu0, cmd0 = _cpu(pid), _redis_cpu(rclient), _redis_commands(rclient)
        await http.post(f"/broadcast?count={messages}&size={size}")
        deadline = time.monotonic() + 120
        while total[0] < n * messages and time.monotonic() < deadline:  # noqa: ASYNC110 - a bench
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last acks and trims
        cpu1, rcpu1, cmd1 = _cpu(pid), _redis_cpu(rclient), _redis_commands(rclient)
        for c in clients:
            await c.ws.close()
        for t in tasks:
            t.cancel()
        deliveries = n * messages
        return {
            "received": total[0] / deliveries,
            "server_us": (cpu1 - cpu0) * 1e6 / deliveries,
            "redis_us": (rcpu1 - rcpu0) * 1e6 / deliveries,
            "redis_cmds": (cmd1 - cmd0) / deliveries,
            "redis_bytes_per_conn": (mem1 - mem0) / n,
            "durable_key_bytes_per_conn": key_bytes / n,
            "server_kb_per_conn": (rss1 - rss0) / n,
        }


async def _moves(ports: list[int], rclient: redis.Redis, moves: int) -> dict[str, float]:
    a, b = ports
    times: list[float] = []
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{a}", timeout=30) as http:
        commands = 0
        for _ in range(moves):
            ws, token = await _open(http, a)
            await ws.send('{"type":1,"invocationId":"1","target":"Ping","arguments":[]}\x1e')
            await ws.recv()
            ws.transport.abort()  # dropped without a close handshake
            await asyncio.sleep(0.05)
            c0 = _redis_commands(rclient)
            start = time.perf_counter()
            again = await connect(f"ws://127.0.0.1:{b}/hub?id={token}", max_size=None, ping_interval=None)
            await again.recv()  # the Sequence (and the replay)
            times.append((time.perf_counter() - start) * 1000)
            commands += _redis_commands(rclient) - c0 - 2  # minus this loop's two INFO calls
            await again.close()
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[int(len(times) * 0.9) - 1],
        "commands": commands / moves,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=500)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--moves", type=int, default=50)
    args = parser.parse_args()
    rport = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        rproc = _redis(rport, workdir)
        rclient = redis.Redis(port=rport)
        url = f"redis://127.0.0.1:{rport}"
        try:
            print(
                f"{args.connections} stateful connections acknowledging every 100 ms, "
                f"{args.messages} broadcasts of {args.size} characters"
            )
            print(
                f"{'mode':8} | {'server µs/delivery':>18} | {'Redis µs/delivery':>17} | "
                f"{'Redis cmds/delivery':>19} | {'Redis B/idle conn':>17} | "
                f"{'of it durable keys':>18} | {'server KB/idle conn':>19} | received"
            )
            for mode in ("redis", "durable"):
                port = _free_port()
                proc = _server(port, url, f"bench-{mode}:", mode == "durable")
                try:
                    r = asyncio.run(
                        _deliveries(port, proc.pid, rclient, args.connections, args.messages, args.size)
                    )
                finally:
                    proc.terminate()
                    proc.wait(10)
                print(
                    f"{mode:8} | {r['server_us']:18.1f} | {r['redis_us']:17.2f} | {r['redis_cmds']:19.3f} | "
                    f"{r['redis_bytes_per_conn']:17.0f} | {r['durable_key_bytes_per_conn']:18.0f} | "
                    f"{r['server_kb_per_conn']:19.2f} | {r['received']:.3f}"
                )
            print(f"\n{args.moves} resumes of a dropped connection on the other of two instances")
            print(f"{'mode':8} | {'upgrade to Sequence, median':>27} | {'p90':>8} | Redis commands per move")
            for mode in ("redis", "durable"):
                ports = [_free_port(), _free_port()]
                procs = [_server(p, url, f"bench-move-{mode}:", mode == "durable") for p in ports]
                try:
                    m = asyncio.run(_moves(ports, rclient, args.moves))
                finally:
                    for p in procs:
                        p.terminate()
                        p.wait(10)
                print(f"{mode:8} | {m['median_ms']:24.1f} ms | {m['p90_ms']:5.1f} ms | {m['commands']:.1f}")
        finally:
            rclient.close()
            rproc.terminate()
            rproc.wait(10)


if __name__ == "__main__":
    main()
