"""The ``messagepack`` hub protocol: varint length prefix + one MessagePack array per message."""

from __future__ import annotations

from typing import Any

import msgspec

from .base import EncHook, HubProtocol, MessageParser, TransferFormat
from .errors import InvalidDataError
from .messages import (
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

__all__ = ["MessagePackHubProtocol", "read_varint", "write_varint"]

_MAX_LENGTH = 2**31 - 1
_ERROR, _VOID, _NON_VOID = 1, 2, 3

_decoder = msgspec.msgpack.Decoder()


def write_varint(value: int) -> bytes:
    """Little-endian base-128 length prefix (1-5 bytes)."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(buf: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """Decode a length prefix at ``pos``: ``(value, bytes used)`` or None if incomplete."""
    value = 0
    for i in range(5):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if value > _MAX_LENGTH:
                raise InvalidDataError("Messages over 2GB in size are not supported.")
            return value, i + 1
    raise InvalidDataError("Messages over 2GB in size are not supported.")


class _MessagePackParser(MessageParser):
    def _records(self) -> list[bytes]:
        buf = self._buffer
        records: list[bytes] = []
        pos = 0
        while True:
            head = read_varint(buf, pos)
            if head is None:
                break
            length, used = head
            # SignalR limits the framed message: length prefix and body
            self._check_size(used + length)
            if len(buf) - pos - used < length:
                break
            start = pos + used
            records.append(bytes(buf[start : start + length]))
            pos = start + length
        if pos:
            del buf[:pos]
        return records

    def _frame(self, record: bytes) -> bytes:
        return write_varint(len(record)) + record


def _str(value: Any, what: str, allow_nil: bool = False) -> str | None:
    if value is None and allow_nil:
        return None
    if not isinstance(value, str):
        raise InvalidDataError(f"Reading '{what}' as String failed.")
    return value


def _headers(value: Any) -> dict[str, str] | None:
    if not isinstance(value, dict):
        raise InvalidDataError("Reading map length for 'headers' failed.")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidDataError("Reading 'headers' failed: keys and values must be strings.")
    return value or None


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidDataError(f"Reading array length for '{what}' failed.")
    return value


def _stream_ids(arr: list[Any], index: int) -> list[str] | None:
    if len(arr) <= index:
        return None
    ids = _list(arr[index], "streamIds")
    for item in ids:
        _str(item, "streamId")
    return ids or None


def _need(arr: list[Any], n: int) -> None:
    if len(arr) < n:
        raise InvalidDataError(f"Invalid message: expected at least {n} elements, got {len(arr)}.")


def _uint(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidDataError(f"Reading '{what}' as Int64 failed.")
    return value


class MessagePackHubProtocol(HubProtocol):
    """MessagePack hub protocol (transfer format Binary).

    Payloads use msgspec's MessagePack: ``bytes`` travel as ``bin``, ``datetime``
    as the timestamp extension (-1), unknown extensions round-trip untouched.
    """

    name = "messagepack"
    transfer_format = TransferFormat.BINARY

    def __init__(self, enc_hook: EncHook | None = None) -> None:
        self._encoder = msgspec.msgpack.Encoder(enc_hook=enc_hook)
        self.encodes_custom_types = enc_hook is not None

    def parser(self, max_message_size: int | None = None) -> MessageParser:
        return _MessagePackParser(self, max_message_size)

    # -- writing -------------------------------------------------------------------------------

    def to_array(self, message: HubMessage) -> list[Any]:
        """The MessagePack array layout of ``message``."""
        if isinstance(message, InvocationMessage):
            return [
                1,
                message.headers or {},
                message.invocation_id,
                message.target,
                message.arguments,
                message.stream_ids or [],
            ]
        if isinstance(message, StreamInvocationMessage):
            return [
                4,
                message.headers or {},
                message.invocation_id,
                message.target,
                message.arguments,
                message.stream_ids or [],
            ]
        if isinstance(message, StreamItemMessage):
            return [2, message.headers or {}, message.invocation_id, message.item]
        if isinstance(message, CompletionMessage):
            if message.error is not None:
                return [3, message.headers or {}, message.invocation_id, _ERROR, message.error]
            if message.has_result:
                return [3, message.headers or {}, message.invocation_id, _NON_VOID, message.result]
            return [3, message.headers or {}, message.invocation_id, _VOID]
        if isinstance(message, CancelInvocationMessage):
            return [5, message.headers or {}, message.invocation_id]
        if isinstance(message, PingMessage):
            return [6]
        if isinstance(message, CloseMessage):
            return [7, message.error, message.allow_reconnect]
        if isinstance(message, AckMessage):
            return [8, message.sequence_id]
        return [9, message.sequence_id]

    def write_message(self, message: HubMessage) -> bytes:
        if isinstance(message, PingMessage):
            return b"\x02\x91\x06"
        body = self._encoder.encode(self.to_array(message))
        return write_varint(len(body)) + body

    # -- reading -------------------------------------------------------------------------------

    def parse_record(self, record: bytes) -> HubMessage | None:
        try:
            arr = _decoder.decode(record)
        except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as exc:
            raise InvalidDataError(f"Deserializing object of the `Object` type failed. {exc}") from None
        if not isinstance(arr, list):
            raise InvalidDataError("Reading array length for 'elementCount' failed.")
        return self.from_array(arr)

    def from_array(self, arr: list[Any]) -> HubMessage | None:
        """Validate a decoded MessagePack array and build the message (None for unknown types)."""
        _need(arr, 1)
        kind = arr[0]
        if not isinstance(kind, int) or isinstance(kind, bool):
            raise InvalidDataError("Reading 'messageType' as Int32 failed.")
        if kind == MessageType.INVOCATION:
            _need(arr, 5)
            return InvocationMessage(
                headers=_headers(arr[1]),
                invocation_id=_str(arr[2], "invocationId", allow_nil=True) or None,
                target=_str(arr[3], "target") or "",
                arguments=_list(arr[4], "arguments"),
                stream_ids=_stream_ids(arr, 5),
            )
        if kind == MessageType.STREAM_INVOCATION:
            _need(arr, 5)
            return StreamInvocationMessage(
                headers=_headers(arr[1]),
                invocation_id=_str(arr[2], "invocationId") or "",
                target=_str(arr[3], "target") or "",
                arguments=_list(arr[4], "arguments"),
                stream_ids=_stream_ids(arr, 5),
            )
        if kind == MessageType.STREAM_ITEM:
            _need(arr, 4)
            return StreamItemMessage(
                headers=_headers(arr[1]),
                invocation_id=_str(arr[2], "invocationId") or "",
                item=arr[3],
            )
        if kind == MessageType.COMPLETION:
            _need(arr, 4)
            headers = _headers(arr[1])
            invocation_id = _str(arr[2], "invocationId") or ""
            result_kind = arr[3]
            if result_kind == _ERROR:
                _need(arr, 5)
                return CompletionMessage(invocation_id, error=_str(arr[4], "error"), headers=headers)
            if result_kind == _VOID:
                return CompletionMessage(invocation_id, headers=headers)
            if result_kind == _NON_VOID:
                _need(arr, 5)
                return CompletionMessage(invocation_id, result=arr[4], has_result=True, headers=headers)
            raise InvalidDataError("Invalid invocation result kind.")
        if kind == MessageType.CANCEL_INVOCATION:
            _need(arr, 3)
            return CancelInvocationMessage(_str(arr[2], "invocationId") or "", headers=_headers(arr[1]))
        if kind == MessageType.PING:
            return PingMessage()
        if kind == MessageType.CLOSE:
            _need(arr, 2)
            error = _str(arr[1], "error", allow_nil=True)
            allow = arr[2] if len(arr) > 2 else False
            if not isinstance(allow, bool):
                raise InvalidDataError("Reading 'allowReconnect' as Boolean failed.")
            return CloseMessage(error=error, allow_reconnect=allow)
        if kind == MessageType.ACK:
            _need(arr, 2)
            return AckMessage(_uint(arr[1], "sequenceId"))
        if kind == MessageType.SEQUENCE:
            _need(arr, 2)
            return SequenceMessage(_uint(arr[1], "sequenceId"))
        return None
