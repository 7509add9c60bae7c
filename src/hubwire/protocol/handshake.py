"""The hub handshake: the first record on every hub connection, always JSON + 0x1E."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from .errors import HandshakeError

__all__ = [
    "HANDSHAKE_CANCELED",
    "HandshakeRequest",
    "handshake_response",
    "parse_handshake",
]

HANDSHAKE_CANCELED = "Handshake was canceled."

_decoder = msgspec.json.Decoder()


@dataclass(slots=True, frozen=True)
class HandshakeRequest:
    """What the client asked for: a protocol name and its version."""

    protocol: str
    version: int


def parse_handshake(
    buffer: bytes | bytearray, max_size: int | None = None
) -> tuple[HandshakeRequest, int] | None:
    """Parse the handshake record at the start of ``buffer``.

    Returns the request and the number of bytes it used (bytes after it are the
    first hub messages), or None when the record is not complete yet. Raises
    :class:`HandshakeError` for anything malformed, and when more than
    ``max_size`` bytes arrived without a complete record (.NET's text then is
    ``Handshake was canceled.``).
    """
    end = buffer.find(b"\x1e")
    if end < 0:
        if max_size is not None and len(buffer) > max_size:
            raise HandshakeError(HANDSHAKE_CANCELED)
        return None
    if max_size is not None and end + 1 > max_size:  # the record and its separator must fit
        raise HandshakeError(HANDSHAKE_CANCELED)
    try:
        obj = _decoder.decode(bytes(buffer[:end]))
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
        raise HandshakeError(f"Error reading JSON. {exc}") from None
    if not isinstance(obj, dict):
        raise HandshakeError("Unexpected JSON Token Type. Expected a JSON Object.")
    if "protocol" not in obj:
        raise HandshakeError("Missing required property 'protocol'. Message content: " + _text(buffer[:end]))
    protocol = obj["protocol"]
    if not isinstance(protocol, str):
        raise HandshakeError("Expected 'protocol' to be of type String.")
    if "version" not in obj:
        raise HandshakeError("Missing required property 'version'. Message content: " + _text(buffer[:end]))
    version = obj["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise HandshakeError("Expected 'version' to be of type Integer.")
    return HandshakeRequest(protocol, version), end + 1


def _text(data: bytes | bytearray) -> str:
    return bytes(data[:200]).decode("utf-8", "replace")


def handshake_response(error: str | None = None) -> bytes:
    """``{}`` + 0x1E on success, ``{"error": ...}`` + 0x1E on failure."""
    if error is None:
        return b"{}\x1e"
    return msgspec.json.encode({"error": error}) + b"\x1e"
