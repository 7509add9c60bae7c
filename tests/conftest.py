"""Shared fixtures: free ports, real server processes, a private redis-server per session."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from .requirements import missing, require_all

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


#: ``HUBWIRE_TEST_PORT_BASE``: hand out ports from [base, base + 10000), below the kernel's ephemeral
#: range (32768 and up on Linux). Why: ``./run test`` runs two pytest processes at once; a port the
#: kernel picked for one (bind to 0, release, the server binds it later) could meanwhile be picked for
#: the other, or become a client connection's source port. Disjoint ranges below the ephemeral ones
#: rule both out; within a process the ports go round the range in order.
_PORT_BASE = int(os.environ.get("HUBWIRE_TEST_PORT_BASE") or 0)
_PORT_SPAN = 10_000
_port_turn = [os.getpid() % _PORT_SPAN]


def free_port() -> int:
    if not _PORT_BASE:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(_PORT_SPAN):
        port = _PORT_BASE + _port_turn[0] % _PORT_SPAN
        _port_turn[0] += 1
        with socket.socket() as s:  # no SO_REUSEADDR: a port in use or in TIME_WAIT is skipped
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{_PORT_BASE}, {_PORT_BASE + _PORT_SPAN})")


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            if s.getsockname() == s.getpeername():  # connected to itself (TCP simultaneous open)
                continue
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


class ServerProcess:
    """A real ``hubwire run`` process on a free loopback port."""

    def __init__(
        self,
        app: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        command: str = "run",
    ) -> None:
        """``command``: ``run`` serves ``app``; ``service`` serves a connection-service node
        (``app`` is not used)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._last_output = ""
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in close()
            prefix="hubwire-server-", suffix=".log", delete=False
        )
        full_env = dict(os.environ)
        paths = [str(ROOT / "src"), str(ROOT), full_env.get("PYTHONPATH", "")]
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "hubwire.cli",
                command,
                *([app] if command == "run" else []),
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *(args or []),
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_port(self.port, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.close()  # stops it first: its whole output is in the log then
            raise type(exc)(f"{exc}; its output:\n{self._last_output}") from None
        except BaseException:
            self.close()
            raise

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def close(self) -> None:
        self.kill()
        with contextlib.suppress(OSError):
            self._last_output = self.output()[-4000:]
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


@pytest.fixture
def start_server() -> Iterator[object]:
    """Factory fixture: ``start_server("tests.apps.foundation:server")`` -> ServerProcess."""
    started: list[ServerProcess] = []

    def start(app: str, **kwargs: object) -> ServerProcess:
        proc = ServerProcess(app, **kwargs)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


class RedisServer:
    """A private redis-server on a free port (never the shared 6379).

    ``options`` are added to its command line, e.g. ``("--enable-debug-command", "yes")`` for a test
    that sends ``DEBUG SLEEP`` (Redis 7 refuses DEBUG by default).
    """

    def __init__(self, port: int | None = None, options: Sequence[str] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed (the README test command installs it)")
        self.exe = exe
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.dir = tempfile.mkdtemp(prefix="hubwire-redis-")
        self.options = list(options)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, proc=self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone (fault tests kill it)."""
    server = RedisServer()
    yield server
    server.close()


@contextlib.contextmanager
def node_checks_against(
    app: str, script: Path, timeout: float, *extra: str
) -> Iterator[tuple[dict[str, dict[str, object]], str]]:
    """Serve ``app``, run a Node check script against its port (:func:`run_node_checks`, with
    ``extra`` arguments after the port), and stop the server afterwards."""
    server = ServerProcess(app)
    try:
        yield run_node_checks([str(script), str(server.port), *extra], timeout)
    finally:
        server.close()


def run_node_checks(args: list[str], timeout: float) -> tuple[dict[str, dict[str, object]], str]:
    """Run a Node check script (one JSON object with a ``name`` per stdout line), bounded in time.

    Returns the results by name and the script's stderr. The script runs in its own session, so
    a timeout kills it together with anything it started (a Chromium, say).
    """
    node = shutil.which("node") or "node"
    proc = subprocess.Popen(
        [node, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
            err += f"\n[killed after {timeout} s]"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    results: dict[str, dict[str, object]] = {}
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[str(result["name"])] = result
    return results, err


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under ``./run test`` (HUBWIRE_REQUIRE_ALL=1) a missing tool fails the run before any test.

    The same checks as the suites' own skip marks (tests/requirements.py), so what the guard
    accepts is exactly what the suites need.
    """
    if not require_all():
        return
    absent = missing()
    if absent:
        pytest.exit(f"missing for the full suite: {', '.join(absent)}", returncode=3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under HUBWIRE_REQUIRE_ALL=1 a skipped test is a failed test: CI never passes by skipping."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and require_all() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under HUBWIRE_REQUIRE_ALL=1 (./run test), which allows no skip: {reason}"
