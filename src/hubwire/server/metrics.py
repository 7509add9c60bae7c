"""What a running server is doing: a stats snapshot (JSON) and a Prometheus endpoint.

Counting costs nothing on the hot path beyond plain integer increments on
objects that exist anyway (a connection's outbox, a hub endpoint, the
backplane's :class:`~hubwire.backplane.bus.BusStats`); this module reads them
only when scraped. ``HubServer(metrics_path="/metrics")`` serves the Prometheus
text format (needs the ``metrics`` extra, ``prometheus-client``) and
``HubServer(stats_path="/debug/stats")`` a JSON snapshot (no dependency), or
mount :func:`metrics_app` / :func:`stats_app` yourself.

Metrics (all prefixed ``hubwire_``):

* ``connections{hub,path,transport,protocol}`` connected hub clients (a stateful-reconnect
  connection waiting for its client to resume counts as connected);
  ``connections_resumed_total`` per hub (stateful reconnect);
  ``drain_handed_over_total`` / ``drain_closed_total`` per hub (graceful shutdown);
  ``connections_registered`` every negotiated or connected connection;
  ``connections_opened_total`` / ``connections_closed_total`` /
  ``handshake_failures_total`` per hub; ``connections_refused_total{reason}``
  (``max_connections``, ``origin``); ``slow_consumer_closes_total``;
* ``messages_received_total{hub,path}`` hub messages parsed;
  ``messages_sent_total`` / ``sent_bytes_total`` records queued to clients;
* ``invocations_total`` / ``invocation_errors_total`` /
  ``invocations_rate_limited_total`` per hub;
* ``backplane_published_total``, ``backplane_received_total``,
  ``backplane_dropped_total``, ``backplane_dropped_bytes_total``, ``backplane_publish_errors_total``,
  ``backplane_layout_refreshes_total``, ``backplane_buffered_bytes``, ``backplane_nodes``,
  ``backplane_reconnects_total{link}``, ``backplane_subscriber_restarts_total``,
  ``backplane_stalls_total``, ``backplane_duplicates_dropped_total``,
  ``backplane_lease_failures_total``, ``backplane_moved_in_total``, ``backplane_moved_out_total``,
  ``backplane_takeover_malformed_total``, ``backplane_inspect_malformed_total``,
  ``backplane_inspect_unanswered_total``, ``backplane_journal_writes_total``,
  ``backplane_journal_failures_total``, ``backplane_history_errors_total``, ``backplane_buffered``,
  ``backplane_subscriptions``, ``backplane_publish_lag_seconds``,
  ``backplane_connected`` (Redis backplane only);
* ``websocket_deflate_negotiated_total`` WebSockets that negotiated permessage-deflate,
  ``websocket_compressions_total`` records compressed (once per broadcast, not per recipient),
  ``websocket_compressed_frames_total`` compressed frames written,
  ``websocket_compression_saved_bytes_total`` bytes those saved on the wire,
  ``websocket_inflated_messages_total`` compressed client messages inflated (native serving; the
  whole process, like ``slow_consumer_closes_total``);
* connection service: on an app server ``service_links``, ``service_links_up``,
  ``service_linked_connections`` and per hub ``migrated_in_total`` / ``migrated_out_total``; on a
  node ``service_app_server_connections{hub,app_server}``, ``service_opened_total``,
  ``service_migrations_total``, ``service_migrations_after_crash_total``,
  ``service_synthesized_errors_total``, ``service_closed_no_app_server_total``,
  ``service_resumed_total``, ``service_replayed_total``;
* ``dashboard_viewers`` (with ``dashboard_path``: its pages are never counted as hub connections);
* ``asyncio_tasks`` and the standard ``process_*`` metrics (RSS, CPU, fds).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..connections import connection as _connection
from ..http import ASGIApp, Receive, Scope, Send, respond
from ..hubs.handler import HubConnectionHandler
from ..service.node import ServiceClients
from ..transports.direct import compression_stats
from ..transports.httpbase import HttpConnectionState

if TYPE_CHECKING:
    from .app import HubServer

__all__ = [
    "health_app",
    "internal_apps",
    "metrics_app",
    "rss_bytes",
    "sent_totals",
    "server_stats",
    "stats_app",
]


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _hub_endpoints(server: HubServer) -> list[tuple[str, HubConnectionHandler]]:
    """The app's hubs by path (hubwire's own, the dashboard's, are not the app's)."""
    return [
        (path, ep)
        for path, ep in server.router.items()
        if isinstance(ep, HubConnectionHandler) and not ep.internal
    ]


def _backplane_health(server: HubServer) -> dict[str, Any] | None:
    return server.backplane.health()


def sent_totals(server: HubServer) -> tuple[int, int]:
    """Records and bytes queued to the app's clients since the start (connections gone included;
    the dashboard's viewers are not the app's clients)."""
    messages, size = server.connections.retired_sent
    for conn in server.connections.connections():
        if conn.application is not None and conn.application.internal:
            continue
        messages += conn.outbox.sent
        size += conn.outbox.sent_bytes
    return messages, size


def server_stats(server: HubServer) -> dict[str, Any]:
    """A JSON-able snapshot: connections, tasks, subscriptions, memory, counters."""
    hubs: dict[str, Any] = {}
    for path, endpoint in _hub_endpoints(server):
        hubs[path] = {
            "hub": endpoint.hub_cls.__name__,
            "connected": len(endpoint.connected),
            # stateful reconnect: dropped, waiting for the client to resume (disconnect timeout)
            "suspended": sum(ctx.outbox.detached for ctx in list(endpoint.connected.values())),
            "pending_handshake": len(endpoint.pending),
            "running_tasks": len(endpoint.tasks),
            **endpoint.stats.as_dict(),
        }
    messages, size = sent_totals(server)
    backplane = _backplane_health(server)
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        tasks = 0
    return {
        "pid": os.getpid(),
        "ready": server.keys.ready,
        "rss_bytes": rss_bytes(),
        "tasks": tasks,
        "server_tasks": len(server.tasks),
        "connections": len(server.connections),
        "hub_connections": sum(h["connected"] for h in hubs.values()),
        "http_states": sum(
            isinstance(c.transport_state, HttpConnectionState) for c in server.connections.connections()
        ),
        "subscriptions": backplane.get("subscriptions") if backplane else None,
        "messages_sent": messages,
        "sent_bytes": size,
        "slow_consumer_closes": _connection.stats.slow_consumer_closes,
        # permessage-deflate on natively served WebSockets (the whole process)
        "websocket_compression": compression_stats.as_dict(),
        "refused": dict(server.http.refused),
        "hubs": hubs,
        "backplane": backplane,
        # the dashboard's viewers are not in "hubs" (nor in hub_connections and messages_sent)
        "dashboard": None if server.dashboard is None else {"viewers": server.dashboard.viewers},
        # the cyclic collector: its thresholds (hubwire run --gc-threshold) and collections so far
        "gc": {
            "threshold": list(gc.get_threshold()),
            "collections": [generation["collections"] for generation in gc.get_stats()],
        },
    }


class _Collector:
    """A prometheus-client collector that reads hubwire's counters at scrape time."""

    def __init__(self, server: HubServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.server
        endpoints = _hub_endpoints(server)
        labels = ["hub", "path"]

        conns = GaugeMetricFamily(
            "hubwire_connections",
            "Connected hub clients",
            labels=["hub", "path", "transport", "protocol"],
        )
        for path, ep in endpoints:
            counts: dict[tuple[str, str], int] = {}
            for ctx in list(ep.connected.values()):
                key = (ctx.connection.transport_name or "", ctx.protocol.name)
                counts[key] = counts.get(key, 0) + 1
            for (transport, protocol), n in sorted(counts.items()):
                conns.add_metric([ep.hub_cls.__name__, path, transport, protocol], n)
        yield conns
        yield GaugeMetricFamily(
            "hubwire_connections_registered",
            "Negotiated or connected connections held by this instance",
            value=len(server.connections),
        )

        def per_hub(name: str, doc: str, attr: str) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            for path, ep in endpoints:
                family.add_metric([ep.hub_cls.__name__, path], getattr(ep.stats, attr))
            return family

        for name, doc, attr in _PER_HUB:
            yield per_hub(name, doc, attr)
        refused = CounterMetricFamily(
            "hubwire_connections_refused", "Connection attempts refused", labels=["reason"]
        )
        for reason, n in sorted(server.http.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily(
            "hubwire_slow_consumer_closes",
            "Connections closed because their client did not read fast enough",
            value=_connection.stats.slow_consumer_closes,
        )
        for name, doc, value in (
            (
                "deflate_negotiated",
                "WebSockets that negotiated permessage-deflate",
                compression_stats.negotiated,
            ),
            ("compressions", "Records compressed (once per broadcast)", compression_stats.compressions),
            ("compressed_frames", "Compressed WebSocket frames written", compression_stats.frames),
            ("compression_saved_bytes", "Bytes compression saved on the wire", compression_stats.bytes_saved),
            ("inflated_messages", "Compressed client messages inflated", compression_stats.inflated),
        ):
            yield CounterMetricFamily(f"hubwire_websocket_{name}", doc, value=value)
        messages, size = sent_totals(server)
        yield CounterMetricFamily("hubwire_messages_sent", "Records queued to clients", value=messages)
        yield CounterMetricFamily("hubwire_sent_bytes", "Bytes queued to clients", value=size)
        yield GaugeMetricFamily("hubwire_asyncio_tasks", "Tasks of the event loop", value=_task_count())
        if server.dashboard is not None:
            yield GaugeMetricFamily(
                "hubwire_dashboard_viewers",
                "Dashboard pages connected (not counted among hub connections)",
                value=sum(server.dashboard.viewers.values()),
            )
        health = _backplane_health(server)
        if health is not None and "links" in health:
            yield from _app_server_metrics(health)
        elif health is not None:
            yield from _backplane_metrics(health)
        yield from _node_metrics(server)


#: counters of each hub endpoint's stats: metric name, help, EndpointStats attribute
_PER_HUB = (
    ("hubwire_connections_opened", "Hub handshakes completed", "opened"),
    ("hubwire_connections_closed", "Hub connections ended", "closed"),
    ("hubwire_handshake_failures", "Hub handshakes refused/timed out", "handshake_failures"),
    ("hubwire_messages_received", "Hub messages received from clients", "messages_received"),
    ("hubwire_invocations", "Hub method calls received", "invocations"),
    ("hubwire_invocation_errors", "Hub method calls that failed", "invocation_errors"),
    ("hubwire_invocations_rate_limited", "Hub method calls refused by the rate limit", "rate_limited"),
    ("hubwire_connections_resumed", "Connections resumed on a new WebSocket (stateful reconnect)", "resumed"),
    (
        "hubwire_drain_handed_over",
        "Draining: stateful connections whose WebSocket was dropped so they resume on another instance",
        "handed_over",
    ),
    ("hubwire_drain_closed", "Draining: connections closed with reconnect allowed", "drain_closed"),
    ("hubwire_migrated_in", "Connections a service node moved here from another app server", "migrated_in"),
    ("hubwire_migrated_out", "Connections moved to another app server (draining)", "migrated_out"),
    (
        "hubwire_forged_completions",
        "Client-result completions refused: sent by a connection the call was not sent to",
        "forged_completions",
    ),
)


def _app_server_metrics(health: dict[str, Any]) -> Iterator[Any]:
    """An app server of the connection service: its links to the nodes and what they carry."""
    from prometheus_client.core import GaugeMetricFamily

    yield GaugeMetricFamily("hubwire_service_links", "Links to service nodes", value=health["links"])
    yield GaugeMetricFamily("hubwire_service_links_up", "Links to service nodes up", value=health["links_up"])
    yield GaugeMetricFamily(
        "hubwire_service_linked_connections",
        "Client connections the service nodes run on this app server",
        value=health["connections"],
    )


def _node_metrics(server: HubServer) -> Iterator[Any]:
    """A service node: app-server links, connections per app server, moves, synthesized errors."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    nodes = {id(ep.stats): ep for ep in server.router.endpoints() if isinstance(ep, ServiceClients)}
    if not nodes:
        return
    pinned = GaugeMetricFamily(
        "hubwire_service_app_server_connections",
        "Client connections pinned to each app server's link",
        labels=["hub", "app_server"],
    )
    for clients in nodes.values():
        for hub in list(clients.hubs.values()):
            for link in list(hub.links):
                pinned.add_metric([hub.name, link.server_id], len(link.routes))
    yield pinned
    for attr, doc in (
        ("opened", "Client connections opened on an app server"),
        ("migrations", "Connections moved off a draining app server"),
        ("migrations_after_crash", "Connections moved off an app server whose link died"),
        ("synthesized_errors", "Calls answered with an error because their app server died"),
        ("closed_no_app_server", "Client connections closed for want of an app server"),
        ("resumed", "Client transports resumed here by stateful reconnect"),
        ("replayed", "Messages sent again on resumed client transports"),
    ):
        total = sum(getattr(c.stats, attr) for c in nodes.values())
        yield CounterMetricFamily(f"hubwire_service_{attr}", doc, value=total)


def _backplane_metrics(health: dict[str, Any]) -> Iterator[Any]:
    """The Redis backplane's counters and gauges, from its health snapshot."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    for stat, doc in (
        ("published", "Messages published to Redis"),
        ("received", "Messages received from Redis"),
        ("dropped", "Messages dropped from the outage buffer"),
        ("dropped_bytes", "Bytes of the messages dropped from the outage buffer"),
        ("publish_errors", "Failed publish batches"),
        ("subscriber_restarts", "Subscriber task restarts"),
        ("stalls_detected", "Times a Redis connection fell silent (replaced when Redis answered others)"),
        ("layout_refreshes", "Sentinel / Cluster layouts learned (the first one, failovers, slot moves)"),
        ("handler_errors", "Backplane messages whose handler failed"),
        ("duplicates_dropped", "Backplane messages received a second time and dropped"),
        ("lease_failures", "Instance lease refreshes that failed (others take it for dead after the TTL)"),
        ("moved_in", "Resumable connections taken over from another instance"),
        ("moved_out", "Resumable connections handed over to another instance"),
        ("takeover_malformed", "Malformed connection-takeover messages from Redis (dropped)"),
        ("inspect_malformed", "Malformed inspection queries or answers from Redis (dropped)"),
        ("inspect_unanswered", "Inspection queries left unanswered (past this instance's answer rate)"),
        ("journal_writes", "Durable resume: messages journaled in Redis before being sent"),
        ("journal_failures", "Durable resume: journal write batches Redis did not take"),
        ("history_errors", "Durable resume: channel history writes Redis refused"),
    ):
        name = "stalls" if stat == "stalls_detected" else stat
        yield CounterMetricFamily(f"hubwire_backplane_{name}", doc, value=health.get(stat, 0))
    reconnects = CounterMetricFamily(
        "hubwire_backplane_reconnects", "Reconnections to Redis", labels=["link"]
    )
    reconnects.add_metric(["publisher"], health.get("publisher_reconnects", 0))
    reconnects.add_metric(["subscriber"], health.get("subscriber_reconnects", 0))
    yield reconnects
    yield GaugeMetricFamily(
        "hubwire_backplane_buffered", "Messages waiting to be published", value=health.get("buffered", 0)
    )
    yield GaugeMetricFamily(
        "hubwire_backplane_buffered_bytes",
        "Bytes waiting to be published",
        value=health.get("buffered_bytes", 0),
    )
    yield GaugeMetricFamily(
        "hubwire_backplane_nodes",
        "Redis nodes this instance publishes to",
        value=len(health.get("nodes", ())),
    )
    yield GaugeMetricFamily(
        "hubwire_backplane_subscriptions", "Channels subscribed", value=health.get("subscriptions", 0)
    )
    yield GaugeMetricFamily(
        "hubwire_backplane_publish_lag_seconds",
        "Time the last published batch waited in the buffer",
        value=health.get("last_publish_lag", 0.0),
    )
    yield GaugeMetricFamily(
        "hubwire_backplane_connected",
        "1 while every Redis node's two links are up",
        value=1 if health.get("state") == "connected" else 0,
    )


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def metrics_app(server: HubServer) -> ASGIApp:
    """An ASGI app answering every GET with the Prometheus text exposition of ``server``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server))
    ProcessCollector(registry=registry)
    return _get_app(lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST))


def _get_app(answer: Callable[[], tuple[int, bytes, str]]) -> ASGIApp:
    """An ASGI app answering GET and HEAD with ``answer()`` (status, body, content type), else 405."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope.get("method") not in ("GET", "HEAD"):
            await respond(send, 405, b"")
            return
        status, body, content_type = answer()
        await respond(send, status, body, content_type)

    return app


def _json_app(server: HubServer, snapshot: Callable[[HubServer], tuple[int, dict[str, Any]]]) -> ASGIApp:
    def answer() -> tuple[int, bytes, str]:
        status, body = snapshot(server)
        return status, json.dumps(body).encode(), "application/json"

    return _get_app(answer)


def stats_app(server: HubServer) -> ASGIApp:
    """An ASGI app answering every GET with :func:`server_stats` as JSON."""
    return _json_app(server, lambda s: (200, server_stats(s)))


def health_app(server: HubServer) -> ASGIApp:
    """Readiness: ``200 {"ready": true}``, or ``503`` with why not (e.g. no agreed token key yet)."""
    return _json_app(server, lambda s: (200 if s.keys.ready else 503, _readiness(s)))


def _readiness(server: HubServer) -> dict[str, Any]:
    ready = server.keys.ready
    return {"ready": ready} if ready else {"ready": False, "reason": server.keys.reason}


def internal_apps(
    server: HubServer, metrics_path: str | None, stats_path: str | None, health_path: str | None
) -> list[tuple[str, ASGIApp]]:
    """The internal endpoints a server was asked to serve, with their paths."""
    apps: list[tuple[str, ASGIApp]] = []
    if metrics_path:
        apps.append((metrics_path, metrics_app(server)))
    if stats_path:
        apps.append((stats_path, stats_app(server)))
    if health_path:
        apps.append((health_path, health_app(server)))
    return apps
