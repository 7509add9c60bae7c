"""Fixed texts of the HTTP connection surface, as ASP.NET Core writes them.

The official clients show these to users and some match on them, so every
place that refuses a request uses these constants instead of spelling the
text again.
"""

from __future__ import annotations

__all__ = [
    "BACKPLANE_UNAVAILABLE",
    "CANNOT_CHANGE_TRANSPORT",
    "CONNECTION_ID_REQUIRED",
    "DELETE_NOT_ALLOWED",
    "NOT_READY",
    "NO_CONNECTION",
    "ORIGIN_NOT_ALLOWED",
    "POST_NOT_ALLOWED_ON_WEBSOCKETS",
    "REQUEST_BODY_TOO_LARGE",
    "RESUME_OTHER_USER",
    "TOO_MANY_CONNECTIONS",
    "transport_not_supported",
]

#: a request names a connection this server does not hold (unknown, ended or another path's)
NO_CONNECTION = "No Connection with that ID"
CONNECTION_ID_REQUIRED = "Connection ID required"
CANNOT_CHANGE_TRANSPORT = "Cannot change transports mid-connection"
TOO_MANY_CONNECTIONS = "Too many connections"
#: a draining instance refuses what would start or continue here (the client's retry goes elsewhere)
SERVER_SHUTTING_DOWN = "Server is shutting down"
ORIGIN_NOT_ALLOWED = "Origin not allowed"
REQUEST_BODY_TOO_LARGE = "Request body too large."
POST_NOT_ALLOWED_ON_WEBSOCKETS = "POST requests are not allowed for WebSocket connections."
DELETE_NOT_ALLOWED = "Cannot terminate this connection using the DELETE endpoint."
#: negotiate or a transport request on an instance that has not agreed on the token key yet
NOT_READY = "The server is not ready: its instances have not agreed on a token key yet. Try again."
#: a connection start that cannot be recorded (the backplane is unreachable): the client retries
BACKPLANE_UNAVAILABLE = "Cannot start the connection now: the backplane is unreachable. Try again."
#: a stateful-reconnect resume by a user other than the connection's (hubwire's own text)
RESUME_OTHER_USER = "The connection belongs to another user."


def transport_not_supported(transport: str) -> str:
    """``404`` text for a transport this path does not offer."""
    return f"{transport} transport not supported by this end point type"
