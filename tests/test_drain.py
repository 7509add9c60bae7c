"""Running and stopping like a production server: graceful drain, workers, uvicorn's flags.

The rolling restart: three real instances of ``tests.apps.stateful:app`` on a private
``redis-server`` behind a round-robin front (``CuttingProxy.rotation``, which passes a connection
that an instance refuses on to the next one, as a load balancer does), a fourth instance
broadcasting a numbered ``Tick`` every 20 ms, and the official JS client (``tests/js/fleet.cjs``)
over every transport and both protocols. Each instance in turn gets SIGTERM and is started again
on its port. Stateful-reconnect WebSocket clients must see nothing at all (same connection id,
no reconnect, every tick once and in order); every other client must be Connected at the end,
each reconnect counted by the client's own events.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hubwire.server import gctune
from tests.conftest import PYTHON, ROOT, RedisServer, ServerProcess, free_port, wait_port
from tests.rawhub import RS
from tests.requirements import NODE_CLIENT, requires
from tests.stateful_tools import NODE, cutting_proxy
from tests.test_scaleout import new_prefix

APP = "tests.apps.stateful:app"
FLEET = ROOT / "tests" / "js" / "fleet.cjs"


async def stop(server: ServerProcess, timeout: float = 20.0) -> float:
    """SIGTERM ``server`` and wait (without blocking the event loop: the front runs on it) until it
    exited; returns how long that took."""
    started = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    while server.proc.poll() is None:
        if time.monotonic() - started > timeout:
            server.kill(signal.SIGKILL)
            raise AssertionError(f"not stopped {timeout} s after SIGTERM:\n{server.output()[-3000:]}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


class Fleet:
    """The Node process of ``fleet.cjs`` and its JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def event(self, kind: str, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), max(0.01, deadline - time.monotonic()))
            assert line, f"the Node clients exited ({self.proc.returncode})"
            event: dict[str, Any] = json.loads(line)
            assert event["event"] != "error", event
            if event["event"] == kind:
                return event

    async def report(self) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"cmd": "report"}\n')
        await self.proc.stdin.drain()
        report = await self.event("report", 10)
        if report["crashes"]:  # what the official client threw, and what the clients logged
            logs = [(c["kind"], c["log"]) for c in report["clients"] if c["log"]]
            raise AssertionError(f"client crashed: {report['crashes']}\nlogs: {json.dumps(logs, indent=1)}")
        clients: list[dict[str, Any]] = report["clients"]
        return clients


