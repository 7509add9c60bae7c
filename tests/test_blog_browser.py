"""The blog demo end to end in Debian's Chromium: three instances on Redis behind the round-robin front.

``tests/blog/browser.cjs`` (playwright-core, launched like the interop browser test) opens two pages
through the front (an admin and a follower of ``alice``), makes sure they sit on different instances,
publishes through the REST API of the third instance and checks both pages, the follower's
``AuthorPosted``, admin-only alerts, then kills the admin page's instance and checks the page
reconnects to another one and is back in ``admins``. One pytest test per check; screenshots in
``test-artifacts/blog/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tests.blog import start_demo
from tests.conftest import ROOT, RedisServer, run_node_checks
from tests.requirements import BROWSER, chromium_path, requires

SCRIPT = ROOT / "tests" / "blog" / "browser.cjs"
ARTIFACTS = ROOT / "test-artifacts" / "blog"
BROWSER_TIMEOUT = 120.0

CHECKS = (
    "pages_connect_through_the_front",
    "pages_on_different_instances",
    "bob_follows_alice",
    "post_published_on_third_instance_reaches_both_pages",
    "follower_gets_author_posted",
    "non_follower_gets_no_author_posted",
    "page_publishes_and_both_see_it",
    "only_admin_pages_show_alerts",
    "non_admin_cannot_send_alerts",
    "instance_dies_page_reconnects_elsewhere_and_rejoins_groups",
    "no_page_errors",
)

pytestmark = requires(*BROWSER)


@pytest.fixture(scope="module")
def browser_results(redis_server: RedisServer) -> Iterator[tuple[dict[str, dict[str, object]], str]]:
    prefix = f"blog-browser-{uuid.uuid4().hex[:8]}:"
    demo = start_demo("--instances", "3", "--redis", redis_server.url, "--channel-prefix", prefix)
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    config = {
        "front": demo.url,
        "chromium": str(chromium_path()),
        "artifacts": str(ARTIFACTS),
        "instances": [{"name": i.name, "url": i.url, "pid": i.pid} for i in demo.instances],
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
    try:
        results, err = run_node_checks([str(SCRIPT), f.name], BROWSER_TIMEOUT)
        yield results, f"{err}\n--- demo output ---\n{demo.output()}"
    finally:
        os.unlink(f.name)
        demo.stop()
        demo.kill_all()


@pytest.mark.parametrize("name", CHECKS)
def test_blog_in_chromium(browser_results: tuple[dict[str, dict[str, object]], str], name: str) -> None:
    results, stderr = browser_results
    result = results.get(name)
    if result is None:
        pytest.fail(f"{name} did not report\n{stderr[-4000:]}")
    assert result["ok"], f"{result['detail']}\n{stderr[-2000:]}"


def test_blog_screenshots_saved(browser_results: tuple[dict[str, dict[str, object]], str]) -> None:
    shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
    assert "01-ada-connected.png" in shots and "03-ada-alert.png" in shots, shots
