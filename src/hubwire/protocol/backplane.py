"""Redis backplane messages, byte-compatible with ASP.NET Core's StackExchangeRedis backplane.

Sans-I/O: channel names and MessagePack envelopes only. Because the envelope
carries each hub message already framed for every protocol, a receiving
instance writes the bytes straight to its clients (no re-serialization), and
Python and .NET instances can share one Redis.

hubwire adds two trailing elements to invocations, ``origin`` (the sending
instance's server name) and ``seq`` (its per-origin sequence number), so a
receiver can drop a copy it already delivered (the bus may publish a batch
twice) and the sender can skip its own copy (it delivered to its local
connections when the send was made). ASP.NET Core's ``RedisProtocol.ReadInvocation``
reads slots 3-4 (``invocationId``, ``returnChannel``) whenever the array has more
than 3 elements, with ``ReadString`` (nil reads as null), and ignores anything
after them; so a plain send is written ``[excluded, sers, nil, nil, origin,
seq]`` and .NET servers see an ordinary send. Envelopes without the pair (from
.NET or older hubwire) are delivered as before, without de-duplication.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from .errors import InvalidDataError

__all__ = [
    "GROUP_ADD",
    "GROUP_REMOVE",
    "BackplaneChannels",
    "GroupCommand",
    "RedisInvocation",
    "decode_ack",
    "decode_completion",
    "decode_group_command",
    "decode_invocation",
    "encode_ack",
    "encode_completion",
    "encode_group_command",
    "encode_invocation",
    "is_from",
    "origin_marker",
]

GROUP_ADD = 1
GROUP_REMOVE = 2

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class BackplaneChannels:
    """Channel names of one hub: ``{channel_prefix}{hub_name}:...`` (no separator after the prefix)."""

    __slots__ = ("all", "group_management", "prefix")

    def __init__(self, channel_prefix: str, hub_name: str) -> None:
        self.prefix = f"{channel_prefix}{hub_name}"
        self.all = f"{self.prefix}:all"
        self.group_management = f"{self.prefix}:internal:groups"

    def connection(self, connection_id: str) -> str:
        return f"{self.prefix}:connection:{connection_id}"

    def group(self, group: str) -> str:
        return f"{self.prefix}:group:{group}"

    def user(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def ack(self, server_name: str) -> str:
        return f"{self.prefix}:internal:ack:{server_name}"

    def return_results(self, server_name: str) -> str:
        return f"{self.prefix}:internal:return:{server_name}"


@dataclass(slots=True)
class RedisInvocation:
    """A send through the backplane: framed hub message per protocol, minus excluded connections.

    ``invocation_id`` and ``return_channel`` are set only for client-result requests;
    ``origin`` and ``seq`` identify the envelope for de-duplication (hubwire senders only).
    """

    serializations: dict[str, bytes]
    excluded: list[str] = field(default_factory=list)
    invocation_id: str | None = None
    return_channel: str | None = None
    origin: str | None = None
    seq: int | None = None


@dataclass(slots=True, frozen=True)
class GroupCommand:
    """Add/remove a connection held by some other instance to/from a group; acked by ``id``."""

    id: int
    server_name: str
    action: int
    group: str
    connection_id: str


def encode_invocation(inv: RedisInvocation) -> bytes:
    """``[excluded, {protocol: bin}]``; for client results ``[..., invocationId, returnChannel]``;
    with an origin ``[excluded, {protocol: bin}, invocationId|nil, returnChannel|nil, origin, seq]``."""
    body: list[Any] = [inv.excluded, inv.serializations]
    if inv.invocation_id is not None or inv.origin is not None:
        body.append(inv.invocation_id)
        body.append(inv.return_channel if inv.invocation_id is not None else None)
    if inv.origin is not None:
        body.append(inv.origin)
        body.append(inv.seq or 0)
    return _encoder.encode(body)


#: first byte of a MessagePack unsigned integer of each encoded size (positive fixint: below 0x80)
_UINT_HEADS = ((2, 0xCC), (3, 0xCD), (5, 0xCE), (9, 0xCF))


def origin_marker(origin: str) -> bytes:
    """How ``origin`` is encoded in an envelope (what :func:`is_from` looks for)."""
    return _encoder.encode(origin)


def is_from(data: bytes, marker: bytes) -> bool:
    """Is this invocation envelope one :func:`encode_invocation` wrote with the origin of ``marker``?

    Why: an instance subscribed to a channel it publishes to (a group with local members) gets
    every one of its own sends back from Redis and drops them; recognising them from the
    envelope's last bytes skips decoding them. The envelope must be the 6-element array (its
    first byte), end with an unsigned integer (the sequence number, read back to its first byte),
    and have ``marker`` right before it. ``marker`` starts with a MessagePack string header (a
    byte of 0xa0 or more), which no ASCII text holds: inside another element's string it cannot
    match, so only an origin element equal to it does.
    """
    n, m = len(data), len(marker)
    if n < m + 2 or data[0] != 0x96:
        return False
    if data[n - 1] < 0x80 and data.startswith(marker, n - 1 - m):
        return True
    for size, head in _UINT_HEADS:
        start = n - size - m
        if start > 0 and data[n - size] == head and data.startswith(marker, start):
            return True
    return False


def _decode(data: bytes) -> Any:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError, TypeError, ValueError) as exc:
        raise InvalidDataError(f"Invalid backplane message: {exc}") from None


def decode_invocation(data: bytes) -> RedisInvocation:
    """Parse an invocation envelope; unknown protocols stay in the map, unknown extra elements are ignored."""
    arr = _decode(data)
    if not isinstance(arr, list) or len(arr) < 2:
        raise InvalidDataError("Invalid backplane invocation: expected an array of at least 2 elements.")
    excluded, sers = arr[0], arr[1]
    if excluded is None:
        excluded = []
    if not isinstance(excluded, list) or not all(isinstance(x, str) for x in excluded):
        raise InvalidDataError("Invalid backplane invocation: excluded ids must be strings.")
    if not isinstance(sers, dict):
        raise InvalidDataError("Invalid backplane invocation: serializations must be a map.")
    clean: dict[str, bytes] = {}
    for name, payload in sers.items():
        if isinstance(name, str) and isinstance(payload, bytes | bytearray):
            clean[name] = bytes(payload)
    inv = RedisInvocation(clean, excluded)
    if len(arr) > 3 and isinstance(arr[2], str) and isinstance(arr[3], str):
        inv.invocation_id, inv.return_channel = arr[2], arr[3]
    if len(arr) > 5 and isinstance(arr[4], str) and type(arr[5]) is int:
        inv.origin, inv.seq = arr[4], arr[5]
    return inv


def encode_group_command(cmd: GroupCommand) -> bytes:
    return _encoder.encode([cmd.id, cmd.server_name, cmd.action, cmd.group, cmd.connection_id])


def decode_group_command(data: bytes) -> GroupCommand:
    arr = _decode(data)
    if (
        not isinstance(arr, list)
        or len(arr) < 5
        or not isinstance(arr[0], int)
        or not all(isinstance(x, str) for x in (arr[1], arr[3], arr[4]))
        or arr[2] not in (GROUP_ADD, GROUP_REMOVE)
    ):
        raise InvalidDataError("Invalid backplane group command.")
    return GroupCommand(arr[0], arr[1], arr[2], arr[3], arr[4])


def encode_ack(ack_id: int) -> bytes:
    return _encoder.encode([ack_id])


def decode_ack(data: bytes) -> int:
    arr = _decode(data)
    if not isinstance(arr, list) or not arr or not isinstance(arr[0], int):
        raise InvalidDataError("Invalid backplane ack.")
    return int(arr[0])


def encode_completion(protocol_name: str, framed_completion: bytes) -> bytes:
    """A client result travelling back: ``[protocolName, bin framedCompletionMessage]``."""
    return _encoder.encode([protocol_name, framed_completion])


def decode_completion(data: bytes) -> tuple[str, bytes]:
    arr = _decode(data)
    if (
        not isinstance(arr, list)
        or len(arr) < 2
        or not isinstance(arr[0], str)
        or not isinstance(arr[1], bytes)
    ):
        raise InvalidDataError("Invalid backplane completion.")
    return arr[0], arr[1]
