"""The ASGI lifespan protocol for the server: start on startup, stop on shutdown; and the heartbeat.

When the server wraps another app (``HubServer(app=...)``), that app owns the
protocol (its own startup hooks run), and the server starts and stops around it:
it stops before the app's "shutdown complete" reaches the ASGI server, which
exits right after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..connections.manager import ConnectionManager
from ..http import ASGIApp, Message, Receive, Scope, Send
from ..logs import install_redaction
from .gctune import apply_env_gc_threshold
from .routes import Router

__all__ = ["heartbeat", "process_settings", "serve_lifespan"]

log = logging.getLogger("hubwire.server")


def process_settings() -> None:
    """What a serving process sets for itself once its server starts (each ``--workers`` process
    starts its own): secrets redacted from every log record, and the garbage collector's
    thresholds ``hubwire run --gc-threshold`` asked for (:mod:`hubwire.server.gctune`)."""
    install_redaction()
    apply_env_gc_threshold()


async def heartbeat(router: Router, connections: ConnectionManager) -> None:
    """Once a second while the server runs: every endpoint's handshake timeouts, keep-alive pings
    and client timeouts, then the sweep of connections whose client went away."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for endpoint in router.endpoints():
            try:
                endpoint.tick(now)
            except Exception:
                log.exception("heartbeat failed")
        connections.sweep(now)


async def serve_lifespan(
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    app: ASGIApp | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    if app is not None:
        await _around(startup, shutdown, app, scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _around(
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Start, run the wrapped app's lifespan, stop; alone when the app does not speak lifespan.

    Many small ASGI apps return at once for a scope that is not HTTP. The server then speaks the
    protocol itself and stops at the real shutdown, instead of stopping the moment the app
    returned (its hubs would start again lazily on the first request, and stop never again).
    """
    await startup()
    stopped = False
    received: list[str] = []
    sent: list[str] = []

    async def tracked_receive() -> Message:
        message = await receive()
        received.append(message["type"])
        return message

    async def send_after_shutdown(message: Message) -> None:
        # the server stops before the wrapped app reports its shutdown complete: once it is
        # reported, uvicorn exits, and the backplane would not get to say goodbye (its lease)
        nonlocal stopped
        sent.append(message["type"])
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed") and not stopped:
            stopped = True
            await shutdown()
        await send(message)

    try:
        await app(scope, tracked_receive, send_after_shutdown)
        if not stopped and not sent:  # the app ignored the lifespan scope
            if "lifespan.startup" not in received:
                await receive()
            await send({"type": "lifespan.startup.complete"})
            while (await receive())["type"] != "lifespan.shutdown":
                pass
            stopped = True
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
    finally:
        if not stopped:
            await shutdown()
