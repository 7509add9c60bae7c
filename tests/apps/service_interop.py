"""The connection-service node of the interop suite in service mode (``tests/test_service_interop.py``).

``hubwire run tests.apps.service_interop:node --factory --redis URL`` serves what ``hubwire service``
serves (:func:`~hubwire.server.service_node.from_env`: ``HUBWIRE_SERVICE_ACCESS_KEY``, ``/health``,
``/debug/stats``) with the transport timings of the interop app, read from the same variables
(``INTEROP_LONG_POLL_TIMEOUT``, ``INTEROP_DISCONNECT_TIMEOUT``, ``INTEROP_KEEP_ALIVE_INTERVAL``): in
service mode the node holds the client transports, so the contract's long-polling timings are the
node's. The message-size limit is HubOptions' default, the contract's 32768 bytes.
"""

from __future__ import annotations

import os

from hubwire import HubOptions, HubServer
from hubwire.server.service_node import service_node


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    return float(raw) if raw else default


def node() -> HubServer:
    options = HubOptions(
        long_poll_timeout=_seconds("INTEROP_LONG_POLL_TIMEOUT", 90.0),
        disconnect_timeout=_seconds("INTEROP_DISCONNECT_TIMEOUT", 15.0),
        keep_alive_interval=_seconds("INTEROP_KEEP_ALIVE_INTERVAL", 15.0),
    )
    assert options.maximum_receive_message_size == 32768
    key = os.environ["HUBWIRE_SERVICE_ACCESS_KEY"]
    return service_node(key, options=options, health_path="/health", stats_path="/debug/stats")
