"""The live cluster dashboard: ``HubServer(dashboard_path="/hubwire/dashboard", dashboard_auth=...)``.

Why a page: ``hubwire inspect`` answers a question once; during an incident people would rather
watch. The page shows what ``hubwire inspect`` prints (the same data: ``server.inspection.view``,
the scatter-gather over the live instances' leases), pushed every second: each instance with its
health, its connections per hub and transport, deliveries and backplane messages per second (a
chart drawn in SVG by the page itself), messages buffered while Redis is unreachable, and drops.

**Security: never without an auth callable.** Enabling it without ``dashboard_auth`` raises
``ValueError`` at construction. Binding it to loopback instead was the other choice, and was
refused: behind a reverse proxy, a port-forward or a container's network every request comes from
the proxy or from loopback, so a "loopback only" check is either open to everyone or useless. The
callable gets every request for the page, its script, style and client bundle, and its hub
(negotiate and every transport request) as a :class:`~hubwire.connections.connection.RequestInfo`
and says yes (truthy) or no (401, with ``WWW-Authenticate`` when the callable has a ``challenge``
string; an exception in it refuses too). The page's requests carry only what a browser sends by
itself: cookies and HTTP authentication. :class:`BasicAuth` is the ready-made callable (the browser
asks for a user name and password once). Before the callable, a browser request from another
origin (an ``Origin`` header naming another host than ``Host``) is refused with 403: browsers open
WebSockets from any page with the user's cookies and cached credentials and without CORS, so a page
elsewhere must not be able to read the cluster through a viewer's browser. The app's
``authenticator``, CORS origins and ``allowed_origins`` play no part on these paths.

**Its own hub.** ``{dashboard_path}/hub`` is a hub of hubwire's own: an in-memory lifetime manager
(never the backplane: every instance pushes its own snapshots to the viewers connected to it), JSON
only, nothing clients can call, no stateful reconnect, small receive limit. Its endpoint is marked
``internal``, so its viewers are not hub connections of the app: they are left out of the stats'
``hubs``, the Prometheus per-hub series, the inspection answers (``hubwire inspect``, presence, this
page's own counts) and ``messages_sent`` (deliveries); they appear as ``dashboard.viewers`` (by
transport) in the stats snapshot and as ``hubwire_dashboard_viewers`` in Prometheus. They do count
as registered connections (``connections``) and against ``max_connections``.

**Only while someone watches.** The snapshot loop runs while the hub has a viewer and stops with
the last one, so an unwatched dashboard costs nothing. While it runs, the serving instance publishes
one inspection query a second and every other instance answers it: that shows in the backplane
figures (with N instances, N more messages published and 2N-1 received a second).

The page, its script and style and the client bundle are files of this package
(``dashboard_files/``); ``signalr.min.js`` is the official ``@microsoft/signalr`` browser bundle,
vendored with its MIT license (``signalr.LICENSE.txt``) so that a wheel needs neither npm nor a CDN.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import html
import importlib.resources
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec

from ..backplane.base import BackplaneUnavailable
from ..backplane.inspect import BackplaneStatus, Instance
from ..connections.connection import RequestInfo
from ..http import Receive, Scope, Send, respond
from ..hubs.context import HubConnectionContext
from ..hubs.handler import HubConnectionHandler
from ..hubs.hub import Hub
from ..hubs.lifetime import InMemoryLifetimeManager
from .routes import IMPLEMENTED_TRANSPORTS, normalize

if TYPE_CHECKING:
    from .app import HubServer

__all__ = ["BasicAuth", "Dashboard", "DashboardAuth", "DashboardHub"]

log = logging.getLogger("hubwire.server")

#: says whether a request may see the dashboard (sync or async); truthy = yes
DashboardAuth = Callable[[RequestInfo], Any | Awaitable[Any]]
#: a refusal: status and headers
Refusal = tuple[int, list[tuple[str, str]]]

#: points of the chart kept (one a snapshot: two minutes at the default interval)
HISTORY = 120
#: the files next to the page: route -> (file, content type)
_FILES = {
    "/signalr.min.js": ("signalr.min.js", "text/javascript; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
_HEADERS = [
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
]
#: the page runs only its own files: no inline script, nothing from another origin, never framed
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_MAX_AUTHORIZATION = 4096


def _read(name: str) -> bytes:
    return (
        importlib.resources.files(__package__ or "hubwire.server")
        .joinpath("dashboard_files", name)
        .read_bytes()
    )


class BasicAuth:
    """HTTP Basic credentials for the dashboard (the browser asks for them once and resends them).

    ``BasicAuth("ops", os.environ["DASHBOARD_PASSWORD"])``. Basic credentials travel in clear text:
    serve the dashboard over HTTPS (or through an SSH tunnel / ``kubectl port-forward``). The
    comparison takes the same time whatever the guess.
    """

    def __init__(self, username: str, password: str, realm: str = "hubwire dashboard") -> None:
        if not username or not password or ":" in username:
            raise ValueError("BasicAuth needs a user name (without ':') and a non-empty password")
        if any(c in realm for c in '"\\\r\n'):
            raise ValueError("the realm must not contain quotes, backslashes or line breaks")
        self._expected = hashlib.sha256(f"{username}:{password}".encode()).digest()
        #: sent as ``WWW-Authenticate`` with 401: the browser then asks for credentials
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'

    def __call__(self, request: RequestInfo) -> bool:
        scheme, _, value = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "basic" or len(value) > _MAX_AUTHORIZATION:
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._expected)


def same_origin(request: RequestInfo) -> bool:
    """No ``Origin`` (not a cross-origin browser request), or one naming the host the request went to."""
    origin = request.header("origin")
    if origin is None:
        return True
    try:
        netloc = urlsplit(origin.strip()).netloc
    except ValueError:
        return False
    host = request.header("host")
    return bool(netloc) and host is not None and netloc.lower() == host.strip().lower()


class DashboardHub(Hub):
    """The dashboard's hub: the server pushes ``snapshot`` to its viewers; clients can call nothing."""


