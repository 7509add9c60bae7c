"""How a hubwire server learns about the ASGI server running it: uvicorn's shutdown and WebSocket mode.

Why: a graceful drain must start the moment the process is told to stop, before uvicorn waits
for in-flight responses (an event stream never ends by itself) and before it closes ASGI
WebSockets with 1012 and no SignalR Close. ``hubwire run`` uses :class:`HubwireServer`, whose
shutdown drains first. Under plain ``uvicorn`` and in ``hubwire run --workers`` (uvicorn's
own server class runs each worker) the server finds uvicorn through the SIGTERM handler it
installed and watches its ``should_exit`` flag; native WebSockets also start the drain from
their protocol's ``shutdown()``. Anything else (hypercorn, granian, a thread) gets the drain
at the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import uvicorn

from ..transports.native import NativeWebSocketProtocol

__all__ = ["HubwireServer", "find_uvicorn", "watch_uvicorn", "websocket_mode"]

log = logging.getLogger("hubwire.server")

#: how often the watch looks at uvicorn's exit flag (uvicorn's own main loop looks every 0.1 s)
_WATCH_INTERVAL = 0.05

_NATIVE_HINT = (
    "for hubwire's native WebSocket path run `hubwire run module:app`, or "
    "`uvicorn --ws hubwire.transports.native:NativeWebSocketProtocol module:app`"
)


def find_uvicorn() -> uvicorn.Server | None:
    """The uvicorn server running this process, found through the SIGTERM handler it installs
    while it serves (only in the main thread, where signals can be handled), or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    with contextlib.suppress(ValueError, TypeError):
        owner = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if isinstance(owner, uvicorn.Server):
            return owner
    return None


def _unwrap(app: Any, wanted: Callable[[Any], bool]) -> Any:
    """``app`` or the first app it wraps (middlewares keep the wrapped one as ``.app``) that is ``wanted``."""
    for _ in range(10):
        if app is None or wanted(app):
            return app
        app = getattr(app, "app", None)
    return None


def websocket_mode(server: uvicorn.Server | None, hub_server: Any) -> tuple[bool, str]:
    """Whether hub WebSockets take the native path, and one line saying so (or why not and how)."""
    if server is None:
        return False, (
            "hub WebSockets are served in ASGI mode: not run by uvicorn (or not from the main "
            f"thread); {_NATIVE_HINT}"
        )
    config = server.config
    protocol = getattr(config, "ws_protocol_class", None)
    native = isinstance(protocol, type) and issubclass(protocol, NativeWebSocketProtocol)
    if not (native and getattr(protocol, "serve_hubs", False)):
        name = getattr(protocol, "__name__", str(config.ws))
        return False, (
            f"hub WebSockets are served in ASGI mode (uvicorn's WebSocket protocol is {name}); {_NATIVE_HINT}"
        )
    loaded = getattr(config, "loaded_app", None)
    found = _unwrap(loaded, lambda a: getattr(a, "native_gate", None) is not None)
    if found is not hub_server:
        return False, (
            "hub WebSockets are served in ASGI mode: this HubServer is mounted inside another app, "
            "where uvicorn's native protocol cannot see it; serve the HubServer and hand it the rest: "
            "HubServer(app=your_app)"
        )
    return True, "hub WebSockets are served natively"


def watch_uvicorn(server: uvicorn.Server, on_exit: Callable[[], None]) -> asyncio.Task[None]:
    """Call ``on_exit`` once uvicorn was told to stop, after closing its listeners (so clients told
    to reconnect reach another instance, or another worker on the shared socket)."""

    async def watch() -> None:
        # should_exit is a plain flag of uvicorn's: there is no event to wait on
        while not server.should_exit:  # noqa: ASYNC110
            await asyncio.sleep(_WATCH_INTERVAL)
        for listener in getattr(server, "servers", []):
            listener.close()
        on_exit()

    return asyncio.get_running_loop().create_task(watch(), name="uvicorn exit watch")


class HubwireServer(uvicorn.Server):
    """uvicorn's server, draining hubwire's connections before uvicorn's own shutdown steps.

    Module level so that ``--reload`` can hand its ``run`` to a spawned process.
    """

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        for listener in self.servers:
            listener.close()  # first, so clients that are told to reconnect go elsewhere
        hub_server = _unwrap(self.config.loaded_app, lambda a: hasattr(a, "begin_drain"))
        if hub_server is not None:
            hub_server.begin_drain()
            await hub_server.wait_drained()
        await super().shutdown(sockets)