@contextlib.asynccontextmanager
async def fleet(
    url: str, kinds: list[dict[str, Any]], *extra: str, script: Path = FLEET, cls: type[Fleet] = Fleet
) -> AsyncIterator[Any]:
    """The Node process of ``script`` (``fleet.cjs`` unless told) with the clients of ``kinds``."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(script),
        url,
        json.dumps(kinds),
        *extra,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
        limit=16 * 1024 * 1024,  # a report line holds every client's recent log
    )
    try:
        yield cls(proc)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


def kinds_of(transport: str, protocol: str, stateful: bool, n: int) -> list[dict[str, Any]]:
    return [{"transport": transport, "protocol": protocol, "stateful": stateful}] * n


async def until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@requires(*NODE_CLIENT)
async def test_rolling_restart_of_three_instances_loses_no_client(private_redis: RedisServer) -> None:
    args = ["--redis", private_redis.url, "--channel-prefix", new_prefix("drain"), "--log-level", "info"]
    every: list[ServerProcess] = []

    def start(port: int | None = None) -> ServerProcess:
        server = ServerProcess(APP, port=port, args=args)
        every.append(server)
        return server

    kinds = (
        kinds_of("ws", "json", True, 6)
        + kinds_of("ws", "messagepack", True, 4)
        + kinds_of("ws", "json", False, 2)
        + kinds_of("ws", "messagepack", False, 2)
        + kinds_of("sse", "json", False, 2)
        + kinds_of("lp", "json", False, 2)
        + kinds_of("lp", "messagepack", False, 1)
    )
    try:
        servers = [start() for _ in range(3)]
        publisher = start()  # an app instance that sends (an HTTP API), not behind the front
        async with (
            cutting_proxy(servers[0].port) as front,
            httpx.AsyncClient(base_url=publisher.url, timeout=10) as api,
        ):
            front.rotation = [s.port for s in servers]
            async with fleet(f"{front.url}/hub?user=u", kinds) as clients:
                ready = await clients.event("ready", 60)
                assert len(ready["clients"]) == len(kinds)
                assert (await api.post("/tick", json={"intervalMs": 20})).status_code == 202
                await asyncio.sleep(1.0)
                drains, held = [], []
                for i, server in enumerate(list(servers)):
                    stats = (await api.get(f"{server.url}/debug/stats")).json()["hubs"]["/hub"]
                    held.append(stats["connected"])
                    drains.append(await stop(server))
                    servers[i] = await asyncio.to_thread(start, server.port)
                    restarted = servers[i].url

                    async def ready(url: str = restarted) -> bool:
                        # a rolling deploy stops the next instance once this one is ready (its
                        # readiness probe); before it agreed on the token key it answers 503
                        answer = await api.post(f"{url}/hub/negotiate?negotiateVersion=1&user=u")
                        return answer.status_code == 200

                    await until(ready, 15, "the restarted instance to be ready")
                    await asyncio.sleep(1.5)  # clients settle, some of them on the new instance
                sent = (await api.delete("/tick")).json()["sent"]

                report = []

                async def all_ticks() -> bool:
                    nonlocal report
                    report = await clients.report()
                    return all(c["ticks"]["last"] == sent for c in report)

                try:
                    await until(all_ticks, 15, f"every client to get tick {sent}")
                except AssertionError as exc:
                    if not str(exc).startswith("timed out"):
                        raise  # what a client threw, say
                    late = [c for c in report if c["ticks"]["last"] != sent]
                    raise AssertionError(f"not every client got tick {sent}: {late}") from None
    except BaseException:
        for i, server in enumerate(every):
            print(f"--- server {i} ---\n{server.output()[-4000:]}")
        raise
    finally:
        logs = "\n".join(f"--- server {i} ---\n{s.output()[-6000:]}" for i, s in enumerate(every))
        for server in every:
            server.close()
    print(f"drain + exit per instance: {[round(d, 2) for d in drains]} s; {sent + 1} ticks sent")
    print(f"connections held by each instance when it was stopped: {held}")
    assert all(held), held  # every restart let connections go
    unnoticed = 0
    for client in report:
        kind, ticks = client["kind"], client["ticks"]
        assert client["state"] == "Connected", client
        assert client["closed"] == 0, client
        assert ticks["duplicates"] == 0 and ticks["outOfOrder"] == 0, client
        # every reconnect is the client's own, counted: none silent
        assert client["reconnected"] == client["reconnecting"], client
        if not kind["stateful"]:
            # told to reconnect (Close with allowReconnect): each reconnect counted, all came back
            assert client["reconnecting"] >= 1, client
        elif client["reconnecting"] == 0:
            # handed over at each drain and resumed on another instance: nothing to see
            assert client["connectionId"] == client["firstId"], client
            assert ticks["missing"] == 0, client
            unnoticed += 1
    stateful = sum(1 for c in report if c["kind"]["stateful"])
    print(f"stateful clients that resumed unnoticed through every drain: {unnoticed} of {stateful}")
    # a client's resume is one WebSocket attempt: were it dropped (no instance took it), the client
    # would start a new connection; the front never drops one while two instances are up
    assert front.unplaced == 0, f"the front dropped {front.unplaced} connections"
    assert unnoticed == stateful, f"{unnoticed} of {stateful} resumed unnoticed\n{logs}"
    plain = [c for c in report if not c["kind"]["stateful"]]
    lost = sum(c["ticks"]["missing"] for c in plain)
    print(f"non-stateful clients: {sum(c['reconnected'] for c in plain)} reconnects, {lost} ticks missed")


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_sigterm_lets_a_running_call_finish_then_closes_with_reconnect(serving: str) -> None:
    server = ServerProcess(APP, args=["--serving", serving])
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
            token = (await c.post("/hub/negotiate?negotiateVersion=1&user=u")).json()["connectionToken"]
        from tests.rawhub import open_ws

        ws = await open_ws(server.url.replace("http", "ws") + f"/hub?id={token}&user=u")
        async with ws:
            await ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
            assert json.loads((await ws.recv()).rstrip(RS)) == {}
            call = {"type": 1, "invocationId": "1", "target": "CountCall", "arguments": ["drain", 1500]}
            await ws.send(json.dumps(call) + RS)
            await asyncio.sleep(0.3)  # the call is running
            started = time.monotonic()
            os.killpg(server.proc.pid, signal.SIGTERM)
            received = []
            with contextlib.suppress(Exception):
                while len(received) < 2:
                    text = await asyncio.wait_for(ws.recv(), 10)
                    received += [json.loads(r) for r in str(text).split(RS) if r]
            received = [m for m in received if m.get("type") != 6]  # pings
            # the result first (the call finished), then the invitation to reconnect elsewhere
            assert received[0] == {"type": 3, "invocationId": "1", "result": 1}, received
            assert received[1] == {"type": 7, "allowReconnect": True}, received
        assert await asyncio.to_thread(server.proc.wait, 15) is not None
        assert time.monotonic() - started < 15
    finally:
        server.close()


@requires(*NODE_CLIENT)
async def test_workers_serve_one_port_as_instances_over_redis(private_redis: RedisServer) -> None:
    args = ["--redis", private_redis.url, "--channel-prefix", new_prefix("workers"), "--workers", "2"]
    server = ServerProcess(APP, args=args)
    try:
        limits = httpx.Limits(max_keepalive_connections=0)  # a new TCP connection each time
        async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits) as c:
            # the port listens once the supervisor bound it; a worker still importing the app (a
            # loaded machine) accepts nothing yet, so ask until both answered (bounded)
            deadline = time.monotonic() + 30
            thresholds: dict[int, list[int]] = {}
            while len(thresholds) < 2 and time.monotonic() < deadline:
                stats = (await c.get("/debug/stats")).json()
                thresholds[stats["pid"]] = stats["gc"]["threshold"]
                await asyncio.sleep(0.02)
            pids = set(thresholds)
            assert len(pids) == 2, pids  # two processes accept on the one port
            # hubwire run's --gc-threshold (its default here) reached each worker process
            want = [700, 10, 100] if gctune._APPLIES else list(gc.get_threshold())  # 3.14+: Python's
            assert list(thresholds.values()) == [want] * 2, thresholds
            assert server.proc.pid not in pids  # the supervisor serves nothing itself
            # a broadcast made by one worker reaches the clients of both (the backplane)
            kinds = kinds_of("ws", "json", False, 4) + kinds_of("sse", "json", False, 2)
            async with fleet(f"{server.url}/hub?user=u", kinds) as clients:
                await clients.event("ready", 30)
                assert (await c.post("/tick", json={"intervalMs": 20})).status_code == 202

                async def everyone() -> bool:
                    return all(r["ticks"]["count"] >= 5 for r in await clients.report())

                await until(everyone, 15, "ticks on every client")
                await c.delete("/tick")
        await stop(server, 30)  # the supervisor stops its workers
    finally:
        server.close()


def test_workers_refuse_the_in_memory_backplane() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    env.pop("HUBWIRE_REDIS_URL", None)
    done = subprocess.run(
        [PYTHON, "-m", "hubwire.cli", "run", APP, "--port", str(free_port()), "--workers", "2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "--workers 2 needs a shared backplane" in done.stderr, done.stderr
    assert "--redis" in done.stderr
    assert "Traceback" not in done.stderr


async def _whereami(url: str, headers: dict[str, str] | None = None, **ws_kwargs: Any) -> dict[str, Any]:
    from tests.rawhub import open_ws

    ws = await open_ws(url, additional_headers=headers or {}, **ws_kwargs)
    async with ws:
        await ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
        assert json.loads((await ws.recv()).rstrip(RS)) == {}
        await ws.send(
            json.dumps({"type": 1, "invocationId": "1", "target": "Whereami", "arguments": []}) + RS
        )
        while True:
            for record in str(await asyncio.wait_for(ws.recv(), 10)).split(RS):
                if record and json.loads(record).get("type") == 3:
                    result: dict[str, Any] = json.loads(record)["result"]
                    return result


FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_proxy_headers_and_root_path_reach_hub_code(serving: str) -> None:
    trusting = ServerProcess(APP, args=["--serving", serving, "--root-path", "/chat"])
    distrusting = ServerProcess(APP, args=["--serving", serving, "--no-proxy-headers"])
    # headers from a peer that is not a trusted proxy: a client spoofing its address is ignored
    elsewhere = ServerProcess(APP, args=["--serving", serving, "--forwarded-allow-ips", "10.9.8.7"])
    try:
        seen = await _whereami(trusting.url.replace("http", "ws") + "/hub?user=u", FORWARDED)
        assert seen["client"][0] == "203.0.113.7" and seen["scheme"] == "wss", seen
        assert seen["path"] == "/chat/hub"  # as ASGI gives it: root_path + path
        for server in (distrusting, elsewhere):
            seen = await _whereami(server.url.replace("http", "ws") + "/hub?user=u", FORWARDED)
            assert seen["client"][0] == "127.0.0.1" and seen["scheme"] == "ws", seen
    finally:
        trusting.close()
        distrusting.close()
        elsewhere.close()


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return key, cert


@requires("openssl")
async def test_tls_serves_wss_natively(tmp_path: Path) -> None:
    key, cert = _self_signed(tmp_path)
    server = ServerProcess(APP, args=["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)])
    try:
        context = ssl.create_default_context(cafile=str(cert))
        seen = await _whereami(f"wss://127.0.0.1:{server.port}/hub?user=u", ssl=context)
        assert seen["scheme"] == "wss", seen
    finally:
        server.close()


@contextlib.contextmanager
def spawned(
    argv: list[str], cwd: Path = ROOT, path: tuple[Path, ...] = ()
) -> Iterator[subprocess.Popen[str]]:
    """A process of its own session with its output captured; stopped (bounded) on exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (*path, ROOT / "src", ROOT)))
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc.stdout:
            proc.stdout.close()


