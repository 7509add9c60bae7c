"""The ``json`` hub protocol: one UTF-8 JSON object per record, each ended by 0x1E."""

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

__all__ = ["RECORD_SEPARATOR", "JsonHubProtocol"]

RECORD_SEPARATOR = 0x1E
_RS = b"\x1e"

_decoder = msgspec.json.Decoder()


class _JsonParser(MessageParser):
    def _records(self) -> list[bytes]:
        buf = self._buffer
        records: list[bytes] = []
        start = 0
        while True:
            end = buf.find(_RS, start)
            if end < 0:
                break
            # SignalR limits the framed message: the record and its separator
            self._check_size(end - start + 1)
            records.append(bytes(buf[start:end]))
            start = end + 1
        if start:
            del buf[:start]
        # a record still waiting for its separator may already be too large
        self._check_size(len(buf))
        return records

    def _frame(self, record: bytes) -> bytes:
        return record + _RS


def _string(obj: dict[str, Any], key: str, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidDataError(f"Missing required property '{key}'.")
        return None
    if not isinstance(value, str):
        raise InvalidDataError(f"Expected '{key}' to be of type String.")
    return value


def _headers(obj: dict[str, Any]) -> dict[str, str] | None:
    value = obj.get("headers")
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidDataError("Expected a header value to be of type String.")
    return value or None


def _arguments(obj: dict[str, Any]) -> list[Any]:
    if "arguments" not in obj:
        raise InvalidDataError("Missing required property 'arguments'.")
    value = obj["arguments"]
    if not isinstance(value, list):
        raise InvalidDataError("Expected 'arguments' to be of type Array.")
    return value


def _stream_ids(obj: dict[str, Any]) -> list[str] | None:
    value = obj.get("streamIds")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidDataError("Expected 'streamIds' to be of type Array of String.")
    return value or None


def _sequence_id(obj: dict[str, Any]) -> int:
    value = obj.get("sequenceId")
    if value is None:
        raise InvalidDataError("Missing required property 'sequenceId'.")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise InvalidDataError("Expected 'sequenceId' to be of type Integer.")
    return value


class JsonHubProtocol(HubProtocol):
    """JSON hub protocol (transfer format Text).

    ``enc_hook`` lets applications send their own types (msgspec already
    handles dataclasses, ``datetime``, ``UUID``, ``bytes`` as base64, ...).
    """

    name = "json"
    transfer_format = TransferFormat.TEXT

    def __init__(self, enc_hook: EncHook | None = None) -> None:
        self._encoder = msgspec.json.Encoder(enc_hook=enc_hook)
        self.encodes_custom_types = enc_hook is not None

    def parser(self, max_message_size: int | None = None) -> MessageParser:
        return _JsonParser(self, max_message_size)

    # -- writing -------------------------------------------------------------------------------

    def to_object(self, message: HubMessage) -> dict[str, Any]:
        """The JSON object for ``message`` with properties in the order .NET writes them."""
        obj: dict[str, Any] = {"type": message.type}
        if isinstance(message, InvocationMessage | StreamInvocationMessage):
            if message.headers:
                obj["headers"] = message.headers
            if message.invocation_id is not None:
                obj["invocationId"] = message.invocation_id
            obj["target"] = message.target
            obj["arguments"] = message.arguments
            if message.stream_ids:
                obj["streamIds"] = message.stream_ids
        elif isinstance(message, StreamItemMessage):
            if message.headers:
                obj["headers"] = message.headers
            obj["invocationId"] = message.invocation_id
            obj["item"] = message.item
        elif isinstance(message, CompletionMessage):
            if message.headers:
                obj["headers"] = message.headers
            obj["invocationId"] = message.invocation_id
            if message.error is not None:
                obj["error"] = message.error
            elif message.has_result:
                obj["result"] = message.result
        elif isinstance(message, CancelInvocationMessage):
            if message.headers:
                obj["headers"] = message.headers
            obj["invocationId"] = message.invocation_id
        elif isinstance(message, CloseMessage):
            if message.error is not None:
                obj["error"] = message.error
            if message.allow_reconnect:
                obj["allowReconnect"] = True
        elif isinstance(message, AckMessage | SequenceMessage):
            obj["sequenceId"] = message.sequence_id
        return obj

    def write_message(self, message: HubMessage) -> bytes:
        if isinstance(message, PingMessage):
            return b'{"type":6}\x1e'
        return self._encoder.encode(self.to_object(message)) + _RS

    # -- reading -------------------------------------------------------------------------------

    def parse_record(self, record: bytes) -> HubMessage | None:
        try:
            obj = _decoder.decode(record)
        except (msgspec.DecodeError, RecursionError, UnicodeDecodeError) as exc:
            raise InvalidDataError(f"Error reading JSON. {exc}") from None
        if not isinstance(obj, dict):
            raise InvalidDataError("Unexpected JSON Token Type. Expected a JSON Object.")
        return self.from_object(obj)

    def from_object(self, obj: dict[str, Any]) -> HubMessage | None:
        """Validate a decoded JSON object and build the message (None for unknown types)."""
        kind = obj.get("type")
        if kind is None:
            raise InvalidDataError("Missing required property 'type'.")
        if not isinstance(kind, int) or isinstance(kind, bool):
            raise InvalidDataError("Expected 'type' to be of type Integer.")
        if kind == MessageType.INVOCATION:
            return InvocationMessage(
                target=_string(obj, "target") or "",
                arguments=_arguments(obj),
                invocation_id=_string(obj, "invocationId", required=False) or None,
                stream_ids=_stream_ids(obj),
                headers=_headers(obj),
            )
        if kind == MessageType.STREAM_INVOCATION:
            return StreamInvocationMessage(
                invocation_id=_string(obj, "invocationId") or "",
                target=_string(obj, "target") or "",
                arguments=_arguments(obj),
                stream_ids=_stream_ids(obj),
                headers=_headers(obj),
            )
        if kind == MessageType.STREAM_ITEM:
            if "item" not in obj:
                raise InvalidDataError("Missing required property 'item'.")
            return StreamItemMessage(
                invocation_id=_string(obj, "invocationId") or "",
                item=obj["item"],
                headers=_headers(obj),
            )
        if kind == MessageType.COMPLETION:
            invocation_id = _string(obj, "invocationId") or ""
            has_result = "result" in obj
            error = obj.get("error")
            if error is not None and not isinstance(error, str):
                raise InvalidDataError("Expected 'error' to be of type String.")
            if error is not None and has_result:
                raise InvalidDataError("The 'error' and 'result' properties are mutually exclusive.")
            return CompletionMessage(
                invocation_id,
                error=error,
                result=obj.get("result"),
                has_result=has_result,
                headers=_headers(obj),
            )
        if kind == MessageType.CANCEL_INVOCATION:
            return CancelInvocationMessage(_string(obj, "invocationId") or "", headers=_headers(obj))
        if kind == MessageType.PING:
            return PingMessage()
        if kind == MessageType.CLOSE:
            error = obj.get("error")
            if error is not None and not isinstance(error, str):
                raise InvalidDataError("Expected 'error' to be of type String.")
            allow = obj.get("allowReconnect", False)
            if not isinstance(allow, bool):
                raise InvalidDataError("Expected 'allowReconnect' to be of type Boolean.")
            return CloseMessage(error=error, allow_reconnect=allow)
        if kind == MessageType.ACK:
            return AckMessage(_sequence_id(obj))
        if kind == MessageType.SEQUENCE:
            return SequenceMessage(_sequence_id(obj))
        return None
