#!/usr/bin/env python3
"""What one cluster-wide presence query costs: 3 instances on Redis, a group of 1k and 10k members.

    .venv/bin/python -m bench.presence                       # 1,000 and 10,000 members, 50 queries each
    .venv/bin/python -m bench.presence --members 500 --repeat 10     # a quick run

One private ``redis-server`` (free loopback port, never 6379), three ``hubwire run`` instances of
``bench/servers/hubwire_app.py`` and one load-generator process (``bench/loadgen.py``) holding the
members: raw WebSocket clients spread evenly over the instances, each its own user, all in one group.
For each member count, in this order:

* **hub code**: ``hub_context(BenchHub).presence.group(g)`` (every member with id, user, instance),
  ``.count(g)`` (numbers only) and ``.user(u)`` (one member), asked ``--repeat`` times in a row on
  instance 1 (``GET /presence/...`` of the bench app); the milliseconds are measured inside the
  instance around each call, so HTTP is not in them;
* **hubwire inspect**: the same group listed through :class:`~hubwire.backplane.inspect.ClusterInspector`
  (what ``hubwire inspect --group`` does) from this process, and ``instances()``.

Server CPU is ``utime + stime`` of the three instances (``/proc/<pid>/stat``) across the
``--repeat`` queries, divided by their number: what one query costs the whole cluster (the
answering instances' work included). Every answer is checked: complete and of the expected size.
The report (markdown) goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.run import SERVERS, LoadGen, Processes, Redis, cpu_seconds, start_instances

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), "-m", "bench.presence", *sys.argv[1:]])

GROUP = "s0"  # bench/loadgen.py's "mod" rule with modulus 1: every client joins s0
PREFIX = "presence-bench:"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def get_json(url: str, timeout: float = 120.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def summary(ms: list[float]) -> dict[str, float]:
    ordered = sorted(ms)
    return {
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
        "max": ordered[-1],
    }


def in_instance(port: int, pids: list[int], kind: str, key: str, repeat: int) -> dict[str, Any]:
    """``repeat`` presence calls made by instance ``port``; its timings and the cluster's CPU per call."""
    get_json(f"http://127.0.0.1:{port}/presence/{kind}/{key}?repeat=2")  # warm up
    cpu = cpu_seconds(pids)
    answer = get_json(f"http://127.0.0.1:{port}/presence/{kind}/{key}?repeat={repeat}")
    return {**summary(answer["ms"]), "cpu_ms": (cpu_seconds(pids) - cpu) * 1000 / repeat, **answer}


async def from_outside(redis_url: str, pids: list[int], repeat: int) -> dict[str, dict[str, Any]]:
    """The group and the instances through ClusterInspector (``hubwire inspect``), timed here."""
    from hubwire.backplane.inspect import ClusterInspector

    out: dict[str, dict[str, Any]] = {}
    async with ClusterInspector(redis_url, PREFIX, timeout=10.0) as cluster:
        for name, call in (("group", lambda: cluster.group(GROUP)), ("instances", cluster.instances)):
            await call()  # warm up
            times, found, complete = [], 0, True
            cpu = cpu_seconds(pids)
            for _ in range(repeat):
                start = time.perf_counter()
                result = await call()
                times.append((time.perf_counter() - start) * 1000)
                found = len(result)
                complete = complete and (
                    result.complete if name == "group" else all(i.info is not None for i in result)  # type: ignore[union-attr]
                )
            cpu_ms = (cpu_seconds(pids) - cpu) * 1000 / repeat
            out[name] = {**summary(times), "cpu_ms": cpu_ms, "found": found, "complete": complete}
    return out


def run(args: argparse.Namespace) -> str:
    counts = sorted(int(c) for c in args.members.split(","))
    rows: list[list[str]] = []
    workdir = Path(tempfile.mkdtemp(prefix="hubwire-presence-bench-"))
    procs = Processes(workdir)
    try:
        redis = Redis(procs, workdir)
        spec = SERVERS["hubwire"]
        instances = start_instances(procs, spec, redis, PREFIX, count=3, pythonpath=str(ROOT / "src"))
        pids = [i.pid for i in instances]
        lg = LoadGen(procs, 1)
        connected = 0
        for count in counts:
            say(f"connecting members {connected}..{count} ...")
            cmd = {
                "cmd": "connect",
                "kind": spec.kind,
                "targets": [["127.0.0.1", i.port, spec.path] for i in instances],
                "first": connected,
                "count": count - connected,
                "user": True,
            }
            got = lg.first(cmd, 300)
            assert got["failed"] == 0, got
            joined = lg.all({"cmd": "join", "rule": {"kind": "mod", "name": "s", "modulus": 1}}, 300)
            assert sum(j["failed"] for j in joined) == 0, joined
            connected = count
            say(f"{count} members: asking ...")
            port = instances[0].port
            results = {
                "presence.group(g)": in_instance(port, pids, "group", GROUP, args.repeat),
                "presence.count(g)": in_instance(port, pids, "count", GROUP, args.repeat),
                "presence.user(u)": in_instance(port, pids, "user", "u7", args.repeat),
            }
            outside = asyncio.run(from_outside(redis.url, pids, args.repeat))
            results["inspect --group g"] = outside["group"]
            results["inspect (instances)"] = outside["instances"]
            expected = {"presence.user(u)": 1, "inspect (instances)": 3, "presence.group(g)": count}
            for name, r in results.items():
                want = expected.get(name, count)
                if r["found"] != want or not r["complete"]:
                    raise RuntimeError(
                        f"{name} at {count} members found {r['found']} (complete {r['complete']})"
                    )
                rows.append(
                    [
                        f"{count:,}",
                        name,
                        f"{r['p50']:.2f}",
                        f"{r['p95']:.2f}",
                        f"{r['max']:.2f}",
                        f"{r['cpu_ms']:.1f}",
                        f"{r['found']:,}",
                    ]
                )
        lg.close()
    finally:
        procs.stop_all()
    return report(rows, args)


def report(rows: list[list[str]], args: argparse.Namespace) -> str:
    header = ["members", "query", "p50 ms", "p95 ms", "max ms", "cluster CPU ms / query", "found"]
    lines = [
        f"# Presence and inspection: cost per query ({args.repeat} queries each)",
        "",
        f"3 hubwire instances on one Redis, members spread evenly; {platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} cores. Milliseconds of one query as its caller sees "
        "it (hub code: measured inside instance 1; inspect: in the bench process); CPU: the three "
        "instances' user+sys per query.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--members", default="1000,10000", help="member counts, ascending (default 1000,10000)"
    )
    parser.add_argument("--repeat", type=int, default=50, help="queries per measurement (default 50)")
    args = parser.parse_args(argv)
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
