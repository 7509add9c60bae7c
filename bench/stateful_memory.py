"""Server memory per connection with stateful reconnect: idle, and holding N unacknowledged messages.

    .venv/bin/python -m bench.stateful_memory [--connections 2000] [--messages 100] [--size 100]

Starts ``hubwire run bench.servers.stateful_app:app`` (native serving) on a free loopback port and,
for each mode, opens the connections from this process with the ``websockets`` library (negotiate,
WebSocket, JSON handshake), reading everything and never acknowledging:

* ``plain``: negotiate without ``useStatefulReconnect``, handshake version 1 (today's connections);
* ``stateful``: ``useStatefulReconnect=true`` and handshake version 2 (the feature on).

It prints the server's RSS growth per connection when idle, then after ``--messages`` broadcasts of
``--size`` characters that nobody acknowledges (kept for the replay; a broadcast's bytes are shared
by every recipient, so what a connection pays per kept message is its bookkeeping). A fresh server
per mode; the machine's figures move by some percent between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "hubwire.cli", "run", "bench.servers.stateful_app:app", "--port", str(port)]
    proc = subprocess.Popen([*cmd, "--log-level", "warning"], cwd=ROOT, env=env, start_new_session=True)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start")


async def _open(http: httpx.AsyncClient, port: int, stateful: bool) -> ClientConnection:
    query = "negotiateVersion=1" + ("&useStatefulReconnect=true" if stateful else "")
    token = (await http.post(f"/hub/negotiate?{query}")).json()["connectionToken"]
    ws = await connect(f"ws://127.0.0.1:{port}/hub?id={token}", max_size=None, ping_interval=None)
    version = 2 if stateful else 1
    await ws.send(f'{{"protocol":"json","version":{version}}}\x1e')
    await ws.recv()  # the handshake response
    return ws


class _Count:
    """Invocations received by all clients; ``done`` is set once ``target`` arrived."""

    def __init__(self, target: int) -> None:
        self.value = 0
        self.target = target
        self.done = asyncio.Event()

    def add(self, n: int) -> None:
        self.value += n
        if self.value >= self.target:
            self.done.set()


async def _drain(ws: ClientConnection, count: _Count) -> None:
    with contextlib.suppress(Exception):
        async for frame in ws:
            count.add(str(frame).count('"type":1'))


async def _measure(port: int, stateful: bool, n: int, messages: int, size: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        base = (await http.get("/gc")).json()["rss_kb"]
        sockets: list[ClientConnection] = []
        for start in range(0, n, 100):
            batch = min(n, start + 100) - start
            sockets += await asyncio.gather(*(_open(http, port, stateful) for _ in range(batch)))
        count = _Count(n * messages)
        readers = [asyncio.create_task(_drain(ws, count)) for ws in sockets]
        await asyncio.sleep(1)  # let the handshakes' garbage go
        idle = (await http.get("/gc")).json()["rss_kb"]
        await http.post(f"/broadcast?count={messages}&size={size}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(count.done.wait(), 60)
        loaded = (await http.get("/gc")).json()["rss_kb"]
        for ws in sockets:
            await ws.close()
        for task in readers:
            task.cancel()
        return {
            "idle_kb_per_conn": (idle - base) / n,
            "kept_bytes_per_message_per_conn": (loaded - idle) * 1024 / (n * messages),
            "received": count.value,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=100)
    parser.add_argument("--size", type=int, default=100)
    args = parser.parse_args()
    for mode in ("plain", "stateful"):
        port = _free_port()
        proc = _start(port)
        try:
            stateful = mode == "stateful"
            result = asyncio.run(_measure(port, stateful, args.connections, args.messages, args.size))
        finally:
            proc.terminate()
            proc.wait(10)
        print(
            f"{mode:9} {args.connections} connections: idle {result['idle_kb_per_conn']:.2f} KB each; "
            f"after {args.messages} unacknowledged broadcasts of {args.size} characters "
            f"(+{result['kept_bytes_per_message_per_conn']:.1f} B per message per connection; "
            f"{result['received']} received)"
        )


if __name__ == "__main__":
    main()
