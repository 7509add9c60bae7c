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

from .clients import ClientProxy, HubCallerClients, HubClients, SingleClientProxy
from .connection import Connection, Principal, RequestInfo
from .context import HubCallerContext
from .exceptions import HubException
from .hub import GroupManager, Hub, HubContext, authorize, hub_method
from .lifetime import HubLifetimeManager, InMemoryLifetimeManager, SerializedMessage
from .options import HubOptions
from .server import Backplane, HubServer, InMemoryBackplane

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
