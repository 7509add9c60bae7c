"""The server: the ASGI app, its HTTP surface and its wiring (routes, CORS, negotiate, metrics).

The top of the library: it may import every layer below it (backplane,
transports, hubs, connections, protocol), and nothing below imports it.
"""

from ..backplane.base import Backplane, InMemoryBackplane
from .app import HubServer
from .dispatcher import Authenticator, HttpConnectionDispatcher, NegotiateRedirect

__all__ = [
    "Authenticator",
    "Backplane",
    "HttpConnectionDispatcher",
    "HubServer",
    "InMemoryBackplane",
    "NegotiateRedirect",
]
