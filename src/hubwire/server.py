"""``HubServer``: the ASGI application that wires negotiate, transports, hubs and lifetime managers.

Mount it in Starlette/FastAPI (``app.mount("/hubs", server)``), wrap an app
(``HubServer(app=fastapi_app)`` serves hub paths and forwards the rest), or run
it alone under uvicorn / hypercorn / granian.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from .connection import Connection, ConnectionManager, Principal, RequestInfo
from .dispatcher import ConnectionApplication, HubEndpoint, RawEndpoint
from .http import ASGIApp, Receive, Scope, Send, respond
from .hub import Hub, HubContext, check_policies
from .lifetime import HubLifetimeManager, InMemoryLifetimeManager
from .logs import install_redaction
from .options import HubOptions
from .protocol.base import EncHook, HubProtocol, TransferFormat
from .protocol.json_protocol import JsonHubProtocol
from .protocol.messagepack_protocol import MessagePackHubProtocol
from .protocol.negotiate import (
    NegotiateError,
    negotiate_error,
    negotiate_response,
    redirect_response,
    select_negotiate_version,
)
from .transports.httpbase import HttpConnectionState, handle_post
from .transports.longpolling import handle_delete, serve_poll
from .transports.relayed import LOCAL_ONLY, forward, serve_relayed
from .transports.sse import serve_sse
from .transports.websocket import reject_websocket, serve_websocket

if TYPE_CHECKING:
    from .backplane.relay import Relay

__all__ = ["Authenticator", "Backplane", "HubServer", "InMemoryBackplane", "NegotiateRedirect"]

log = logging.getLogger("hubwire.server")

H = TypeVar("H", bound=Hub)

#: turns a transport or negotiate request into a user (None = anonymous)
Authenticator = Callable[[RequestInfo], Awaitable[Principal | None] | Principal | None]

#: a hook that sends a negotiating client elsewhere: ``request -> (url, access_token) | None``
NegotiateRedirect = Callable[
    [RequestInfo], Awaitable[tuple[str, str | None] | None] | tuple[str, str | None] | None
]

#: every transport, in the order negotiate lists them (clients try them in this order)
IMPLEMENTED_TRANSPORTS = ("WebSockets", "ServerSentEvents", "LongPolling")

#: answered to a CORS preflight on hub paths
_CORS_METHODS = "GET, POST, DELETE, OPTIONS"

#: how much larger than one hub message a POST body may be (the JS client batches queued messages)
POST_BODY_FACTOR = 4


class Backplane(Protocol):
    """Creates the lifetime manager of each hub; in-memory by default, Redis for scale-out."""

    def create_manager(self, hub_name: str) -> HubLifetimeManager: ...


class InMemoryBackplane:
    """The zero-configuration default: every hub's connections live in this process."""

    def create_manager(self, hub_name: str) -> HubLifetimeManager:
        return InMemoryLifetimeManager()


def _backplane_from_env() -> Backplane | None:
    """``HUBWIRE_REDIS_URL`` (set by ``hubwire run --redis``) switches on the Redis backplane."""
    import os

    if not os.environ.get("HUBWIRE_REDIS_URL"):
        return None
    from .backplane.redis import RedisBackplane

    return RedisBackplane.from_env()


def _normalize(path: str) -> str:
    path = "/" + path.strip("/")
    return path.lower()


def _transports(requested: Sequence[str]) -> tuple[str, ...]:
    unknown = [t for t in requested if t not in IMPLEMENTED_TRANSPORTS]
    if unknown:
        raise ValueError(f"unknown transport(s) {unknown}; choose from {IMPLEMENTED_TRANSPORTS}")
    return tuple(t for t in IMPLEMENTED_TRANSPORTS if t in requested)


