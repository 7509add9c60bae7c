"""The live cluster dashboard (``HubServer(dashboard_path=..., dashboard_auth=...)``), on real processes.

* Enabling it without an auth callable is refused at construction; ``BasicAuth`` takes only the
  right credentials.
* On one instance of tests/apps/dashboard.py (in memory): the page, its script, style and client
  bundle and its hub (negotiate, Server-Sent Events, WebSockets in both serving modes) answer 401
  without credentials or with wrong ones, 403 from another origin, and work with the right ones;
  the bundle served is the official one (byte for byte what package-lock.json pins); a viewer gets
  snapshots with the app's connections and is counted nowhere among them (stats, deliveries).
* In Chromium (tests/dashboard/browser.cjs): two instances on Redis with the official client's
  connections on each; the page shows both instances and their counts per hub and transport,
  charts deliveries and backplane messages, and shows the SIGKILLed instance gone once its lease
  (1.5 s here) expired. Screenshots in ``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from hubwire import HubServer, RequestInfo
from hubwire.server.dashboard import BasicAuth
from tests.apps.dashboard import DASHBOARD, PASSWORD, USER
from tests.conftest import ROOT, RedisServer, ServerProcess, run_node_checks
from tests.rawhub import RawHub, open_ws, ws_url
from tests.requirements import BROWSER, NODE_MODULES, chromium_path, requires

APP = "tests.apps.dashboard:app"
SCRIPT = ROOT / "tests" / "dashboard" / "browser.cjs"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
VENDORED = ROOT / "src" / "hubwire" / "server" / "dashboard_files" / "signalr.min.js"
BROWSER_TIMEOUT = 60.0
LEASES = {"HUBWIRE_LEASE_INTERVAL": "0.5", "HUBWIRE_LEASE_TTL": "1.5"}
CREDENTIALS = {"authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
WRONG = {"authorization": "Basic " + base64.b64encode(f"{USER}:guess".encode()).decode()}
NEGOTIATE = f"{DASHBOARD}/hub/negotiate?negotiateVersion=1"
FILES = ("", "/signalr.min.js", "/dashboard.js", "/dashboard.css")
CHECKS = [
    "app_clients_connect",
    "page_shows_both_instances",
    "connection_counts_per_instance_hub_and_transport",
    "deliveries_and_backplane_rates_charted",
    "killed_instance_gone_within_lease_ttl",
    "everything_from_the_instance_no_page_errors",
]


# -- construction ------------------------------------------------------------------------------------


def test_enabling_without_an_auth_callable_is_refused() -> None:
    with pytest.raises(ValueError, match="dashboard_auth"):
        HubServer(dashboard_path="/hubwire/dashboard")
    with pytest.raises(TypeError, match="callable"):
        HubServer(dashboard_path="/hubwire/dashboard", dashboard_auth="s3cret")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without dashboard_path"):
        HubServer(dashboard_auth=lambda request: True)
    assert HubServer().dashboard is None
    server = HubServer(dashboard_path="/hubwire/dashboard/", dashboard_auth=lambda request: True)
    assert server.dashboard is not None and server.dashboard.endpoint.methods == {}  # nothing to call


def test_basic_auth_takes_only_the_right_credentials() -> None:
    auth = BasicAuth(USER, PASSWORD)

    def request(headers: dict[str, str]) -> RequestInfo:
        return RequestInfo("/", headers, {}, {})

    assert auth(request(CREDENTIALS))
    assert auth(request({"authorization": CREDENTIALS["authorization"].replace("Basic", "basic")}))
    for headers in (
        {},
        WRONG,
        {"authorization": "Bearer " + CREDENTIALS["authorization"].split()[1]},
        {"authorization": "Basic !!!not-base64"},
        {"authorization": "Basic " + "A" * 10_000},
        {"authorization": "Basic " + base64.b64encode(f"{USER}x:{PASSWORD}".encode()).decode()},
    ):
        assert not auth(request(headers)), headers
    assert auth.challenge.startswith('Basic realm="hubwire dashboard"')
    for bad in (("", "x"), ("ops", ""), ("a:b", "x")):
        with pytest.raises(ValueError):
            BasicAuth(*bad)


@requires("@microsoft/signalr")
def test_the_vendored_bundle_is_the_official_one() -> None:
    """The package ships the bundle (a wheel has no node_modules): it must be the pinned version's."""
    official = NODE_MODULES / "@microsoft" / "signalr" / "dist" / "browser" / "signalr.min.js"
    assert VENDORED.read_bytes() == official.read_bytes()
    pinned = json.loads((ROOT / "package-lock.json").read_text())["packages"][
        "node_modules/@microsoft/signalr"
    ]
    license_text = (VENDORED.parent / "signalr.LICENSE.txt").read_text()
    assert f"@microsoft/signalr {pinned['version']}" in license_text and "MIT" in license_text


