"""permessage-deflate in Debian's Chromium with the official client's browser bundle, JSON and
MessagePack: the browser negotiates the extension (``WebSocket.extensions``), receives compressed
broadcasts intact, and what it sends compressed is inflated by the server (an echoed 2 KB string,
and the server's counters). Driven by ``tests/js/compression-browser.cjs``; one pytest test per check.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, node_checks_against
from tests.requirements import BROWSER, chromium_path, requires

SCRIPT = ROOT / "tests" / "js" / "compression-browser.cjs"
BROWSER_TIMEOUT = 120.0
CHECKS = (
    "extension_negotiated",
    "compressed_broadcasts_received",
    "compressed_echo_inflated",
    "server_counters",
)

pytestmark = requires(*BROWSER)


@pytest.fixture(scope="module")
def browser_results() -> Iterator[tuple[dict[str, dict[str, object]], str]]:
    with node_checks_against(
        "tests.apps.compression:app", SCRIPT, BROWSER_TIMEOUT, str(chromium_path())
    ) as results:
        yield results


@pytest.mark.parametrize(
    "name", [f"{protocol}/{check}" for protocol in ("json", "messagepack") for check in CHECKS]
)
def test_browser(browser_results: tuple[dict[str, dict[str, object]], str], name: str) -> None:
    results, stderr = browser_results
    result = results.get(name)
    if result is None:
        pytest.fail(f"{name} did not report\n{stderr[-3000:]}")
    assert result["ok"], result["detail"]
