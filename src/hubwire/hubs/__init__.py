"""Hubs: classes whose methods clients call, and everything that reaches their clients.

Above the connection layer, beside the transports (neither imports the
other): the :class:`Hub` base class, client proxies, the per-connection hub
context, the connection handler (handshake, keep-alive) and the dispatcher
(invocations, streams, client results), and the lifetime managers that
deliver sends. Import the modules of this package directly from inside it.
"""

from .clients import ClientProxy, GroupProxy, HubCallerClients, HubClients, SingleClientProxy, UserProxy
from .context import HubCallerContext, HubConnectionContext
from .dispatcher import RATE_LIMITED, EndpointStats, HubDispatcher
from .handler import HubConnectionHandler
from .hub import GroupManager, Hub, HubContext, authorize, hub_method
from .lifetime import HubLifetimeManager, InMemoryLifetimeManager, SerializedMessage
from .presence import ConnectionInfo, Presence, PresenceResult
from .streams import UploadStream

__all__ = [
    "RATE_LIMITED",
    "ClientProxy",
    "ConnectionInfo",
    "EndpointStats",
    "GroupManager",
    "GroupProxy",
    "Hub",
    "HubCallerClients",
    "HubCallerContext",
    "HubClients",
    "HubConnectionContext",
    "HubConnectionHandler",
    "HubContext",
    "HubDispatcher",
    "HubLifetimeManager",
    "InMemoryLifetimeManager",
    "Presence",
    "PresenceResult",
    "SerializedMessage",
    "SingleClientProxy",
    "UploadStream",
    "UserProxy",
    "authorize",
    "hub_method",
]
