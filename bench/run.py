#!/usr/bin/env python3
"""hubwire bench runner: fan-out over a Redis backplane, hubwire against reference servers.

    .venv/bin/python bench/run.py                       # 1k and 5k clients, every server and phase
    .venv/bin/python bench/run.py --clients 200 --duration 3 --big-conns 2000    # a smoke run

Starts its own redis-server (free loopback port, never 6379), then for each server two instances
sharing that Redis, and load-generator worker processes (bench/loadgen.py); runs the phases; prints
one markdown table. Every process it starts is stopped on exit (also on Ctrl+C / SIGTERM); every wait
is bounded. See bench/README.md for what each phase measures and how.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENV_PY = ROOT / ".venv" / "bin" / "python"
if __name__ == "__main__" and VENV_PY.exists() and Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
    os.execv(str(VENV_PY), [str(VENV_PY), *sys.argv])  # the project's venv has the servers' packages
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

SIGNALR_PATH = "/hub"
SIO_PATH = "/socket.io/?EIO=4&transport=websocket"


@dataclass(frozen=True)
class ServerSpec:
    name: str
    kind: str  # the load generator's dialect: signalr | sio
    path: str
    argv: tuple[str, ...]  # before --port/--redis/--prefix


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in (
        ServerSpec("hubwire", "signalr", SIGNALR_PATH, (PY, "-m", "bench.servers.hubwire_app")),
        ServerSpec("socketio-py", "sio", SIO_PATH, (PY, "-m", "bench.servers.socketio_py_app")),
        ServerSpec("socketio-node", "sio", SIO_PATH, ("node", "bench/node/socketio_server.js")),
        ServerSpec("picows", "signalr", SIGNALR_PATH, (PY, "-m", "bench.servers.picows_server")),
        ServerSpec(
            "picows-batch", "signalr", SIGNALR_PATH, (PY, "-m", "bench.servers.picows_server", "--batch")
        ),
    )
}
#: the floors hubwire is compared with: one frame per message, and coalescing as hubwire does
FLOORS = ("picows", "picows-batch")
PHASES = ("idle", "fanout", "group", "latency", "rooms", "ingest", "big", "deflate")
#: what runs without --phases (the deflate phase is asked for by name)
DEFAULT_PHASES = ("idle", "fanout", "group", "latency", "rooms", "ingest", "big")
#: phases of each client-count round (deflate: for ``DEFLATE_SERVERS`` only)
ROUND_PHASES = ("fanout", "group", "latency", "deflate")
#: phases that run for hubwire only
HUBWIRE_ONLY = ("ingest", "big")
#: servers of the deflate phase (permessage-deflate: hubwire compresses once, socket.io per socket)
DEFLATE_SERVERS = ("hubwire", "socketio-node")
HUB_NAME = "BenchHub"


# -- processes --------------------------------------------------------------------------------------


def _child_setup() -> None:
    """In every child: its own session (Ctrl+C reaches only the runner), SIGTERM when the runner
    dies (even by SIGKILL), and the fd limit raised."""
    os.setsid()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


class Processes:
    """Every process the runner starts; ``stop_all`` ends them (TERM, then KILL), by pid."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the child
        kwargs.setdefault("stdout", log)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, cwd=ROOT, stderr=log, preexec_fn=_child_setup, close_fds=True, **kwargs)
        log.close()
        self.running.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 8.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(5)
        self.running = [(n, p) for n, p in self.running if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port
    raise RuntimeError("no free port")


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


class Redis:
    def __init__(self, procs: Processes, workdir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("redis-server not found (bench/setup.sh installs it with apt-get)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = procs.start(
            "redis",
            [
                exe,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(workdir),
                "--protected-mode", "yes",
                # never cut a slow subscriber off (the ingest phase backs up on purpose)
                "--client-output-buffer-limit", "pubsub 0 0 0",
                "--maxclients", "1000",
            ],
        )  # fmt: skip
        wait_port(self.port, self.proc)

    def command(self, *parts: str | bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(resp(*parts))
            return s.recv(65536)


def resp(*parts: str | bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


@dataclass
class Instance:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_instances(
    procs: Processes,
    spec: ServerSpec,
    redis: Redis,
    prefix: str,
    count: int = 2,
    pythonpath: str | None = None,
    extra_env: dict[str, str] | None = None,
    tag: str | None = None,
) -> list[Instance]:
    tag = tag or spec.name
    env = None
    if pythonpath or extra_env:
        env = dict(os.environ)
        env.update(extra_env or {})
    if pythonpath:
        assert env is not None
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    out = []
    for i in range(count):
        port = free_port()
        argv = [*spec.argv, "--port", str(port), "--redis", redis.url, "--prefix", prefix]
        proc = procs.start(f"{tag}-{i}", argv, env=env)
        out.append(Instance(port, proc))
    for inst in out:
        try:
            wait_port(inst.port, inst.proc)
        except RuntimeError as exc:
            tail = procs.log_tail(f"{tag}-{out.index(inst)}")
            raise RuntimeError(f"{spec.name}: {exc}\n{tail}") from None
    return out


# -- load generator workers -------------------------------------------------------------------------


class LoadGen:
    """``count`` bench/loadgen.py processes, one JSON command / answer per line each."""

    def __init__(self, procs: Processes, count: int, tag: str = "loadgen") -> None:
        self.procs = procs
        self.workers: list[subprocess.Popen[bytes]] = []
        self.buffers: list[bytes] = []
        for i in range(count):
            proc = procs.start(
                f"{tag}-{i}",
                [PY, "-m", "bench.loadgen", str(i)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            self.workers.append(proc)
            self.buffers.append(b"")
        hello = self._read([True] * count, 30.0)
        self.pids = [h["pid"] for h in hello]
        self.nofile = min(h["nofile"] for h in hello)

    def __len__(self) -> int:
        return len(self.workers)

    def close(self) -> None:
        for proc in self.workers:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.write(b'{"cmd":"quit"}\n')
                proc.stdin.flush()
        for proc in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            self.procs.stop(proc)

    def call(self, cmds: list[dict[str, Any] | None], timeout: float) -> list[dict[str, Any]]:
        """Send worker i ``cmds[i]`` (None: nothing) and wait for each answer; raise on error."""
        for proc, cmd in zip(self.workers, cmds, strict=True):
            if cmd is not None:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps(cmd).encode() + b"\n")
                proc.stdin.flush()
        answers = self._read([c is not None for c in cmds], timeout)
        for a in answers:
            if a and "error" in a and a["error"]:
                raise RuntimeError(f"load generator: {a['error']}")
        return answers

    def all(self, cmd: dict[str, Any], timeout: float = 60.0) -> list[dict[str, Any]]:
        return self.call([cmd] * len(self.workers), timeout)

    def first(self, cmd: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        return self.call([cmd] + [None] * (len(self.workers) - 1), timeout)[0]

    def _read(self, wanted: list[bool], timeout: float) -> list[dict[str, Any]]:
        answers: list[dict[str, Any]] = [{} for _ in wanted]
        pending = {i for i, w in enumerate(wanted) if w}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for i in pending:
                stdout = self.workers[i].stdout
                assert stdout is not None
                sel.register(stdout, selectors.EVENT_READ, i)
            while pending:
                # an answer already buffered
                for i in list(pending):
                    if b"\n" in self.buffers[i]:
                        line, self.buffers[i] = self.buffers[i].split(b"\n", 1)
                        answers[i] = json.loads(line)
                        pending.discard(i)
                        sel.unregister(self.workers[i].stdout)  # type: ignore[arg-type]
                if not pending:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"load generator worker(s) {sorted(pending)} did not answer in {timeout:g}s"
                    )
                for key, _ in sel.select(min(left, 1.0)):
                    i = key.data
                    chunk = os.read(key.fd, 1 << 20)
                    if not chunk:
                        raise RuntimeError(
                            f"load generator worker {i} died:\n{self.procs.log_tail(f'loadgen-{i}')}"
                        )
                    self.buffers[i] += chunk
        return answers


def split(count: int, parts: int) -> list[tuple[int, int]]:
    """(first, count) of each part: contiguous global client indices."""
    base, extra = divmod(count, parts)
    out, first = [], 0
    for i in range(parts):
        n = base + (1 if i < extra else 0)
        out.append((first, n))
        first += n
    return out


def connect(
    lg: LoadGen,
    spec: ServerSpec,
    instances: list[Instance],
    count: int,
    *,
    user: bool = False,
    concurrency: int = 200,
    timeout: float = 180.0,
    deflate: bool = False,
) -> dict[str, Any]:
    targets = [["127.0.0.1", inst.port, spec.path] for inst in instances]
    cmds: list[dict[str, Any] | None] = [
        {
            "cmd": "connect",
            "kind": spec.kind,
            "targets": targets,
            "first": first,
            "count": n,
            "user": user,
            "deflate": deflate,
            "concurrency": max(1, concurrency // len(lg)),
        }
        for first, n in split(count, len(lg))
    ]
    t0 = time.monotonic()
    answers = lg.call(cmds, timeout)
    seconds = time.monotonic() - t0
    ok = sum(a["ok"] for a in answers)
    errors = [e for a in answers for e in a["errors"]]
    return {
        "ok": ok,
        "failed": sum(a["failed"] for a in answers),
        "seconds": seconds,
        "errors": errors[:5],
        "negotiated": sum(a.get("negotiated", 0) for a in answers),
    }


# -- broadcast phases -------------------------------------------------------------------------------


@dataclass
class Result:
    sent: int = 0
    members: int = 0
    distinct: int = 0
    lost: int = 0
    dups: int = 0
    unexpected: int = 0
    stale: int = 0
    lost_connections: int = 0
    cpu_s: float = 0.0
    seconds: float = 0.0
    rate: float = 0.0  # deliveries/s
    p50_ms: float | None = None
    p99_ms: float | None = None
    stalls: int = 0
    loadgen_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    #: the workers' latency quantile points and sample counts (ns): what the CDF plot draws
    latency_parts: list[tuple[list[int], int]] = field(default_factory=list)
    #: bytes the clients read from their sockets, compressed messages they inflated (deflate phase)
    wire_bytes: int = 0
    inflated: int = 0

    @property
    def us_per_delivery(self) -> float | None:
        return self.cpu_s * 1e6 / self.distinct if self.distinct else None

    @property
    def bytes_per_delivery(self) -> float | None:
        return self.wire_bytes / self.distinct if self.distinct else None


def merged_quantile(parts: list[tuple[list[int], int]], q: float) -> float | None:
    items: list[tuple[int, float]] = []
    for points, count in parts:
        if points:
            w = count / len(points)
            items.extend((v, w) for v in points)
    if not items:
        return None
    items.sort()
    total = sum(w for _, w in items)
    acc = 0.0
    for v, w in items:
        acc += w
        if acc >= q * total:
            return v / 1e6
    return items[-1][0] / 1e6


class PhaseIds:
    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n = (self.n + 1) % 1000
        return self.n


def broadcasts(
    lg: LoadGen,
    pids: list[int],
    phase: int,
    *,
    duration: float,
    window: int | None = None,
    rate: float | None = None,
    count: int | None = None,
    group: str | None = None,
    rule: dict[str, Any] | None = None,
    drain_timeout: float = 15.0,
    senders: int = 8,
    redis_pid: int | None = None,
    target: str | None = None,
) -> Result:
    """One measured run of broadcasts: begin on every worker, send from worker 0, end everywhere."""
    begins = lg.all({"cmd": "begin", "phase": phase, "rule": rule, "group": group})
    members = sum(b["members"] for b in begins)
    send_cmd = {
        "cmd": "send",
        "duration": duration,
        "window": window,
        "rate": rate,
        "count": count,
        "target": target or ("GroupBroadcast" if group else "Broadcast"),
        "group": group,
        "senders": senders,
    }
    others = [lg.pids, [redis_pid] if redis_pid else []]
    cpu0, others0 = cpu_seconds(pids), [cpu_seconds(p) for p in others]
    t0 = time.monotonic()
    sent = lg.first(send_cmd, duration + 60)
    ends = lg.all({"cmd": "end", "sent": sent["sent"], "drain_timeout": drain_timeout}, drain_timeout + 60)
    cpu1, others1 = cpu_seconds(pids), [cpu_seconds(p) for p in others]
    seconds = time.monotonic() - t0
    r = Result(
        sent=sent["sent"],
        members=members,
        distinct=sum(e["distinct"] for e in ends),
        lost=sum(e["lost"] for e in ends),
        dups=sum(e["dups"] for e in ends),
        unexpected=sum(e["unexpected"] for e in ends),
        stale=sum(e["stale"] for e in ends),
        lost_connections=sum(e["lost_connections"] for e in ends),
        cpu_s=cpu1 - cpu0,
        seconds=seconds,
        stalls=sent.get("stalls", 0),
        loadgen_cpu_s=others1[0] - others0[0],
        redis_cpu_s=others1[1] - others0[1],
        wire_bytes=sum(e.get("wire_bytes", 0) for e in ends),
        inflated=sum(e.get("inflated", 0) for e in ends),
    )
    firsts = [e["first_ns"] for e in ends if e["first_ns"]]
    lasts = [e["last_ns"] for e in ends if e["last_ns"]]
    span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
    r.rate = r.distinct / span if span > 0 else 0.0
    parts = [(e["latency_points"], e["latency_count"]) for e in ends]
    r.p50_ms = merged_quantile(parts, 0.50)
    r.p99_ms = merged_quantile(parts, 0.99)
    r.latency_parts = parts
    return r


@dataclass
class RoomSpec:
    """One row of the rooms phase: ``clients`` in rooms of ``size``, each room sending ``rate``/s."""

    clients: int
    rate: float

    @property
    def label(self) -> str:
        return f"{self.clients}x{self.rate:g}"


@dataclass
class RoomsResult:
    clients: int
    rooms: int
    rate: float
    result: Result
    connect_s: float = 0.0
    join_s: float = 0.0
    joined: int = 0
    join_failed: int = 0
    loadgens: int = 1
    #: Redis commands executed during the measured window, per message sent (INFO commandstats),
    #: and ``stat:<name>`` of ``REDIS_IO_STATS`` per message (bytes in / out, reads / writes)
    redis_commands: dict[str, float] = field(default_factory=dict)
    #: connecting and joining (until the send window): Redis's and the servers' CPU seconds and
    #: Redis's commands (calls), which the send window leaves out
    setup_redis_cpu_s: float = 0.0
    setup_cpu_s: float = 0.0
    setup_commands: dict[str, int] = field(default_factory=dict)
    #: the joins alone (wall ``join_s``): both servers' and the load generators' CPU seconds, so a
    #: join time can be read as CPU (the machine is saturated while clients join) or waiting
    join_cpu_s: float = 0.0
    join_loadgen_cpu_s: float = 0.0


#: ``INFO stats`` counters the rooms phase reports per message: what Redis read and wrote, and how
#: many reads / writes (syscalls, roughly) it made for them
REDIS_IO_STATS = (
    "total_net_input_bytes",
    "total_net_output_bytes",
    "total_reads_processed",
    "total_writes_processed",
)


def redis_commandstats(redis: Redis) -> dict[str, int]:
    """calls per command from ``INFO commandstats`` (cmdstat_publish:calls=N,...), and the
    ``REDIS_IO_STATS`` counters of ``INFO stats`` (keyed ``stat:<name>``)."""
    text = redis.command("INFO", "commandstats").decode(errors="replace")
    text += redis.command("INFO", "stats").decode(errors="replace")
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.strip().partition(":")
        if name in REDIS_IO_STATS:
            out[f"stat:{name}"] = int(value)
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_") :].partition(":")
            for item in rest.split(","):
                if item.startswith("calls="):
                    out[name] = int(item[len("calls=") :])
    return out


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class ServerReport:
    name: str
    fanout: dict[int, Result] = field(default_factory=dict)
    group: dict[int, Result] = field(default_factory=dict)
    latency: dict[int, Result] = field(default_factory=dict)
    idle_kb: float | None = None
    idle_n: int = 0
    connect_rate: dict[int, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    ingest: dict[str, Any] | None = None
    big: dict[str, Any] | None = None
    rooms: dict[str, RoomsResult] = field(default_factory=dict)
    #: the deflate phase by (variant, clients): "uncompressed" and "deflate" (clients offer it)
    deflate: dict[tuple[str, int], Result] = field(default_factory=dict)

    def results(self) -> list[Result]:
        return [
            *self.fanout.values(),
            *self.group.values(),
            *self.latency.values(),
            *(r.result for r in self.rooms.values()),
            *self.deflate.values(),
        ]


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, redis: Redis, workdir: Path) -> None:
        self.args = args
        self.procs = procs
        self.redis = redis
        self.workdir = workdir
        self.ids = PhaseIds()
        self.lg = LoadGen(procs, args.loadgens)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def run_server(self, name: str) -> ServerReport:
        spec = SERVERS[name]
        report = ServerReport(name)
        args = self.args
        if name == "hubwire" and args.hubwire_python:
            # another interpreter (a venv with hubwire installed) serves hubwire; the rest is unchanged
            spec = replace(spec, argv=(str(args.hubwire_python), *spec.argv[1:]))
        prefix = f"bench-{name}:"
        self.log(f"{name}: starting 2 instances")
        src = str(args.hubwire_src.resolve()) if name == "hubwire" and args.hubwire_src else None
        extra_env = None
        if name == "hubwire" and args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            extra_env = {"BENCH_PROFILE_DIR": str(args.profile.resolve())}
        instances = start_instances(self.procs, spec, self.redis, prefix, pythonpath=src, extra_env=extra_env)
        pids = [i.pid for i in instances]
        try:
            self.warmup(spec, instances)
            if "idle" in args.phases:
                self.idle(spec, instances, report)
            round_phases = [p for p in ROUND_PHASES if p != "deflate" or name in DEFLATE_SERVERS]
            if any(p in args.phases for p in round_phases):
                for n in args.clients:
                    self.round(spec, instances, n, report)
            if "rooms" in args.phases and name in args.rooms_servers:
                for room_spec in args.rooms:
                    report.rooms[room_spec.label] = self.rooms(spec, instances, room_spec)
            if name == "hubwire" and "ingest" in args.phases:
                report.ingest = self.ingest(spec, instances, prefix)
            if name == "hubwire" and "big" in args.phases:
                report.big = self.big(spec, instances, prefix, src)
        except Exception as exc:
            report.errors.append(f"{type(exc).__name__}: {exc}")
            self.log(f"{name}: FAILED: {exc}")
            with contextlib.suppress(Exception):
                self.lg.all({"cmd": "close"}, 30)
        finally:
            for i, inst in enumerate(instances):
                if inst.proc.poll() is not None:
                    report.errors.append(f"instance {i} (pid {inst.pid}) exited with {inst.proc.returncode}")
                self.procs.stop(inst.proc)
        del pids
        return report

    def warmup(self, spec: ServerSpec, instances: list[Instance]) -> None:
        """Until one broadcast reaches a few clients on both instances (subscriptions are up), then
        a short unmeasured fan-out (imports, JIT, allocator pools)."""
        n = max(4, min(200, min(self.args.clients)))
        c = connect(self.lg, spec, instances, n)
        if c["ok"] != n:
            raise RuntimeError(f"warm-up: {c['failed']} of {n} connections failed: {c['errors']}")
        pids = [i.pid for i in instances]
        for _attempt in range(20):
            r = broadcasts(self.lg, pids, self.ids.next(), duration=5, count=1, window=1, drain_timeout=1.5)
            if r.sent == 1 and r.lost == 0:
                break
        else:
            raise RuntimeError("warm-up: a broadcast never reached every client")
        broadcasts(
            self.lg, pids, self.ids.next(), duration=min(2.0, self.args.duration), window=self.args.window
        )
        self.lg.all({"cmd": "close"}, 30)
        time.sleep(0.5)

    def idle(self, spec: ServerSpec, instances: list[Instance], report: ServerReport) -> None:
        n = max(self.args.clients)
        pids = [i.pid for i in instances]
        before = rss_kb(pids)
        c = connect(self.lg, spec, instances, n)
        time.sleep(self.args.settle)
        after = rss_kb(pids)
        report.idle_n = c["ok"]
        report.idle_kb = (after - before) / c["ok"] if c["ok"] else None
        self.log(
            f"{spec.name}: idle {c['ok']} connections ({c['failed']} failed): "
            f"RSS +{after - before} KB = {report.idle_kb or 0:.1f} KB/connection"
        )
        if c["failed"]:
            report.errors.append(f"idle: {c['failed']} connections failed: {c['errors']}")
        self.lg.all({"cmd": "close"}, 60)
        time.sleep(1.0)

    def round(self, spec: ServerSpec, instances: list[Instance], n: int, report: ServerReport) -> None:
        args = self.args
        pids = [i.pid for i in instances]
        c = connect(self.lg, spec, instances, n)
        report.connect_rate[n] = c["ok"] / c["seconds"] if c["seconds"] else 0.0
        self.log(f"{spec.name}: {c['ok']} clients connected in {c['seconds']:.2f}s ({c['failed']} failed)")
        if c["failed"]:
            report.errors.append(f"{n} clients: {c['failed']} connections failed: {c['errors']}")
        try:
            if "fanout" in args.phases:
                r = broadcasts(
                    self.lg, pids, self.ids.next(), duration=args.duration, window=args.window,
                    redis_pid=self.redis.proc.pid,
                )  # fmt: skip
                report.fanout[n] = r
                self.log_result(spec.name, f"fanout {n}", r)
            if "group" in args.phases:
                rule = {"kind": "half", "name": "g"}
                j = self.lg.all({"cmd": "join", "rule": rule}, 120)
                failed = sum(a["failed"] for a in j)
                if failed:
                    report.errors.append(f"group {n}: {failed} joins failed: {j[0]['errors']}")
                r = broadcasts(
                    self.lg, pids, self.ids.next(), duration=args.duration, window=args.window,
                    group="g", rule=rule, redis_pid=self.redis.proc.pid,
                )  # fmt: skip
                report.group[n] = r
                self.log_result(spec.name, f"group {n}", r)
            if "latency" in args.phases:
                per_s = args.latency_rate / n
                r = broadcasts(
                    self.lg, pids, self.ids.next(), duration=args.latency_duration, rate=per_s,
                    drain_timeout=15.0, redis_pid=self.redis.proc.pid,
                )  # fmt: skip
                report.latency[n] = r
                self.log_result(spec.name, f"latency {n} @{args.latency_rate:g}/s", r)
            if "deflate" in args.phases and spec.name in DEFLATE_SERVERS:
                self.deflate(spec, instances, n, report)
        finally:
            self.lg.all({"cmd": "close"}, 60)
            time.sleep(1.0)

    def rooms(self, spec: ServerSpec, instances: list[Instance], rs: RoomSpec) -> RoomsResult:
        """Many small rooms: every client in a room of ``--rooms-size`` (half on each instance), one
        member of each room sending ``rs.rate`` messages/s to it, each message delivered to every
        member. Measures the joins (all rooms, wall time) and the send window: server and Redis CPU
        per delivery, latency, lost / duplicated, and Redis's commands per message."""
        args = self.args
        size = args.rooms_size
        n = rs.clients - rs.clients % size
        n_rooms = n // size
        pids = [i.pid for i in instances]
        per_worker = max(1, self.lg.nofile - 256)
        workers = max(args.loadgens, math.ceil(n / per_worker))
        lg = LoadGen(self.procs, workers, tag="roomload") if workers != len(self.lg) else self.lg
        rule = {"kind": "block", "size": size, "name": "r"}
        try:
            setup0 = redis_commandstats(self.redis), cpu_seconds([self.redis.proc.pid]), cpu_seconds(pids)
            c = connect(lg, spec, instances, n, concurrency=args.big_concurrency, timeout=600)
            self.log(
                f"{spec.name}: rooms {rs.label}: {c['ok']} clients connected in {c['seconds']:.2f}s "
                f"({c['failed']} failed, {len(lg)} load generator(s))"
            )
            if c["failed"]:
                raise RuntimeError(f"rooms: {c['failed']} of {n} connections failed: {c['errors']}")
            t0 = time.monotonic()
            join_cpu0 = cpu_seconds(pids), cpu_seconds(lg.pids)
            joins = lg.all(
                {"cmd": "join", "rule": rule, "concurrency": max(1, args.rooms_join_concurrency // len(lg)),
                 "timeout": 60.0},
                600,
            )  # fmt: skip
            join_s = time.monotonic() - t0
            join_cpu = cpu_seconds(pids) - join_cpu0[0], cpu_seconds(lg.pids) - join_cpu0[1]
            joined = sum(a["joined"] for a in joins)
            join_failed = sum(a["failed"] for a in joins)
            self.log(f"{spec.name}: rooms {rs.label}: {joined} joins ({n_rooms} rooms) in {join_s:.2f}s")
            if join_failed:
                raise RuntimeError(f"rooms: {join_failed} joins failed: {joins[0]['errors']}")
            time.sleep(1.0)  # subscriptions settle; the joins' own work is not in the window
            setup1 = redis_commandstats(self.redis), cpu_seconds([self.redis.proc.pid]), cpu_seconds(pids)
            setup_commands = {
                k: v - setup0[0].get(k, 0)
                for k, v in setup1[0].items()
                if v - setup0[0].get(k, 0) > 0 and not k.startswith("stat:") and k != "info"
            }
            phase = self.ids.next()
            lg.all({"cmd": "begin", "phase": phase, "rooms": {"size": size}})
            profiling = spec.name == "hubwire" and args.profile
            if profiling:  # bench/servers/hubwire_app.py: SIGUSR2 starts a profile, SIGUSR1 writes it
                signal_all(instances, signal.SIGUSR2)
            stats0 = redis_commandstats(self.redis)
            redis_perf = None
            if args.redis_perf:  # where Redis spends its CPU in the send window (perf report -i FILE)
                args.redis_perf.mkdir(parents=True, exist_ok=True)
                out_file = args.redis_perf / f"redis-{spec.name}-{rs.label}.data"
                redis_perf = subprocess.Popen(
                    ["perf", "record", "-q", "-e", "cpu-clock", "-F", "4000", "-g", "-o", str(out_file),
                     "-p", str(self.redis.proc.pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
            others = [lg.pids, [self.redis.proc.pid]]
            cpu0, others0 = cpu_seconds(pids), [cpu_seconds(p) for p in others]
            t0 = time.monotonic()
            sends = lg.all(
                {"cmd": "rooms_send", "size": size, "name": "r", "rate": rs.rate,
                 "duration": args.rooms_duration},
                args.rooms_duration + 120,
            )  # fmt: skip
            by_room: dict[int, int] = {}
            for a in sends:
                by_room.update({int(k): v for k, v in a["by_room"].items()})
            sent = sum(by_room.values())
            expected = []
            for first, count in split(n, len(lg)):
                expected.append(sum(by_room.get(i // size, 0) for i in range(first, first + count)))
            ends = lg.call(
                [{"cmd": "end", "sent": sent, "expected": e, "drain_timeout": 15.0} for e in expected], 120
            )
            cpu1, others1 = cpu_seconds(pids), [cpu_seconds(p) for p in others]
            seconds = time.monotonic() - t0
            if redis_perf is not None:
                redis_perf.send_signal(signal.SIGINT)
                redis_perf.wait(30)
            stats1 = redis_commandstats(self.redis)
            if profiling:
                signal_all(instances, signal.SIGUSR1)
            r = Result(
                sent=sent,
                members=n,
                distinct=sum(e["distinct"] for e in ends),
                lost=sum(e["lost"] for e in ends) + size * sent - sum(expected),
                dups=sum(e["dups"] for e in ends),
                unexpected=sum(e["unexpected"] for e in ends),
                stale=sum(e["stale"] for e in ends),
                lost_connections=sum(e["lost_connections"] for e in ends),
                cpu_s=cpu1 - cpu0,
                seconds=seconds,
                loadgen_cpu_s=others1[0] - others0[0],
                redis_cpu_s=others1[1] - others0[1],
            )
            firsts = [e["first_ns"] for e in ends if e["first_ns"]]
            lasts = [e["last_ns"] for e in ends if e["last_ns"]]
            span = (max(lasts) - min(firsts)) / 1e9 if firsts and lasts else 0.0
            r.rate = r.distinct / span if span > 0 else 0.0
            r.latency_parts = [(e["latency_points"], e["latency_count"]) for e in ends]
            r.p50_ms = merged_quantile(r.latency_parts, 0.50)
            r.p99_ms = merged_quantile(r.latency_parts, 0.99)
            commands = {
                name: (stats1.get(name, 0) - stats0.get(name, 0)) / sent
                for name in stats1
                if stats1.get(name, 0) - stats0.get(name, 0) > 0 and name != "info" and sent
            }
            out = RoomsResult(
                clients=n, rooms=n_rooms, rate=rs.rate, result=r, connect_s=c["seconds"], join_s=join_s,
                joined=joined, join_failed=join_failed, loadgens=len(lg), redis_commands=commands,
                setup_redis_cpu_s=setup1[1] - setup0[1], setup_cpu_s=setup1[2] - setup0[2],
                setup_commands=setup_commands, join_cpu_s=join_cpu[0], join_loadgen_cpu_s=join_cpu[1],
            )  # fmt: skip
            self.log_result(spec.name, f"rooms {rs.label} ({n_rooms} rooms)", r)
            self.log(
                f"{spec.name}: rooms {rs.label}: Redis {r.redis_cpu_s:.2f}s CPU = "
                f"{fmt(r.redis_cpu_s * 1e6 / r.distinct if r.distinct else None, 2)} µs/delivery; "
                "per message: "
                + ", ".join(f"{k} {v:.2f}" for k, v in sorted(commands.items(), key=lambda kv: -kv[1]))
            )
            return out
        finally:
            with contextlib.suppress(Exception):
                lg.all({"cmd": "close"}, 120)
            if lg is not self.lg:
                lg.close()
            time.sleep(1.0)

    def deflate(self, spec: ServerSpec, instances: list[Instance], n: int, report: ServerReport) -> None:
        """~1 KB JSON broadcasts to the ``n`` clients connected without compression, then to ``n``
        clients that offer permessage-deflate: wire bytes and server CPU per delivery of each."""
        args = self.args
        pids = [i.pid for i in instances]
        for variant in ("uncompressed", "deflate"):
            if variant == "deflate":
                self.lg.all({"cmd": "close"}, 60)
                time.sleep(1.0)
                c = connect(self.lg, spec, instances, n, deflate=True)
                if c["failed"] or c["negotiated"] != c["ok"]:
                    report.errors.append(
                        f"deflate {n}: {c['failed']} connections failed, {c['negotiated']} of {c['ok']} "
                        f"negotiated permessage-deflate: {c['errors']}"
                    )
            r = broadcasts(
                self.lg, pids, self.ids.next(), duration=args.duration, window=args.deflate_window,
                redis_pid=self.redis.proc.pid, target="BroadcastData",
            )  # fmt: skip
            report.deflate[(variant, n)] = r
            self.log_result(
                spec.name, f"deflate phase, {variant} {n}", r,
                f", {r.bytes_per_delivery or 0:.0f} wire bytes/delivery, {r.inflated} inflated",
            )  # fmt: skip

    def log_result(self, name: str, what: str, r: Result, extra: str = "") -> None:
        us = r.us_per_delivery
        self.log(
            f"{name}: {what}: {r.sent} sent, {r.distinct} delivered ({r.rate:,.0f}/s), "
            f"CPU {r.cpu_s:.2f}s = {us or 0:.2f} µs/delivery, p50 {r.p50_ms or 0:.1f} ms, "
            f"p99 {r.p99_ms or 0:.1f} ms, lost {r.lost}, dup {r.dups}, unexpected {r.unexpected}"
            + (f", stalls {r.stalls}" if r.stalls else "")
            + (f", lost connections {r.lost_connections}" if r.lost_connections else "")
            + extra
        )

    # -- hubwire only --------------------------------------------------------------------------------

    def ingest(self, spec: ServerSpec, instances: list[Instance], prefix: str) -> dict[str, Any]:
        """Targeted envelopes published straight into Redis, consumed by ONE instance."""
        from hubwire.protocol.backplane import BackplaneChannels, RedisInvocation, encode_invocation
        from hubwire.protocol.json_protocol import JsonHubProtocol
        from hubwire.protocol.messagepack_protocol import MessagePackHubProtocol
        from hubwire.protocol.messages import InvocationMessage

        args = self.args
        inst = instances[0]
        m = args.ingest_clients
        groups = max(1, m // args.ingest_group_size)
        c = connect(self.lg, spec, [inst], m, user=True)
        if c["failed"]:
            raise RuntimeError(f"ingest: {c['failed']} connections failed: {c['errors']}")
        rule = {"kind": "mod", "name": "s", "modulus": groups}
        self.lg.all({"cmd": "join", "rule": rule}, 120)
        ids: dict[int, str] = {}
        for a in self.lg.all({"cmd": "ids"}, 120):
            ids.update({int(k): v for k, v in a["ids"].items()})
        self.lg.all({"cmd": "drain", "on": True})
        try:
            message = InvocationMessage("broadcast", ["i" * 200])
            sers = {p.name: p.write_message(message) for p in (JsonHubProtocol(), MessagePackHubProtocol())}
            envelope = encode_invocation(RedisInvocation(sers, []))
            ch = BackplaneChannels(prefix, HUB_NAME)
            sizes = [0] * groups
            for i in range(m):
                sizes[i % groups] += 1
            commands: list[tuple[bytes, int]] = []  # (RESP command, deliveries it makes)
            for i in range(m):
                commands.append((resp("PUBLISH", ch.connection(ids[i]), envelope), 1))
                commands.append((resp("PUBLISH", ch.user(f"u{i}"), envelope), 1))
                commands.append((resp("PUBLISH", ch.group(f"s{i % groups}"), envelope), sizes[i % groups]))
            batch = 1000
            while len(commands) < batch:
                commands = commands * 2
            starts = range(0, len(commands) - batch + 1, batch)
            chunks = [b"".join(c for c, _ in commands[k : k + batch]) for k in starts]
            chunk_records = [sum(n for _, n in commands[k : k + batch]) for k in starts]

            received0 = health(inst.port)["received"]
            drained0 = sum(a["drained_records"] for a in self.lg.all({"cmd": "counters"}))
            cpu0 = cpu_seconds([inst.pid])
            t0 = time.monotonic()
            published = publish_for(self.redis.port, chunks, batch, args.ingest_seconds, args.ingest_max)
            t_pub = time.monotonic() - t0
            # wait (bounded) for the instance to have read everything
            deadline = time.monotonic() + 120
            received = 0
            while time.monotonic() < deadline:
                received = health(inst.port)["received"] - received0
                if received >= published:
                    break
                time.sleep(0.05)
            t_done = time.monotonic() - t0
            cpu1 = cpu_seconds([inst.pid])
            expected = sum(chunk_records[k % len(chunks)] for k in range(published // batch))
            deadline = time.monotonic() + 30
            while True:  # the clients may still be reading
                counters = self.lg.all({"cmd": "counters"})
                drained = sum(a["drained_records"] for a in counters) - drained0
                if drained >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            result = {
                "clients": m,
                "group_size": m // groups,
                "published": published,
                "publish_rate": published / t_pub if t_pub else 0.0,
                "received": received,
                "consume_rate": received / t_done if t_done else 0.0,
                "cpu_us_per_message": (cpu1 - cpu0) * 1e6 / received if received else None,
                "deliveries": drained,
                "expected_deliveries": expected,
                "lost_connections": sum(a["lost_connections"] for a in counters),
            }
            self.log(
                f"hubwire: ingest: published {published} in {t_pub:.2f}s ({result['publish_rate']:,.0f}/s), "
                f"instance read {received} in {t_done:.2f}s = {result['consume_rate']:,.0f}/s, "
                f"{result['cpu_us_per_message'] or 0:.2f} µs CPU/message, client records {drained} "
                f"(expected {result['expected_deliveries']})"
            )
            return result
        finally:
            self.lg.all({"cmd": "close"}, 60)
            time.sleep(1.0)

    def big(
        self, spec: ServerSpec, instances: list[Instance], prefix: str, src: str | None
    ) -> dict[str, Any]:
        """Many concurrent connections, opened as fast as the generator can: ``--big-conns`` on each
        of ``--big-instances`` instances (1: instance A; more: a fresh set of its own, on a channel
        prefix of its own). Measures the connect rate, RSS per connection, idle CPU with everything
        connected, then ``--big-broadcasts`` single broadcasts, each sent through instance 0, that must
        reach every client on every instance exactly once (time to the last delivery)."""
        args = self.args
        n_inst = args.big_instances
        own: list[Instance] = []
        if n_inst > 1:
            self.log(f"hubwire: big: starting {n_inst} instances")
            own = start_instances(
                self.procs, spec, self.redis, f"{prefix}big:", count=n_inst, pythonpath=src, tag="hubwire-big"
            )
            group = own
        else:
            group = instances[:1]
        pids = [i.pid for i in group]
        limit = nofile_hard() - 64  # a server's fd limit, less its listening/Redis/stdio fds
        wanted = args.big_conns
        per_instance = min(wanted, limit)
        count = per_instance * n_inst
        per_worker = max(1, self.lg.nofile - 256)
        workers = max(args.big_loadgens, math.ceil(count / per_worker))
        lg = LoadGen(self.procs, workers, tag="bigload") if workers > 1 else self.lg
        try:
            if own:
                self.warmup(spec, own)  # every instance subscribed, imports done
            rss0 = rss_kb(pids)
            c = connect(lg, spec, group, count, concurrency=args.big_concurrency, timeout=120 + count / 250)
            rate = c["ok"] / c["seconds"] if c["seconds"] else 0.0
            self.log(
                f"hubwire: big: {c['ok']}/{count} connections on {n_inst} instance(s) in {c['seconds']:.2f}s "
                f"= {rate:,.0f}/s ({c['failed']} failed{': ' + str(c['errors']) if c['errors'] else ''}; "
                f"{len(lg)} load generator(s))"
            )
            time.sleep(args.settle)
            rss1 = rss_kb(pids)
            cpu0 = cpu_seconds(pids)
            time.sleep(args.big_idle)
            idle_cpu = cpu_seconds(pids) - cpu0
            held = [health(i.port).get("connections") for i in group]
            self.log(
                f"hubwire: big: held {held}, RSS +{(rss1 - rss0) / 1024:.0f} MB, idle CPU {idle_cpu:.2f}s "
                f"over {args.big_idle:g}s"
            )
            last_ms: list[float] = []
            median_ms: list[float] = []
            delivered = lost = dups = dropped = 0
            for _ in range(args.big_broadcasts):
                phase = self.ids.next()
                begins = lg.all({"cmd": "begin", "phase": phase})
                members = sum(b["members"] for b in begins)
                sent = lg.first({"cmd": "send", "duration": 60, "count": 1, "window": 1}, 120)["sent"]
                ends = lg.all({"cmd": "end", "sent": sent, "drain_timeout": 60}, 180)
                got = sum(e["distinct"] for e in ends)
                delivered += got
                lost += members * sent - got
                dups += sum(e["dups"] + e["unexpected"] for e in ends)
                dropped = max(dropped, sum(e["lost_connections"] for e in ends))
                last_ms.append(max(e["latency_max_ns"] for e in ends) / 1e6)
                parts = [(e["latency_points"], e["latency_count"]) for e in ends]
                first_ms = merged_quantile(parts, 0.0)
                median_ms.append(merged_quantile(parts, 0.5) or 0.0)
                self.log(
                    f"hubwire: big: broadcast via instance 0: {got:,} of {members * sent:,} delivered, "
                    f"first after {first_ms or 0:.1f} ms, median {median_ms[-1]:.1f} ms, "
                    f"last {last_ms[-1]:.1f} ms"
                )
            return {
                "instances": n_inst,
                "wanted": wanted,
                "attempted": count,
                "connected": c["ok"],
                "failed": c["failed"],
                "held": held,
                "seconds": c["seconds"],
                "rate": rate,
                "rss_kb_per_conn": (rss1 - rss0) / c["ok"] if c["ok"] else None,
                "idle_window_s": args.big_idle,
                "idle_cpu_s": idle_cpu,
                "broadcasts": args.big_broadcasts,
                "last_delivery_ms": last_ms,
                "median_delivery_ms": median_ms,
                "delivered": delivered,
                "lost": lost,
                "dups": dups,
                "lost_connections": dropped,
                "fd_limit": limit + 64,
                "loadgen_workers": workers,
            }
        finally:
            with contextlib.suppress(Exception):
                lg.all({"cmd": "close"}, 120)
            if lg is not self.lg:
                lg.close()
            for inst in own:
                self.procs.stop(inst.proc, timeout=30)
            time.sleep(1.0)


def signal_all(instances: list[Instance], signum: int) -> None:
    for inst in instances:
        with contextlib.suppress(ProcessLookupError):
            inst.proc.send_signal(signum)


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp_:
        return json.loads(resp_.read())  # type: ignore[no-any-return]


def publish_for(port: int, chunks: list[bytes], batch: int, seconds: float, max_messages: int) -> int:
    """Pipelined PUBLISHes (pre-encoded RESP), two batches in flight, for ``seconds``; returns the count."""
    published = 0
    replies_due = 0
    pending = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        deadline = time.monotonic() + seconds
        k = 0
        while time.monotonic() < deadline and published < max_messages:
            s.sendall(chunks[k % len(chunks)])
            k += 1
            published += batch
            replies_due += batch
            while replies_due > batch:  # keep at most two batches unanswered
                data = s.recv(1 << 20)
                if not data:
                    raise RuntimeError("redis closed the publisher connection")
                data = pending + data
                lines = data.count(b"\r\n")
                cut = data.rfind(b"\r\n") + 2
                pending = data[cut:]
                replies_due -= lines
        while replies_due > 0:
            data = s.recv(1 << 20)
            if not data:
                raise RuntimeError("redis closed the publisher connection")
            data = pending + data
            replies_due -= data.count(b"\r\n")
            pending = data[data.rfind(b"\r\n") + 2 :]
    return published


# -- output -----------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def table(reports: list[ServerReport], args: argparse.Namespace) -> str:
    ns = args.clients
    k = {n: (f"{n // 1000}k" if n % 1000 == 0 else str(n)) for n in ns}
    by_name = {r.name: r for r in reports}
    node = by_name.get("socketio-node")
    floors = [by_name[f] for f in FLOORS if f in by_name]

    def metrics(r: ServerReport) -> list[float | None]:
        return (
            [r.fanout[n].us_per_delivery if n in r.fanout else None for n in ns]
            + [r.group[n].us_per_delivery if n in r.group else None for n in ns]
            + [r.latency[n].p99_ms if n in r.latency else None for n in ns]
        )

    head = (
        ["server"]
        + [f"CPU µs/delivery {k[n]}" for n in ns]
        + [f"group {k[n]}" for n in ns]
        + [f"p99 ms @{args.latency_rate / 1000:g}k/s {k[n]}" for n in ns]
        + ["RSS KB/idle conn", "deliveries/s " + "/".join(k[n] for n in ns), "lost", "dup"]
        + ["÷ socketio-node (CPU " + ", ".join(k[n] for n in ns) + "; group; p99)"]
        + [f"÷ {f.name} (CPU; group)" for f in floors]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        vals = metrics(r)
        digits = [2] * (2 * len(ns)) + [1] * len(ns)
        lost = sum(x.lost for x in r.results())
        dup = sum(x.dups + x.unexpected for x in r.results())
        rates = "/".join(f"{r.fanout[n].rate / 1000:.0f}k" if n in r.fanout else "-" for n in ns)
        vs_node = " · ".join(
            ratio(a, b) for a, b in zip(vals, metrics(node) if node else [None] * len(vals), strict=True)
        )
        cpu_vals = vals[: 2 * len(ns)]
        vs_floors = [
            " · ".join(ratio(a, b) for a, b in zip(cpu_vals, metrics(f)[: 2 * len(ns)], strict=True))
            for f in floors
        ]
        name = r.name + (" ⚠" if r.errors else "")
        row = (
            [name]
            + [fmt(v, d) for v, d in zip(vals, digits, strict=True)]
            + [fmt(r.idle_kb), rates, str(lost), str(dup), vs_node, *vs_floors]
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _deflate_label(server: str, variant: str) -> str:
    if variant == "uncompressed":
        return f"{server} uncompressed"
    return f"{server} compress-once" if server == "hubwire" else f"{server} per-socket deflate"


def deflate_table(reports: list[ServerReport]) -> str:
    """The deflate phase: wire bytes and server CPU per delivery, against hubwire uncompressed."""
    hw = next((r for r in reports if r.name == "hubwire"), None)
    head = (
        "| server | clients | wire bytes/delivery | ÷ hubwire uncompressed | CPU µs/delivery "
        "| ÷ hubwire uncompressed | deliveries/s | compressed messages | lost | dup |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rep in reports:
        for (variant, n), r in sorted(
            rep.deflate.items(), key=lambda kv: (kv[0][1], kv[0][0] != "uncompressed")
        ):
            base = hw.deflate.get(("uncompressed", n)) if hw else None
            lines.append(
                f"| {_deflate_label(rep.name, variant)} | {n} | {fmt(r.bytes_per_delivery, 0)} "
                f"| {ratio(r.bytes_per_delivery, base.bytes_per_delivery if base else None)} "
                f"| {fmt(r.us_per_delivery, 2)} "
                f"| {ratio(r.us_per_delivery, base.us_per_delivery if base else None)} "
                f"| {r.rate:,.0f} | {r.inflated} | {r.lost} | {r.dups + r.unexpected} |"
            )
    return "\n".join(lines)


def deflate_targets(reports: list[ServerReport], args: argparse.Namespace) -> list[str]:
    by = {r.name: r for r in reports}
    hw, node = by.get("hubwire"), by.get("socketio-node")
    out: list[str] = []
    if hw is None:
        return out
    for n in args.clients:
        plain, once = hw.deflate.get(("uncompressed", n)), hw.deflate.get(("deflate", n))
        other = node.deflate.get(("deflate", n)) if node else None
        if plain is None or once is None:
            continue
        p, o = plain.us_per_delivery, once.us_per_delivery
        if p and o:
            out.append(f"- {'PASS' if o <= 1.3 * p else 'FAIL'} compress-once CPU {n} ≤ 1.3x hubwire "
                       f"uncompressed: {o:.2f} vs {p:.2f} µs ({o / p:.2f}x)")  # fmt: skip
        x = other.us_per_delivery if other else None
        if o and x:
            out.append(f"- {'PASS' if o < x else 'FAIL'} compress-once CPU {n} < socket.io-node per-socket "
                       f"deflate: {o:.2f} vs {x:.2f} µs ({o / x:.2f}x)")  # fmt: skip
        pb, ob = plain.bytes_per_delivery, once.bytes_per_delivery
        if pb and ob:
            out.append(f"- {'PASS' if ob <= 0.55 * pb else 'FAIL'} wire bytes/delivery {n} about halved: "
                       f"{ob:.0f} vs {pb:.0f} ({ob / pb:.2f}x)")  # fmt: skip
    return out


def details(reports: list[ServerReport]) -> str:
    head = (
        "| server | phase | clients | broadcasts | deliveries | deliveries/s | server CPU s | µs/delivery "
        "| p50 ms | p99 ms | lost | dup | unexpected | wall s | loadgen CPU s | redis CPU s |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for rep in reports:
        rooms = {f"rooms {k}": v.result for k, v in rep.rooms.items()}
        deflate = {(n, variant): r for (variant, n), r in rep.deflate.items()}
        for phase, results in (
            ("fanout", rep.fanout),
            ("group", rep.group),
            ("latency", rep.latency),
            *(
                (f"deflate {v}", {n: r for (n, v2), r in deflate.items() if v2 == v})
                for v in ("uncompressed", "deflate")
            ),
            ("", rooms),
        ):
            for n, r in results.items():
                clients = n if phase else r.members
                lines.append(
                    f"| {rep.name} | {phase or n} | {clients} | {r.sent} | {r.distinct} | {r.rate:,.0f} "
                    f"| {r.cpu_s:.2f} | {fmt(r.us_per_delivery, 2)} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} "
                    f"| {r.lost} | {r.dups} | {r.unexpected} | {r.seconds:.1f} | {r.loadgen_cpu_s:.2f} "
                    f"| {r.redis_cpu_s:.2f} |"
                )
    return "\n".join(lines)


def rooms_table(reports: list[ServerReport]) -> str:
    """The rooms phase: one line per server and row (clients / rooms / messages per room per s)."""
    with_rooms = [r for r in reports if r.rooms]
    if not with_rooms:
        return ""
    node = next((r for r in reports if r.name == "socketio-node"), None)
    head = (
        "| server | clients / rooms / msg/s per room | messages | deliveries/s | server CPU µs/delivery "
        "| Redis CPU µs/delivery | p50 ms | p99 ms | join s (rooms) | lost | dup | Redis commands/message "
        "| Redis per message: bytes in / out, reads / writes | ÷ socketio-node (CPU; Redis; p99; join) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    setup = [
        "",
        "Connecting and joining (not in the send window): wall time, both servers' and Redis's CPU "
        "seconds from the first connection to 1 s after the last join, and Redis's commands meanwhile; "
        "the joins alone: both servers' and the load generators' CPU per join:",
        "",
        "| server | clients / rooms | connect s | join s | server CPU s | Redis CPU s | Redis commands "
        "| join: server CPU µs/join | join: load generators' CPU µs/join |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for rep in with_rooms:
        for label, rr in rep.rooms.items():
            r = rr.result
            redis_us = r.redis_cpu_s * 1e6 / r.distinct if r.distinct else None
            ranked = sorted(rr.redis_commands.items(), key=lambda kv: -kv[1])
            cmds = ", ".join(f"{k} {v:.2f}" for k, v in ranked if v >= 0.01 and not k.startswith("stat:"))
            bytes_in, bytes_out, reads, writes = (
                rr.redis_commands.get(f"stat:{k}", 0.0) for k in REDIS_IO_STATS
            )
            redis_io = f"{bytes_in:,.0f} / {bytes_out:,.0f}, {reads:.2f} / {writes:.2f}"
            vs = "-"
            other = node.rooms.get(label) if node else None
            if other is not None:
                o = other.result
                o_redis = o.redis_cpu_s * 1e6 / o.distinct if o.distinct else None
                vs = " · ".join(
                    (
                        ratio(r.us_per_delivery, o.us_per_delivery),
                        ratio(redis_us, o_redis),
                        ratio(r.p99_ms, o.p99_ms),
                        ratio(rr.join_s, other.join_s),
                    )
                )
            setup.append(
                f"| {rep.name} | {rr.clients:,} / {rr.rooms:,} | {rr.connect_s:.2f} | {rr.join_s:.2f} "
                f"| {rr.setup_cpu_s:.2f} | {rr.setup_redis_cpu_s:.2f} | "
                + ", ".join(f"{k} {v:,}" for k, v in sorted(rr.setup_commands.items(), key=lambda kv: -kv[1]))
                + f" | {fmt(rr.join_cpu_s * 1e6 / rr.joined if rr.joined else None, 1)} "
                f"| {fmt(rr.join_loadgen_cpu_s * 1e6 / rr.joined if rr.joined else None, 1)} |"
            )
            lines.append(
                f"| {rep.name} | {rr.clients:,} / {rr.rooms:,} / {rr.rate:g} | {r.sent:,} | {r.rate:,.0f} "
                f"| {fmt(r.us_per_delivery, 2)} | {fmt(redis_us, 2)} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} "
                f"| {rr.join_s:.2f} | {r.lost} | {r.dups + r.unexpected} | {cmds} | {redis_io} | {vs} |"
            )
    return "\n".join(lines + setup)


def targets(reports: list[ServerReport], args: argparse.Namespace) -> list[str]:
    by = {r.name: r for r in reports}
    hw, node = by.get("hubwire"), by.get("socketio-node")
    floors = [by[f] for f in FLOORS if f in by]
    out: list[str] = []
    if hw is None:
        return out

    def check(label: str, ok: bool | None, detail: str) -> None:
        mark = "N/A" if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"- {mark} {label}: {detail}")

    for n in args.clients:
        for what, get in (
            ("fan-out", lambda r, n=n: r.fanout.get(n)),
            ("group", lambda r, n=n: r.group.get(n)),
        ):
            h = get(hw)
            hv = h.us_per_delivery if h else None
            nv = get(node).us_per_delivery if node and get(node) else None  # type: ignore[union-attr]
            if hv is not None and nv is not None:
                check(
                    f"{what} CPU {n} ≤ socket.io-node", hv <= nv, f"{hv:.2f} vs {nv:.2f} µs ({hv / nv:.2f}x)"
                )
            for floor in floors:
                f = get(floor)
                fv = f.us_per_delivery if f else None
                if hv is not None and fv is not None:
                    check(
                        f"{what} CPU {n} ≤ 1.3x {floor.name}",
                        hv <= 1.3 * fv,
                        f"{hv:.2f} vs {fv:.2f} µs ({hv / fv:.2f}x)",
                    )
        h = hw.latency.get(n)
        nl = node.latency.get(n) if node else None
        if h and nl and h.p99_ms is not None and nl.p99_ms is not None:
            check(
                f"p99 @{args.latency_rate:g}/s {n} ≤ socket.io-node",
                h.p99_ms <= nl.p99_ms,
                f"{h.p99_ms:.1f} vs {nl.p99_ms:.1f} ms",
            )
    for label, rr in hw.rooms.items():
        other = node.rooms.get(label) if node else None
        if other is None:
            continue
        h, o = rr.result, other.result
        row = f"rooms {rr.clients:,}/{rr.rooms:,}/{rr.rate:g}"
        if h.us_per_delivery is not None and o.us_per_delivery is not None:
            check(
                f"{row}: server CPU ≤ 0.5x socket.io-node",
                h.us_per_delivery <= 0.5 * o.us_per_delivery,
                f"{h.us_per_delivery:.2f} vs {o.us_per_delivery:.2f} µs/delivery "
                f"({h.us_per_delivery / o.us_per_delivery:.2f}x)",
            )
        if h.p99_ms is not None and o.p99_ms is not None:
            check(
                f"{row}: p99 ≤ socket.io-node", h.p99_ms <= o.p99_ms, f"{h.p99_ms:.1f} vs {o.p99_ms:.1f} ms"
            )
        if h.distinct and o.distinct:
            hr, orr = h.redis_cpu_s * 1e6 / h.distinct, o.redis_cpu_s * 1e6 / o.distinct
            check(
                f"{row}: Redis CPU ≤ socket.io-node",
                hr <= orr,
                f"{hr:.2f} vs {orr:.2f} µs/delivery (Redis CPU over the window: {h.redis_cpu_s:.2f} vs "
                f"{o.redis_cpu_s:.2f} s, ±0.01 s per reading)",
            )
        check(
            f"{row}: joining the rooms ≤ socket.io-node",
            rr.join_s <= other.join_s,
            f"{rr.join_s:.2f} vs {other.join_s:.2f} s for {rr.joined:,} joins",
        )
    if hw.idle_kb is not None:
        check(
            "RSS per idle connection ≤ 16 KB",
            hw.idle_kb <= 16,
            f"{hw.idle_kb:.1f} KB ({hw.idle_n} connections)",
        )
    lost = sum(r.lost for r in hw.results())
    dup = sum(r.dups + r.unexpected for r in hw.results())
    check("nothing lost or duplicated (hubwire)", lost == 0 and dup == 0, f"lost {lost}, dup {dup}")
    if hw.ingest:
        g = hw.ingest
        check(
            "backplane ingest ≥ 100k messages/s",
            g["consume_rate"] >= 100_000,
            f"{g['consume_rate']:,.0f}/s (published at {g['publish_rate']:,.0f}/s)",
        )
    if hw.ingest:
        g = hw.ingest
        check(
            "ingest: every targeted message delivered once",
            g["deliveries"] == g["expected_deliveries"] and g["lost_connections"] == 0,
            f"{g['deliveries']:,} of {g['expected_deliveries']:,} client deliveries",
        )
    if hw.big:
        b = hw.big
        capped = b["attempted"] < b["wanted"] * b["instances"]
        where = "one instance" if b["instances"] == 1 else f"{b['instances']} instances"
        check(
            f"{b['wanted'] * b['instances']:,} connections on {where}",
            None
            if capped and b["connected"] == b["attempted"]
            else b["connected"] >= b["wanted"] * b["instances"] and not b["failed"],
            f"{b['connected']:,} connected"
            + (
                f", all that were attempted: {b['attempted'] // b['instances']:,} per instance is the most "
                f"this machine's fd hard limit ({b['fd_limit']:,} per process) leaves one server process"
                if capped
                else ""
            ),
        )
        check(
            "every connection still held after the idle window",
            None if None in b["held"] else sum(b["held"]) == b["connected"],
            f"{' + '.join(f'{h:,}' for h in b['held'])} held",
        )
        check("connection rate ≥ 2,000/s", b["rate"] >= 2000, f"{b['rate']:,.0f}/s")
        check(
            "a broadcast reaches every connection",
            b["lost"] == 0 and b["dups"] == 0 and b["lost_connections"] == 0 and b["delivered"] > 0,
            f"{b['delivered']:,} deliveries of {b['broadcasts']} broadcasts, "
            f"lost {b['lost']}, dup {b['dups']}",
        )
    return out


def big_table(b: dict[str, Any]) -> str:
    """The big phase's figures, one per row."""
    n, conns = b["instances"], b["connected"]
    capped = (
        f" (capped from {b['wanted']:,} per instance by the fd limit {b['fd_limit']:,})"
        if b["attempted"] < b["wanted"] * n
        else ""
    )
    held = b["held"]
    idle = b["idle_cpu_s"]
    window = b["idle_window_s"]
    last = b["last_delivery_ms"]
    rows = [
        ("hubwire instances (one Redis)", f"{n}, {b['loadgen_workers']} load generator process(es)"),
        (
            "connections held",
            f"{sum(h or 0 for h in held):,} ({' + '.join(f'{h:,}' if h is not None else '?' for h in held)})"
            f" of {b['attempted']:,} attempted{capped}, {b['failed']} failed",
        ),
        ("connect rate", f"{b['rate']:,.0f} connections/s ({conns:,} in {b['seconds']:.1f} s)"),
        ("RSS per connection", f"{fmt(b['rss_kb_per_conn'])} KB (all instances' growth / connections)"),
        (
            f"idle CPU ({window:g} s, all connected)",
            f"{idle * 100 / window:.1f} % of a core = "
            f"{fmt(idle * 1e6 / (conns * window) if conns else None, 3)} µs per connection per second",
        ),
        (
            "broadcast via instance 0 → every client",
            f"{len(last)} single broadcast(s): time to last delivery "
            + ", ".join(f"{v:,.0f}" for v in last)
            + " ms (median delivery "
            + ", ".join(f"{v:,.0f}" for v in b["median_delivery_ms"])
            + f" ms); {b['delivered']:,} delivered, lost {b['lost']}, dup {b['dups']}, "
            f"connections dropped {b['lost_connections']}",
        ),
    ]
    head = "**Concurrent connections (hubwire, big phase):**\n\n| figure | value |\n| --- | --- |"
    return head + "".join(f"\n| {k} | {v} |" for k, v in rows)


def report_text(reports: list[ServerReport], args: argparse.Namespace, elapsed: float) -> str:
    parts = [
        f"## hubwire bench — {', '.join(map(str, args.clients))} clients, {args.duration:g}s phases, "
        f"window {args.window}, {args.loadgens} load generator(s), {os.cpu_count()} cores, {elapsed:.0f}s"
        + (f", hubwire from {args.hubwire_src}" if args.hubwire_src else "")
        + (f", hubwire on {args.hubwire_python}" if args.hubwire_python else ""),
        "",
        "CPU = user+sys of both server processes per delivery (fan-out to all, and to a group of half "
        "the clients); p99 = delivery latency at a fixed "
        f"{args.latency_rate:,.0f} deliveries/s; RSS = growth of both processes per idle WebSocket. "
        "Ratio columns: each value ÷ the same value of socket.io-node / the picows floors (one frame "
        "per message; `picows-batch`: one write per socket per loop iteration, as hubwire), in the "
        "columns' order (below 1 is better).",
        "",
        table(reports, args),
        "",
    ]
    if not any(r.fanout or r.group or r.latency or r.idle_kb is not None for r in reports):
        parts = parts[:2]  # no broadcast round ran: only the rooms below
    rooms = rooms_table(reports)
    if rooms:
        parts += [
            f"**Many small rooms** (rooms of {args.rooms_size}, half of each on each instance; one member of "
            f"each room sends to it; {args.rooms_duration:g}s of sending per row; CPU per delivery = both "
            "servers' CPU over the send window ÷ deliveries; Redis = redis-server's CPU the same way; "
            "join = wall time for every client to join its room, acknowledged):",
            "",
            rooms,
            "",
        ]
    if getattr(args, "plot_files", None):
        base = args.output.parent.resolve() if args.output else None
        links = []
        for path in args.plot_files:
            shown = os.path.relpath(path.resolve(), base) if base else str(path)
            links.append(f"![{path.stem}]({shown})")
        parts += [*links, ""]
    hw = next((r for r in reports if r.name == "hubwire"), None)
    if hw and hw.ingest:
        g = hw.ingest
        parts.append(
            f"**Backplane ingest (hubwire, one instance):** {g['consume_rate']:,.0f} messages/s consumed "
            f"({g['published']:,} targeted envelopes published at {g['publish_rate']:,.0f}/s to "
            f":connection / :user / :group of {g['group_size']} over {g['clients']} connections; "
            f"{fmt(g['cpu_us_per_message'], 2)} µs CPU/message; client records {g['deliveries']:,} "
            f"of {g['expected_deliveries']:,} expected)"
        )
        parts.append("")
    if hw and hw.big:
        parts += [big_table(hw.big), ""]
    if any(r.deflate for r in reports):
        parts += [
            f"**permessage-deflate** (~1 KB JSON broadcasts, closed loop with {args.deflate_window} in "
            "flight; clients offer `permessage-deflate; client_max_window_bits` as browsers do, or "
            "nothing; wire bytes = everything the clients read from their sockets, frame headers and "
            "pings included):",
            "",
            deflate_table(reports),
            "",
        ]
        deflate_checks = deflate_targets(reports, args)
        if deflate_checks:
            parts += ["**Targets (permessage-deflate):**", *deflate_checks, ""]
    checks = targets(reports, args)
    if checks:
        parts += ["**Targets (hubwire):**", *checks, ""]
    parts += ["<details><summary>per phase</summary>", "", details(reports), "", "</details>", ""]
    errs = [f"- {r.name}: {e}" for r in reports for e in r.errors]
    if errs:
        parts += ["**Errors:**", *errs, ""]
    return "\n".join(parts)


def report_data(report: ServerReport) -> dict[str, Any]:
    """``report`` as JSON can hold it: the deflate phase's (variant, clients) keys become
    ``"variant:clients"`` (bench/plots.py's ``load`` reads them back)."""
    data = asdict(report)
    data["deflate"] = {f"{variant}:{n}": asdict(r) for (variant, n), r in report.deflate.items()}
    return data


def room_specs(text: str) -> list[RoomSpec]:
    out = []
    for item in text.split(","):
        if item.strip():
            clients, _, rate = item.strip().partition("x")
            out.append(RoomSpec(int(clients), float(rate or 1)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])

    def csv(kind: type) -> Any:
        return lambda s: [kind(x) for x in s.split(",") if x.strip()]

    p.add_argument("--clients", type=csv(int), default=[1000, 5000], help="client counts (default 1000,5000)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of each fan-out/group phase")
    p.add_argument("--latency-duration", type=float, default=None, help="seconds of the latency phase")
    p.add_argument("--latency-rate", type=float, default=10_000, help="deliveries/s of the latency phase")
    p.add_argument("--servers", type=csv(str), default=list(SERVERS), help=",".join(SERVERS))
    p.add_argument(
        "--phases", type=csv(str), default=list(DEFAULT_PHASES),
        help=",".join(PHASES) + " (default: all but deflate)",
    )  # fmt: skip
    p.add_argument("--window", type=int, default=4, help="broadcasts in flight in fan-out/group phases")
    p.add_argument(
        "--deflate-window", type=int, default=1, help="broadcasts in flight in the deflate phase (default 1: "
        "inflating slows the load generator, which would otherwise change how much servers coalesce)"
    )  # fmt: skip
    p.add_argument("--loadgens", type=int, default=1, help="load generator processes")
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle connections settle before RSS")
    p.add_argument("--ingest-clients", type=int, default=1000)
    p.add_argument("--ingest-group-size", type=int, default=3)
    p.add_argument("--ingest-seconds", type=float, default=5.0, help="seconds of publishing")
    p.add_argument("--ingest-max", type=int, default=5_000_000, help="most envelopes published")
    p.add_argument(
        "--big-conns", type=int, default=20_000, help="connections of the big phase on each instance"
    )  # fmt: skip
    p.add_argument(
        "--big-instances", type=int, default=1, help="hubwire instances of the big phase (1: instance A; "
        "more: a fresh set sharing the Redis)"
    )  # fmt: skip
    p.add_argument(
        "--big-idle", type=float, default=10.0, help="seconds of the big phase's idle-CPU window"
    )  # fmt: skip
    p.add_argument("--big-concurrency", type=int, default=500, help="handshakes in flight in the big phase")
    p.add_argument("--big-broadcasts", type=int, default=3)
    p.add_argument(
        "--big-loadgens", type=int, default=1, help="least load generator processes of the big phase "
        "(more are used when one process's fd limit is too low)"
    )  # fmt: skip
    p.add_argument(
        "--hubwire-src", type=Path, help="serve hubwire from this source directory (the one holding the "
        "hubwire package, e.g. an exported commit's src/) instead of the project's install"
    )  # fmt: skip
    p.add_argument(
        "--hubwire-python", type=Path, help="serve hubwire with this Python (e.g. another venv's "
        "bin/python, which has hubwire and its bench app's packages installed)"
    )  # fmt: skip
    p.add_argument(
        "--rooms", type=room_specs, default=room_specs("20000x1,2000x1,4000x2"),
        help="rows of the rooms phase, CLIENTSxRATE (messages/s per room), comma-separated "
        "(default 20000x1,2000x1,4000x2)",
    )  # fmt: skip
    p.add_argument("--rooms-size", type=int, default=4, help="members per room (default 4)")
    p.add_argument("--rooms-duration", type=float, default=None, help="seconds of sending per rooms row")
    p.add_argument(
        "--rooms-servers", type=csv(str), default=["hubwire", "socketio-node"],
        help="servers that run the rooms phase (default hubwire,socketio-node)",
    )  # fmt: skip
    p.add_argument(
        "--rooms-join-concurrency", type=int, default=500, help="joins in flight in the rooms phase"
    )  # fmt: skip
    p.add_argument("--output", type=Path, help="also write the markdown report here")
    p.add_argument(
        "--plots", type=Path, help="write the PNG plots into this directory (default: --output's directory)"
    )  # fmt: skip
    p.add_argument(
        "--profile", type=Path, help="profile the hubwire instances (cProfile of the event-loop thread): "
        "one .prof file per instance in this directory, written when it stops",
    )  # fmt: skip
    p.add_argument(
        "--redis-perf", type=Path, help="record Redis with perf (cpu-clock, call graphs) during each rooms "
        "row's send window: redis-<server>-<row>.data in this directory, for perf report",
    )  # fmt: skip
    p.add_argument("--keep-logs", action="store_true", help="keep the server logs directory")
    args = p.parse_args(argv)
    unknown = [s for s in args.servers if s not in SERVERS] + [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error(f"unknown server/phase {unknown}")
    if args.hubwire_src and not (args.hubwire_src / "hubwire" / "__init__.py").is_file():
        p.error(f"--hubwire-src: no hubwire package in {args.hubwire_src}")
    if args.latency_duration is None:
        args.latency_duration = args.duration
    if args.rooms_duration is None:
        args.rooms_duration = args.duration
    if args.rooms_size < 2:
        p.error("--rooms-size: at least 2 (a member sends, the others receive)")
    if args.plots is None and args.output is not None:
        args.plots = args.output.parent
    args.clients = sorted(set(args.clients))
    if not args.clients or min(args.clients) < 4:
        p.error("--clients: at least 4")
    return args


def check_setup(args: argparse.Namespace) -> None:
    missing = []
    for mod, server in (
        ("socketio", "socketio-py"),
        ("picows", "picows"),
        ("picows", "picows-batch"),
        ("uvloop", None),
        ("matplotlib", "plots"),
    ):
        if server is None or server in args.servers or (server == "plots" and args.plots):
            try:
                __import__(mod)
            except ImportError:
                if mod not in missing:
                    missing.append(mod)
    if "socketio-node" in args.servers and not (ROOT / "bench/node/node_modules/socket.io").is_dir():
        missing.append("bench/node/node_modules")
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: run bench/setup.sh first")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_setup(args)
    workdir = Path(tempfile.mkdtemp(prefix="hubwire-bench-"))
    procs = Processes(workdir)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    reports: list[ServerReport] = []
    failed = False
    try:
        redis = Redis(procs, workdir)
        bench = Bench(args, procs, redis, workdir)
        print(f"[bench] logs in {workdir}", file=sys.stderr, flush=True)
        for name in args.servers:
            reports.append(bench.run_server(name))
        bench.lg.close()
    except KeyboardInterrupt:
        print("[bench] interrupted", file=sys.stderr)
        failed = True
    finally:
        procs.stop_all()
    elapsed = time.monotonic() - started
    args.plot_files = []
    if args.plots and reports:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))  # run as a script: bench/ is on the path, not the project
        from bench.plots import write_plots

        try:
            args.plot_files = write_plots(reports, args, args.plots)
        except Exception as exc:  # the numbers matter more than the pictures
            print(f"[bench] plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    text = report_text(reports, args, elapsed)
    print(text)
    if args.output:
        args.output.write_text(text)
        # the results behind the report and the plots (latency quantile points included), so the
        # plots can be drawn again (python -m bench.plots FILE.json) and runs compared later
        data = {
            "args": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("rooms", "plot_files")
            }
            | {"rooms": [[r.clients, r.rate] for r in args.rooms]},
            "reports": [report_data(r) for r in reports],
        }
        args.output.with_suffix(".json").write_text(json.dumps(data))
    lost = sum(x.lost for r in reports for x in r.results())
    dup = sum(x.dups + x.unexpected for r in reports for x in r.results())
    if lost or dup:
        print(f"[bench] deliveries lost: {lost}, duplicated or misdelivered: {dup}", file=sys.stderr)
    for r in reports:
        if r.ingest and r.ingest["deliveries"] != r.ingest["expected_deliveries"]:
            print(f"[bench] {r.name}: ingest deliveries incomplete", file=sys.stderr)
            failed = True
        if r.big and (r.big["lost"] or r.big["dups"] or r.big["failed"]):
            print(f"[bench] {r.name}: big phase lost connections or deliveries", file=sys.stderr)
            failed = True
    failed = failed or lost > 0 or dup > 0 or any(r.errors for r in reports)
    if args.keep_logs or failed:
        print(f"[bench] logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
