"""Wiring of a connection-service node: a :class:`HubServer` that holds clients and runs no hub.

The node reuses everything a hubwire instance has - transports, negotiate, connection
tokens, the backplane that carries fan-out and group commands between nodes, drain,
metrics - and puts :class:`~hubwire.service.node.ServiceClients` at ``/client`` in place of
hubs, the app servers' links at ``/server`` and the REST API at ``/api``.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from ..backplane.base import Backplane, InMemoryBackplane
from ..backplane.redis import RedisBackplane
from ..http import ASGIApp, Receive, Scope, Send, respond
from ..hubs.lifetime import HubLifetimeManager
from ..options import HubOptions
from ..service.acceptor import LinkAcceptor
from ..service.node import ServiceClients
from ..service.rest import ServiceRestApi
from ..service.serverless import ServerlessLink
from ..service.tokens import ALL_TRANSPORTS, ClientAuthenticator, require_pyjwt, transports_path
from ..transports.websocket import reject_websocket
from .app import HubServer

__all__ = ["from_env", "service_node"]

log = logging.getLogger("hubwire.service")


class _NodeRoutes:
    """What a node serves besides its clients: app-server links, and the REST API if any."""

    def __init__(self, links: LinkAcceptor, rest: ASGIApp | None) -> None:
        self.links = links
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").rstrip("/")
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "websocket":
            if path.endswith("/server"):
                await self.links(scope, receive, send)
            else:
                await reject_websocket(scope, receive, send, 404, "Not Found")
        elif scope["type"] == "http" and self.rest is not None and "/api/" in path + "/":
            await self.rest(scope, receive, send)
        else:
            await respond(send, 404, b"Not Found")


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing of its own to start or stop (the node's server does it)."""
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif kind == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def service_node(
    access_key: str,
    *,
    options: HubOptions | None = None,
    backplane: Backplane | None = None,
    serverless: bool | None = None,
    **server_args: Any,
) -> HubServer:
    """A service node: clients connect at ``/client/?hub=H`` (sent there by an app server's
    negotiate), app servers link at ``/server/?hub=H``, serverless senders call ``/api/...``.

    Nodes of one service share ``access_key`` and a Redis backplane (``backplane``, else
    ``HUBWIRE_REDIS_URL``), like instances of one app. ``serverless`` (else
    ``HUBWIRE_SERVICE_SERVERLESS=1``): clients of a hub no app server runs are served listen-only
    (:mod:`hubwire.service.serverless`) instead of refused.
    """
    require_pyjwt()
    # stateful reconnect is the node's: it holds the client's transport and numbers its messages
    opts = options or HubOptions()
    serverless = serverless if serverless is not None else os.environ.get("HUBWIRE_SERVICE_SERVERLESS") == "1"
    # never the service's app-server side (HUBWIRE_SERVICE_URLS), whatever the environment says
    backplane = backplane or RedisBackplane.from_env() or InMemoryBackplane()
    if isinstance(backplane, RedisBackplane) and backplane.durable is not None:
        # a node's connection is not recovered on another node (its app-server route dies with
        # it): journaling each message to Redis first would only delay it
        log.warning("durable resume does not apply to a service node: it is off")
        backplane.durable = None
    server = HubServer(
        opts, backplane=backplane, authenticator=ClientAuthenticator(access_key), **server_args
    )

    def create_manager(name: str) -> tuple[HubLifetimeManager, Awaitable[None]]:
        manager = server.backplane.create_manager(name)
        manager.protocols = tuple(server.protocols.values())
        server.adopt_manager(name, manager)
        return manager, manager.start()

    clients = ServiceClients(opts, server.protocols, create_manager)
    if serverless:
        clients.serverless = ServerlessLink
    for size in range(1, len(ALL_TRANSPORTS) + 1):  # a path per choice of transports an app may make
        for transports in itertools.combinations(ALL_TRANSPORTS, size):
            full = len(transports) == len(ALL_TRANSPORTS)
            server.router.add(transports_path(transports), clients if full else clients.variant(transports))
    acceptor = LinkAcceptor(clients, access_key)
    server.app = _NodeRoutes(acceptor, _rest_api(access_key, clients))
    server.service_clients = clients  # type: ignore[attr-defined]
    return server


def from_env() -> HubServer:
    """The node ``hubwire service`` serves: ``HUBWIRE_SERVICE_ACCESS_KEY``, ``HUBWIRE_REDIS_URL``,
    ``HUBWIRE_SERVICE_KEEP_ALIVE`` / ``HUBWIRE_SERVICE_CLIENT_TIMEOUT`` (seconds; 15 and 30),
    ``HUBWIRE_SERVICE_MAX_MESSAGE_SIZE`` (bytes; 32 KB, the hubs' default: set the app servers'
    ``maximum_receive_message_size`` when it differs);
    readiness at ``/health``, a JSON snapshot at ``/debug/stats``, and Prometheus metrics at
    ``/metrics`` when ``prometheus-client`` is installed."""
    key = os.environ.get("HUBWIRE_SERVICE_ACCESS_KEY")
    if not key:
        raise ValueError("a service node needs HUBWIRE_SERVICE_ACCESS_KEY")
    metrics = "/metrics" if importlib.util.find_spec("prometheus_client") is not None else None
    keep_alive = os.environ.get("HUBWIRE_SERVICE_KEEP_ALIVE")
    timeout = os.environ.get("HUBWIRE_SERVICE_CLIENT_TIMEOUT")
    size = os.environ.get("HUBWIRE_SERVICE_MAX_MESSAGE_SIZE")
    options = HubOptions()
    if size:  # the app servers' maximum_receive_message_size (stateful clients are parsed here)
        options = replace(options, maximum_receive_message_size=int(size))
    if keep_alive:
        options = replace(options, keep_alive_interval=float(keep_alive))
    if timeout:
        options = replace(options, client_timeout_interval=float(timeout))
    return service_node(
        key, options=options, health_path="/health", stats_path="/debug/stats", metrics_path=metrics
    )


def _rest_api(access_key: str, clients: ServiceClients) -> ASGIApp:
    def manager_for(name: str) -> HubLifetimeManager | None:
        # any node sends for any hub (the hub's clients may all be on other nodes): a REST call
        # makes the hub here if it is new (callers hold the access key)
        hub = clients.hub_now(name, create=True)
        return hub.manager if hub is not None else None

    return ServiceRestApi(access_key, manager_for)
