"""Connections: one client connection and its life, with no hubs and no routing.

Below transports and hubs: a :class:`Connection` is a byte stream in and out,
owned by the :class:`ConnectionManager`; a :class:`ConnectionApplication` is
what runs on it. Import the modules of this package directly from inside it.
"""

from .application import ConnectionApplication, Policy, RawEndpoint
from .connection import Connection, ConnectionStatus, Principal, RequestInfo, TransportFeatures, stats
from .inbox import Inbox
from .manager import ConnectionManager
from .outbox import Outbox
from .tasks import BackgroundTasks
from .tokens import TokenIssuer, VerifiedToken

__all__ = [
    "BackgroundTasks",
    "Connection",
    "ConnectionApplication",
    "ConnectionManager",
    "ConnectionStatus",
    "Inbox",
    "Outbox",
    "Policy",
    "Principal",
    "RawEndpoint",
    "RequestInfo",
    "TokenIssuer",
    "TransportFeatures",
    "VerifiedToken",
    "stats",
]