class HubServer:
    """Serves SignalR hubs over ASGI.

    ``options`` apply to every hub unless ``add_hub`` overrides them;
    ``backplane`` decides how hubs reach connections on other instances;
    ``authenticator`` maps a request to a :class:`Principal` (see
    :mod:`hubwire.auth` for JWT); ``enc_hook`` teaches both protocols to
    serialize application types; ``app`` receives every request that is not
    for a hub path.

    ``cors_origins`` lets browser pages on other origins use the hubs (the
    JS client sends credentials, so the origin is echoed rather than ``*``):
    a list of allowed origins, or ``"*"`` for any; default off. It only
    covers hub paths, an app passed as ``app`` keeps its own CORS handling.

    ``metrics_path`` serves Prometheus metrics there (``metrics`` extra) and
    ``stats_path`` a JSON snapshot (connections, tasks, subscriptions, RSS);
    see :mod:`hubwire.metrics`.
    """

    def __init__(
        self,
        options: HubOptions | None = None,
        *,
        backplane: Backplane | None = None,
        authenticator: Authenticator | None = None,
        enc_hook: EncHook | None = None,
        app: ASGIApp | None = None,
        cors_origins: Sequence[str] | str | None = None,
        metrics_path: str | None = None,
        stats_path: str | None = None,
    ) -> None:
        self.options = options or HubOptions()
        self.backplane: Backplane = backplane or _backplane_from_env() or InMemoryBackplane()
        # a backplane that can relay HTTP-transport requests between instances (Redis does)
        self._relay: Relay | None = getattr(self.backplane, "relay", None)
        self.authenticator = authenticator
        self.app = app
        self.protocols: dict[str, HubProtocol] = {
            "json": JsonHubProtocol(enc_hook),
            "messagepack": MessagePackHubProtocol(enc_hook),
        }
        self.connections = ConnectionManager(self.options.disconnect_timeout)
        self._routes: dict[str, ConnectionApplication] = {}
        self._managers: dict[str, HubLifetimeManager] = {}
        self._hub_names: dict[type[Hub], str] = {}
        self._endpoints: list[ConnectionApplication] = []
        self._heartbeat: asyncio.Task[None] | None = None
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        if isinstance(cors_origins, str) and cors_origins != "*":
            cors_origins = [cors_origins]
        self.cors_origins: frozenset[str] | str | None = (
            cors_origins if cors_origins is None or isinstance(cors_origins, str) else frozenset(cors_origins)
        )
        self._redirects: dict[ConnectionApplication, NegotiateRedirect] = {}
        #: SSE / long-polling state of connections (survives across their HTTP requests)
        self._http_states: dict[Connection, HttpConnectionState] = {}
        #: connections whose end is being processed (so on_disconnect runs once)
        self._ending: set[Connection] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: refused connection attempts by reason, and what ended connections sent (for metrics)
        self.refused: dict[str, int] = {"max_connections": 0, "origin": 0}
        self.sent_retired = [0, 0]
        self._internal: dict[str, ASGIApp] = {}
        if metrics_path:
            self._internal[_normalize(metrics_path)] = self.metrics_app()
        if stats_path:
            from .metrics import stats_app

            self._internal[_normalize(stats_path)] = stats_app(self)

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
    ) -> HubEndpoint:
        """Serve ``hub_cls`` at ``path``. One hub class may be served at several paths.

        ``transports`` narrows the transports of this path (negotiate lists only
        those, the others are refused with 404); ``name`` is the hub's name on
        the backplane (default: the class name); set it to the .NET hub's full
        type name to share a Redis with .NET servers. ``negotiate_redirect``
        may send negotiating clients elsewhere (a connection service, another
        cluster): called with the negotiate request after authorization, it
        returns ``(url, access_token)`` or None to negotiate here. Python
        clients skip the second negotiate and open a WebSocket straight to
        ``url`` with the token, so always give one.
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
        protocols = [self.protocols[p] for p in opts.supported_protocols]
        allowed = _transports(transports or opts.transports)
        endpoint = HubEndpoint(hub_cls, manager, protocols, opts, allowed)
        self._add_route(path, endpoint)
        if negotiate_redirect is not None:
            self._redirects[endpoint] = negotiate_redirect
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
        allowed = _transports(transports or self.options.transports)
        endpoint = RawEndpoint(handler, allowed, transfer_format)
        self._add_route(path, endpoint)
        return endpoint

    def _add_route(self, path: str, endpoint: ConnectionApplication) -> None:
        key = _normalize(path)
        if key in self._routes:
            raise ValueError(f"path {path!r} is already served")
        self._routes[key] = endpoint
        self._endpoints.append(endpoint)

    def hub_context(self, hub_cls: type[Hub]) -> HubContext:
        """Send to a hub's clients from anywhere in the process (HTTP handlers, background tasks)."""
        name = self._hub_names.get(hub_cls)
        if name is None:
            raise KeyError(f"{hub_cls.__name__} is not served by this server")
        for endpoint in self._endpoints:
            if isinstance(endpoint, HubEndpoint) and endpoint.manager is self._managers[name]:
                return endpoint.context
        raise KeyError(hub_cls.__name__)  # pragma: no cover - add_hub always adds an endpoint

    def manager(self, hub_cls: type[Hub]) -> HubLifetimeManager:
        """The lifetime manager serving ``hub_cls``."""
        return self._managers[self._hub_names[hub_cls]]

    def metrics_app(self) -> ASGIApp:
        """An ASGI app serving this server's Prometheus metrics (needs ``prometheus-client``)."""
        from .metrics import metrics_app

        return metrics_app(self)

    def stats(self) -> dict[str, Any]:
        """A snapshot of connections, tasks, subscriptions, memory and counters."""
        from .metrics import server_stats

        return server_stats(self)

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
            for manager in self._managers.values():
                await manager.start()
            token_secret = getattr(self.backplane, "token_secret", None)
            if token_secret is not None:
                secret = await token_secret()
                if secret:
                    self.connections.issuer.secret = secret
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())
            install_redaction()
            self._started = True

    async def shutdown(self) -> None:
        """Close every connection and stop managers."""
        if not self._started:
            return
        self._started = False
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        for conn in self.connections.connections():
            conn.abort("server shutting down")
        for conn, state in list(self._http_states.items()):
            if state.endpoint is not None and state.idle:  # long polling between polls
                await self.connection_ended(state.endpoint, conn, None)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.options.websocket_close_timeout)
        for endpoint in self._endpoints:
            if isinstance(endpoint, HubEndpoint):
                for ctx in list(endpoint.connected.values()):
                    ctx.close(None, allow_reconnect=True)
                await endpoint.close()
        for manager in self._managers.values():
            await manager.close()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """Use as (or inside) a Starlette/FastAPI ``lifespan`` to start and stop with the app."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for endpoint in self._endpoints:
                try:
                    endpoint.tick(now)
                except Exception:
                    log.exception("heartbeat failed")
            for conn in self.connections.sweep(now):
                log.debug("disposing inactive connection %s", conn.connection_id)
                conn.abort("inactive")
                # WebSocket and SSE loops notice the abort and end the connection themselves;
                # a long-polling connection between polls has nobody to notice, so end it here
                state = self._http_states.get(conn)
                if state is not None and state.idle:
                    if state.endpoint is not None:
                        self.spawn(self.connection_ended(state.endpoint, conn, None))
                    else:
                        self._http_states.pop(conn, None)

    def close_transports(self) -> None:
        """The process is about to stop: end every SSE stream and waiting long poll now.

        Why: an ASGI server waits for in-flight HTTP responses before it runs the
        lifespan shutdown, and an event stream never finishes by itself, so a
        SIGTERM would hang for as long as any SSE client stays (and a waiting
        poll for up to the poll timeout). Hub connections get a Close message
        that invites the client to reconnect (to another instance). ``hubwire
        run`` calls this once uvicorn stops accepting connections; under another
        server call it from its shutdown hook. WebSockets are closed by the
        ASGI server itself.
        """
        for conn, state in list(self._http_states.items()):
            if state.endpoint is not None:
                state.endpoint.server_closing(conn)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, keeping a reference until it is done (awaited on shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if not self._started:
            await self.startup()
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        key = _normalize(path)
        if self._internal and kind == "http" and key in self._internal:
            await self._internal[key](scope, receive, send)
            return
        endpoint = self._routes.get(key)
        if endpoint is not None:
            if kind == "websocket":
                await self._websocket(endpoint, scope, receive, send)
            else:
                await self._http(endpoint, scope, receive, send)
            return
        if key.endswith("/negotiate"):
            endpoint = self._routes.get(key[: -len("/negotiate")] or "/")
            if endpoint is not None and kind == "http":
                await self._negotiate(endpoint, scope, receive, send)
                return
        if self.app is not None:
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await reject_websocket(scope, receive, send, 404, "Not Found")
        else:
            await respond(send, 404, b"Not Found")

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is not None:
            # the wrapped app owns the lifespan protocol; start and stop around it
            await self.startup()
            try:
                await self.app(scope, receive, send)
            finally:
                await self.shutdown()
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def authenticate(self, request: RequestInfo) -> Principal | None:
        """Run the configured authenticator (None when there is none)."""
        if self.authenticator is None:
            return None
        result = self.authenticator(request)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _authorized(self, endpoint: ConnectionApplication, principal: Principal | None) -> bool:
        if endpoint.policies is None:
            return True
        return await check_policies(principal, endpoint.policies)

    # -- HTTP helpers ----------------------------------------------------------------------------

    def _cors_headers(self, request: RequestInfo) -> list[tuple[str, str]]:
        """CORS response headers for a hub-path request from an allowed browser origin."""
        origin = request.header("origin")
        if self.cors_origins is None or not origin:
            return []
        if self.cors_origins != "*" and origin not in self.cors_origins:
            return []
        return [
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("vary", "Origin"),
        ]

    async def _preflight(self, request: RequestInfo, send: Send) -> None:
        """Answer a CORS preflight (``OPTIONS``) with ``204``; allow headers only for allowed origins."""
        headers = self._cors_headers(request)
        if headers:
            headers.append(("access-control-allow-methods", _CORS_METHODS))
            asked = request.header("access-control-request-headers")
            if asked:
                headers.append(("access-control-allow-headers", asked))
            headers.append(("access-control-max-age", "600"))
        await respond(send, 204, b"", content_type=None, headers=headers)

    async def _unauthorized(self, send: Send, headers: list[tuple[str, str]]) -> None:
        """``401`` with an empty body: the JS client then reports ``Unauthorized: Status code '401'``."""
        challenge = getattr(self.authenticator, "challenge", None)
        if isinstance(challenge, str):
            headers = [*headers, ("www-authenticate", challenge)]
        await respond(send, 401, b"", content_type=None, headers=headers)

    def http_state(self, conn: Connection) -> HttpConnectionState:
        """The SSE / long-polling state of ``conn`` (created on first use)."""
        state = self._http_states.get(conn)
        if state is None:
            state = self._http_states[conn] = HttpConnectionState()
        return state

    def is_live(self, conn: Connection) -> bool:
        """True while ``conn`` is registered here and has not ended."""
        return (
            self.connections.get(conn.token) is conn and not conn.closed.is_set() and conn not in self._ending
        )

    def _options_of(self, endpoint: ConnectionApplication) -> HubOptions:
        return endpoint.options if isinstance(endpoint, HubEndpoint) else self.options

    def _post_limit(self, endpoint: ConnectionApplication) -> int | None:
        size = self._options_of(endpoint).maximum_receive_message_size
        return None if size is None else size * POST_BODY_FACTOR

    # -- limits ----------------------------------------------------------------------------------

    def _origin_refused(self, endpoint: ConnectionApplication, request: RequestInfo) -> bool:
        """True when ``allowed_origins`` is set and a browser request comes from another origin."""
        allowed = self._options_of(endpoint).allowed_origins
        origin = request.header("origin")
        if allowed is None or origin is None:
            return False
        normalized = origin.strip().rstrip("/").lower()
        if "*" in allowed or any(normalized == a.rstrip("/").lower() for a in allowed):
            return False
        self.refused["origin"] += 1
        log.info("refused a request from origin %r on %s", origin[:200], request.path)
        return True

    def _at_capacity(self, token: str | None) -> bool:
        """True when ``max_connections`` is reached and ``token`` is not one of ours already."""
        limit = self.options.max_connections
        if limit is None or len(self.connections) < limit:
            return False
        if token and self.connections.get(token) is not None:
            return False
        self.refused["max_connections"] += 1
        return True

    async def _http_preamble(
        self, endpoint: ConnectionApplication, scope: Scope, send: Send, methods: tuple[str, ...]
    ) -> tuple[RequestInfo, list[tuple[str, str]]] | None:
        """What every HTTP request on a hub path goes through first: CORS preflight, origin, method.

        Returns the request and the CORS headers to add, or None when it was already answered.
        """
        request = RequestInfo.from_scope(scope)
        method = scope.get("method")
        if method == "OPTIONS" and self.cors_origins is not None:
            await self._preflight(request, send)
            return None
        cors = self._cors_headers(request)
        if self._origin_refused(endpoint, request):
            await respond(send, 403, b"Origin not allowed", headers=cors)
            return None
        if method not in methods:
            await respond(send, 405, b"", headers=cors)
            return None
        return request, cors

    # -- negotiate -------------------------------------------------------------------------------

    async def _negotiate(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``POST {hub}/negotiate``: authorize, maybe redirect, else create a connection."""
        checked = await self._http_preamble(endpoint, scope, send, ("POST",))
        if checked is None:
            return
        request, cors = checked
        principal = await self.authenticate(request)
        if not await self._authorized(endpoint, principal):
            await self._unauthorized(send, cors)
            return
        try:
            version = select_negotiate_version(
                request.query_param("negotiateVersion"), self.options.minimum_negotiate_version
            )
        except NegotiateError as exc:
            await respond(send, 200, negotiate_error(str(exc)), "application/json", cors)
            return
        hook = self._redirects.get(endpoint)
        if hook is not None:
            target = hook(request)
            if inspect.isawaitable(target):
                target = await target
            if target is not None:
                url, access_token = target
                await respond(send, 200, redirect_response(url, access_token), "application/json", cors)
                return
        if self._at_capacity(None):
            await respond(send, 503, b"Too many connections", headers=[*cors, ("retry-after", "1")])
            return
        conn = self.connections.create(version, principal, self.options.max_buffered_bytes)
        body = negotiate_response(version, conn.connection_id, conn.token, endpoint.transports)
        await respond(send, 200, body, "application/json", cors)

    # -- SSE / long polling ----------------------------------------------------------------------

    async def _http(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Plain HTTP on a hub path: SSE GET, long-poll GET, POST (send) or DELETE (close).

        Checks run in ASP.NET's order: authorization (401), connection id (400 /
        404), transport enabled here (404), transport unchanged (400),
        one stream at a time (409).
        """
        method = scope.get("method")
        checked = await self._http_preamble(endpoint, scope, send, ("GET", "POST", "DELETE"))
        if checked is None:
            return
        request, cors = checked
        principal = await self.authenticate(request)
        if not await self._authorized(endpoint, principal):
            await self._unauthorized(send, cors)
            return
        token = request.query_param("id")
        if not token:
            await respond(send, 400, b"Connection ID required", headers=cors)
            return
        local = self.connections.get(token)
        if (
            self._relay is not None
            and (local is None or local.transport_name is None)
            and not scope.get(LOCAL_ONLY)
            and await forward(self, self._relay, endpoint, scope, request, receive, send, token, cors)
        ):
            return  # another instance holds this connection and answered
        if method != "GET":
            # a POST or DELETE never starts a connection, so only local ones count: taking one
            # over here would accept bytes that the instance streaming to the client never sees
            conn = self.connections.get(token)
            if conn is None or not self.is_live(conn):
                await respond(send, 404, b"No Connection with that ID", headers=cors)
                return
            # the user is that of the transport request (SSE GET / polls), as in ASP.NET: a POST
            # authorizes itself but does not change who the connection belongs to
            if method == "POST":
                limit = self._post_limit(endpoint)
                await handle_post(self, endpoint, conn, request, receive, send, cors, limit)
            else:
                await handle_delete(self, conn, send, cors)
            return
        accept = request.header("accept") or ""
        name = "ServerSentEvents" if "text/event-stream" in accept.lower() else "LongPolling"
        if self._at_capacity(token):
            await respond(send, 503, b"Too many connections", headers=cors)
            return
        found = self.connections.resolve(token, self.options.max_buffered_bytes)
        if found is None or not self.is_live(found):
            await respond(send, 404, b"No Connection with that ID", headers=cors)
            return
        conn = found
        if name not in endpoint.transports:
            text = f"{name} transport not supported by this end point type"
            await respond(send, 404, text.encode(), headers=cors)
            return
        if conn.transport_name not in (None, name):
            await respond(send, 400, b"Cannot change transports mid-connection", headers=cors)
            return
        state = self.http_state(conn)
        if state.endpoint is not None and state.endpoint is not endpoint:
            await respond(send, 404, b"No Connection with that ID", headers=cors)
            return
        if principal is not None:
            conn.principal = principal
        if conn.transport_name is None and not await self._take_ownership(endpoint, conn, name):
            await respond(send, 409, b"", headers=cors)
            return
        if name == "ServerSentEvents":
            if conn.transport_active:
                await respond(send, 409, b"", headers=cors)
                return
            conn.transport_name = name
            conn.transport_active = True
            conn.inactive_since = None
            conn.request = request
            await serve_sse(self, endpoint, conn, state, receive, send, cors)
            return
        if conn.transport_name is None:
            # the first poll's request is the connection's request for hub code (headers, query)
            conn.transport_name = name
            conn.transport_active = True
            conn.request = request
        poll_timeout = self._options_of(endpoint).long_poll_timeout
        await serve_poll(self, endpoint, conn, state, receive, send, cors, poll_timeout)

    # -- WebSockets ------------------------------------------------------------------------------

    async def _websocket(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        admitted = await self.admit_websocket(endpoint, RequestInfo.from_scope(scope))
        if isinstance(admitted, tuple):
            await reject_websocket(scope, receive, send, admitted[0], admitted[1])
            return
        await serve_websocket(self, endpoint, admitted, receive, send)

    def route(self, path: str) -> ConnectionApplication | None:
        """The endpoint serving a transport ``path`` (case-insensitive, trailing slash ignored)."""
        return self._routes.get(_normalize(path))

    async def admit_websocket(
        self, endpoint: ConnectionApplication, request: RequestInfo
    ) -> Connection | tuple[int, str]:
        """Check a WebSocket request: the connection to serve, or ``(status, body)`` to refuse it.

        Shared by the ASGI path and the native protocol so both answer alike.
        """
        if self._origin_refused(endpoint, request):
            return 403, "Origin not allowed"
        if "WebSockets" not in endpoint.transports:
            return 404, "WebSockets transport not supported by this end point type"
        if self._at_capacity(request.query_param("id")):
            return 503, "Too many connections"
        principal = await self.authenticate(request)
        if not await self._authorized(endpoint, principal):
            return 401, ""
        token = request.query_param("id")
        if token:
            conn = self.connections.resolve(token, self.options.max_buffered_bytes)
            if conn is None or not self.is_live(conn):
                return 404, "No Connection with that ID"
            if conn.transport_name not in (None, "WebSockets"):
                return 400, "Cannot change transports mid-connection"
            if conn.transport_active:
                return 409, ""
            if principal is not None:
                conn.principal = principal
            if not await self._take_ownership(endpoint, conn, "WebSockets"):
                return 409, ""
        else:
            # skipNegotiation: a connection created on the fly, version-0 style (token == id)
            conn = self.connections.create(0, principal, self.options.max_buffered_bytes)
        conn.transport_name = "WebSockets"
        conn.transport_active = True
        conn.inactive_since = None
        conn.request = request
        return conn

    async def _take_ownership(
        self, endpoint: ConnectionApplication, conn: Connection, transport: str
    ) -> bool:
        """This instance starts ``conn``'s transport: claim it, and answer relays for SSE/LP.

        False when another instance already started a connection with this id
        (a replayed token).
        """
        claim = getattr(self.backplane, "claim_connection", None)
        if claim is not None and not await claim(conn.connection_id):
            log.warning("connection %s was already started on another instance", conn.connection_id)
            return False
        if self._relay is not None and transport != "WebSockets":
            await serve_relayed(self, self._relay, endpoint, conn)
        return True

    def post_limit(self, endpoint: ConnectionApplication) -> int | None:
        """Largest POST body accepted for ``endpoint``."""
        return self._post_limit(endpoint)

    def options_of(self, endpoint: ConnectionApplication) -> HubOptions:
        """The options in force for ``endpoint``."""
        return self._options_of(endpoint)

    async def serve_http(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer a non-WebSocket request on a hub path (also used for relayed requests)."""
        await self._http(endpoint, scope, receive, send)

    async def connection_ended(
        self, endpoint: ConnectionApplication, conn: Connection, error: BaseException | None
    ) -> None:
        """A connection is over for good: dispose it and tell the application, exactly once.

        Called by whichever notices first (a transport loop, a long poll that
        found the application done, DELETE, the inactivity sweep); later calls
        return at once.
        """
        if conn.closed.is_set() or conn in self._ending:
            return
        self._ending.add(conn)
        if self._relay is not None:
            self._relay.stop_serving(conn.connection_id)
        self.sent_retired[0] += conn.outbox.sent
        self.sent_retired[1] += conn.outbox.sent_bytes
        conn.transport_active = False
        conn.inactive_since = None
        self.connections.remove(conn)
        conn.outbox.close()
        self._http_states.pop(conn, None)
        try:
            await endpoint.on_disconnect(conn, error)
        finally:
            conn.closed.set()
            self._ending.discard(conn)
