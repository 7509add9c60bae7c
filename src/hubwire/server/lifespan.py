"""The ASGI lifespan protocol for the server: start on startup, stop on shutdown.

When the server wraps another app (``HubServer(app=...)``), that app owns the
protocol (its own startup hooks run), and the server starts and stops around it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ..http import ASGIApp, Receive, Scope, Send

__all__ = ["serve_lifespan"]


async def serve_lifespan(
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
    app: ASGIApp | None,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    if app is not None:
        await startup()
        try:
            await app(scope, receive, send)
        finally:
            await shutdown()
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
