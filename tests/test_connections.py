"""The connection manager alone: one owner of each connection's life (no server, no sockets)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from typing import Any

import pytest

from hubwire.connections.application import ConnectionApplication
from hubwire.connections.connection import Connection, ConnectionStatus, RequestInfo, TransportFeatures
from hubwire.connections.manager import ConnectionManager
from hubwire.connections.tokens import TokenIssuer
from hubwire.options import HubOptions

POLLING = TransportFeatures("LongPolling", inherent_keep_alive=True)
REQUEST = RequestInfo("/hub", {}, {}, {})


class Recorder(ConnectionApplication):
    transports = ("LongPolling",)
    options = HubOptions()

    def __init__(self) -> None:
        self.ended: list[tuple[str, BaseException | None]] = []

    async def on_connect(self, conn: Connection) -> None:
        return None

    async def on_receive(self, conn: Connection, data: bytes) -> None:
        return None

    async def on_disconnect(self, conn: Connection, error: BaseException | None) -> None:
        await asyncio.sleep(0)
        self.ended.append((conn.connection_id, error))


async def test_status_moves_new_active_inactive_disposed() -> None:
    manager = ConnectionManager(disconnect_timeout=15)
    conn = manager.create(1)
    assert conn.status is ConnectionStatus.NEW and manager.is_live(conn)
    manager.activate(conn, POLLING, REQUEST)
    assert conn.status is ConnectionStatus.ACTIVE and conn.inactive_since is None
    assert conn.transport_name == "LongPolling"
    manager.mark_inactive(conn)
    assert conn.status is ConnectionStatus.INACTIVE and conn.inactive_since is not None
    manager.mark_active(conn)
    assert conn.status is ConnectionStatus.ACTIVE
    await manager.end(conn)
    assert conn.status is ConnectionStatus.DISPOSED and conn.closed.is_set()
    assert not manager.is_live(conn) and len(manager) == 0
    manager.mark_inactive(conn)  # a late transport request changes nothing any more
    assert conn.status is ConnectionStatus.DISPOSED


async def test_end_runs_the_application_once_whoever_calls_it() -> None:
    manager = ConnectionManager()
    app = Recorder()
    conn = manager.create(1)
    conn.application = app
    hooks: list[str] = []
    manager.on_end.append(lambda c: hooks.append(c.connection_id))
    error = RuntimeError("gone")
    manager.end_soon(conn, error)
    assert conn.status is ConnectionStatus.ENDING and not manager.is_live(conn)
    await asyncio.gather(manager.end(conn), manager.end(conn, None))
    await manager.tasks.wait(1)
    assert app.ended == [(conn.connection_id, error)]
    assert hooks == [conn.connection_id]
    assert conn.outbox.closed


async def test_sweep_ends_connections_without_a_transport_request() -> None:
    manager = ConnectionManager(disconnect_timeout=10)
    app = Recorder()
    idle = manager.create(1)
    idle.application = app
    manager.activate(idle, POLLING, REQUEST)
    manager.mark_inactive(idle)
    busy = manager.create(1)
    manager.activate(busy, POLLING, REQUEST)
    never_started = manager.create(1)
    assert idle.inactive_since is not None
    assert manager.sweep(idle.inactive_since + 5) == []
    expired = manager.sweep(idle.inactive_since + 11)
    assert set(expired) == {idle, never_started}
    await manager.tasks.wait(1)
    assert app.ended == [(idle.connection_id, None)]
    assert manager.connections() == [busy]
    assert idle.abort_reason == "inactive"


def _decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _respell(token: str) -> list[str]:
    """Other spellings that a lenient base64 decoder maps to the same bytes: unused trailing bits,
    and the standard alphabet's ``+`` / ``/`` for ``-`` / ``_``."""
    raw = _decode(token)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    candidates = {token[:-1] + char for char in alphabet}
    candidates.add(token.replace("-", "+").replace("_", "/"))
    return sorted(c for c in candidates if c != token and _decode(c) == raw)


@pytest.mark.parametrize("version", [0, 1])
async def test_one_connection_per_id_and_token_spelling(version: int) -> None:
    issuer = TokenIssuer()
    here = ConnectionManager(issuer=issuer)
    for _ in range(100):  # a token with respellings (unused bits in v0; a '-' or '_' in v1)
        conn = here.create(version)
        variants = _respell(conn.token)
        if variants:
            break
    assert variants
    for variant in variants:
        assert here.get(variant) is None
        assert here.resolve(variant) is None
    assert here.resolve(conn.token) is conn
    # another instance with the same key takes it over once, by id; respellings are refused there too
    there = ConnectionManager(issuer=TokenIssuer(issuer.secret))
    taken = there.resolve(conn.token)
    assert taken is not None and taken.connection_id == conn.connection_id
    assert all(there.resolve(v) is None for v in variants)
    assert there.resolve(conn.token) is taken
    await there.end(taken)
    assert there.resolve(conn.token) is None  # ended here: never started again here


# -- lifespan and cancellation edges ---------------------------------------------------------------


async def test_a_wrapped_app_that_ignores_lifespan_leaves_the_server_started_until_shutdown() -> None:
    """Small ASGI apps return at once for a non-HTTP scope; the server then speaks lifespan alone
    and stays started until the real shutdown (it used to stop the moment the app returned)."""
    from hubwire import HubServer

    async def plain(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return

    server = HubServer(app=plain)
    events: list[str] = []
    original_startup, original_shutdown = server.startup, server.shutdown

    async def startup() -> None:
        events.append("startup")
        await original_startup()

    async def shutdown() -> None:
        events.append("shutdown")
        await original_shutdown()

    server.startup, server.shutdown = startup, shutdown  # type: ignore[method-assign]
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    running = asyncio.ensure_future(server({"type": "lifespan"}, inbox.get, outbox.put))
    assert await asyncio.wait_for(outbox.get(), 5) == {"type": "lifespan.startup.complete"}
    await asyncio.sleep(0.05)
    assert events == ["startup"] and not running.done()  # still started: no early shutdown
    await inbox.put({"type": "lifespan.shutdown"})
    assert await asyncio.wait_for(outbox.get(), 5) == {"type": "lifespan.shutdown.complete"}
    await asyncio.wait_for(running, 5)
    assert events == ["startup", "shutdown"]


async def test_cancel_and_wait_ends_a_task_that_swallowed_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Python 3.11's wait_for can swallow a cancellation; a loop around it must still end."""
    from hubwire.connections.tasks import cancel_and_wait

    swallowed = 0

    async def swallows_once() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    stop = False

    async def never_ends() -> None:  # until the test lets it
        while not stop:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.ensure_future(swallows_once())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], timeout=5) and task.cancelled() and swallowed == 1
    stubborn = asyncio.ensure_future(never_ends())
    await asyncio.sleep(0)
    with caplog.at_level(logging.ERROR, logger="hubwire.tasks"):
        assert not await cancel_and_wait([stubborn], timeout=0.6, what="a test")
    assert any("tasks of a test still running" in r.getMessage() for r in caplog.records)
    stop = True
    stubborn.cancel()
    await asyncio.wait_for(stubborn, 5)