# -- one instance, in memory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance() -> Iterator[ServerProcess]:
    server = ServerProcess(APP)
    yield server
    server.close()


def test_without_credentials_everything_is_refused(instance: ServerProcess) -> None:
    with httpx.Client(base_url=instance.url, timeout=5) as http:
        for route in FILES:
            for headers in ({}, WRONG):
                answer = http.get(DASHBOARD + route, headers=headers)
                assert answer.status_code == 401, (route, headers, answer.status_code)
                assert answer.headers["www-authenticate"].startswith("Basic realm=")
                assert answer.content == b""
            assert http.get(DASHBOARD + route, headers=CREDENTIALS).status_code == 200
        assert http.post(NEGOTIATE).status_code == 401
        assert http.post(NEGOTIATE, headers=WRONG).status_code == 401
        token = http.post(NEGOTIATE, headers=CREDENTIALS).json()["connectionToken"]
        sse = {"accept": "text/event-stream"}
        assert http.get(f"{DASHBOARD}/hub", params={"id": token}, headers=sse).status_code == 401
        assert http.post(f"{DASHBOARD}/hub", params={"id": token}, content=b"{}").status_code == 401
        # another origin is refused even with the right credentials (and gets no CORS headers)
        evil = {**CREDENTIALS, "origin": "http://evil.example"}
        for route in FILES:
            assert http.get(DASHBOARD + route, headers=evil).status_code == 403
        refused = http.post(NEGOTIATE, headers=evil)
        assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers
        same = {**CREDENTIALS, "origin": instance.url}
        assert http.post(NEGOTIATE, headers=same).status_code == 200


def test_the_page_and_the_official_bundle(instance: ServerProcess) -> None:
    with httpx.Client(base_url=instance.url, timeout=5, headers=CREDENTIALS) as http:
        page = http.get(DASHBOARD)
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert f'src="{DASHBOARD}/signalr.min.js"' in page.text and f'data-hub="{DASHBOARD}/hub"' in page.text
        assert "<script>" not in page.text  # no inline script: the CSP allows none
        bundle = http.get(f"{DASHBOARD}/signalr.min.js")
        assert bundle.headers["content-type"].startswith("text/javascript")
        assert bundle.content == VENDORED.read_bytes()
        assert http.post(DASHBOARD).status_code == 405


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_the_hub_refuses_websockets_without_credentials(
    serving: str, instance: ServerProcess, start_server: Any
) -> None:
    server = instance if serving == os.environ.get("HUBWIRE_SERVING", "native") else None
    server = server or start_server(APP, args=["--serving", serving])
    url = ws_url(server.url, f"{DASHBOARD}/hub")
    for headers in ({}, WRONG, {**CREDENTIALS, "origin": "http://evil.example"}):
        with pytest.raises(InvalidStatus) as refused:
            await open_ws(url, additional_headers=headers)
        assert refused.value.response.status_code == (403 if "origin" in headers else 401)
    viewer = RawHub(await open_ws(url, additional_headers=CREDENTIALS), "json")
    try:
        assert await viewer.handshake("json") == {}
        assert (await snapshot(viewer))["served_by"]
    finally:
        await viewer.ws.close()


async def snapshot(viewer: RawHub) -> dict[str, Any]:
    """The next snapshot pushed to a dashboard connection."""
    while True:
        message = await viewer.next_message(timeout=5)
        if message.get("target") == "snapshot":
            return message["arguments"][0]  # type: ignore[no-any-return]


