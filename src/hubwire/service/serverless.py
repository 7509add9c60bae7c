"""Serverless hubs: a node serves clients of a hub that no app server runs (listen-only).

With ``hubwire service --serverless``, a client of a hub no app server is linked for
is served by the node itself: the node answers its handshake and keeps it alive, and
what it is sent through the REST API (or by app servers of other hubs) reaches it.
The client cannot call anything: an invocation that expects an answer gets an error
completion, as there is no hub code to run it. Who may connect is decided by whoever
holds the access key and mints client tokens (:func:`~hubwire.service.tokens.client_token`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..protocol.handshake import handshake_response
from ..protocol.messages import CompletionMessage
from ..protocol.service import ConnectionData, ServiceFrame
from .node import ClientRoute, NodeLink, ServiceHub

__all__ = ["NO_APP_SERVER", "ServerlessLink"]

log = logging.getLogger("hubwire.service")

#: the error of a call made on a serverless hub
NO_APP_SERVER = "No app server runs this hub: its clients can only listen."


class ServerlessLink(NodeLink):
    """Stands where an app server's link would: the node answers the client itself.

    ``register(route)`` puts an accepted client into the hub's fan-out (the node's manager)."""

    def __init__(self, hub: ServiceHub, register: Callable[[ClientRoute], None]) -> None:
        super().__init__("serverless", hub.name, self._nowhere)
        self.service_hub = hub
        self.register = register
        self.serverless = True

    @staticmethod
    async def _nowhere(data: bytes) -> None:
        return None

    def send(self, frame: ServiceFrame) -> None:
        if isinstance(frame, ConnectionData):
            route = self.routes.get(frame.connection_id)
            if route is not None:
                self._answer(route)

    def _answer(self, route: ClientRoute) -> None:
        """The client's bytes were parsed already (``ClientRoute.track_inbound``): answer its
        handshake once, and every call it made with an error."""
        protocol = route.protocol
        if not route.replied:
            route.replied = True
            if protocol is None:
                route.conn.write_control(handshake_response("The requested protocol is not supported."))
                route.conn.abort("unsupported protocol")
                return
            route.conn.write_control(handshake_response())
            self.register(route)
        if protocol is None or not route.pending:
            return
        for invocation_id in route.pending:
            answer = CompletionMessage.with_error(invocation_id, NO_APP_SERVER)
            route.conn.write(protocol.write_message(answer))
        route.pending.clear()
        route.uploads.clear()
