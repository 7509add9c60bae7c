#!/usr/bin/env python3
"""Publish capacity and one instance's ingest on a Redis Cluster of 1 and 3 shards, through RedisBus.

    .venv/bin/python -m bench.shards                        # 1 shard, 3 shards, 3 shards classic; 10 s each
    .venv/bin/python -m bench.shards --seconds 3 --publishers 1   # a quick look

For each configuration a fresh cluster (``tests/redisdeploy.py``: redis-server processes on free
loopback ports, no replicas, pub/sub output buffers unlimited), then, each in its own process:

* ``--publishers`` K publishers: a ``RedisBus("redis+cluster://...")`` each, publishing
  ``--payload``-byte messages round-robin to ``--groups`` channels ``p:g:{i}`` (spread over all
  slots) for ``--seconds``, batches of 1,000, at most a few batches unanswered (closed loop: as fast
  as Redis answers). Messages/s = messages Redis answered / time until the last was answered.
* one subscriber, the ingest of one instance: a ``RedisBus`` subscribed to every ``--every``-th
  group (1/3 by default), counting what it reads; it must read exactly what was published to
  its channels.

Configurations: ``1`` (one master: every channel on it), ``3`` (three masters, sharded pub/sub:
SPUBLISH / SSUBSCRIBE, what the bus does on a cluster), and ``3c`` (three masters, classic pub/sub:
the same bus links switched to PUBLISH / SUBSCRIBE, to show what sharding avoids: a classic PUBLISH
is forwarded over the cluster bus to every node). Per node: CPU (utime+stime from /proc/<pid>/stat
over the publishing window), the PUBLISH / SPUBLISH commands it executed, and the publish messages it
got over the cluster bus from other nodes.

Everything runs on this machine: with 2 cores, the "3 shards" share the same 2 cores with the
publishers and the subscriber, so capacity numbers show CPU per message where the work is, not
what 3 machines would do. The report (markdown) goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.run import _child_setup

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), "-m", "bench.shards", *sys.argv[1:]])
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

BATCH = 1000
#: batches whose last message's answer is awaited later, per publisher
IN_FLIGHT = 4
#: at most this many messages queued in a publisher's bus (its links, one per node, each keep one
#: batch of up to 1,000 unanswered): enough that every link always has a full batch to write
QUEUED = 16 * 1000
#: how long a worker may take for a step (setup, draining) before the run fails
STEP_TIMEOUT = 60.0
CONFIGS = {"1": (1, False), "3": (3, False), "3c": (3, True)}


# -- workers ------------------------------------------------------------------------------------


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _line() -> str:
    """The runner's next command (a thread blocked in read costs no CPU)."""
    line: str = await asyncio.wait_for(asyncio.to_thread(sys.stdin.readline), STEP_TIMEOUT * 5)
    if not line:
        raise SystemExit("runner went away")
    return line.strip()


async def _bus(cfg: dict[str, Any], name: str) -> Any:
    from hubwire.backplane.bus import RedisBus

    bus = RedisBus(cfg["url"], buffer_size=1_000_000, buffer_bytes=1 << 30, health_timeout=30.0, name=name)
    await bus.start()
    if not bus.healthy:
        raise RuntimeError(f"bus not healthy: {bus.health()}")
    if cfg["classic"]:
        # the bench's own switch (not a hubwire option): the same links, classic pub/sub commands
        for link in bus._links.values():
            link.publish_command, link.subscribe_command = b"PUBLISH", b"SUBSCRIBE"
            link.unsubscribe_command = b"UNSUBSCRIBE"
    return bus


async def publisher(cfg: dict[str, Any]) -> dict[str, Any]:
    bus = await _bus(cfg, f"pub{cfg['index']}")
    channels = [f"p:g:{i}" for i in range(cfg["groups"])]
    mine = [i % cfg["every"] == 0 for i in range(cfg["groups"])]
    payload = b"x" * cfg["payload"]
    _say({"ready": True})
    await _line()  # go
    wall, cpu = time.perf_counter(), time.process_time()
    deadline = time.monotonic() + cfg["seconds"]
    i = cfg["index"] * 7919 % cfg["groups"]  # publishers start at different groups
    sent = to_subscriber = 0
    inflight: list[asyncio.Future[int]] = []
    publish = bus.publish
    groups = cfg["groups"]
    while time.monotonic() < deadline:
        for _ in range(BATCH - 1):
            publish(channels[i], payload)
            to_subscriber += mine[i]
            i = (i + 1) % groups
        last = publish(channels[i], payload, want_receivers=True)
        assert last is not None
        to_subscriber += mine[i]
        i = (i + 1) % groups
        sent += BATCH
        inflight.append(last)
        # let the links write what is queued (awaiting a future that is done already would not)
        await asyncio.sleep(0)
        if len(inflight) >= IN_FLIGHT:
            await asyncio.wait_for(inflight.pop(0), STEP_TIMEOUT)
        for _ in range(int(STEP_TIMEOUT * 1000)):  # other nodes' links may lag behind the awaited one
            if bus.buffered <= QUEUED:
                break
            await asyncio.sleep(0.001)
    await asyncio.wait_for(asyncio.gather(*inflight), STEP_TIMEOUT)
    for _ in range(int(STEP_TIMEOUT * 1000)):
        if bus.buffered == 0:
            break
        await asyncio.sleep(0.001)
    result = {
        "sent": sent,
        "published": bus.stats.published,
        "to_subscriber": to_subscriber,
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "dropped": bus.stats.dropped,
        "errors": bus.stats.publish_errors,
    }
    await bus.close()
    return result


