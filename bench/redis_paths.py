#!/usr/bin/env python3
"""Why hubwire keeps a hand-written Redis data path: redis-py's asyncio pub/sub and pipelines against it.

    .venv/bin/python -m bench.redis_paths                    # 200 B and 2 KB, 200k messages, 3 rounds
    .venv/bin/python -m bench.redis_paths --messages 50000 --repeat 1   # a quicker run

One private ``redis-server`` (free loopback port, never 6379; pub/sub output buffers unlimited), and
for every measurement a fresh worker process: only the measuring process's CPU counts
(``time.process_time()``, all its threads), and the other side runs in a separate process.

* **subscriber ingest**: the worker subscribes to one channel; a producer process then pushes
  ``--warmup`` + ``--messages`` PUBLISHes into Redis as fast as Redis takes them (pre-encoded,
  pipelined, raw socket). *backlog*: the subscriber is stopped (SIGSTOP) until the producer is done,
  so it then reads everything at its own speed; *live*: it reads while the producer runs. CPU and
  wall time from the last warm-up message to the last one; every payload's length is checked.
  Paths: redis-py's ``PubSub.get_message(timeout=None)`` loop, ``PubSub.listen()``,
  ``PubSub.run()`` with a handler registered on the channel; hubwire's ``RespConnection`` with an
  ``on_push`` handler; hubwire's whole ``RedisBus.subscribe`` path (link -> dispatch -> handler).
* **publisher**: the worker publishes ``--messages`` messages to a channel, batches of 1,000, one
  batch in flight (what the bus's links do). Paths: redis-py ``pipeline(transaction=False)``;
  hubwire's ``RespConnection.write_commands`` (one future per reply, gathered); hubwire's whole
  ``RedisBus.publish`` path (queue -> link -> answered; the last message of each batch asks for
  its receiver count, and the next batch waits for it). Nobody subscribes: Redis only answers.

Every worker runs on uvloop when it is installed (hubwire's server does), warms up with
``--warmup`` messages first, and is bounded in time. Each measurement is made ``--repeat`` times in
interleaved rounds; the report (markdown, to stdout) shows each cell's median round and the range.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.run import _child_setup

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), "-m", "bench.redis_paths", *sys.argv[1:]])
PY = sys.executable

#: how long one worker may take before the run is declared failed
WORKER_TIMEOUT = 300.0
BATCH = 1000
#: (path, payload size, results): subscriber rows hold (backlog, live), publisher rows one result
Row = tuple[str, int, tuple[dict[str, Any], ...]]

SUBSCRIBERS = {
    "redis-py get_message": "sub-redispy-get",
    "redis-py listen": "sub-redispy-listen",
    "redis-py run + handler": "sub-redispy-run",
    "hubwire RespConnection": "sub-resp",
    "hubwire RedisBus": "sub-bus",
}
PUBLISHERS = {
    "redis-py pipeline": "pub-redispy",
    "hubwire RespConnection": "pub-resp",
    "hubwire RedisBus": "pub-bus",
}


# -- workers (each in its own process) ----------------------------------------------------------


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Counter:
    """What every subscriber path does per message: count it and check its payload's length."""

    def __init__(self, warmup: int, messages: int, size: int) -> None:
        #: the window starts at this message (after the warm-up) and ends at the last one
        self.mark = max(1, warmup)
        self.total = warmup + messages
        self.size = size
        self.count = 0
        self.bad = 0
        self.first_wall = 0.0
        self.first_cpu = 0.0
        self.last_wall = 0.0
        self.last_cpu = 0.0
        self.done = asyncio.get_running_loop().create_future()

    def got(self, data: bytes) -> None:
        self.count += 1
        if self.count == self.mark:
            self.first_wall = time.perf_counter()
            self.first_cpu = time.process_time()
        if len(data) != self.size:
            self.bad += 1
        if self.count == self.total:
            self.last_wall = time.perf_counter()
            self.last_cpu = time.process_time()
            if not self.done.done():
                self.done.set_result(None)

    def result(self) -> dict[str, Any]:
        return {
            "messages": self.count,
            "bad": self.bad,
            "wall": self.last_wall - self.first_wall,
            "cpu": self.last_cpu - self.first_cpu,
            "counted": self.total - self.mark,
        }