class _Viewers(InMemoryLifetimeManager):
    """The dashboard hub's own lifetime manager: in memory, and it tells the dashboard who arrives."""

    def __init__(self, dashboard: Dashboard) -> None:
        super().__init__()
        self.dashboard = dashboard

    async def on_connected(self, connection: HubConnectionContext) -> None:
        await super().on_connected(connection)
        await self.dashboard.joined(connection.connection_id)


class Dashboard:
    """The page, its files and its hub under ``path``, and the loop that feeds the hub.

    ``interval``: seconds between snapshots; ``timeout``: how long a snapshot waits for the
    instances' answers (an instance killed a moment ago is waited for until its lease expires).
    """

    def __init__(
        self,
        server: HubServer,
        path: str,
        auth: DashboardAuth,
        *,
        interval: float = 1.0,
        timeout: float = 1.0,
    ) -> None:
        if not callable(auth):
            raise TypeError(
                f"dashboard_auth must be a callable taking the request, not {type(auth).__name__}"
            )
        self.server = server
        self.path = normalize(path).rstrip("/")
        self.auth = auth
        challenge = getattr(auth, "challenge", None)
        self.challenge = challenge if isinstance(challenge, str) else None
        self.interval = interval
        self.timeout = timeout
        self.manager = _Viewers(self)
        options = replace(
            server.options,
            maximum_receive_message_size=4096,
            supported_protocols=("json",),
            allow_stateful_reconnect=False,
            allowed_origins=None,
        )
        protocols = [server.protocols["json"]]
        self.endpoint = HubConnectionHandler(
            DashboardHub, self.manager, protocols, options, IMPLEMENTED_TRANSPORTS
        )
        self.endpoint.internal = True
        server.router.add(f"{self.path}/hub", self.endpoint)
        server.http.gates[self.endpoint] = self
        self._page = _read("index.html").decode()
        self._files = {route: (_read(name), kind) for route, (name, kind) in _FILES.items()}
        server.router.add_internal(self.path or "/", self._serve_page)
        for route in _FILES:
            server.router.add_internal(self.path + route, self._serve_file)
        #: [unix time, deliveries/s, published/s, received/s] of the cluster, one per snapshot
        self.history: deque[list[float]] = deque(maxlen=HISTORY)
        #: instance -> (monotonic time, messages sent, published, received) at its last snapshot
        self._counters: dict[str, tuple[float, int, int, int]] = {}
        self._last: dict[str, Any] | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def enable(cls, server: HubServer, path: str | None, auth: DashboardAuth | None) -> Dashboard | None:
        """The dashboard a server was asked for (None: not asked); refused without an auth callable."""
        if path is None:
            if auth is not None:
                raise ValueError("dashboard_auth was given without dashboard_path")
            return None
        if auth is None:
            raise ValueError(
                "the dashboard shows the whole cluster: pass dashboard_auth= (a callable taking the "
                "request, e.g. hubwire.server.dashboard.BasicAuth(user, password)) to enable it"
            )
        return cls(server, path, auth)

    # -- who may see it -----------------------------------------------------------------------------

    async def check(self, request: RequestInfo) -> Refusal | None:
        """None when the request may see the dashboard, else the status (and headers) to refuse it."""
        if not same_origin(request):
            return 403, []
        try:
            verdict = self.auth(request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
        except Exception:
            log.exception("dashboard_auth failed; the request is refused")
            verdict = False
        if verdict:
            return None
        return 401, [("www-authenticate", self.challenge)] if self.challenge else []

    @property
    def viewers(self) -> dict[str, int]:
        """Connected viewers by transport."""
        counts: dict[str, int] = {}
        for ctx in list(self.endpoint.connected.values()):
            transport = ctx.connection.transport_name or ""
            counts[transport] = counts.get(transport, 0) + 1
        return counts

    # -- HTTP ---------------------------------------------------------------------------------------

    async def _admitted(self, scope: Scope, send: Send) -> bool:
        if scope.get("method") not in ("GET", "HEAD"):
            await respond(send, 405, b"", headers=[*_HEADERS, ("allow", "GET, HEAD")])
            return False
        refusal = await self.check(RequestInfo.from_scope(scope))
        if refusal is not None:
            await respond(send, refusal[0], b"", None, [*_HEADERS, *refusal[1]])
            return False
        return True

    async def _serve_page(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await self._admitted(scope, send):
            base = html.escape(str(scope.get("root_path", "")) + self.path, quote=True)
            body = self._page.replace("{{base}}", base).encode()
            headers = [*_HEADERS, ("content-security-policy", _CSP)]
            await respond(send, 200, body, "text/html; charset=utf-8", headers)

    async def _serve_file(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await self._admitted(scope, send):
            route = normalize(str(scope.get("path", ""))).rsplit("/", 1)[-1]
            body, kind = self._files["/" + route]
            await respond(send, 200, body, kind, _HEADERS)

    # -- the snapshots ------------------------------------------------------------------------------

    async def joined(self, connection_id: str) -> None:
        """A viewer arrived: the latest snapshot now if the loop runs, else start it."""
        if self._task is not None and not self._task.done():
            if self._last is not None:
                await self.manager.send_connections([connection_id], "snapshot", [self._last])
            return
        self._task = self.endpoint.tasks.spawn(self._run(), name="dashboard snapshots")

    async def _run(self) -> None:
        """A snapshot every ``interval`` while anyone watches (cancelled with the endpoint at shutdown)."""
        loop = asyncio.get_running_loop()
        while self.endpoint.connected:
            started = loop.time()
            try:
                self._last = await self.snapshot()
            except Exception:  # one bad snapshot must not end the page for everyone
                log.exception("dashboard snapshot failed")
            else:
                await self.manager.send_all("snapshot", [self._last])
            await asyncio.sleep(max(0.1, self.interval - (loop.time() - started)))

    async def snapshot(self) -> dict[str, Any]:
        """The cluster now, as the page gets it (JSON-able)."""
        inspection = self.server.inspection
        # the instances read their counters as the query reaches them: the rates are measured from
        # here, not from when the last answer came (a dead instance is waited for a while)
        now, clock = time.time(), time.monotonic()
        error = None
        try:
            instances = await inspection.view.instances(self.timeout)
        except BackplaneUnavailable as exc:  # this instance alone: what it buffers is the news
            error = f"{exc}; showing this instance only"
            instances = [Instance(name=inspection.name, started=inspection.started, info=inspection.info())]
        rows = [self._row(instance, clock) for instance in instances]
        for name in set(self._counters) - {i.name for i in instances}:
            del self._counters[name]
        totals = _totals(rows)
        self.history.append(
            [round(now, 3), totals["deliveries_per_s"], totals["published_per_s"], totals["received_per_s"]]
        )
        return {
            "at": now,
            "served_by": inspection.name,
            "backplane": "in-memory" if self.server.backplane.health() is None else "redis",
            "error": error,
            "interval": self.interval,
            "viewers": sum(self.viewers.values()),
            "instances": rows,
            "totals": totals,
            "history": list(self.history),
        }

    def _row(self, instance: Instance, clock: float) -> dict[str, Any]:
        """One instance as the page shows it, with its rates since the previous snapshot."""
        info = instance.info
        if info is None:
            return {
                "name": instance.name,
                "started": instance.started,
                "answered": False,
                "health": "no answer",
            }
        backplane = info.backplane
        health = "ok" if backplane is None or backplane.state == "connected" else backplane.state
        return {
            **msgspec.to_builtins(info),
            "name": instance.name,
            "answered": True,
            "health": health,
            "total": info.total,
            **self._rates(instance.name, clock, info.messages_sent, backplane),
        }

    def _rates(self, name: str, clock: float, sent: int, backplane: BackplaneStatus | None) -> dict[str, Any]:
        published = backplane.published if backplane is not None else 0
        received = backplane.received if backplane is not None else 0
        before = self._counters.get(name)
        self._counters[name] = (clock, sent, published, received)
        elapsed = clock - before[0] if before is not None else 0.0
        if before is None or not 0 < elapsed <= 5 * max(self.interval, self.timeout):
            return {"deliveries_per_s": None, "published_per_s": None, "received_per_s": None}
        return {
            "deliveries_per_s": round(max(0, sent - before[1]) / elapsed, 2),
            "published_per_s": round(max(0, published - before[2]) / elapsed, 2),
            "received_per_s": round(max(0, received - before[3]) / elapsed, 2),
        }


def _totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The cluster's sums, and its connections per hub and transport."""
    answered = [r for r in rows if r["answered"]]
    per_hub: dict[tuple[str, str], int] = {}
    for row in answered:
        for c in row["connections"]:
            key = (c["hub"], c["transport"])
            per_hub[key] = per_hub.get(key, 0) + c["connections"]

    def total(field: str) -> float:
        return round(sum(r[field] or 0 for r in answered), 2)

    def backplane(field: str) -> int:
        return sum((r["backplane"] or {}).get(field, 0) for r in answered)

    return {
        "instances": len(rows),
        "answered": len(answered),
        "connections": sum(r["total"] for r in answered),
        "per_hub": [[hub, transport, n] for (hub, transport), n in sorted(per_hub.items())],
        "deliveries_per_s": total("deliveries_per_s"),
        "published_per_s": total("published_per_s"),
        "received_per_s": total("received_per_s"),
        "buffered": backplane("buffered"),
        "buffered_bytes": backplane("buffered_bytes"),
        "dropped": backplane("dropped"),
        "dropped_bytes": backplane("dropped_bytes"),
    }