async def subscriber(cfg: dict[str, Any]) -> dict[str, Any]:
    bus = await _bus(cfg, "sub")
    received = 0
    target = 1 << 62
    enough = asyncio.Event()

    def handler(_channel: bytes, _data: bytes) -> None:
        nonlocal received
        received += 1
        if received >= target:
            enough.set()

    channels = [f"p:g:{i}" for i in range(0, cfg["groups"], cfg["every"])]
    await asyncio.gather(*(bus.subscribe(ch, handler) for ch in channels))
    _say({"ready": True, "channels": len(channels)})
    await _line()  # go
    wall, cpu = time.perf_counter(), time.process_time()
    target = int((await _line()).split()[1])  # "stop N": wait for N messages (bounded)
    if received >= target:
        enough.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), STEP_TIMEOUT)
    result = {
        "received": received,
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "reconnects": bus.stats.subscriber_reconnects,
    }
    await bus.close()
    return result


def worker_main(cfg: dict[str, Any]) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    main = publisher if cfg["role"] == "publisher" else subscriber
    _say(asyncio.run(main(cfg)))


# -- the runner ---------------------------------------------------------------------------------


def cluster_class() -> Any:
    """``RedisClusterDeployment``, able to make a cluster of 1 or 2 masters too.

    ``redis-cli --cluster create`` wants at least 3 masters; a one-master cluster is valid Redis
    all the same: without replicas the slots are assigned (ADDSLOTSRANGE) and the nodes met by hand.
    """
    from tests.redisdeploy import ALL_SLOTS, RedisClusterDeployment

    class Cluster(RedisClusterDeployment):
        def _create(self, timeout: float) -> None:
            if self.expected_masters >= 3 or self.replicas_per_master:
                super()._create(timeout)
                return
            ports = list(self._nodes)
            for i, port in enumerate(ports):
                lo, hi = ALL_SLOTS * i // len(ports), ALL_SLOTS * (i + 1) // len(ports) - 1
                self.call(port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for port in ports[1:]:
                bus_port = next(
                    int(x.split()[1]) for x in self._nodes[port].lines if x.startswith("cluster-port")
                )
                self.call(ports[0], "CLUSTER", "MEET", "127.0.0.1", port, bus_port)

    return Cluster


class Worker:
    def __init__(self, cfg: dict[str, Any], log: Path) -> None:
        self.cfg = cfg
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "bench.shards", "--worker", json.dumps(cfg)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=out,
                preexec_fn=_child_setup,
            )

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(
                f"worker {self.cfg['role']} gave no answer within {timeout:g}s:\n"
                + self.log.read_text(errors="replace")[-3000:]
            )
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime: fields 14 and 15 of stat(5)


