"""The graceful drain of one instance (a rolling deploy): let every connection go without loss.

What a client sees: new connections are refused (503: the client's retry reaches another
instance). Each connection is let go as soon as nothing is lost by it: a stateful-reconnect
WebSocket, when another instance can take it over, has its socket dropped so the client resumes
there without noticing (the other instance takes the connection over, unacknowledged messages
and running calls included); any other connection gets SignalR's Close with reconnect allowed
once its running hub methods and streams finished (their results reach it), so clients with
automatic reconnect come back elsewhere. Event streams and long polls end with it. The drain
timeout bounds it all; the server's shutdown then closes what is left and the backplane
publishes what it still holds.

Each connection's application decides when and how it lets go (``ConnectionApplication.drain``);
this module runs the rounds and the deadline, and starts the drain when uvicorn is told to stop
(:mod:`hubwire.server.serving`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any

from ..connections.manager import ConnectionManager
from ..connections.tasks import cancel_and_wait
from .dispatcher import HttpConnectionDispatcher
from .serving import find_uvicorn, watch_uvicorn, websocket_mode

__all__ = ["Drainer", "env_drain_timeout"]

log = logging.getLogger("hubwire.server")

#: how often a drain looks again at the connections that were busy
_STEP = 0.05
DEFAULT_DRAIN_TIMEOUT = 10.0


def env_drain_timeout() -> float:
    """``HUBWIRE_DRAIN_TIMEOUT`` (seconds; ``hubwire run --drain-timeout`` sets it), else 10."""
    raw = os.environ.get("HUBWIRE_DRAIN_TIMEOUT")
    if not raw:
        return DEFAULT_DRAIN_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"HUBWIRE_DRAIN_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"HUBWIRE_DRAIN_TIMEOUT must not be negative, got {raw!r}")
    return value


class Drainer:
    """Runs one drain: refuse new connections, then let each registered connection go.

    A connection is asked again every 50 ms while its application says it is busy; at the
    deadline every one still here is let go regardless. The drain ends when each connection
    was closed or has moved to another instance, or at the deadline.
    """

    def __init__(
        self,
        connections: ConnectionManager,
        http: HttpConnectionDispatcher,
        timeout: float | None,
        announce: Callable[[], None] | None = None,
    ) -> None:
        self.connections = connections
        #: told first when a drain begins (the connection service stops sending new clients here)
        self.announce = announce
        self.http = http
        self.timeout = timeout if timeout is not None else env_drain_timeout()
        http.on_drain = self.begin
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    def watch_server(self, hub_server: Any) -> None:
        """At startup: say in one line how hub WebSockets are served, and begin draining as soon
        as uvicorn (if it runs this process) is told to stop. A new start is not draining."""
        self.http.draining = False
        self.http.stopping.clear()
        self._task = None
        server = find_uvicorn()
        native, mode = websocket_mode(server, hub_server)
        # a warning when not native: it is a performance matter, and shows under plain uvicorn too
        # (which gives hubwire's logger no handler: only warnings reach its output)
        log.log(logging.INFO if native else logging.WARNING, "%s", mode)
        if server is not None:
            self._watch = watch_uvicorn(server, self.begin)

    async def stop_watching(self, *others: asyncio.Task[None] | None) -> None:
        """Stop the uvicorn watch (and ``others``, the server's heartbeat) at shutdown."""
        tasks = [t for t in (self._watch, *others) if t is not None]
        await cancel_and_wait(tasks, what="uvicorn exit watch and heartbeat")

    def begin(self) -> None:
        """Refuse new connections and let the others go (once; again after the next start)."""
        self.http.draining = True
        if self._task is None:
            if self.announce is not None:
                self.announce()
            self._task = asyncio.get_running_loop().create_task(self._run(self.timeout), name="drain")

    async def wait(self) -> None:
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # stateful connections can resume elsewhere only when another instance can take them over
        hand_over = self.connections.hand_over if self.http.moves is not None else None
        let_go: set[str] = set()
        log.info("draining %d connections (at most %.1f s)", len(self.connections), timeout)
        while True:
            final = loop.time() >= deadline
            for conn in self.connections.connections():
                if conn.connection_id in let_go:
                    continue
                app = conn.application
                done = True
                try:
                    if app is None:
                        conn.abort("server shutting down")  # negotiated, never connected
                    else:
                        done = app.drain(conn, hand_over, final)
                except Exception:
                    log.exception("draining %s failed", conn.connection_id)
                    conn.abort("server shutting down")
                if done:
                    let_go.add(conn.connection_id)
            # done when every connection was let go and none handed over still waits for its
            # client to resume elsewhere (closed ones end on their own, or at the shutdown)
            if final or all(
                c.connection_id in let_go and c.outbox.closed for c in self.connections.connections()
            ):
                break
            await asyncio.sleep(_STEP)
        self.http.stopping.set()  # polls relayed through here to other instances end now
        waiting = sum(1 for c in self.connections.connections() if not c.outbox.closed)
        log.info("drained: %d connections let go, %d not resumed elsewhere", len(let_go), waiting)
