"""``HubServer``: the ASGI application that wires hubs, the connection manager and the HTTP surface.

Mount it in Starlette/FastAPI (``app.mount("/hubs", server)``), wrap an app
(``HubServer(app=fastapi_app)`` serves hub paths and forwards the rest), or run
it alone under uvicorn / hypercorn / granian. The work is done below it: the
:class:`~hubwire.server.dispatcher.HttpConnectionDispatcher` checks requests,
the :class:`~hubwire.connections.manager.ConnectionManager` owns each
connection's life, transports move bytes, hubs run methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from ..backplane.base import Backplane, InMemoryBackplane
from ..backplane.redis import RedisBackplane
from ..connections.application import RawEndpoint
from ..connections.connection import Connection
from ..connections.manager import ConnectionManager
from ..connections.tasks import BackgroundTasks
from ..http import ASGIApp, Receive, Scope, Send, respond
from ..hubs.handler import HubConnectionHandler
from ..hubs.hub import Hub, HubContext
from ..hubs.lifetime import HubLifetimeManager
from ..options import HubOptions
from ..protocol.base import EncHook, HubProtocol, TransferFormat
from ..protocol.json_protocol import JsonHubProtocol
from ..protocol.messagepack_protocol import MessagePackHubProtocol
from ..service.applink import service_from_env
from ..transports.websocket import reject_websocket
from .cors import CorsPolicy, OriginPredicate
from .dashboard import Dashboard, DashboardAuth
from .dispatcher import Authenticator, HttpConnectionDispatcher, NegotiateRedirect
from .drain import Drainer
from .inspection import ServerInspection
from .keys import KeyAgreement
from .lifespan import heartbeat, process_settings, serve_lifespan
from .metrics import internal_apps, server_stats
from .routes import Router, check_transports

__all__ = ["HubServer"]

log = logging.getLogger("hubwire.server")


class HubServer:
    """Serves SignalR hubs over ASGI.

    ``options`` apply to every hub unless ``add_hub`` overrides them; ``backplane``: how hubs
    reach connections on other instances; ``authenticator`` maps a request to a
    :class:`~hubwire.Principal` (:mod:`hubwire.auth` for JWT); ``enc_hook`` teaches both
    protocols application types; ``app`` gets every request not for a hub path;
    ``cors_origins``: browser origins allowed (:class:`~hubwire.server.cors.CorsPolicy`);
    ``metrics_path`` / ``stats_path`` / ``health_path``: Prometheus, a JSON snapshot, readiness;
    ``dashboard_path``: a live page of the cluster, refused without ``dashboard_auth`` (a callable
    taking the request: :mod:`~hubwire.server.dashboard`, e.g. its ``BasicAuth``);
    ``drain_timeout``: how long a graceful shutdown (:meth:`begin_drain`) may wait for running
    calls and for handed-over connections to resume elsewhere (``HUBWIRE_DRAIN_TIMEOUT``, 10 s).
    ``HUBWIRE_SERVICE_URLS``: run the hubs for a connection service (:mod:`hubwire.service`).
    """

    def __init__(
        self,
        options: HubOptions | None = None,
        *,
        backplane: Backplane | None = None,
        authenticator: Authenticator | None = None,
        enc_hook: EncHook | None = None,
        app: ASGIApp | None = None,
        cors_origins: Sequence[str] | str | OriginPredicate | None = None,
        metrics_path: str | None = None,
        stats_path: str | None = None,
        health_path: str | None = None,
        dashboard_path: str | None = None,
        dashboard_auth: DashboardAuth | None = None,
        drain_timeout: float | None = None,
    ) -> None:
        self.options = options or HubOptions()
        self.backplane: Backplane = (
            backplane or service_from_env() or RedisBackplane.from_env() or InMemoryBackplane()
        )
        self.authenticator = authenticator
        self.app = app
        self.protocols: dict[str, HubProtocol] = {
            "json": JsonHubProtocol(enc_hook),
            "messagepack": MessagePackHubProtocol(enc_hook),
        }
        #: every background task of the server (connection ends, admissions), awaited at shutdown
        self.tasks = BackgroundTasks("server")
        opts = self.options
        self.connections = ConnectionManager(
            opts.disconnect_timeout, max_buffered=opts.max_buffered_bytes, tasks=self.tasks
        )
        self.backplane.bind(self.connections)
        self.router = Router()
        self.cors = CorsPolicy(cors_origins)
        self.keys = KeyAgreement(self.backplane, self.connections.issuer)
        self.http = HttpConnectionDispatcher(
            self.connections,
            self.router,
            self.cors,
            opts,
            self.backplane,
            authenticator,
            self.startup,
            self.keys,
        )
        #: what hubwire's native WebSocket serving asks for routes and admission
        self.native_gate = self.http
        self._managers: dict[str, HubLifetimeManager] = {}
        #: this instance's answers to cluster inspection, and ``inspection.view``: the cluster as data
        self.inspection = ServerInspection(self, self._managers)
        self._hub_names: dict[type[Hub], str] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        # drain_timeout (else HUBWIRE_DRAIN_TIMEOUT, else 10 s) bounds a graceful shutdown
        self._drainer = Drainer(self.connections, self.http, drain_timeout, self.backplane.begin_drain)
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        relay = self.backplane.relay
        if relay is not None:
            self.connections.on_end.append(lambda conn: relay.stop_serving(conn.connection_id))
        for path, internal in internal_apps(self, metrics_path, stats_path, health_path):
            self.router.add_internal(path, internal)
        #: the live cluster page and its hub (None unless ``dashboard_path`` was given)
        self.dashboard = Dashboard.enable(self, dashboard_path, dashboard_auth)

    # -- registration ----------------------------------------------------------------------------

    def add_hub(
        self,
        path: str,
        hub_cls: type[Hub],
        *,
        transports: Sequence[str] | None = None,
        options: HubOptions | None = None,
        name: str | None = None,
        negotiate_redirect: NegotiateRedirect | None = None,
    ) -> HubConnectionHandler:
        """Serve ``hub_cls`` at ``path`` (one hub class may be served at several paths).

        ``transports`` narrows this path's transports (others get 404); ``name``: the hub's backplane
        name (default: the class name; a .NET hub's full type name shares a Redis with .NET servers);
        ``negotiate_redirect(request)`` may send negotiating clients elsewhere: ``(url, token)``.
        """
        opts = options or self.options
        hub_name = name or self._hub_names.get(hub_cls) or hub_cls.__name__
        for other, other_name in self._hub_names.items():
            if other_name == hub_name and other is not hub_cls:
                raise ValueError(f"two hubs named {hub_name!r}; pass name= to add_hub")
        self._hub_names[hub_cls] = hub_name
        manager = self._managers.get(hub_name)
        if manager is None:
            manager = self._managers[hub_name] = self.backplane.create_manager(hub_name)
            manager.presence = manager.presence or self.inspection.presence(hub_name)
        protocols = [self.protocols[p] for p in opts.supported_protocols]
        # a hub served at several paths is reached through one manager: it serializes for the
        # protocols of every path, not only the last one's
        known = {p.name for p in manager.protocols}
        manager.protocols = (*manager.protocols, *(p for p in protocols if p.name not in known))
        endpoint = HubConnectionHandler(
            hub_cls, manager, protocols, opts, check_transports(transports or opts.transports)
        )
        self.router.add(path, endpoint)
        if negotiate_redirect is not None:
            self.http.redirects[endpoint] = negotiate_redirect
        if (to_service := self.backplane.serve_hub(hub_name, endpoint)) is not None:
            self.http.user_redirects[endpoint] = to_service
        return endpoint

    def add_connection_handler(
        self,
        path: str,
        handler: Callable[[Connection, bytes], Awaitable[None] | None],
        *,
        transports: Sequence[str] | None = None,
        transfer_format: TransferFormat = TransferFormat.TEXT,
    ) -> RawEndpoint:
        """Serve a raw connection (no hub protocol) at ``path``: ``handler(conn, data)`` per chunk."""
        allowed = check_transports(transports or self.options.transports)
        endpoint = RawEndpoint(handler, allowed, self.options, transfer_format)
        self.router.add(path, endpoint)
        return endpoint

    def hub_context(self, hub_cls: type[Hub]) -> HubContext:
        """Send to a hub's clients from anywhere in the process (HTTP handlers, background tasks)."""
        name = self._hub_names.get(hub_cls)
        if name is None:
            raise KeyError(f"{hub_cls.__name__} is not served by this server")
        for endpoint in self.hub_endpoints():
            if endpoint.manager is self._managers[name]:
                return endpoint.context
        raise KeyError(hub_cls.__name__)  # pragma: no cover - add_hub always adds an endpoint

    def hub_endpoints(self) -> list[HubConnectionHandler]:
        return [ep for ep in self.router.endpoints() if isinstance(ep, HubConnectionHandler)]

    def adopt_manager(self, name: str, manager: HubLifetimeManager) -> None:
        self._managers[name] = manager  # made outside add_hub (a service node's), stopped with us

    def manager(self, hub_cls: type[Hub]) -> HubLifetimeManager:
        return self._managers[self._hub_names[hub_cls]]  # the lifetime manager serving hub_cls

    def stats(self) -> dict[str, Any]:
        return server_stats(self)  # connections, tasks, subscriptions, memory and counters

    # -- lifecycle -------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Start lifetime managers and the heartbeat (done lazily on the first request too)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            # which backplane this instance uses: a typo'd or forgotten Redis setting shows here
            log.info("backplane: %s", self.backplane.describe())
            await self.backplane.start()  # a service node with no hub yet joins the cluster too
            for manager in self._managers.values():
                await manager.start()
            if not await self.keys.agree():  # not ready (503) until the instances agree on the key
                self.keys.retry_in_background()
            self._heartbeat = asyncio.get_running_loop().create_task(heartbeat(self.router, self.connections))
            process_settings()  # log redaction, hubwire run's --gc-threshold (in every worker)
            self._drainer.watch_server(self)
            self._started = True

    async def shutdown(self) -> None:
        """Drain (:meth:`begin_drain`), then close what is left, let the connections' ends run
        (bounded), stop hubs and managers (the backplane publishes what it still holds)."""
        if not self._started:
            return
        self.begin_drain()
        await self.wait_drained()
        self._started = False
        await self.keys.stop()  # no waiting on Redis at shutdown
        await self._drainer.stop_watching(self._heartbeat)
        self.connections.abort_all("server shutting down")
        await self.tasks.wait(self.options.websocket_close_timeout)
        await self.tasks.cancel_all()
        for endpoint in self.hub_endpoints():
            for ctx in list(endpoint.connected.values()):
                ctx.close(None, allow_reconnect=True)
            await endpoint.close()
        for manager in self._managers.values():
            await manager.close()
        await self.backplane.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Use as (or inside) a Starlette/FastAPI ``lifespan`` to start and stop with the app."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    def begin_drain(self) -> None:
        """Stop gracefully (a rolling deploy; what SIGTERM starts under uvicorn): refuse new
        connections, let each one go without loss (:mod:`hubwire.server.drain` says how), all
        within ``drain_timeout``; :meth:`shutdown` then closes what is left."""
        self._drainer.begin()

    async def wait_drained(self) -> None:
        """Until the drain started by :meth:`begin_drain` is over (at most ``drain_timeout``)."""
        await self._drainer.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await serve_lifespan(self.startup, self.shutdown, self.app, scope, receive, send)
            return
        if not self._started:
            await self.startup()
        self.inspection.seen(scope)
        match = self.router.match(scope)
        if match is None:
            await self._not_ours(scope, receive, send)
        elif match[0] == "internal":
            await match[1](scope, receive, send)
        elif match[0] == "negotiate":
            await self.http.negotiate(match[1], scope, receive, send)
        elif kind == "websocket":
            await self.http.websocket(match[1], scope, receive, send)
        else:
            await self.http.http(match[1], scope, receive, send)

    async def _not_ours(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await reject_websocket(scope, receive, send, 404, "Not Found")
        else:
            await respond(send, 404, b"Not Found")
