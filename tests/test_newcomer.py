"""What a newcomer needs to see: why a call's arguments did not bind, and how Redis is configured.

Real ``hubwire run`` processes (and a real redis-server where Redis is reachable): argument errors
are logged on the server and detailed with ``--detailed-errors``; a typo'd Redis URL stops the
server with one line naming it (password hidden) and where it came from; the backplane is named
at startup; ``--require-redis`` refuses to start without Redis.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hubwire import HubOptions

from .conftest import RedisServer, ServerProcess, free_port
from .rawhub import RawHub

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.foundation:app"


def _run_until_exit(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``hubwire run`` expected to refuse to start: its exit status and output."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HUBWIRE_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hubwire.cli", "run", APP, "--port", str(free_port()), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_argument_errors_are_logged_and_detailed(start_server: Any) -> None:
    server = start_server(APP, args=["--detailed-errors", "--log-level", "info"])
    first = await RawHub.open(server.url, "/hub")
    second = await RawHub.open(server.url, "/hub")
    try:
        wrong_type = await first.invoke_raw("Add", "one", 2)
        wrong_count = await second.invoke_raw("Add", 1)
        assert wrong_type["error"] == (
            "Failed to invoke 'Add' due to an error on the server. InvalidDataException: Error binding "
            "arguments. Make sure that the types of the provided values match the types of the hub method "
            "being invoked. Parameter 'a' (int): Expected `int`, got `str`"
        )
        assert wrong_count["error"] == (
            "Failed to invoke 'Add' due to an error on the server. InvalidDataException: "
            "Invocation provides 1 argument(s) but target expects 2."
        )
        assert await first.invoke("Add", 1, 2) == 3  # the connection lives on
    finally:
        await first.close()
        await second.close()
    server.kill()  # its whole log is written then; the fixture removes it
    out = server.output()
    assert "cannot bind the arguments of 'Add' (method add)" in out, out
    assert "parameter 'a' expects int, got str: Expected `int`, got `str`" in out, out
    assert "expected 2 argument(s) (a: int, b: int), got 1" in out, out
    assert "backplane: in-memory" in out, out


def test_detailed_errors_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUBWIRE_DETAILED_ERRORS", raising=False)
    assert HubOptions().enable_detailed_errors is False
    monkeypatch.setenv("HUBWIRE_DETAILED_ERRORS", "1")
    assert HubOptions().enable_detailed_errors is True
    assert HubOptions(enable_detailed_errors=False).enable_detailed_errors is False  # code wins


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["--redis", "reddis://ops:hunter2@127.0.0.1:1/0"], {}, "--redis"),
        ([], {"HUBWIRE_REDIS_URL": "reddis://ops:hunter2@127.0.0.1:1/0"}, "HUBWIRE_REDIS_URL"),
    ],
)
def test_a_typoed_redis_url_is_one_line_naming_it(args: list[str], env: dict[str, str], source: str) -> None:
    done = _run_until_exit(args, env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"hubwire: {source}: unsupported Redis URL scheme 'reddis' in reddis://ops:***@127.0.0.1:1/0 "
        "(redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, redis+cluster://, "
        "rediss+cluster://)"
    ], done.stderr


def test_require_redis_refuses_to_start_without_it() -> None:
    url = f"redis://ops:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    done = _run_until_exit(["--redis", url, "--require-redis"])
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert (
        f"Redis at redis://ops:***@127.0.0.1:{url.rsplit(':', 1)[1]} is not reachable and it is required"
        in out
    ), out
    assert "hunter2" not in out, out
    assert _run_until_exit(["--require-redis"]).stderr.strip() == (
        "hubwire: --require-redis needs a Redis URL: pass --redis or set HUBWIRE_REDIS_URL"
    )


def test_the_backplane_is_named_at_startup(redis_server: RedisServer) -> None:
    server = ServerProcess(
        APP,
        args=[
            "--redis",
            redis_server.url,
            "--channel-prefix",
            "newcomer:",
            "--require-redis",
            "--log-level",
            "info",
        ],
    )
    try:
        server.kill()
        out = server.output()
    finally:
        server.close()
    assert f"backplane: Redis at {redis_server.url} (standalone), channel prefix 'newcomer:'" in out, out


def test_unreachable_redis_warnings_name_the_url_once() -> None:
    port = free_port()  # nothing listens there
    server = ServerProcess(APP, args=["--redis", f"redis://ops:hunter2@127.0.0.1:{port}/0"])
    try:
        # by the time the port is open the startup waited for Redis and the links retried several times
        out = server.output()
    finally:
        server.close()
    url = f"redis://ops:***@127.0.0.1:{port}/0"
    assert out.count(f"backplane publisher cannot reach 127.0.0.1:{port} (of {url})") == 1, out
    assert out.count(f"backplane subscriber (127.0.0.1:{port}, of {url})") == 1, out
    assert "hunter2" not in out, out


async def test_hub_method_failures_are_logged_with_their_traceback(start_server: Any) -> None:
    """A bug in a hub method is an ERROR with its traceback (the client gets SignalR's generic text);
    a HubException, meant for the caller, is not an error of the server."""
    server = start_server(APP, args=["--log-level", "warning"])
    hub = await RawHub.open(server.url, "/hub")
    try:
        failed = await hub.invoke_raw("Throw", "kaboom-in-method")
        assert failed["error"] == "An unexpected error occurred invoking 'Throw' on the server."
        refused = await hub.invoke_raw("ThrowHubException", "meant-for-the-caller")
        assert "meant-for-the-caller" in refused["error"]
    finally:
        await hub.close()
    server.kill()
    out = server.output()
    assert "hub method Throw failed" in out, out
    assert "Traceback (most recent call last)" in out and "kaboom-in-method" in out, out
    assert "ThrowHubException" not in out and "meant-for-the-caller" not in out, out


def test_ids_beginning_with_a_dash_are_values_not_options() -> None:
    """Connection ids are base64url: ``--client -x1`` names a connection, it is not an option."""
    import argparse

    from hubwire.cli import _dashed_ids

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    emit = sub.add_parser("emit")
    emit.add_argument("--client")
    emit.add_argument("--json", action="store_true")
    assert _dashed_ids(["emit", "--client", "-x1Ab", "Hello"], parser) == ["emit", "--client=-x1Ab", "Hello"]
    assert _dashed_ids(["emit", "--client", "--json"], parser) == ["emit", "--client", "--json"]
    assert _dashed_ids(["emit", "--group", "-team"], parser) == ["emit", "--group=-team"]
    emit = ["emit", "--redis", "redis://127.0.0.1:1", "--hub", "ChatHub", "--client", "-x1Ab", "Hi"]
    done = subprocess.run(
        [sys.executable, "-m", "hubwire.cli", *emit],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "expected one argument" not in done.stderr, done.stderr  # parsed: it fails on Redis instead
    assert "cannot publish through Redis" in done.stderr, done.stderr
