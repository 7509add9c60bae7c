"""``hubwire run --gc-threshold``: the serving process's cyclic-collector thresholds.

Why it exists: with Python's own thresholds a server that is taking on thousands of connections
collects its whole (growing) object graph again and again, each time a pause of a quarter second
or more on a busy instance (``hubwire.server.gctune``). These tests run real ``hubwire run``
processes and read the thresholds each one applied from its stats endpoint.
"""

from __future__ import annotations

import gc
import subprocess

import httpx
import pytest

from hubwire.server.gctune import DEFAULT_GC_THRESHOLD, apply_env_gc_threshold, parse_gc_threshold
from tests.conftest import PYTHON, ROOT, ServerProcess, free_port

APP = "tests.apps.stateful:app"  # serves /debug/stats


def _threshold(server: ServerProcess) -> list[int]:
    stats = httpx.get(f"{server.url}/debug/stats", timeout=10).json()
    threshold: list[int] = stats["gc"]["threshold"]
    assert len(stats["gc"]["collections"]) == 3
    return threshold


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ([], {}, [700, 10, 100]),  # hubwire run's default
        (["--gc-threshold", "2000,20,50"], {}, [2000, 20, 50]),
        ([], {"HUBWIRE_GC_THRESHOLD": "1500,10,40"}, [1500, 10, 40]),  # the variable is the default
        (["--gc-threshold", "python"], {}, list(gc.get_threshold())),  # Python's own, untouched
    ],
)
def test_run_applies_the_gc_threshold(args: list[str], env: dict[str, str], expected: list[int]) -> None:
    server = ServerProcess(APP, args=args, env=env)
    try:
        assert _threshold(server) == expected
    finally:
        server.close()


@pytest.mark.parametrize("value", ["0,10,10", "700,10", "a,b,c", "700,-1,10", ""])
def test_run_refuses_a_bad_gc_threshold(value: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "run", APP, "--port", str(free_port()), "--gc-threshold", value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--gc-threshold" in done.stderr and "three positive integers" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_parse_and_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_gc_threshold(DEFAULT_GC_THRESHOLD) == (700, 10, 100)
    assert parse_gc_threshold(" 1, 2, 3 ") == (1, 2, 3)
    assert parse_gc_threshold("Python") is None
    before = gc.get_threshold()
    try:
        monkeypatch.setenv("HUBWIRE_GC_THRESHOLD", "900,11,90")
        assert apply_env_gc_threshold() == (900, 11, 90)
        assert gc.get_threshold() == (900, 11, 90)
        # a bad value set outside hubwire run (plain uvicorn) is logged and leaves the collector alone
        monkeypatch.setenv("HUBWIRE_GC_THRESHOLD", "0,0,0")
        assert apply_env_gc_threshold() is None
        assert gc.get_threshold() == (900, 11, 90)
        monkeypatch.delenv("HUBWIRE_GC_THRESHOLD")
        assert apply_env_gc_threshold() is None
    finally:
        gc.set_threshold(*before)
