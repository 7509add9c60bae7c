#!/usr/bin/env python3
"""What a hub call costs hubwire's own code, without sockets: the rooms workload's per-message path
split from the event-loop wake-ups and socket I/O around it.

    .venv/bin/python -m bench.hub_path                 # in memory and over a private Redis, 5 rounds
    .venv/bin/python -m bench.hub_path --hubwire-src /tmp/old/src   # another hubwire, same script

One process (uvloop): a real ``HubConnectionHandler`` with the JSON and MessagePack protocols,
``--clients`` connections made through a ``ConnectionManager`` and handshaken, each outbox with a
sink that only takes the records (what ``DirectSink`` hands to ``transport.write``). Then, measured
with ``time.process_time()``:

* **join**: every client invokes ``JoinGroup("r<i // 4>")`` (acknowledged; rooms of 4);
* **group send**: one member of each room invokes ``GroupBroadcast(room, 200 characters)``
  (no invocation id, as the rooms bench sends), one message per event-loop pass; a room's 4 members
  each get the message (checked);
* **subscribe** (Redis only): 5,000 channels subscribed at once through the backplane's bus, each
  call waiting for Redis's confirmation, as a burst of connections (each subscribes its own
  channel) or of joins to new rooms does.

Lifetime managers: ``memory`` (the default one) and ``redis`` (``RedisBackplane`` on a private
``redis-server`` on a free loopback port, never 6379): there a send is also serialized for both
protocols into an envelope, published, answered, and its echo read back and recognised as this
instance's own. With Redis the sends are paced (1 ms apart, so each is published alone, as at a
low rate) and the CPU of the same pacing without sends is subtracted. Each cell is the best of
``--rounds`` rounds of ``--clients``/4 sends x 10.

Why: the rooms bench (``bench/run.py --phases rooms``) measures whole servers, where one client
message costs an instance ~300 µs of CPU; this tells how much of that is hubwire's hub path, so a
change to it can be measured alone (the in-memory cell repeats within a few per cent; the Redis
one, which includes a round trip to redis-server per send, within about 15 %). Receiving a remote
message is not measured here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOM = 4
PAYLOAD = "x" * 200
#: subscriptions made at once in the subscribe cell (Redis only)
SUBSCRIBE_BURST = 5_000
#: uvloop's timers count whole milliseconds: a shorter sleep does not pause at all
PACING = 0.001


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=400, help="connections (rooms of 4)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per cell (the best is shown)")
    p.add_argument("--managers", default="memory,redis", help="memory, redis or both")
    p.add_argument("--hubwire-src", type=Path, help="import hubwire from this source directory")
    args = p.parse_args(argv)
    if args.clients < ROOM or args.clients % ROOM:
        p.error(f"--clients: a multiple of {ROOM}")
    kinds = [k for k in args.managers.split(",") if k]
    if not kinds or set(kinds) - {"memory", "redis"} or len(set(kinds)) != len(kinds):
        p.error("--managers: memory, redis or memory,redis")
    args.managers = kinds
    return args


def _ignore(channel: bytes, data: bytes) -> None:
    pass


class _Sink:
    """Takes what the outbox hands over once per loop pass, as DirectSink does, and counts it."""

    def __init__(self) -> None:
        self.records = 0

    def flush(self, outbox: Any, memo: Any = None) -> None:
        self.records += len(outbox.take_nowait())

    def closed(self) -> None:
        pass


async def measure(kind: str, clients: int, rounds: int, redis_url: str | None) -> dict[str, float]:
    from hubwire import Hub, HubOptions
    from hubwire.connections.manager import ConnectionManager
    from hubwire.hubs.handler import HubConnectionHandler
    from hubwire.hubs.lifetime import InMemoryLifetimeManager
    from hubwire.protocol.json_protocol import JsonHubProtocol
    from hubwire.protocol.messagepack_protocol import MessagePackHubProtocol

    class BenchHub(Hub):
        async def join_group(self, name: str) -> None:
            await self.groups.add(self.context.connection_id, name)

        async def group_broadcast(self, name: str, payload: str) -> None:
            await self.clients.group(name).send("broadcast", payload)

    backplane: Any = None
    manager: Any
    if redis_url is not None:
        from hubwire.backplane.redis import RedisBackplane

        backplane = RedisBackplane(redis_url, "hubpath:")
        await backplane.start()
        manager = backplane.create_manager("BenchHub")
        await manager.start()
    else:
        manager = InMemoryLifetimeManager()
    protocols = [JsonHubProtocol(), MessagePackHubProtocol()]
    manager.protocols = tuple(protocols)
    handler = HubConnectionHandler(BenchHub, manager, protocols, HubOptions(), ["WebSockets"])
    connections = ConnectionManager()
    conns, sinks = [], []
    try:
        for _ in range(clients):
            conn = connections.create(1)
            sink = _Sink()
            conn.outbox.sink = sink  # type: ignore[assignment]
            await handler.on_connect(conn)
            await handler.on_receive(conn, b'{"protocol":"json","version":1}\x1e')
            conns.append(conn)
            sinks.append(sink)
        await asyncio.sleep(0.05)
        before = sum(s.records for s in sinks)
        t0 = time.process_time()
        for i, conn in enumerate(conns):
            frame = b'{"type":1,"invocationId":"%d","target":"JoinGroup","arguments":["r%d"]}\x1e'
            await handler.on_receive(conn, frame % (i, i // ROOM))
            if i % 50 == 49:
                await asyncio.sleep(0)
        deadline = time.monotonic() + 30
        while sum(s.records for s in sinks) - before < clients:  # every join acknowledged
            if time.monotonic() > deadline:
                raise SystemExit(f"{kind}: joins not acknowledged within 30 s")
            await asyncio.sleep(0.001)
        join_us = (time.process_time() - t0) / clients * 1e6
        frames = [
            b'{"type":1,"target":"GroupBroadcast","arguments":["r%d","%s"]}\x1e'
            % (i // ROOM, PAYLOAD.encode())
            for i in range(clients)
        ]
        pause = PACING if backplane is not None else 0.0
        sends = 10 * clients // ROOM

        async def run(send: bool) -> float:
            gc.collect()
            t = time.process_time()
            for _ in range(10):
                for i in range(0, clients, ROOM):
                    if send:
                        await handler.on_receive(conns[i], frames[i])
                    await asyncio.sleep(pause)
            await asyncio.sleep(0.05)
            return time.process_time() - t

        idle = min([await run(False) for _ in range(2)]) if backplane is not None else 0.0
        best = float("inf")
        for _ in range(rounds):
            before = sum(s.records for s in sinks)
            spent = await run(True)
            delivered = sum(s.records for s in sinks) - before
            if delivered != sends * ROOM:
                raise SystemExit(f"{kind}: {delivered} records delivered, expected {sends * ROOM}")
            best = min(best, (spent - idle) / sends * 1e6)
        subscribe = float("inf") if backplane is not None else float("nan")
        if backplane is not None:
            # what every connection (its own channel) and each room's first member here pays:
            # a burst of subscriptions, each waiting for Redis's confirmation
            for r in range(rounds):
                gc.collect()
                t = time.process_time()
                channels = (f"hubpath:burst:{r}:{i}" for i in range(SUBSCRIBE_BURST))
                await asyncio.gather(*(backplane.bus.subscribe(c, _ignore) for c in channels))
                subscribe = min(subscribe, (time.process_time() - t) / SUBSCRIBE_BURST * 1e6)
        return {"join": join_us, "send": best, "subscribe": subscribe}
    finally:
        for conn in conns:
            with contextlib.suppress(Exception):
                await handler.on_disconnect(conn, None)
        if backplane is not None:
            await manager.close()
            await backplane.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.hubwire_src is not None:
        sys.path.insert(0, str(args.hubwire_src.resolve()))
    import uvloop

    kinds: list[str] = args.managers
    results: dict[str, dict[str, float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="hubwire-hubpath-"))
    redis_proc = None
    try:
        for kind in kinds:
            url = None
            if kind == "redis":
                from bench.redis_paths import start_redis

                redis_proc, port = start_redis(workdir)
                url = f"redis://127.0.0.1:{port}/0"
            results[kind] = uvloop.run(measure(kind, args.clients, args.rounds, url))
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
                redis_proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    import hubwire

    print(
        f"hubwire from {Path(hubwire.__file__).parent}; {args.clients} clients, rooms of {ROOM}, "
        f"best of {args.rounds} rounds; CPU µs of this process"
    )
    print()
    print(
        f"| lifetime manager | join (acknowledged) | group send to 4 local members "
        f"| subscribe, {SUBSCRIBE_BURST:,} at once |"
    )
    print("|---|---:|---:|---:|")
    for kind, r in results.items():
        sub = "-" if r["subscribe"] != r["subscribe"] else f"{r['subscribe']:.1f}"  # NaN: in memory
        print(f"| {kind} | {r['join']:.1f} | {r['send']:.1f} | {sub} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