async def test_viewers_see_the_app_and_are_not_counted_in_it(instance: ServerProcess) -> None:
    app_client = await RawHub.open(instance.url, "/hub", query="user=ann")
    viewer = RawHub(
        await open_ws(ws_url(instance.url, f"{DASHBOARD}/hub"), additional_headers=CREDENTIALS), "json"
    )
    try:
        assert await viewer.handshake("json") == {}
        await app_client.invoke("send_all", "one")  # one delivery, to ann
        first = await snapshot(viewer)  # the latest one at once (the loop may be running already) ...
        for _ in range(3):  # ... made before ann connected, maybe: the next one is made after
            if first["totals"]["connections"]:
                break
            first = await snapshot(viewer)
        (row,) = first["instances"]
        assert (row["name"], row["health"], row["answered"]) == (first["served_by"], "ok", True)
        assert row["connections"] == [{"hub": "DemoHub", "transport": "WebSockets", "connections": 1}]
        assert row["total"] == 1 and row["backplane"] is None and first["backplane"] == "in-memory"
        assert first["totals"]["per_hub"] == [["DemoHub", "WebSockets", 1]]
        assert first["viewers"] == 1 and first["error"] is None
        async with httpx.AsyncClient(base_url=instance.url, timeout=5) as http:
            stats = (await http.get("/debug/stats")).json()
            assert set(stats["hubs"]) == {"/hub"} and stats["hub_connections"] == 1
            assert stats["dashboard"] == {"viewers": {"WebSockets": 1}}
            sent = stats["messages_sent"]
            # snapshots keep coming to the viewer; the app's deliveries do not move
            later = [await snapshot(viewer) for _ in range(2)]
            assert (await http.get("/debug/stats")).json()["messages_sent"] == sent
        assert later[-1]["instances"][0]["deliveries_per_s"] == 0
        assert len(later[-1]["history"]) >= 3
    finally:
        await viewer.ws.close()
        await app_client.close()


async def test_during_a_redis_outage_it_shows_what_waits(
    private_redis: RedisServer, start_server: Any
) -> None:
    """Redis gone: no cluster to ask, so the page shows this instance alone, its backplane degraded
    and the messages waiting in its outage buffer; they are published once Redis is back."""
    args = ["--redis", private_redis.url, "--channel-prefix", f"dashboard-{uuid.uuid4().hex[:8]}:"]
    server = start_server(APP, env=LEASES, args=args)
    app_client = await RawHub.open(server.url, "/hub", query="user=ann")
    url = ws_url(server.url, f"{DASHBOARD}/hub")
    viewer = RawHub(await open_ws(url, additional_headers=CREDENTIALS), "json")
    try:
        assert await viewer.handshake("json") == {}
        assert (await snapshot(viewer))["instances"][0]["backplane"]["state"] == "connected"
        private_redis.kill()
        for i in range(3):
            await app_client.invoke("send_all", f"while Redis is away {i}")
        for _ in range(10):
            now = await snapshot(viewer)
            (row,) = now["instances"]
            if now["error"] and row["backplane"]["buffered"] >= 3:
                break
        assert "showing this instance only" in now["error"], now
        assert row["health"] == "degraded" and row["backplane"]["buffered"] >= 3, row
        assert now["totals"]["buffered"] == row["backplane"]["buffered"] and row["total"] == 1
        private_redis.start()
        for _ in range(15):
            now = await snapshot(viewer)
            if now["error"] is None and now["totals"]["buffered"] == 0:
                break
        assert now["error"] is None and now["instances"][0]["health"] == "ok", now
        assert now["totals"]["buffered"] == 0
    finally:
        await viewer.ws.close()
        await app_client.close()


# -- two instances on Redis, in Chromium -------------------------------------------------------------


@requires(*BROWSER)
def test_dashboard_in_chromium(redis_server: RedisServer) -> None:
    prefix = f"dashboard-{uuid.uuid4().hex[:8]}:"
    args = ["--redis", redis_server.url, "--channel-prefix", prefix]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(ServerProcess, APP, env=LEASES, args=args) for _ in range(2)]
    instances = [f.result() for f in futures]
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    try:
        names = [httpx.get(f"{i.url}/instance", timeout=5).text for i in instances]
        config = {
            "chromium": str(chromium_path()),
            "artifacts": str(ARTIFACTS),
            "path": DASHBOARD,
            "user": USER,
            "password": PASSWORD,
            "leaseTtl": float(LEASES["HUBWIRE_LEASE_TTL"]),
            "instances": [
                {"name": n, "url": i.url, "pid": i.proc.pid} for n, i in zip(names, instances, strict=True)
            ],
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(config, f)
        try:
            results, err = run_node_checks([str(SCRIPT), f.name], BROWSER_TIMEOUT)
        finally:
            os.unlink(f.name)
        logs = "\n".join(f"--- {n} ---\n{i.output()[-2000:]}" for n, i in zip(names, instances, strict=True))
        failed = {name: r["detail"] for name, r in results.items() if not r["ok"]}
        failed.update({name: "did not report" for name in CHECKS if name not in results})
        assert not failed, f"{json.dumps(failed, indent=1)}\n{err[-3000:]}\n{logs}"
        for name, result in results.items():
            print(f"{name}: {result['detail']} ({result['ms']} ms)")
        shots = sorted(p.name for p in ARTIFACTS.glob("*.png"))
        assert shots == ["01-two-instances.png", "02-one-instance-after-sigkill.png"], shots
        print(f"screenshots in {ARTIFACTS}")
    finally:
        for server in instances:
            server.close()
