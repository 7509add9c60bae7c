"""The blog on N instances sharing Redis, behind a round-robin front: ``hubwire demo --instances 3``.

* Redis: ``--redis URL``, or else a private ``redis-server`` started on a free port (never 6379)
  with no persistence, stopped on exit.
* N ``hubwire run examples.blog.app:app --redis URL --channel-prefix P`` processes, each on its own
  port (``--port`` + 1, + 2, ... when free, else any free port), named ``instance-1 :PORT`` ...
* The front (``front.py``) on ``--port``: every HTTP request and WebSocket goes to the next
  instance, no session affinity.

Open the front's URL in two windows: each shows the instance it is connected to; publish in one and
the post appears in both, whichever instances they are on. "Reconnect" moves a page to the next
instance. Check the backplane between two instances with ``python -m examples.blog.verify URL1 URL2``.
Ctrl+C stops everything this command started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
APP = "examples.blog.app:app"
START_TIMEOUT = 30.0
DEFAULT_PREFIX = "BlogApp:SignalR:"


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(
    host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2) as s:
            # a connect to a free port in the ephemeral range can connect the socket to itself
            # (TCP simultaneous open): that is not a listener
            if s.getsockname() != s.getpeername():
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} is not listening on port {port} after {timeout:.0f} s")


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when this process dies, even by SIGKILL."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


class Cluster:
    """The processes of the demo cluster; ``stop()`` ends every one of them."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.instance_ports: dict[str, int] = {}
        self.redis_dir: str | None = None
        self._stopping = False

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, quiet: bool = False
    ) -> subprocess.Popen[bytes]:
        # children get their own sessions, so Ctrl+C reaches only this process, and stop() ends
        # them in order (instances, then Redis) with SIGTERM; they still die with this process
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL if quiet else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.procs.append((name, proc))
        return proc

    def start_redis(self) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("no redis-server: apt-get install redis-server, or pass --redis URL")
        port = free_port(self.host)
        self.redis_dir = tempfile.mkdtemp(prefix="hubwire-blog-redis-")
        proc = self._spawn(
            "redis-server",
            [
                exe,
                "--port",
                str(port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.redis_dir,
                "--loglevel",
                "warning",
            ],
            quiet=True,
        )
        wait_port(self.host, port, proc, "redis-server")
        return f"redis://{self.host}:{port}/0"

    def start_instance(self, index: int, port: int, redis_url: str, prefix: str) -> str:
        env = dict(os.environ)
        paths = (str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env["BLOG_INSTANCE"] = f"instance-{index} :{port}"
        self.instance_ports[f"instance-{index}"] = port
        self._spawn(
            f"instance-{index}",
            [
                sys.executable,
                "-m",
                "hubwire.cli",
                "run",
                APP,
                "--host",
                self.host,
                "--port",
                str(port),
                "--redis",
                redis_url,
                "--channel-prefix",
                prefix,
                "--log-level",
                "warning",
            ],
            env,
        )
        return f"http://{self.host}:{port}"

    def wait_instances(self) -> None:
        for name, proc in self.procs:
            if name in self.instance_ports:
                wait_port(self.host, self.instance_ports[name], proc, name)

    def watch(self) -> None:
        """Report instances that exit while the cluster runs (the front skips them)."""

        def run() -> None:
            reported: set[str] = set()
            while not self._stopping:
                for name, proc in self.procs:
                    if name not in reported and proc.poll() is not None:
                        reported.add(name)
                        print(f"{name} exited with code {proc.returncode}", flush=True)
                time.sleep(0.5)

        threading.Thread(target=run, name="cluster-watch", daemon=True).start()

    def stop(self) -> None:
        """Instances first (they close their clients while Redis is still there), then Redis."""
        self._stopping = True
        instances = [proc for name, proc in self.procs if name in self.instance_ports]
        others = [proc for name, proc in self.procs if name not in self.instance_ports]
        for group in (instances, others):
            for proc in group:
                if proc.poll() is None:
                    proc.terminate()
            for proc in group:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self.redis_dir:
            shutil.rmtree(self.redis_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.blog.cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the front's port (instances: the next ones)")
    parser.add_argument("--redis", help="Redis URL (default: start a private redis-server on a free port)")
    parser.add_argument("--channel-prefix", default=DEFAULT_PREFIX)
    args = parser.parse_args(argv)
    if args.instances < 1:
        parser.error("--instances must be at least 1")
    if not port_free(args.host, args.port):
        raise SystemExit(f"port {args.port} is in use (pass --port)")

    from .front import serve

    cluster = Cluster(args.host)
    # SIGTERM ends the cluster like Ctrl+C does (uvicorn handles both while the front runs)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        redis_url = args.redis or cluster.start_redis()
        taken = {args.port}
        urls = []
        for index in range(1, args.instances + 1):
            port = args.port + index
            if port in taken or not port_free(args.host, port):
                port = free_port(args.host)
            taken.add(port)
            urls.append(cluster.start_instance(index, port, redis_url, args.channel_prefix))
        cluster.wait_instances()
        cluster.watch()
        print(f"redis {redis_url} (channel prefix {args.channel_prefix})", flush=True)
        for index, url in enumerate(urls, 1):
            print(f"instance-{index} {url}", flush=True)
        print(
            f"hubwire demo: {args.instances} instances behind a round-robin front on "
            f"http://{args.host}:{args.port}  (Ctrl+C to stop)",
            flush=True,
        )
        serve(urls, args.host, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