def machine_busy() -> float:
    """CPU seconds every process of the machine used so far (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def node_counters(cluster: Any, port: int) -> dict[str, int]:
    """Publish commands this node executed, and publish messages it got over the cluster bus."""
    stats = cluster.info(port, "commandstats")
    bus = dict(
        line.split(":", 1) for line in cluster.call(port, "CLUSTER", "INFO").splitlines() if ":" in line
    )

    def calls(cmd: str) -> int:
        entry = stats.get(f"cmdstat_{cmd}", "calls=0")
        return int(entry.split(",")[0].split("=")[1])

    return {
        "commands": calls("publish") + calls("spublish"),
        "forwarded": int(bus.get("cluster_stats_messages_publish_received", "0").strip())
        + int(bus.get("cluster_stats_messages_publishshard_received", "0").strip()),
    }


def run_config(name: str, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    masters, classic = CONFIGS[name]
    with cluster_class()(masters=masters, replicas=0) as cluster:
        ports = [m.port for m in cluster.masters()]
        for port in ports:
            cluster.call(port, "CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        pids = {port: proc.pid for port, proc in cluster.nodes.items()}
        base = {
            "url": cluster.url,
            "classic": classic,
            "groups": args.groups,
            "every": args.every,
            "payload": args.payload,
            "seconds": args.seconds,
        }
        workers: list[Worker] = []
        try:
            sub = Worker({**base, "role": "subscriber"}, logdir / f"{name}-sub.log")
            workers.append(sub)
            pubs = [
                Worker({**base, "role": "publisher", "index": k}, logdir / f"{name}-pub{k}.log")
                for k in range(args.publishers)
            ]
            workers += pubs
            for w in workers:
                w.answer(STEP_TIMEOUT)
            before = {p: (cpu_seconds(pids[p]), node_counters(cluster, p)) for p in ports}
            busy = machine_busy()
            for w in workers:
                w.send("go")
            results = [w.answer(args.seconds + STEP_TIMEOUT * 2) for w in pubs]
            busy = machine_busy() - busy
            after = {p: (cpu_seconds(pids[p]), node_counters(cluster, p)) for p in ports}
            expected = sum(r["to_subscriber"] for r in results)
            sub.send(f"stop {expected}")
            ingest = sub.answer(STEP_TIMEOUT * 2)
        finally:
            for w in workers:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(10)
                w.stop()
    nodes = [
        {
            "cpu": after[p][0] - before[p][0],
            "commands": after[p][1]["commands"] - before[p][1]["commands"],
            "forwarded": after[p][1]["forwarded"] - before[p][1]["forwarded"],
        }
        for p in ports
    ]
    return {
        "name": name,
        "masters": masters,
        "classic": classic,
        "pubs": results,
        "sub": ingest,
        "nodes": nodes,
        "busy": busy,
    }


def _check(r: dict[str, Any]) -> list[str]:
    problems = []
    for k, p in enumerate(r["pubs"]):
        if p["published"] != p["sent"] or p["dropped"] or p["errors"]:
            problems.append(f"{r['name']}: publisher {k}: {p}")
    expected = sum(p["to_subscriber"] for p in r["pubs"])
    if r["sub"]["received"] != expected:
        problems.append(f"{r['name']}: subscriber read {r['sub']['received']} of {expected} messages")
    return problems


def report(results: list[dict[str, Any]], args: argparse.Namespace, elapsed: float) -> str:
    lines = [
        f"## Redis Cluster shards: {args.publishers} publisher process(es), {args.groups:,} groups, "
        f"{args.payload} B payloads, {args.seconds:g}s per configuration, {os.cpu_count()} cores, "
        f"{elapsed:.0f}s",
        "",
        f"Python {platform.python_version()}; everything (Redis nodes, publishers, subscriber) shares "
        f"this machine's {os.cpu_count()} cores. Publish msg/s = messages Redis answered ÷ time to the "
        "last answer (all publishers); CPU % = CPU time ÷ that time (100 % = one core). Redis CPU = "
        "utime+stime of each node over the publishing window; per node: CPU s / PUBLISH or SPUBLISH "
        "commands it executed / publish messages it received over the cluster bus. Subscriber = one "
        f"instance subscribed to 1 group in {args.every}. Other processes' CPU % = the machine's busy "
        "time (/proc/stat) over the window minus this bench's processes: load that was not ours.",
        "",
        "| config | publish msg/s | publishers CPU % | publishers CPU µs/msg | Redis CPU µs/msg (all nodes) "
        "| per node: CPU s / commands / via cluster bus | subscriber msg/s | share of published "
        "| subscriber CPU µs/msg | subscriber CPU % | other processes' CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        published = sum(p["published"] for p in r["pubs"])
        wall = max(p["wall"] for p in r["pubs"])
        pub_cpu = sum(p["cpu"] for p in r["pubs"])
        redis_cpu = sum(n["cpu"] for n in r["nodes"])
        per_node = " · ".join(f"{n['cpu']:.1f} / {n['commands']:,} / {n['forwarded']:,}" for n in r["nodes"])
        sub = r["sub"]
        others = r["busy"] - pub_cpu - redis_cpu - sub["cpu"]
        label = f"{r['masters']} shard{'s' if r['masters'] > 1 else ''}, " + (
            "classic PUBLISH" if r["classic"] else "sharded SPUBLISH"
        )
        lines.append(
            f"| {label} | {published / wall:,.0f} | {pub_cpu / wall * 100:.0f} | "
            f"{pub_cpu / published * 1e6:.2f} | "
            f"{redis_cpu / published * 1e6:.2f} | {per_node} | {sub['received'] / sub['wall']:,.0f} | "
            f"{sub['received'] / published:.3f} | {sub['cpu'] / max(1, sub['received']) * 1e6:.2f} | "
            f"{sub['cpu'] / sub['wall'] * 100:.0f} | {max(0.0, others) / wall * 100:.0f} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1,3,3c", help="1, 3 (sharded) and/or 3c (classic), comma-separated")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes")
    p.add_argument("--seconds", type=float, default=10.0, help="publishing time per configuration")
    p.add_argument("--groups", type=int, default=3000, help="channels p:g:{i} published to")
    p.add_argument("--every", type=int, default=3, help="the subscriber takes every N-th group")
    p.add_argument("--payload", type=int, default=200, help="payload bytes")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0
    import tempfile

    started = time.monotonic()
    results = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hubwire-shards-") as logdir:
        for name in args.configs.split(","):
            print(f"-- {name}", file=sys.stderr, flush=True)
            result = run_config(name, args, Path(logdir))
            problems += _check(result)
            results.append(result)
    print(report(results, args, time.monotonic() - started))
    for problem in problems:
        print(f"\nPROBLEM: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