def _plain_uvicorn(
    app: str, port: int, *extra: str
) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    return spawned([PYTHON, "-m", "uvicorn", app, "--port", str(port), *extra])


ASGI_MODE = "hub WebSockets are served in ASGI mode (uvicorn's WebSocket protocol is"


@pytest.mark.parametrize("native", [False, True])
async def test_plain_uvicorn_says_how_websockets_are_served_and_ends_sse_on_sigterm(native: bool) -> None:
    """Under plain ``uvicorn`` (no ``hubwire run``): a warning at startup when hub WebSockets take
    the ASGI path, saying how to get the native one; SSE streams end at SIGTERM (the server
    watches uvicorn's exit flag), so uvicorn does not wait forever for them."""
    extra = ("--ws", "hubwire.transports.native:NativeWebSocketProtocol") if native else ()
    port = free_port()
    with _plain_uvicorn(APP, port, *extra) as proc:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            token = (await c.post("/hub/negotiate?negotiateVersion=1&user=u")).json()["connectionToken"]
            headers = {"Accept": "text/event-stream"}
            async with c.stream("GET", f"/hub?id={token}&user=u", headers=headers) as response:
                assert response.status_code == 200
                handshake = json.dumps({"protocol": "json", "version": 1}) + RS
                assert (await c.post(f"/hub?id={token}&user=u", content=handshake)).status_code == 200
                os.killpg(proc.pid, signal.SIGTERM)
                body = b""
                async for chunk in response.aiter_bytes():  # ends: the stream was closed by the drain
                    body += chunk
            assert b'"allowReconnect":true' in body, body
        # uvicorn re-raises the signal it stopped for once it is done: -SIGTERM, after a full shutdown
        assert proc.wait(15) == -signal.SIGTERM
        output = proc.stdout.read() if proc.stdout else ""
    assert (ASGI_MODE in output) is not native, output
    if not native:
        assert "hubwire.transports.native:NativeWebSocketProtocol" in output  # how to get it
    assert "Application shutdown complete." in output, output


