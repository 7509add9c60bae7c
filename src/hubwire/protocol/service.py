"""The link between app servers and service nodes (hubwire's connection service), sans-I/O.

An app server keeps WebSocket links to every service node; the nodes hold the
client connections and the app servers run the hubs. Frames on a link are
MessagePack arrays behind a varint length prefix (the framing of SignalR's
MessagePack protocol), numbered and shaped like Azure SignalR Service's
service protocol so that its message kinds map one to one: the client's own
bytes travel untouched in ``ConnectionData`` both ways, and fan-out frames
carry one pre-serialized payload per hub protocol, so nothing is serialized per
recipient anywhere. Every field is checked on decode: a link is authenticated,
but a bug or a stale peer must still get a clear error, never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import InvalidDataError
from .messagepack_protocol import read_varint, write_varint

__all__ = [
    "ACK_ERROR",
    "ACK_NOT_FOUND",
    "ACK_OK",
    "VERSION",
    "Ack",
    "BroadcastData",
    "ClientCompletion",
    "ClientInvocation",
    "CloseConnection",
    "ConnectionData",
    "ErrorCompletion",
    "GroupBroadcastData",
    "GroupCommand",
    "HandshakeRequest",
    "HandshakeResponse",
    "MultiConnectionData",
    "MultiGroupBroadcastData",
    "MultiUserData",
    "OpenConnection",
    "Ping",
    "ServiceFrame",
    "ServiceFrameParser",
    "ServiceProtocolError",
    "UserData",
    "encode_frame",
]

#: the version this side speaks (ASRS's service protocol is at 1 too)
VERSION = 1

ACK_OK = 1
ACK_NOT_FOUND = 2
ACK_TIMEOUT = 3
ACK_ERROR = 4


class ServiceProtocolError(ValueError):
    """A frame that does not follow the link protocol (the link is dropped)."""


@dataclass(slots=True)
class HandshakeRequest:
    """First frame of an app server: the version, and who it is (``ext["server"]``)."""

    version: int = VERSION
    ext: dict[str, Any] = field(default_factory=dict)
    type = 1


@dataclass(slots=True)
class HandshakeResponse:
    error: str | None = None
    ext: dict[str, Any] = field(default_factory=dict)
    type = 2


@dataclass(slots=True)
class Ping:
    """Keep-alive, and the app server's announcements (``{"shutdown": "fin"}`` when it drains)."""

    values: dict[str, str] = field(default_factory=dict)
    type = 3


@dataclass(slots=True)
class OpenConnection:
    """A client connection pinned to this app server: who it is and what it asked for.

    ``claims`` is None for an anonymous user; ``ext`` says the transport and, for a
    connection moved here, where it came from and its state (``migrated``)."""

    connection_id: str
    claims: dict[str, Any] | None
    headers: dict[str, str]
    query: dict[str, str]
    ext: dict[str, Any] = field(default_factory=dict)
    type = 4


@dataclass(slots=True)
class CloseConnection:
    """Either side: the connection is over here (``ext["migrate"]``: it moves, with its state)."""

    connection_id: str
    error: str | None = None
    ext: dict[str, Any] = field(default_factory=dict)
    type = 5


@dataclass(slots=True)
class ConnectionData:
    """The client's own bytes, in either direction."""

    connection_id: str
    payload: bytes
    ext: dict[str, Any] = field(default_factory=dict)
    type = 6


@dataclass(slots=True)
class MultiConnectionData:
    connection_ids: list[str]
    payloads: dict[str, bytes]
    type = 7


@dataclass(slots=True)
class UserData:
    user_id: str
    payloads: dict[str, bytes]
    type = 8


@dataclass(slots=True)
class MultiUserData:
    user_ids: list[str]
    payloads: dict[str, bytes]
    type = 9


@dataclass(slots=True)
class BroadcastData:
    excluded: list[str]
    payloads: dict[str, bytes]
    type = 10


@dataclass(slots=True)
class GroupBroadcastData:
    group: str
    excluded: list[str]
    payloads: dict[str, bytes]
    type = 13


@dataclass(slots=True)
class MultiGroupBroadcastData:
    groups: list[str]
    payloads: dict[str, bytes]
    excluded: list[str] = field(default_factory=list)
    type = 14


@dataclass(slots=True)
class GroupCommand:
    """JoinGroupWithAck (18) or LeaveGroupWithAck (19); answered by an :class:`Ack`."""

    join: bool
    connection_id: str
    group: str
    ack_id: int

    @property
    def type(self) -> int:
        return 18 if self.join else 19


@dataclass(slots=True)
class Ack:
    ack_id: int
    status: int = ACK_OK
    message: str | None = None
    type = 20


