"""Helpers of the blog demo tests: the documented ``hubwire demo`` commands as real processes."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.conftest import PYTHON, ROOT, free_port, wait_port

START_TIMEOUT = 30.0


@dataclass
class Instance:
    name: str
    url: str
    pid: int


@dataclass
class Demo:
    """A running ``hubwire demo`` (one instance, or a cluster behind its front)."""

    proc: subprocess.Popen[str]
    url: str
    lines: list[str] = field(default_factory=list)
    redis_url: str | None = None
    instances: list[Instance] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the demo's process and wait for it; None if it had to be killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_all()
                return None
        return self.proc.returncode

    def kill_all(self) -> None:
        """Whatever is left of the demo's process group (instances, redis-server)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _reader(proc: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def start_demo(*args: str, env: dict[str, str] | None = None, ready: str = "hubwire demo") -> Demo:
    """``hubwire demo --port <free> *args`` from the repository root, as the README runs it.

    Waits (bounded) for the line starting with ``ready`` and for the port; for a cluster, reads the
    ``redis ...`` and ``instance-N URL`` lines and asks every instance for its name and pid.
    """
    port = free_port()
    proc = subprocess.Popen(
        [PYTHON, "-m", "hubwire.cli", "demo", "--port", str(port), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so teardown can end every child
    )
    demo = Demo(proc, f"http://127.0.0.1:{port}")
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc, lines), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    urls: list[str] = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {ready!r} line after {START_TIMEOUT} s:\n{demo.output()}")
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"hubwire demo exited ({proc.wait(5)}):\n{demo.output()}")
            demo.lines.append(line)
            if m := re.match(r"redis (\S+)", line):
                demo.redis_url = m.group(1)
            if m := re.match(r"instance-\d+ (http://\S+)", line):
                urls.append(m.group(1))
            if line.startswith(ready):
                break
        wait_port(port, timeout=START_TIMEOUT)
        for url in urls:
            try:
                info = httpx.get(f"{url}/api/instance", timeout=5).json()
            except httpx.HTTPError as exc:  # say what the demo printed (an instance that exited, ...)
                raise RuntimeError(f"{url}/api/instance: {exc!r}; demo output:\n{demo.output()}") from exc
            demo.instances.append(Instance(str(info["name"]), url, int(info["pid"])))
    except BaseException:
        demo.kill_all()
        raise
    # keep draining the output so the demo never blocks on a full pipe
    threading.Thread(target=_drain, args=(lines, demo.lines), daemon=True).start()
    return demo


def _drain(lines: queue.Queue[str | None], into: list[str]) -> None:
    while (line := lines.get()) is not None:
        into.append(line)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    # a zombie (exited, not yet reaped by its parent) counts as gone
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        if stat.read().split(") ", 1)[1].startswith("Z"):
            return False
    return True
