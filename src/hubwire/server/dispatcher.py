"""The HTTP connection dispatcher: negotiate and every transport request on a hub path.

Shaped after ASP.NET Core's ``HttpConnectionDispatcher``: it runs the
request checks in ASP.NET's order (CORS preflight, origin, method,
authorization, connection id, transport enabled, transport unchanged, one
stream at a time), hands SSE / long-polling requests for connections held by
another instance to the relay, starts transports through the connection
manager, and leaves the bytes to the transports. It is also the gate native
WebSocket serving asks for routes and admission.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from ..backplane.base import Backplane, UserRedirect
from ..connections.application import ConnectionApplication, check_policies
from ..connections.connection import Connection, Principal, RequestInfo, TransportFeatures
from ..connections.manager import ConnectionManager
from ..http import Receive, Scope, Send, respond
from ..options import HubOptions
from ..protocol import texts
from ..protocol.negotiate import (
    NegotiateError,
    negotiate_error,
    negotiate_response,
    redirect_response,
    select_negotiate_version,
)
from ..transports import longpolling, sse, websocket
from ..transports.httpbase import handle_post, refuse_draining
from ..transports.longpolling import handle_delete, serve_poll
from ..transports.relayed import LOCAL_ONLY, RELAYED_USER, forward, serve_relayed
from ..transports.sse import serve_sse
from ..transports.websocket import reject_websocket, serve_websocket
from .cors import CorsPolicy, origin_allowed
from .keys import KeyAgreement
from .moves import ConnectionMoves
from .routes import Router

__all__ = ["Authenticator", "Gate", "HttpConnectionDispatcher", "NegotiateRedirect"]

log = logging.getLogger("hubwire.server")

#: turns a transport or negotiate request into a user (None = anonymous)
Authenticator = Callable[[RequestInfo], Awaitable[Principal | None] | Principal | None]

#: a hook that sends a negotiating client elsewhere: ``request -> (url, access_token) | None``
NegotiateRedirect = Callable[
    [RequestInfo], Awaitable[tuple[str, str | None] | None] | tuple[str, str | None] | None
]

Headers = list[tuple[str, str]]


class Gate(Protocol):
    """A server endpoint's own admission check (the dashboard's hub), used instead of the app's.

    Its requests skip the authenticator, the hub policies, CORS and the origin lists: the gate
    alone decides, and its connections have no user.
    """

    async def check(self, request: RequestInfo) -> tuple[int, Headers] | None:
        """None to admit the request, else the status and headers to refuse it with."""


#: seconds a connection-start claim outlives the token's validity (clock skew between instances)
_CLAIM_SLACK = 10.0


def _draining_status(features: TransportFeatures) -> int:
    """A draining instance refuses to start a transport: 503, except 410 for an event stream.

    Why 410: Node's ``eventsource`` (which the official JS client uses in Node) reconnects an
    EventSource by itself after a 500/502/503/504, and the client never closes the EventSource of
    a start that failed - so a 503 would leave a stream that later connects elsewhere and feeds
    stray messages into the client's next connection. Any 4xx makes it give up, as browsers do.
    """
    return 410 if features is sse.FEATURES else 503


class HttpConnectionDispatcher:
    """Checks and routes negotiate, WebSocket, SSE, long-polling, POST and DELETE requests."""

    def __init__(
        self,
        connections: ConnectionManager,
        router: Router,
        cors: CorsPolicy,
        options: HubOptions,
        backplane: Backplane,
        authenticator: Authenticator | None,
        start: Callable[[], Awaitable[None]],
        keys: KeyAgreement,
    ) -> None:
        self.connections = connections
        self.router = router
        self.cors = cors
        self.options = options
        self.backplane = backplane
        self.authenticator = authenticator
        self._start = start
        self.keys = keys
        self.redirects: dict[ConnectionApplication, NegotiateRedirect] = {}
        #: redirects that also get the authenticated user (the connection service vouches for it)
        self.user_redirects: dict[ConnectionApplication, UserRedirect] = {}
        #: endpoints with a gate of their own instead of the app's authentication and origin rules
        self.gates: dict[ConnectionApplication, Gate] = {}
        takeovers = backplane.takeovers
        #: stateful reconnect across instances (None: one instance)
        self.moves = ConnectionMoves(connections, router, backplane, takeovers) if takeovers else None
        #: refused connection attempts by reason (for metrics)
        self.refused: dict[str, int] = {"max_connections": 0, "origin": 0, "draining": 0}
        #: the server is draining: new connections are refused (503) so clients go elsewhere
        self.draining = False
        #: set once a drain let every connection go: relayed polls still waiting here end (empty)
        #: instead of holding the shutdown for a poll's length
        self.stopping = asyncio.Event()
        #: starts the server's drain (set by the server; uvicorn's shutdown reaches it through
        #: the native WebSocket protocol as well as through the server's own watch)
        self.on_drain: Callable[[], None] | None = None

    # -- what native WebSocket serving needs (NativeGate) ----------------------------------------

    def route(self, path: str) -> ConnectionApplication | None:
        return self.router.route(path)

    async def ensure_started(self) -> None:
        await self._start()

    def begin_drain(self) -> None:
        """The process is stopping: refuse new connections and let the server drain the others."""
        self.draining = True
        if self.on_drain is not None:
            self.on_drain()

    async def admit_websocket(
        self, endpoint: ConnectionApplication, request: RequestInfo
    ) -> Connection | tuple[int, str]:
        """Check a WebSocket request: the connection to serve, or ``(status, body)`` to refuse it.

        Shared by the ASGI path and the native protocol so both answer alike. A refusal is
        logged (debug) with its status and reason: for a stateful-reconnect resume it is the
        client's one attempt, and the client starts a new connection after it.
        """
        admitted = await self._admit_websocket(endpoint, request)
        if isinstance(admitted, tuple):
            log.debug(
                "WebSocket %s refused: %d %s",
                "resume or start" if request.query_param("id") else "start",
                admitted[0],
                admitted[1] or "(no body)",
            )
        return admitted

    async def _admit_websocket(
        self, endpoint: ConnectionApplication, request: RequestInfo
    ) -> Connection | tuple[int, str]:
        if not self.keys.ready:
            return 503, texts.NOT_READY
        if self.draining:  # new or resuming: either is served better by an instance that stays
            self.refused["draining"] += 1
            return 503, texts.SERVER_SHUTTING_DOWN
        gate = self.gates.get(endpoint)
        if gate is None and self._origin_refused(endpoint, request, websocket=True):
            return 403, texts.ORIGIN_NOT_ALLOWED
        if websocket.FEATURES.name not in endpoint.transports or endpoint in self.user_redirects:
            # (an app server of a connection service serves no transport, skipNegotiation's
            # negotiate-less WebSocket included: its clients are held by the nodes)
            return 404, texts.transport_not_supported(websocket.FEATURES.name)
        token = request.query_param("id")
        if self._at_capacity(token):
            return 503, texts.TOO_MANY_CONNECTIONS
        principal = None
        if gate is not None:
            denied = await gate.check(request)
            if denied is not None:
                return denied[0], ""
        else:
            principal = await self.authenticate(request)
            if not await self._authorized(endpoint, principal):
                return 401, ""
        if token:
            conn = self.connections.resolve(token)
            if conn is None:
                # not here and too old to start anywhere: a resume of a connection held elsewhere?
                return await self._take_over(endpoint, token, request, principal)
            if not self.connections.is_live(conn):
                return 404, texts.NO_CONNECTION
            if self.moves is not None and self.moves.is_moving(conn.connection_id):
                return 409, ""  # another resume of it is moving it right now
            if conn.transport_name not in (None, websocket.FEATURES.name):
                return 400, texts.CANNOT_CHANGE_TRANSPORT
            if conn.transport_name is not None:
                return self._resume(endpoint, conn, request, principal)
            refusal = await self._take_ownership(endpoint, conn, websocket.FEATURES)
            if refusal == (409, "") and conn.stateful and self.moves is not None:
                # started on another instance: this is a resume landing here
                self.connections.drop_adopted(conn)
                return await self._take_over(endpoint, token, request, principal)
            if refusal is not None:
                return refusal
        else:
            # skipNegotiation: a connection created on the fly, version-0 style (token == id)
            conn = self.connections.create(0, principal)
        self.connections.activate(conn, websocket.FEATURES, request, principal)
        return conn

    async def _take_over(
        self,
        endpoint: ConnectionApplication,
        token: str,
        request: RequestInfo,
        principal: Principal | None,
    ) -> Connection | tuple[int, str]:
        """A resume of a connection this instance does not hold: take it over from its holder."""
        verified = self.connections.resumable_token(token)
        if verified is None or self.moves is None:
            return 404, texts.NO_CONNECTION
        return await self.moves.take_over(endpoint, verified, token, request, principal)

    def _resume(
        self,
        endpoint: ConnectionApplication,
        conn: Connection,
        request: RequestInfo,
        principal: Principal | None,
    ) -> Connection | tuple[int, str]:
        """A second WebSocket for a started connection: a stateful-reconnect resume, or 409.

        Only a resumable connection (stateful reconnect on, not ended or
        aborted) of this path is resumed, and only by the user it belongs to:
        a token is a bearer secret, so a stolen one must not hand another user
        the connection (its messages, groups and identity). No credentials
        where the connection has a user is 401; another user is 403. The
        token's age does not matter here (a resume is not a start).

        A resume reaching an instance that does not hold the connection never
        gets here: :meth:`_take_over` moves it from its holder (``moves.py``).
        """
        if not conn.resumable:
            return 409, ""  # a WebSocket of this connection is already open
        if conn.application is not endpoint:
            return 404, texts.NO_CONNECTION  # started on another path
        owner = conn.principal
        if owner is not None and principal is None:
            return 401, ""
        if principal is not None and (owner is None or owner.identifier != principal.identifier):
            log.warning(
                "refused resuming %s as another user",
                conn.connection_id,
                extra={"connection_id": conn.connection_id, "event": "resume_refused"},
            )
            return 403, texts.RESUME_OTHER_USER
        self.connections.resume(conn, request, principal)
        return conn

    # -- ASGI entry points -------------------------------------------------------------------------

    async def websocket(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        admitted = await self.admit_websocket(endpoint, RequestInfo.from_scope(scope))
        if isinstance(admitted, tuple):
            await reject_websocket(scope, receive, send, admitted[0], admitted[1])
            return
        await serve_websocket(self.connections, endpoint, admitted, receive, send)

    async def negotiate(
        self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``POST {hub}/negotiate``: authorize, maybe redirect, else create a connection."""
        checked = await self._preamble(endpoint, scope, send, ("POST",))
        if checked is None:
            return
        request, cors, principal = checked
        try:
            version = select_negotiate_version(
                request.query_param("negotiateVersion"), self.options.minimum_negotiate_version
            )
        except NegotiateError as exc:
            await respond(send, 200, negotiate_error(str(exc)), "application/json", cors)
            return
        target = await self._redirect(endpoint, request, principal)
        if target is not None:
            await respond(send, 200, redirect_response(*target), "application/json", cors)
            return
        if self._at_capacity(None):
            body = texts.TOO_MANY_CONNECTIONS.encode()
            await respond(send, 503, body, headers=[*cors, ("retry-after", "1")])
            return
        if self.draining:  # a rolling deploy: the client's retry reaches another instance
            self.refused["draining"] += 1
            await refuse_draining(send, 503, cors)
            return
        stateful = self._grants_stateful_reconnect(endpoint, request, version)
        conn = self.connections.create(version, principal, stateful)
        body = negotiate_response(
            version, conn.connection_id, conn.token, endpoint.transports, use_stateful_reconnect=stateful
        )
        await respond(send, 200, body, "application/json", cors)

    async def _redirect(
        self, endpoint: ConnectionApplication, request: RequestInfo, principal: Principal | None
    ) -> tuple[str, str | None] | None:
        """Where to send a negotiating client: the path's own hook first, then the connection
        service (an app server in service mode serves no client itself), or None: here."""
        hook = self.redirects.get(endpoint)
        if hook is not None:
            target = hook(request)
            if inspect.isawaitable(target):
                target = await target
            if target is not None:
                return target
        user_hook = self.user_redirects.get(endpoint)
        return user_hook(request, principal) if user_hook is not None else None

    @staticmethod
    def _grants_stateful_reconnect(
        endpoint: ConnectionApplication, request: RequestInfo, version: int
    ) -> bool:
        """The client asked (``useStatefulReconnect=true``) and the hub allows it, as ASP.NET answers.

        Negotiate version 0 makes the id the token, which has no room for the
        signed flag another instance needs, so v0 never gets it (the clients
        that ask for it all negotiate version 1).
        """
        asked = (request.query_param("useStatefulReconnect") or "").strip().lower() == "true"
        opts = endpoint.options
        allowed = opts.allow_stateful_reconnect and opts.stateful_reconnect_buffer_size > 0
        return asked and version > 0 and allowed

    async def http(self, endpoint: ConnectionApplication, scope: Scope, receive: Receive, send: Send) -> None:
        """Plain HTTP on a hub path: SSE GET, long-poll GET, POST (send) or DELETE (close)."""
        checked = await self._preamble(endpoint, scope, send, ("GET", "POST", "DELETE"))
        if checked is None:
            return
        request, cors, principal = checked
        token = request.query_param("id")
        if not token:
            await respond(send, 400, texts.CONNECTION_ID_REQUIRED.encode(), headers=cors)
            return
        draining_get = self.draining and scope.get("method") == "GET"
        if draining_get and await self._move_along(token, request, send, cors):
            return
        if await self._relayed(endpoint, scope, request, principal, receive, send, token, cors):
            return  # another instance holds this connection and answered
        method = scope.get("method")
        if method == "GET":
            await self._stream_or_poll(endpoint, token, principal, request, receive, send, cors)
            return
        # a POST or DELETE never starts a connection, so only local ones count: taking one over
        # here would accept bytes that the instance streaming to the client never sees
        conn = self.connections.get(token)
        if conn is None or not self.connections.is_live(conn):
            await respond(send, 404, texts.NO_CONNECTION.encode(), headers=cors)
        elif method == "POST":
            refusal = await self._hold_unstarted(endpoint, conn)
            if refusal is not None:
                await respond(send, refusal[0], refusal[1].encode(), headers=cors)
                return
            # the user is that of the transport request (SSE GET / polls), as in ASP.NET: a POST
            # authorizes itself but does not change who the connection belongs to
            await handle_post(self.connections, endpoint, conn, request, receive, send, cors)
        else:
            await handle_delete(self.connections, conn, send, cors)

    # -- SSE and long polling ----------------------------------------------------------------------

    async def _move_along(self, token: str, request: RequestInfo, send: Send, cors: Headers) -> bool:
        """Draining: an SSE GET for a connection not streaming here cannot start here (410, and
        ``Connection: close`` so the client's retry reaches another instance). A poll goes on
        (relayed to the instance holding its connection; one that would start here is refused
        like a stream, in ``_refuse_stream_or_poll``)."""
        local = self.connections.get(token)
        if local is not None and local.transport_name is not None:
            return False  # started here: the drain closes it
        if "text/event-stream" not in (request.header("accept") or "").lower():
            return False
        self.refused["draining"] += 1
        await refuse_draining(send, _draining_status(sse.FEATURES), cors)
        return True

    async def _relayed(
        self,
        endpoint: ConnectionApplication,
        scope: Scope,
        request: RequestInfo,
        principal: Principal | None,
        receive: Receive,
        send: Send,
        token: str,
        cors: Headers,
    ) -> bool:
        """True when the request was relayed to (and answered by) the instance holding the connection."""
        relay = self.backplane.relay
        if relay is None or scope.get(LOCAL_ONLY):
            return False
        local = self.connections.get(token)
        if local is not None and local.transport_name is not None:
            return False  # started here
        return await forward(
            self.connections,
            relay,
            self.http,
            endpoint,
            scope,
            request,
            principal,
            receive,
            send,
            token,
            cors,
            self.stopping,
        )

    async def _stream_or_poll(
        self,
        endpoint: ConnectionApplication,
        token: str,
        principal: Principal | None,
        request: RequestInfo,
        receive: Receive,
        send: Send,
        cors: Headers,
    ) -> None:
        accept = (request.header("accept") or "").lower()
        features = sse.FEATURES if "text/event-stream" in accept else longpolling.FEATURES
        refusal = await self._refuse_stream_or_poll(endpoint, token, principal, features)
        if isinstance(refusal, tuple):
            status, text = refusal
            await respond(send, status, text.encode(), headers=cors)
            return
        conn = refusal
        if conn.transport_name is None:
            # the first SSE GET or poll starts the transport; its request is the connection's
            self.connections.activate(conn, features, request, principal)
        elif principal is not None:
            conn.principal = principal
        if features is sse.FEATURES:
            await serve_sse(self.connections, endpoint, conn, receive, send, cors)
        else:
            await serve_poll(self.connections, endpoint, conn, receive, send, cors)

    async def _refuse_stream_or_poll(
        self,
        endpoint: ConnectionApplication,
        token: str,
        principal: Principal | None,
        features: TransportFeatures,
    ) -> Connection | tuple[int, str]:
        """The connection an SSE GET or a poll may serve, or ``(status, text)`` in ASP.NET's order."""
        if self._at_capacity(token):
            return 503, texts.TOO_MANY_CONNECTIONS
        conn = self.connections.resolve(token)
        if conn is None or not self.connections.is_live(conn):
            return 404, texts.NO_CONNECTION
        if self.draining and conn.transport_name is None:  # no transport starts on a draining instance
            return _draining_status(features), texts.SERVER_SHUTTING_DOWN
        if features.name not in endpoint.transports:
            return 404, texts.transport_not_supported(features.name)
        if conn.transport_name not in (None, features.name):
            return 400, texts.CANNOT_CHANGE_TRANSPORT
        if conn.application is not None and conn.application is not endpoint:
            return 404, texts.NO_CONNECTION  # negotiated for another path
        if conn.transport_name is None:
            refusal = await self._take_ownership(endpoint, conn, features)
            if refusal is not None:
                return refusal
        elif features is sse.FEATURES:
            return 409, ""  # one event stream per connection
        return conn

    async def _hold_unstarted(
        self, endpoint: ConnectionApplication, conn: Connection
    ) -> tuple[int, str] | None:
        """A POST for a connection negotiated here whose transport started nowhere that answers.

        Its bytes wait for the start (as in ASP.NET) only where the start will run them: with
        other instances, this one claims the connection and answers its relay channel, so the
        first poll, wherever it lands, is relayed here. When another instance started it (and no
        longer answers for it: it ended, or that instance is gone) the POST gets 404 - a 200 would
        accept bytes that no application ever gets. 503 when Redis cannot tell.
        """
        relay = self.backplane.relay
        if relay is None or conn.transport_name is not None:
            return None
        ttl = self.connections.issuer.max_age + _CLAIM_SLACK
        claimed = await self.backplane.claim_connection(conn.connection_id, ttl)
        if claimed is None:
            return 503, texts.BACKPLANE_UNAVAILABLE
        if not claimed:
            return 404, texts.NO_CONNECTION
        await serve_relayed(relay, self.http, endpoint, conn)
        return None

    async def _take_ownership(
        self, endpoint: ConnectionApplication, conn: Connection, features: TransportFeatures
    ) -> tuple[int, str] | None:
        """This instance starts ``conn``'s transport: claim it, and answer relays for SSE/LP.

        Refused with 409 when another instance already started a connection with
        this id (a replayed token), 503 when the backplane cannot record the start.
        """
        # the claim lives as long as the token could start the connection anywhere (clock skew too)
        ttl = self.connections.issuer.max_age + _CLAIM_SLACK
        claimed = await self.backplane.claim_connection(conn.connection_id, ttl)
        if claimed is None:
            return 503, texts.BACKPLANE_UNAVAILABLE
        if not claimed:
            if not conn.stateful:  # a resumable one is a resume landing here: it is taken over
                log.warning("connection %s was already started on another instance", conn.connection_id)
            return 409, ""
        relay = self.backplane.relay
        if relay is not None and features is not websocket.FEATURES:
            await serve_relayed(relay, self.http, endpoint, conn)
        return None

    # -- checks ------------------------------------------------------------------------------------

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

    async def _unauthorized(self, send: Send, headers: Headers) -> None:
        """``401`` with an empty body: the JS client then reports ``Unauthorized: Status code '401'``."""
        challenge = getattr(self.authenticator, "challenge", None)  # e.g. JwtBearerAuthenticator's
        if isinstance(challenge, str):
            headers = [*headers, ("www-authenticate", challenge)]
        await respond(send, 401, b"", content_type=None, headers=headers)

    def _origin_refused(
        self, endpoint: ConnectionApplication, request: RequestInfo, websocket: bool = False
    ) -> bool:
        """``allowed_origins`` when set; else WebSocket upgrades follow ``cors_origins`` (browsers
        open WebSockets from any page without CORS, with the user's cookies)."""
        allowed = endpoint.options.allowed_origins
        if origin_allowed(allowed, request) and (
            allowed is not None or not websocket or self.cors.allows_websocket(request)
        ):
            return False
        self.refused["origin"] += 1
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

    async def _preamble(
        self, endpoint: ConnectionApplication, scope: Scope, send: Send, methods: tuple[str, ...]
    ) -> tuple[RequestInfo, Headers, Principal | None] | None:
        """What every HTTP request on a hub path goes through first: CORS preflight, origin, method,
        authentication and the path's policies (401).

        Returns the request, the CORS headers to add and the user, or None when it was already answered.
        """
        request = RequestInfo.from_scope(scope)
        method = scope.get("method")
        gate = self.gates.get(endpoint)
        if gate is not None:
            return await self._gated(gate, request, scope, send, methods)
        if method == "OPTIONS" and self.cors.enabled:
            await self.cors.preflight(request, send)
            return None
        cors = self.cors.headers(request)
        if not self.keys.ready:
            await respond(send, 503, texts.NOT_READY.encode(), headers=[*cors, ("retry-after", "1")])
            return None
        if self._origin_refused(endpoint, request):
            await respond(send, 403, texts.ORIGIN_NOT_ALLOWED.encode(), headers=cors)
            return None
        if method not in methods:
            await respond(send, 405, b"", headers=cors)
            return None
        if RELAYED_USER in scope:  # relayed: the relaying instance authenticated and authorized it
            return request, cors, scope[RELAYED_USER]
        principal = await self.authenticate(request)
        if not await self._authorized(endpoint, principal):
            await self._unauthorized(send, cors)
            return None
        return request, cors, principal

    async def _gated(
        self, gate: Gate, request: RequestInfo, scope: Scope, send: Send, methods: tuple[str, ...]
    ) -> tuple[RequestInfo, Headers, Principal | None] | None:
        """:meth:`_preamble` for an endpoint with a gate: no CORS (same-origin pages only), no user."""
        if not self.keys.ready:
            await respond(send, 503, texts.NOT_READY.encode(), headers=[("retry-after", "1")])
            return None
        if scope.get("method") not in methods:
            await respond(send, 405, b"")
            return None
        if RELAYED_USER not in scope:  # a relayed request passed the gate on the relaying instance
            refusal = await gate.check(request)
            if refusal is not None:
                await respond(send, refusal[0], b"", content_type=None, headers=refusal[1])
                return None
        return request, [], None
