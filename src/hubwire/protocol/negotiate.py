"""Negotiate: the first HTTP request of a connection, answered with ids and transports.

Pure functions over strings and bytes; the HTTP layer decides status codes.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable

import msgspec

__all__ = [
    "TRANSPORT_FORMATS",
    "NegotiateError",
    "negotiate_error",
    "negotiate_response",
    "new_id",
    "redirect_response",
    "select_negotiate_version",
]

#: transport name -> transfer formats it can carry (fixed by the protocol)
TRANSPORT_FORMATS: dict[str, list[str]] = {
    "WebSockets": ["Text", "Binary"],
    "ServerSentEvents": ["Text"],
    "LongPolling": ["Text", "Binary"],
}

MAX_NEGOTIATE_VERSION = 1


class NegotiateError(ValueError):
    """The negotiate request cannot be served; the text goes in ``{"error": ...}``."""


def new_id() -> str:
    """16 cryptographically random bytes, base64url without padding (22 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode("ascii")


def select_negotiate_version(raw: str | None, minimum: int = 0) -> int:
    """The version to answer with, from the ``negotiateVersion`` query value (absent = 0)."""
    if raw is None:
        if minimum > 0:
            raise NegotiateError(
                "The client requested version '0', but the server does not support this version."
            )
        return 0
    try:
        requested = int(raw.strip())
    except ValueError:
        raise NegotiateError("The client requested a non-integer protocol version.") from None
    if requested < minimum:
        raise NegotiateError(
            f"The client requested version '{requested}', but the server does not support this version."
        )
    return min(requested, MAX_NEGOTIATE_VERSION)


def negotiate_response(
    version: int,
    connection_id: str,
    connection_token: str | None,
    transports: Iterable[str],
    use_stateful_reconnect: bool = False,
) -> bytes:
    """The JSON body of a successful negotiate, in the property order .NET writes."""
    body: dict[str, object] = {}
    if use_stateful_reconnect:
        body["useStatefulReconnect"] = True
    body["negotiateVersion"] = version
    body["connectionId"] = connection_id
    if version > 0:
        body["connectionToken"] = connection_token
    body["availableTransports"] = [
        {"transport": name, "transferFormats": TRANSPORT_FORMATS[name]} for name in transports
    ]
    return msgspec.json.encode(body)


def negotiate_error(message: str) -> bytes:
    """``{"error": message}``: clients stop connecting and show the text."""
    return msgspec.json.encode({"error": message})


def redirect_response(url: str, access_token: str | None = None) -> bytes:
    """Send the client elsewhere (e.g. a connection service); always give a token for Python clients."""
    body: dict[str, object] = {"negotiateVersion": 0, "url": url}
    if access_token is not None:
        body["accessToken"] = access_token
    body["availableTransports"] = []
    return msgspec.json.encode(body)
