"""``python -m examples.blog.verify A B``: exit 0 against two instances sharing Redis, non-zero
against two instances without a shared backplane (each in memory, or different channel prefixes)."""

from __future__ import annotations

import subprocess
import uuid

import pytest

from tests.conftest import PYTHON, ROOT, RedisServer, ServerProcess

APP = "examples.blog.app:app"
TIMEOUT = 30


def run_verify(a: ServerProcess, b: ServerProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "examples.blog.verify", a.url, b.url, "--timeout", "3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_verify_passes_with_the_redis_backplane(start_server: object, redis_server: RedisServer) -> None:
    prefix = f"verify-{uuid.uuid4().hex[:8]}:"
    args = ["--redis", redis_server.url, "--channel-prefix", prefix]
    a = start_server(APP, args=args, env={"BLOG_INSTANCE": "A"})  # type: ignore[operator]
    b = start_server(APP, args=args, env={"BLOG_INSTANCE": "B"})  # type: ignore[operator]
    result = run_verify(a, b)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert sum("... PASS" in line for line in lines) == 5, result.stdout
    assert "client A connected" in result.stdout and "(instance A)" in result.stdout
    assert "client B (B) received PostPublished ... PASS" in result.stdout
    assert lines[-1] == "RESULT: PASS"


@pytest.mark.parametrize("setup", ["in_memory", "different_prefixes"])
def test_verify_fails_without_a_shared_backplane(
    start_server: object, redis_server: RedisServer, setup: str
) -> None:
    """Each instance in memory, or both on one Redis under different prefixes: B's client misses it."""
    args = {"A": [], "B": []}
    if setup == "different_prefixes":
        tag = uuid.uuid4().hex[:8]
        args = {name: ["--redis", redis_server.url, "--channel-prefix", f"{tag}-{name}:"] for name in args}
    a = start_server(APP, args=args["A"], env={"BLOG_INSTANCE": "A"})  # type: ignore[operator]
    b = start_server(APP, args=args["B"], env={"BLOG_INSTANCE": "B"})  # type: ignore[operator]
    result = run_verify(a, b)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "client A (A) received PostPublished ... PASS" in result.stdout
    assert "client B (B) received PostPublished ... FAIL" in result.stdout
    assert result.stdout.splitlines()[-1] == "RESULT: FAIL"


def test_verify_fails_when_an_instance_is_unreachable(start_server: object) -> None:
    a = start_server(APP)  # type: ignore[operator]
    gone = ServerProcess(APP)
    gone.close()
    result = run_verify(a, gone)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"client B connected to {gone.url} ... FAIL" in result.stdout
