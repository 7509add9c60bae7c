"""What the suites need from outside Python, checked in one place.

The suites that drive Node, the npm packages, Chromium or redis-server skip themselves when those
are absent (handy on a laptop) through :func:`requires`; under ``./run test`` (``HUBWIRE_REQUIRE_ALL=1``)
``tests/conftest.py`` checks the very same requirements before the session starts and turns any skip
into a failure, so CI can never pass by skipping a suite.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "node_modules"


def require_all() -> bool:
    """``./run test`` sets HUBWIRE_REQUIRE_ALL=1: nothing may be skipped."""
    return os.environ.get("HUBWIRE_REQUIRE_ALL") == "1"


def node() -> str | None:
    return shutil.which("node")


def chromium() -> Path | None:
    """The Chromium the browser suites launch: ``$HUBWIRE_CHROMIUM``, else Debian's ``/usr/bin/chromium``,
    else a ``chromium`` on PATH (what ``./run test`` installs)."""
    configured = os.environ.get("HUBWIRE_CHROMIUM")
    if configured:
        return Path(configured) if os.access(configured, os.X_OK) else None
    debian = Path("/usr/bin/chromium")
    if os.access(debian, os.X_OK):
        return debian
    found = shutil.which("chromium")
    return Path(found) if found else None


def chromium_path() -> Path:
    """The Chromium to launch (only called by suites that required it)."""
    path = chromium()
    assert path is not None, "chromium is required (tests.requirements.requires('chromium'))"
    return path


#: requirement name -> (check, how to get it)
CHECKS: dict[str, tuple[Callable[[], bool], str]] = {
    "node": (lambda: node() is not None, "apt-get install nodejs"),
    "redis-server": (lambda: shutil.which("redis-server") is not None, "apt-get install redis-server"),
    "openssl": (lambda: shutil.which("openssl") is not None, "apt-get install openssl"),
    "@microsoft/signalr": (
        lambda: (NODE_MODULES / "@microsoft" / "signalr" / "package.json").is_file(),
        "npm ci",
    ),
    "@microsoft/signalr-protocol-msgpack": (
        lambda: (NODE_MODULES / "@microsoft" / "signalr-protocol-msgpack" / "package.json").is_file(),
        "npm ci",
    ),
    "playwright-core": (lambda: (NODE_MODULES / "playwright-core" / "package.json").is_file(), "npm ci"),
    "typescript": (lambda: (NODE_MODULES / "typescript" / "package.json").is_file(), "npm ci"),
    "chromium": (lambda: chromium() is not None, "apt-get install chromium, or set HUBWIRE_CHROMIUM"),
}

#: what the Node suites need, and what the browser suites need on top
NODE_CLIENT = ("node", "@microsoft/signalr", "@microsoft/signalr-protocol-msgpack")
BROWSER = (*NODE_CLIENT, "playwright-core", "chromium")


def missing(*names: str) -> list[str]:
    """The requirements among ``names`` (all of them when none is named) that are not met."""
    unknown = set(names) - set(CHECKS)
    assert not unknown, f"unknown requirements {sorted(unknown)}"
    return [f"{name} ({CHECKS[name][1]})" for name in names or CHECKS if not CHECKS[name][0]()]


def requires(*names: str) -> pytest.MarkDecorator:
    """A skip mark for a suite that needs ``names`` (a failure under HUBWIRE_REQUIRE_ALL=1)."""
    absent = missing(*names)
    return pytest.mark.skipif(bool(absent), reason=f"missing: {', '.join(absent)}")
