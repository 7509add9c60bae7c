"""Hub protocol message types (SignalR hub protocol, message types 1-9).

These are plain data holders shared by both codecs. They carry no behaviour so
that the codecs, the hub layer and the backplane can all agree on one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "AckMessage",
    "CancelInvocationMessage",
    "CloseMessage",
    "CompletionMessage",
    "HubMessage",
    "InvocationMessage",
    "MessageType",
    "PingMessage",
    "SequenceMessage",
    "StreamInvocationMessage",
    "StreamItemMessage",
]


class MessageType:
    """Numeric message type ids as they appear on the wire."""

    INVOCATION = 1
    STREAM_ITEM = 2
    COMPLETION = 3
    STREAM_INVOCATION = 4
    CANCEL_INVOCATION = 5
    PING = 6
    CLOSE = 7
    ACK = 8
    SEQUENCE = 9


@dataclass(slots=True)
class InvocationMessage:
    """Call a method on the other side. Without ``invocation_id`` it is fire-and-forget."""

    target: str
    arguments: list[Any]
    invocation_id: str | None = None
    stream_ids: list[str] | None = None
    headers: dict[str, str] | None = None
    type: ClassVar[int] = MessageType.INVOCATION


@dataclass(slots=True)
class StreamInvocationMessage:
    """Call a streaming method; the callee answers with StreamItems then a Completion."""

    invocation_id: str
    target: str
    arguments: list[Any]
    stream_ids: list[str] | None = None
    headers: dict[str, str] | None = None
    type: ClassVar[int] = MessageType.STREAM_INVOCATION


@dataclass(slots=True)
class StreamItemMessage:
    """One item of a stream (server-to-client results or a client upload stream)."""

    invocation_id: str
    item: Any
    headers: dict[str, str] | None = None
    type: ClassVar[int] = MessageType.STREAM_ITEM


@dataclass(slots=True)
class CompletionMessage:
    """End of an invocation: a result (``has_result``), an ``error``, or neither (void)."""

    invocation_id: str
    error: str | None = None
    result: Any = None
    has_result: bool = False
    headers: dict[str, str] | None = None
    type: ClassVar[int] = MessageType.COMPLETION

    @classmethod
    def with_result(cls, invocation_id: str, result: Any) -> CompletionMessage:
        return cls(invocation_id, result=result, has_result=True)

    @classmethod
    def with_error(cls, invocation_id: str, error: str) -> CompletionMessage:
        return cls(invocation_id, error=error)

    @classmethod
    def empty(cls, invocation_id: str) -> CompletionMessage:
        return cls(invocation_id)


@dataclass(slots=True)
class CancelInvocationMessage:
    """Ask the callee to stop a running stream."""

    invocation_id: str
    headers: dict[str, str] | None = None
    type: ClassVar[int] = MessageType.CANCEL_INVOCATION


@dataclass(slots=True)
class PingMessage:
    """Keep-alive; carries nothing."""

    type: ClassVar[int] = MessageType.PING


@dataclass(slots=True)
class CloseMessage:
    """Sent before closing; ``allow_reconnect`` lets clients with auto-reconnect come back."""

    error: str | None = None
    allow_reconnect: bool = False
    type: ClassVar[int] = MessageType.CLOSE


@dataclass(slots=True)
class AckMessage:
    """Stateful reconnect: highest trackable message id received."""

    sequence_id: int
    type: ClassVar[int] = MessageType.ACK


@dataclass(slots=True)
class SequenceMessage:
    """Stateful reconnect: id of the first message replayed after a reconnect."""

    sequence_id: int
    type: ClassVar[int] = MessageType.SEQUENCE


HubMessage = (
    InvocationMessage
    | StreamInvocationMessage
    | StreamItemMessage
    | CompletionMessage
    | CancelInvocationMessage
    | PingMessage
    | CloseMessage
    | AckMessage
    | SequenceMessage
)

PING = PingMessage()
