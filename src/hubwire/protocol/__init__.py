"""Sans-I/O SignalR protocol core: messages, codecs, framing, handshake, negotiate.

Nothing in this package touches sockets, tasks or the event loop: every
function maps bytes to values and back, so it can be tested exhaustively and
reused by any serving mode (ASGI, a native server, the backplane).
"""

from .base import HubProtocol, MessageParser, TransferFormat
from .errors import HandshakeError, InvalidDataError, MessageTooLargeError
from .handshake import HandshakeRequest, handshake_response, parse_handshake
from .json_protocol import JsonHubProtocol
from .messagepack_protocol import MessagePackHubProtocol, read_varint, write_varint
from .messages import (
    PING,
    AckMessage,
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    HubMessage,
    InvocationMessage,
    MessageType,
    PingMessage,
    SequenceMessage,
    StreamInvocationMessage,
    StreamItemMessage,
)

__all__ = [
    "PING",
    "AckMessage",
    "CancelInvocationMessage",
    "CloseMessage",
    "CompletionMessage",
    "HandshakeError",
    "HandshakeRequest",
    "HubMessage",
    "HubProtocol",
    "InvalidDataError",
    "InvocationMessage",
    "JsonHubProtocol",
    "MessagePackHubProtocol",
    "MessageParser",
    "MessageTooLargeError",
    "MessageType",
    "PingMessage",
    "SequenceMessage",
    "StreamInvocationMessage",
    "StreamItemMessage",
    "TransferFormat",
    "handshake_response",
    "parse_handshake",
    "read_varint",
    "write_varint",
]