async def test_mounted_in_another_app_says_how_to_keep_the_native_path() -> None:
    port = free_port()
    native = "hubwire.transports.native:NativeWebSocketProtocol"
    with _plain_uvicorn("tests.apps.mounted:app", port, "--ws", native) as proc:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            assert (await c.post("/hubs/hub/negotiate?negotiateVersion=1")).status_code == 200
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
        output = proc.stdout.read() if proc.stdout else ""
    assert "mounted inside another app" in output and "HubServer(app=your_app)" in output, output


RELOADED_APP = """
from hubwire import HubServer
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

server = HubServer(app=Starlette(routes=[Route("/", lambda request: PlainTextResponse("{version}"))]))
"""


async def test_reload_restarts_on_a_source_change(tmp_path: Path) -> None:
    (tmp_path / "reloaded_app.py").write_text(RELOADED_APP.format(version="one"))
    port = free_port()
    argv = [PYTHON, "-m", "hubwire.cli", "run", "reloaded_app:server", "--port", str(port), "--reload"]
    with spawned(argv, cwd=tmp_path, path=(tmp_path,)) as proc:
        wait_port(port, proc=proc)  # type: ignore[arg-type]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:

            async def says(text: str) -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return (await c.get("/")).text == text
                return False

            await until(lambda: says("one"), 20, "the first version")
            (tmp_path / "reloaded_app.py").write_text(RELOADED_APP.format(version="two"))
            await until(lambda: says("two"), 20, "the reloaded version")