async def _sub_redispy(cfg: dict[str, Any], counter: Counter) -> Callable[[], Awaitable[None]]:
    """Subscribe with redis-py; returns the coroutine function that reads until the last message."""
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=cfg["port"])
    pubsub = client.pubsub()
    channel = cfg["channel"].encode()
    kind = cfg["kind"]

    def handler(message: dict[str, Any]) -> None:
        counter.got(message["data"])

    if kind == "sub-redispy-run":
        await pubsub.subscribe(**{cfg["channel"]: handler})
    else:
        await pubsub.subscribe(channel)
    confirmed = await pubsub.get_message(timeout=5.0)
    if not confirmed or confirmed["type"] != "subscribe":
        raise RuntimeError(f"no subscribe confirmation: {confirmed!r}")

    async def read_get_message() -> None:
        while counter.count < counter.total:
            message = await pubsub.get_message(timeout=None)
            if message is not None and message["type"] == "message":
                counter.got(message["data"])

    async def read_listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                counter.got(message["data"])
                if counter.count >= counter.total:
                    return

    async def read_run() -> None:
        task = asyncio.get_running_loop().create_task(pubsub.run())
        try:
            await asyncio.wait({task, counter.done}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return {
        "sub-redispy-get": read_get_message,
        "sub-redispy-listen": read_listen,
        "sub-redispy-run": read_run,
    }[kind]


async def _sub_hubwire(cfg: dict[str, Any], counter: Counter) -> Callable[[], Awaitable[None]]:
    from hubwire.backplane.bus import RedisBus
    from hubwire.backplane.deployment import NodeSettings
    from hubwire.backplane.resp import RespConnection

    channel = cfg["channel"].encode()
    if cfg["kind"] == "sub-bus":
        # a long health timeout: the backlog mode stops this process for a while (SIGSTOP)
        bus = RedisBus(f"redis://127.0.0.1:{cfg['port']}/0", health_timeout=60.0)
        await bus.start()
        await bus.subscribe(cfg["channel"], lambda _channel, data: counter.got(data))
    else:
        confirmed = asyncio.get_running_loop().create_future()

        def on_push(reply: list[Any]) -> None:
            if reply[0] == b"message":
                counter.got(reply[2])
            elif reply[0] == b"subscribe" and not confirmed.done():
                confirmed.set_result(None)

        conn = await RespConnection.open(NodeSettings(port=cfg["port"]), on_push=on_push)
        conn.subscribed = True
        conn.write_commands([(b"SUBSCRIBE", channel)], expect_replies=False)
        await asyncio.wait_for(confirmed, 5.0)

    async def read() -> None:
        await counter.done

    return read


async def subscriber(cfg: dict[str, Any]) -> dict[str, Any]:
    counter = Counter(cfg["warmup"], cfg["messages"], cfg["size"])
    setup = _sub_redispy if cfg["kind"].startswith("sub-redispy") else _sub_hubwire
    read = await setup(cfg, counter)
    _say({"ready": True})
    await asyncio.wait_for(read(), WORKER_TIMEOUT)
    return counter.result()


async def _publish_redispy(cfg: dict[str, Any]) -> Callable[[int], Awaitable[None]]:
    from redis.asyncio import Redis

    client = Redis(host="127.0.0.1", port=cfg["port"])
    channel, payload = cfg["channel"].encode(), b"x" * cfg["size"]

    async def batch(n: int) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(n):
                pipe.publish(channel, payload)
            replies = await pipe.execute()
        if len(replies) != n:
            raise RuntimeError("missing replies")

    return batch


async def _publish_resp(cfg: dict[str, Any]) -> Callable[[int], Awaitable[None]]:
    from hubwire.backplane.deployment import NodeSettings
    from hubwire.backplane.resp import RespConnection

    conn = await RespConnection.open(NodeSettings(port=cfg["port"]))
    channel, payload = cfg["channel"].encode(), b"x" * cfg["size"]

    async def batch(n: int) -> None:
        futures = conn.write_commands([(b"PUBLISH", channel, payload) for _ in range(n)])
        await asyncio.gather(*futures)

    return batch


async def _publish_bus(cfg: dict[str, Any]) -> Callable[[int], Awaitable[None]]:
    from hubwire.backplane.bus import RedisBus

    bus = RedisBus(f"redis://127.0.0.1:{cfg['port']}/0", buffer_size=10 * BATCH)
    await bus.start()
    channel, payload = cfg["channel"], b"x" * cfg["size"]

    async def batch(n: int) -> None:
        publish = bus.publish
        for _ in range(n - 1):
            publish(channel, payload)
        last = publish(channel, payload, want_receivers=True)
        assert last is not None
        await last
        if bus.stats.dropped:
            raise RuntimeError("the bus dropped messages")

    return batch


async def publisher(cfg: dict[str, Any]) -> dict[str, Any]:
    setup = {"pub-redispy": _publish_redispy, "pub-resp": _publish_resp, "pub-bus": _publish_bus}
    batch = await setup[cfg["kind"]](cfg)

    async def run(total: int) -> None:
        sent = 0
        while sent < total:
            n = min(BATCH, total - sent)
            await batch(n)
            sent += n

    await asyncio.wait_for(run(cfg["warmup"]), WORKER_TIMEOUT)
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.wait_for(run(cfg["messages"]), WORKER_TIMEOUT)
    return {
        "messages": cfg["messages"],
        "counted": cfg["messages"],
        "bad": 0,
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
    }


def produce(cfg: dict[str, Any]) -> dict[str, Any]:
    """Push exactly ``total`` PUBLISHes, pipelined, at most two batches unanswered (no asyncio)."""
    import socket

    import hiredis

    total = cfg["warmup"] + cfg["messages"]
    command: Any = (b"PUBLISH", cfg["channel"].encode(), b"x" * cfg["size"])
    chunk = hiredis.pack_command(command) * BATCH
    reader = hiredis.Reader()
    sent = answered = 0
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", cfg["port"]), timeout=60) as sock:
        while answered < total:
            while sent < total and sent - answered < 2 * BATCH:
                n = min(BATCH, total - sent)
                sock.sendall(chunk if n == BATCH else chunk[: len(chunk) // BATCH * n])
                sent += n
            data = sock.recv(1 << 16)
            if not data:
                raise RuntimeError("redis closed the producer's connection")
            reader.feed(data)
            while reader.gets() is not False:
                answered += 1
    return {"produced": total, "rate": total / (time.perf_counter() - start)}


def worker_main(cfg: dict[str, Any]) -> None:
    if cfg["kind"] == "produce":
        _say(produce(cfg))
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main = subscriber if cfg["kind"].startswith("sub-") else publisher
    _say(asyncio.run(main(cfg)))


# -- the runner ---------------------------------------------------------------------------------


class Worker:
    """One worker process, answering JSON lines on stdout; its stderr goes to a log file."""

    def __init__(self, cfg: dict[str, Any], logdir: Path) -> None:
        self.cfg = cfg
        self.log_path = logdir / f"{cfg['channel'].replace(':', '-')}-{cfg['kind']}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "bench.redis_paths", "--worker", json.dumps(cfg)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=_child_setup,
            )

    def answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker {self.cfg['kind']} gave no answer within {timeout:g}s:\n{tail}")
        result: dict[str, Any] = json.loads(line)
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def measure(
    kind: str, size: int, args: argparse.Namespace, port: int, logdir: Path, backlog: bool = False
) -> dict[str, Any]:
    """One worker's measurement; ``backlog``: the subscriber is stopped (SIGSTOP) while the producer
    runs, so Redis holds every message and the subscriber then reads at its own full speed."""
    cfg = {
        "kind": kind,
        "size": size,
        "port": port,
        "channel": f"bench:paths:{kind}:{size}:{int(backlog)}",
        "messages": args.messages,
        "warmup": args.warmup,
    }
    worker = Worker(cfg, logdir)
    producer: Worker | None = None
    stopped = False
    try:
        if kind.startswith("sub-"):
            worker.answer(30.0)  # subscribed
            if backlog:
                os.kill(worker.proc.pid, signal.SIGSTOP)
                stopped = True
            producer = Worker({**cfg, "kind": "produce"}, logdir)
            produced = producer.answer(WORKER_TIMEOUT)
            if stopped:
                os.kill(worker.proc.pid, signal.SIGCONT)
                stopped = False
            result = worker.answer(WORKER_TIMEOUT)
            result["producer"] = produced
        else:
            result = worker.answer(WORKER_TIMEOUT)
        return result
    finally:
        if stopped:
            os.kill(worker.proc.pid, signal.SIGCONT)
        for w in (worker, producer):
            if w is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(10)
                w.stop()


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    from bench.run import free_port, wait_port

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (bench/setup.sh installs it with apt-get)")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(workdir), "--client-output-buffer-limit", "pubsub 0 0 0"]
    with open(workdir / "redis.log", "ab") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, preexec_fn=_child_setup
        )
    wait_port(port, proc)
    return proc, port


def versions() -> str:
    import hiredis
    import redis

    try:
        import uvloop

        loop = f"uvloop {getattr(uvloop, '__version__', '?')}"
    except ImportError:
        loop = "asyncio"
    server = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=False)
    server_version = next((w[2:] for w in server.stdout.split() if w.startswith("v=")), "?")
    return (
        f"Python {platform.python_version()}, redis-py {redis.__version__}, hiredis {hiredis.__version__}, "
        f"{loop}, redis-server {server_version}, {os.cpu_count()} cores"
    )


