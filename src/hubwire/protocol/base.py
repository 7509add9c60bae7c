"""The hub protocol interface shared by the JSON and MessagePack codecs.

A protocol turns one :data:`HubMessage` into the exact bytes that go on a
client transport (*framed*: JSON + 0x1E, or varint length + MessagePack), and
turns an arbitrary inbound byte stream back into messages. Because the framed
bytes are what every transport writes, a broadcast is framed once per protocol
and the same bytes are handed to every recipient.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from typing import Any

from .errors import InvalidDataError, MessageTooLargeError
from .messages import HubMessage

__all__ = ["EncHook", "HubProtocol", "MessageParser", "TransferFormat"]

EncHook = Callable[[Any], Any]


class TransferFormat(enum.Enum):
    """What a transport must carry: UTF-8 text (``Text``) or arbitrary bytes (``Binary``)."""

    TEXT = "Text"
    BINARY = "Binary"


class MessageParser(abc.ABC):
    """Incremental parser: feed any chunking of the byte stream, get whole messages.

    Records may arrive several per chunk or split across chunks. A single
    message larger than ``max_message_size`` raises :class:`MessageTooLargeError`
    as soon as that is known, without buffering the rest of it.
    """

    def __init__(self, protocol: HubProtocol, max_message_size: int | None) -> None:
        self._protocol = protocol
        self._max = max_message_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet forming a whole message."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[HubMessage]:
        """Add bytes; return every message completed by them (unknown types dropped)."""
        self._buffer += data
        out: list[HubMessage] = []
        for record in self._records():
            msg = self._protocol.parse_record(record)
            if msg is not None:
                out.append(msg)
        return out

    def feed_framed(self, data: bytes | bytearray | memoryview) -> list[tuple[HubMessage | None, bytes]]:
        """Like :meth:`feed`, with each message's framed bytes (an unknown type: ``None``).

        Why: a relay that numbers or drops single messages (a service node doing stateful
        reconnect for the app server behind it) passes the client's own bytes on, not a copy
        written again."""
        self._buffer += data
        return [(self._protocol.parse_record(r), self._frame(r)) for r in self._records()]

    @abc.abstractmethod
    def _records(self) -> list[bytes]:
        """Split whole records off the front of the buffer."""

    @abc.abstractmethod
    def _frame(self, record: bytes) -> bytes:
        """``record`` framed again as it came."""

    def _check_size(self, size: int) -> None:
        if self._max is not None and size > self._max:
            raise MessageTooLargeError(self._max)


class HubProtocol(abc.ABC):
    """One hub protocol (``json`` or ``messagepack``)."""

    name: str
    version: int = 2
    transfer_format: TransferFormat
    #: an application ``enc_hook`` can encode types msgspec does not know (checked at ``add_hub``)
    encodes_custom_types: bool = False

    @abc.abstractmethod
    def write_message(self, message: HubMessage) -> bytes:
        """Encode and frame one message, ready to be written to any transport."""

    @abc.abstractmethod
    def parse_record(self, record: bytes) -> HubMessage | None:
        """Decode one unframed record; ``None`` for unknown message types (ignored)."""

    @abc.abstractmethod
    def parser(self, max_message_size: int | None = None) -> MessageParser:
        """A new incremental parser for one inbound stream."""

    def parse_all(self, data: bytes) -> list[HubMessage]:
        """Parse a complete buffer (no partial records allowed)."""
        parser = self.parser()
        messages = parser.feed(data)
        if parser.buffered:
            raise InvalidDataError("Incomplete message.")
        return messages
