"""hubwire: real-time hubs for Python that speak the ASP.NET Core SignalR protocol.

Quick start::

    from hubwire import Hub, HubServer

    class ChatHub(Hub):
        async def send_message(self, user: str, text: str) -> None:
            await self.clients.all.send("ReceiveMessage", user, text)

    server = HubServer()
    server.add_hub("/chat", ChatHub)
    # uvicorn module:server   (or: hubwire run module:server)
"""

from .backplane.base import Backplane, InMemoryBackplane
from .connections.connection import Connection, Principal, RequestInfo
from .exceptions import HubException
from .hubs.clients import ClientProxy, HubCallerClients, HubClients, SingleClientProxy
from .hubs.context import HubCallerContext
from .hubs.hub import GroupManager, Hub, HubContext, authorize, hub_method
from .hubs.lifetime import HubLifetimeManager, InMemoryLifetimeManager, SerializedMessage
from .options import HubOptions
from .server.app import HubServer

__all__ = [
    "Backplane",
    "ClientProxy",
    "Connection",
    "GroupManager",
    "Hub",
    "HubCallerClients",
    "HubCallerContext",
    "HubClients",
    "HubContext",
    "HubException",
    "HubLifetimeManager",
    "HubOptions",
    "HubServer",
    "InMemoryBackplane",
    "InMemoryLifetimeManager",
    "Principal",
    "RequestInfo",
    "SerializedMessage",
    "SingleClientProxy",
    "authorize",
    "hub_method",
]

__version__ = "0.1.0"