@dataclass(slots=True)
class ClientInvocation:
    """An app server asks a client it does not run for a result (``clients.client(id).invoke``):
    ``payloads`` is the Invocation framed per protocol; the node holding the client answers the
    caller with a :class:`ClientCompletion` (or :class:`ErrorCompletion`; ``ext["absent"]``: the
    connection is not on that node)."""

    invocation_id: str
    connection_id: str
    caller: str
    payloads: dict[str, bytes]
    type = 34


@dataclass(slots=True)
class ClientCompletion:
    """The client's Completion of a :class:`ClientInvocation`, framed in ``protocol``."""

    invocation_id: str
    connection_id: str
    caller: str
    protocol: str
    payload: bytes
    type = 36


@dataclass(slots=True)
class ErrorCompletion:
    invocation_id: str
    connection_id: str
    caller: str
    error: str
    ext: dict[str, Any] = field(default_factory=dict)
    type = 37


ServiceFrame = (
    HandshakeRequest
    | HandshakeResponse
    | Ping
    | OpenConnection
    | CloseConnection
    | ConnectionData
    | MultiConnectionData
    | UserData
    | MultiUserData
    | BroadcastData
    | GroupBroadcastData
    | MultiGroupBroadcastData
    | GroupCommand
    | Ack
    | ClientInvocation
    | ClientCompletion
    | ErrorCompletion
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _fields(frame: ServiceFrame) -> list[Any]:
    match frame:
        case HandshakeRequest():
            return [1, frame.version, 0, None, 1, frame.ext]
        case HandshakeResponse():
            return [2, frame.error, frame.ext, None]
        case Ping():
            return [3, *(x for kv in frame.values.items() for x in kv)]
        case OpenConnection():
            return [4, frame.connection_id, frame.claims, frame.headers, frame.query, frame.ext]
        case CloseConnection():
            return [5, frame.connection_id, frame.error, {}, frame.ext]
        case ConnectionData():
            return [6, frame.connection_id, frame.payload, frame.ext]
        case MultiConnectionData():
            return [7, frame.connection_ids, frame.payloads]
        case UserData():
            return [8, frame.user_id, frame.payloads]
        case MultiUserData():
            return [9, frame.user_ids, frame.payloads]
        case BroadcastData():
            return [10, frame.excluded, frame.payloads]
        case GroupBroadcastData():
            return [13, frame.group, frame.excluded, frame.payloads]
        case MultiGroupBroadcastData():
            return [14, frame.groups, frame.payloads, frame.excluded]
        case GroupCommand():
            return [frame.type, frame.connection_id, frame.group, frame.ack_id]
        case Ack():
            return [20, frame.ack_id, frame.status, frame.message]
        case ClientInvocation():
            return [34, frame.invocation_id, frame.connection_id, frame.caller, frame.payloads]
        case ClientCompletion():
            return [36, frame.invocation_id, frame.connection_id, frame.caller, frame.protocol, frame.payload]
        case ErrorCompletion():
            return [37, frame.invocation_id, frame.connection_id, frame.caller, frame.error, frame.ext]
    raise TypeError(f"not a service frame: {frame!r}")  # pragma: no cover


def encode_frame(frame: ServiceFrame) -> bytes:
    """One frame: its varint length, then the MessagePack array."""
    body = _encoder.encode(_fields(frame))
    return write_varint(len(body)) + body


# -- decoding ------------------------------------------------------------------------------------


def _str(value: Any, what: str, limit: int = 1 << 16) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ServiceProtocolError(f"{what}: expected a string")
    return value


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _strs(value: Any, what: str) -> list[str]:
    if not isinstance(value, list):
        raise ServiceProtocolError(f"{what}: expected an array of strings")
    return [_str(v, what) for v in value]


def _map(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ServiceProtocolError(f"{what}: expected a map with string keys")
    return value


def _str_map(value: Any, what: str) -> dict[str, str]:
    mapping = _map(value, what)
    if not all(isinstance(v, str) for v in mapping.values()):
        raise ServiceProtocolError(f"{what}: expected string values")
    return mapping


def _payloads(value: Any) -> dict[str, bytes]:
    mapping = _map(value, "payloads")
    if not mapping or not all(isinstance(v, bytes) for v in mapping.values()):
        raise ServiceProtocolError("payloads: expected a map of protocol names to bytes")
    return mapping


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ServiceProtocolError(f"{what}: expected an integer")
    return value


def _arity(items: list[Any], low: int) -> None:
    if len(items) < low:
        raise ServiceProtocolError(f"frame type {items[0]}: {len(items)} fields, expected {low}")


def decode_frame(body: bytes) -> ServiceFrame:
    """Decode one frame body (without its length prefix)."""
    try:
        items = _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise ServiceProtocolError(f"not MessagePack: {exc}") from None
    except RecursionError:  # msgspec's bound on nesting (a few bytes a level)
        raise ServiceProtocolError("not MessagePack: nested too deep") from None
    if not isinstance(items, list) or not items or type(items[0]) is not int:
        raise ServiceProtocolError("a frame is an array starting with its type")
    kind = items[0]
    match kind:
        case 1:
            _arity(items, 6)
            return HandshakeRequest(_int(items[1], "version"), _map(items[5], "ext"))
        case 2:
            _arity(items, 3)
            return HandshakeResponse(_opt_str(items[1], "error"), _map(items[2], "ext"))
        case 3:
            values = items[1:]
            if len(values) % 2:
                raise ServiceProtocolError("ping: an odd number of fields")
            pairs = [_str(v, "ping") for v in values]
            return Ping(dict(zip(pairs[::2], pairs[1::2], strict=True)))
        case 4:
            _arity(items, 6)
            claims = None if items[2] is None else _map(items[2], "claims")
            return OpenConnection(
                _str(items[1], "connection id", 256),
                claims,
                _str_map(items[3], "headers"),
                _str_map(items[4], "query"),
                _map(items[5], "ext"),
            )
        case 5:
            _arity(items, 5)
            ext = _map(items[4], "ext")
            return CloseConnection(_str(items[1], "connection id", 256), _opt_str(items[2], "error"), ext)
        case 6:
            _arity(items, 4)
            if not isinstance(items[2], bytes):
                raise ServiceProtocolError("connection data: expected bytes")
            return ConnectionData(_str(items[1], "connection id", 256), items[2], _map(items[3], "ext"))
        case 7:
            _arity(items, 3)
            return MultiConnectionData(_strs(items[1], "connection ids"), _payloads(items[2]))
        case 8:
            _arity(items, 3)
            return UserData(_str(items[1], "user id"), _payloads(items[2]))
        case 9:
            _arity(items, 3)
            return MultiUserData(_strs(items[1], "user ids"), _payloads(items[2]))
        case 10:
            _arity(items, 3)
            return BroadcastData(_strs(items[1], "excluded"), _payloads(items[2]))
        case 13:
            _arity(items, 4)
            group, excluded = _str(items[1], "group"), _strs(items[2], "excluded")
            return GroupBroadcastData(group, excluded, _payloads(items[3]))
        case 14:
            _arity(items, 3)
            excluded = _strs(items[3], "excluded") if len(items) > 3 else []
            return MultiGroupBroadcastData(_strs(items[1], "groups"), _payloads(items[2]), excluded)
        case 18 | 19:
            _arity(items, 4)
            cid, group = _str(items[1], "connection id", 256), _str(items[2], "group")
            return GroupCommand(kind == 18, cid, group, _int(items[3], "ack id"))
        case 20:
            _arity(items, 4)
            return Ack(_int(items[1], "ack id"), _int(items[2], "status"), _opt_str(items[3], "message"))
        case 34 | 36 | 37:
            return _client_result(kind, items)
    raise ServiceProtocolError(f"unknown frame type {kind}")


def _client_result(kind: int, items: list[Any]) -> ServiceFrame:
    """Frames 34, 36 and 37 (client results across app servers)."""
    _arity(items, 5 if kind == 34 else 6)
    ids = _str(items[1], "invocation id", 256), _str(items[2], "connection id", 256)
    caller = _str(items[3], "caller", 256)
    if kind == 34:
        return ClientInvocation(*ids, caller, _payloads(items[4]))
    if kind == 36:
        if not isinstance(items[5], bytes):
            raise ServiceProtocolError("client completion: expected bytes")
        return ClientCompletion(*ids, caller, _str(items[4], "protocol", 64), items[5])
    return ErrorCompletion(*ids, caller, _str(items[4], "error"), _map(items[5], "ext"))


class ServiceFrameParser:
    """Split a link's bytes into frames; a frame over ``max_frame`` bytes is refused before it is
    buffered (a peer cannot make this side hold an unbounded message)."""

    def __init__(self, max_frame: int = 16 * 1024 * 1024) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[ServiceFrame]:
        self._buffer += data
        frames: list[ServiceFrame] = []
        buf = self._buffer
        pos = 0
        while pos < len(buf):
            try:
                parsed = read_varint(buf, pos)
            except InvalidDataError as exc:
                raise ServiceProtocolError(str(exc)) from None
            if parsed is None:
                break
            size, used = parsed
            start = pos + used
            if size > self.max_frame:
                raise ServiceProtocolError(f"a frame of {size} bytes exceeds {self.max_frame}")
            if start + size > len(buf):
                break
            frames.append(decode_frame(bytes(buf[start : start + size])))
            pos = start + size
        del buf[:pos]
        return frames
