"""hubwire's connection service: service nodes hold the client connections, app servers run hubs.

:mod:`~hubwire.service.node` is the node's side of the app-server links and of the client
connections it holds; :mod:`~hubwire.service.applink` the app server's side (its links, the
connections they carry, a lifetime manager that sends through the service);
:mod:`~hubwire.service.tokens` the tokens both sides and the clients carry;
:mod:`~hubwire.service.rest` the serverless REST API (send and manage groups with no app
server). The frames are in :mod:`hubwire.protocol.service`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .applink import ServiceBackplane, ServiceLinks

__all__ = ["ServiceBackplane", "connection_service"]


def connection_service(
    node_urls: Sequence[str],
    access_key: str,
    *,
    server_id: str | None = None,
    client_urls: Sequence[str] | None = None,
) -> ServiceBackplane:
    """Run this app server's hubs for a connection service: ``HubServer(backplane=connection_service(
    ["http://node1:8080", "http://node2:8080"], access_key=...))`` - what ``hubwire run --service``
    (``HUBWIRE_SERVICE_URLS``) sets up. ``server_id`` names this app server to the nodes (logs,
    metrics); a random one by default. ``client_urls`` (``HUBWIRE_SERVICE_CLIENT_URLS``): where
    clients reach the same nodes, in the same order, when not at ``node_urls`` (an ingress): a
    client's stateful-reconnect resume must reach the node it was sent to."""
    return ServiceBackplane(ServiceLinks(node_urls, access_key, server_id, client_urls))
