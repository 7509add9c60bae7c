"""Exceptions hub code raises or catches."""

from __future__ import annotations

__all__ = ["HubException"]


class HubException(Exception):
    """An error meant for the client.

    Raised from a hub method, its message always reaches the caller
    (``... HubException: <message>``), even with detailed errors off, because
    the author chose to expose it. Also raised to hub code when a client
    result fails (the client's error text is the message).
    """

    dotnet_name = "HubException"


def error_type_name(exc: BaseException) -> str:
    """The type name put in detailed error texts (.NET names for our own error types)."""
    name = getattr(type(exc), "dotnet_name", None)
    return name if isinstance(name, str) else type(exc).__name__
