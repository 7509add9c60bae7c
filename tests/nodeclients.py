"""Official JS clients driven through a Node script, and the round-robin front before instances.

Shared by the instance-death and instance-lease suites: the Node process prints one JSON event per
line and takes commands on stdin; every read is bounded. The front is the blog demo's round-robin
balancer (``examples.blog.front``), so no request sticks to an instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from .conftest import PYTHON, ROOT, free_port, wait_port

NODE = shutil.which("node")


class Clients:
    """The Node process: JSON events out, commands in, every read bounded."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []

    async def next_event(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise AssertionError(f"the Node clients exited ({self.proc.returncode}); events: {self.events}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        assert event["event"] not in ("error", "closed"), event
        return event

    async def wait_for(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next_event(max(0.01, deadline - time.monotonic()))
            if event["event"] == kind:
                return event

    async def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()


@contextlib.asynccontextmanager
async def node_clients(script: Path, *args: str) -> AsyncIterator[Clients]:
    """Run ``node script args...``; killed (and waited for, bounded) on exit."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        yield Clients(proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


@contextlib.contextmanager
def round_robin_front(urls: Sequence[str]) -> Iterator[str]:
    """The blog demo's round-robin front before ``urls``; its URL. Stopped (bounded) on exit."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [PYTHON, "-m", "examples.blog.front", "--port", str(port), *urls],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
