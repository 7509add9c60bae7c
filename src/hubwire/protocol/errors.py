"""Errors raised by the sans-I/O protocol core."""

from __future__ import annotations

__all__ = ["HandshakeError", "InvalidDataError", "MessageTooLargeError"]


class InvalidDataError(ValueError):
    """Malformed bytes or a message that breaks the hub protocol.

    Every parser in :mod:`hubwire.protocol` raises only this type (or a subclass)
    for bad input, so the connection layer can answer any garbage with the
    protocol's own Close message instead of crashing. ``dotnet_name`` is the
    exception name ASP.NET Core would use; detailed error texts carry it so
    clients written against .NET servers see the same strings.
    """

    dotnet_name = "InvalidDataException"


class MessageTooLargeError(InvalidDataError):
    """A single hub message exceeded the configured maximum receive size."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"The maximum message size of {limit}B was exceeded. "
            "The message size can be configured in AddHubOptions."
        )
        self.limit = limit


class HandshakeError(InvalidDataError):
    """The handshake request could not be parsed."""
