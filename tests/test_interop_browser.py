"""The official client's browser bundle in Debian's Chromium (headless, via playwright-core).

``tests/interop/browser.cjs`` opens the interop app's page (``/browser``, bundles served from
node_modules) on ``http://localhost:<port>`` and talks to the hubs on ``http://127.0.0.1:<port>``,
so every request is cross-origin with credentials: CORS preflights for the XHR polls and POSTs,
EventSource with ``withCredentials``, tokens in the ``access_token`` query for WebSockets and SSE.
One page per transport x protocol; one pytest test per check.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, node_checks_against
from tests.requirements import BROWSER, chromium_path, requires

SCRIPT = ROOT / "tests" / "interop" / "browser.cjs"
BROWSER_TIMEOUT = 150.0

RUNS = (
    ("WebSockets", "json"),
    ("WebSockets", "messagepack"),
    ("ServerSentEvents", "json"),
    ("LongPolling", "json"),
    ("LongPolling", "messagepack"),
)
CHECKS = (
    "cross_origin_page",
    "echo",
    "active_transport_name",
    "connection_id_matches_server",
    "server_calls_client",
    "stream_items",
    "error_text",
    "client_result",
    "user_agent_header",
    "jwt_authorized_hub",
    "unauthorized_negotiate_401",
    "nowebsockets_fallback",
)
#: the raw /echo connection has no hub protocol: checked once per transport, with the json page
JSON_ONLY = ("raw_echo_connection",)

pytestmark = requires(*BROWSER)


@pytest.fixture(scope="module")
def browser_results() -> Iterator[tuple[dict[str, dict[str, object]], str]]:
    with node_checks_against(
        "examples.interop.app:app", SCRIPT, BROWSER_TIMEOUT, str(chromium_path())
    ) as results:
        yield results


@pytest.mark.parametrize(
    "name",
    [
        f"{transport}/{protocol}/{check}"
        for transport, protocol in RUNS
        for check in (*CHECKS, *(JSON_ONLY if protocol == "json" else ()))
    ],
)
def test_browser(browser_results: tuple[dict[str, dict[str, object]], str], name: str) -> None:
    results, stderr = browser_results
    result = results.get(name)
    if result is None:
        pytest.fail(f"{name} did not report\n{stderr[-3000:]}")
    assert result["ok"], result["detail"]
