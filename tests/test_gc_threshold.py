"""``hubwire run --gc-threshold``: the serving process's cyclic-collector thresholds.

Why it exists: with Python's own thresholds a server that is taking on thousands of connections
collects its whole (growing) object graph again and again, each time a pause of a quarter second
or more on a busy instance (``hubwire.server.gctune``). These tests run real ``hubwire run``
processes and read the thresholds each one applied from its stats endpoint.
"""

from __future__ import annotations

import gc
import os
import subprocess

import httpx
import pytest

from hubwire.server import gctune
from hubwire.server.gctune import DEFAULT_GC_THRESHOLD, apply_env_gc_threshold, parse_gc_threshold
from tests.conftest import PYTHON, ROOT, ServerProcess, free_port

APP = "tests.apps.stateful:app"  # serves /debug/stats
PYTHONS_OWN = list(gc.get_threshold())


def _applied(threshold: list[int]) -> list[int]:
    """What a server ends up with: ``threshold``, or Python's own where it does not apply (3.14+)."""
    return threshold if gctune._APPLIES else PYTHONS_OWN


@pytest.fixture(autouse=True)
def _no_inherited_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """The servers inherit this environment: a developer's own setting must not decide the tests."""
    monkeypatch.delenv("HUBWIRE_GC_THRESHOLD", raising=False)


def _threshold(server: ServerProcess) -> list[int]:
    stats = httpx.get(f"{server.url}/debug/stats", timeout=10).json()
    threshold: list[int] = stats["gc"]["threshold"]
    assert len(stats["gc"]["collections"]) == 3
    return threshold


@pytest.mark.parametrize(
    ("app", "args", "env", "expected"),
    [
        (APP, [], {}, _applied([700, 10, 100])),  # hubwire run's default
        (APP, ["--gc-threshold", "2000,20,50"], {}, _applied([2000, 20, 50])),
        (APP, [], {"HUBWIRE_GC_THRESHOLD": "1500,10,40"}, _applied([1500, 10, 40])),  # the variable
        (APP, [], {"HUBWIRE_GC_THRESHOLD": ""}, _applied([700, 10, 100])),  # empty: as unset
        (APP, ["--gc-threshold", "python"], {}, PYTHONS_OWN),  # Python's own, untouched
        ("tests.apps.gc_own:app", [], {}, [1000, 15, 15]),  # the app's own choice wins
    ],
)
def test_run_applies_the_gc_threshold(
    app: str, args: list[str], env: dict[str, str], expected: list[int]
) -> None:
    server = ServerProcess(app, args=args, env=env)
    try:
        assert _threshold(server) == expected
    finally:
        server.close()


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["--gc-threshold", "0,10,10"], {}, "--gc-threshold"),  # zero: no automatic collection
        (["--gc-threshold", "700,10"], {}, "--gc-threshold"),
        (["--gc-threshold", "a,b,c"], {}, "--gc-threshold"),
        (["--gc-threshold", "700,-1,10"], {}, "--gc-threshold"),
        (["--gc-threshold", "99999999999,10,10"], {}, "--gc-threshold"),  # past a C int
        ([], {"HUBWIRE_GC_THRESHOLD": "700,10,0"}, "HUBWIRE_GC_THRESHOLD"),
    ],
)
def test_run_refuses_a_bad_gc_threshold(args: list[str], env: dict[str, str], source: str) -> None:
    done = subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "run", APP, "--port", str(free_port()), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"hubwire: {source}: " in done.stderr and "three positive integers" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_parse_and_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_gc_threshold(DEFAULT_GC_THRESHOLD) == (700, 10, 100)
    assert parse_gc_threshold(" 1, 2, 3 ") == (1, 2, 3)
    assert parse_gc_threshold("Python") is None
    with pytest.raises(ValueError):
        parse_gc_threshold(f"{2**31},10,10")
    before = gc.get_threshold()
    try:
        monkeypatch.setenv("HUBWIRE_GC_THRESHOLD", "900,11,90")
        if not gctune._APPLIES:  # Python 3.14+: left alone
            assert apply_env_gc_threshold() is None and gc.get_threshold() == before
            return
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