def _us(r: dict[str, Any]) -> float:
    return float(r["cpu"]) / float(r["counted"]) * 1e6


def _rate(r: dict[str, Any]) -> float:
    return float(r["counted"]) / float(r["wall"])


def _cpu(r: dict[str, Any]) -> str:
    """CPU µs per message of the median run, and the range over every round."""
    spread = r.get("all_us", [])
    if len(spread) < 2:
        return f"{_us(r):.2f}"
    return f"{_us(r):.2f} ({min(spread):.2f}-{max(spread):.2f})"


def report(sub: list[Row], pub: list[Row], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        f"## Redis data paths: {args.messages:,} messages per measurement (after {args.warmup:,} warm-up), "
        f"median of {args.repeat} rounds, {elapsed:.0f}s",
        "",
        versions() + ". CPU = `time.process_time()` of the measuring process only (the other side is "
        "another process). ÷ hand = CPU per message ÷ that of hubwire's `RespConnection` (same side, "
        "size, mode). CPU cells: the median round (its messages/s beside it), and in brackets the range "
        "over all rounds.",
        "",
    ]
    hand = {
        (side, size): results
        for side, rows in (("sub", sub), ("pub", pub))
        for name, size, results in rows
        if name == "hubwire RespConnection"
    }
    if sub:
        lines += [
            "**Subscriber ingest.** backlog: Redis holds every message before the subscriber reads "
            "(its full speed); live: a producer publishes as fast as it can while the subscriber "
            "reads (messages/s then cannot exceed the producer's, shown).",
            "",
            "| path | payload | backlog msg/s | backlog CPU µs/msg | ÷ hand | live msg/s | live CPU µs/msg "
            "| ÷ hand | producer msg/s (live) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, size, (backlog, live) in sub:
            hb, hl = hand[("sub", size)]
            lines.append(
                f"| {name} | {size} B | {_rate(backlog):,.0f} | {_cpu(backlog)} | "
                f"{_us(backlog) / _us(hb):.2f} | {_rate(live):,.0f} | {_cpu(live)} | "
                f"{_us(live) / _us(hl):.2f} | {live['producer']['rate']:,.0f} |"
            )
        lines.append("")
    if pub:
        lines += [
            "**Publisher.** Batches of 1,000 PUBLISHes, one batch in flight; nobody subscribed.",
            "",
            "| path | payload | msg/s | CPU µs/publish | ÷ hand |",
            "|---|---|---|---|---|",
        ]
        for name, size, (r,) in pub:
            (h,) = hand[("pub", size)]
            lines.append(f"| {name} | {size} B | {_rate(r):,.0f} | {_cpu(r)} | {_us(r) / _us(h):.2f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=200_000, help="measured messages per path and size")
    p.add_argument("--warmup", type=int, default=20_000, help="unmeasured messages before them")
    p.add_argument("--sizes", default="200,2000", help="payload bytes, comma-separated")
    p.add_argument("--sides", default="subscriber,publisher")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the table shows each cell's median run")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _checked(what: str, result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if result["bad"] or result["counted"] < args.messages - 1:
        raise RuntimeError(f"{what}: wrong messages: {result}")
    return result


def _median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The measurement with the median CPU per message (the table shows one real run, not a mix)."""
    ordered = sorted(results, key=_us)
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_us"] = [_us(r) for r in results]
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    sides = args.sides.split(",")
    # (side, path, kind, size, backlog): every round measures each once, so drift hits all alike
    plan = [
        (side, name, kind, size, backlog)
        for size in sizes
        for side, paths in (("subscriber", SUBSCRIBERS), ("publisher", PUBLISHERS))
        if side in sides
        for name, kind in paths.items()
        for backlog in ((True, False) if side == "subscriber" else (False,))
    ]
    measured: dict[tuple[str, str, int, bool], list[dict[str, Any]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="hubwire-redis-paths-"))
    redis_proc, port = start_redis(workdir)
    started = time.monotonic()
    try:
        for round_ in range(args.repeat):
            for side, name, kind, size, backlog in plan:
                what = f"{side} {name} {size} B{' backlog' if backlog else ''} (round {round_ + 1})"
                print(f"-- {what}", file=sys.stderr, flush=True)
                result = _checked(what, measure(kind, size, args, port, workdir, backlog), args)
                measured.setdefault((side, name, size, backlog), []).append(result)
    finally:
        redis_proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            redis_proc.wait(5)
        if redis_proc.poll() is None:
            redis_proc.kill()
            redis_proc.wait(5)
    shutil.rmtree(workdir, ignore_errors=True)
    sub: list[Row] = []
    pub: list[Row] = []
    for side, name, _kind, size, backlog in plan:
        if side == "subscriber" and backlog:
            both = (measured[(side, name, size, True)], measured[(side, name, size, False)])
            sub.append((name, size, tuple(_median(m) for m in both)))
        elif side == "publisher":
            pub.append((name, size, (_median(measured[(side, name, size, False)]),)))
    print(report(sub, pub, args, time.monotonic() - started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
