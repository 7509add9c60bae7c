"""Sans-I/O WebSocket (RFC 6455) for the server side: bytes in, events out, bytes to send.

Why by hand: hubwire's native serving mode writes pre-framed broadcast frames
straight to sockets, which no WebSocket library's connection object allows;
only the framing is needed, and keeping it here without sockets or tasks makes
it testable and fuzzable byte by byte (as the ``websockets`` library does with
its own sans-I/O core). The asyncio side is ``hubwire.transports.native``.

Use: :meth:`ServerWebSocket.receive_data` with whatever arrived, then
:meth:`~ServerWebSocket.events_received` and
:meth:`~ServerWebSocket.data_to_send`. After a Close frame or a protocol error
no further input is parsed or buffered (a failed connection takes no more
input), and :attr:`~ServerWebSocket.closing` tells the runtime to stop reading.
"""

from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass

from websockets.utils import apply_mask

__all__ = [
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "CloseReceived",
    "DataReceived",
    "PingReceived",
    "ServerWebSocket",
    "close_frame",
    "encode_frame",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0, 1, 2, 8, 9, 10
_TEXT_HEAD, _BINARY_HEAD = 0x81, 0x82
#: close codes a peer may send (RFC 6455 7.4, IANA registry); others are a protocol error
_VALID_CLOSE = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


@dataclass(slots=True)
class DataReceived:
    """Payload of a text, binary or continuation frame (messages arrive as a byte stream)."""

    payload: bytes


@dataclass(slots=True)
class PingReceived:
    payload: bytes


@dataclass(slots=True)
class CloseReceived:
    code: int
    reason: str


Event = DataReceived | PingReceived | CloseReceived


def encode_frame(payload: bytes, binary: bool) -> bytes:
    """One unmasked, final data frame (server to client)."""
    first = _BINARY_HEAD if binary else _TEXT_HEAD
    size = len(payload)
    if size < 126:
        return bytes((first, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


def close_frame(code: int, reason: str = "") -> bytes:
    payload = struct.pack("!H", code) + reason.encode()[:123]
    return bytes((0x88, len(payload))) + payload


def pong_frame(payload: bytes) -> bytes:
    return bytes((0x8A, len(payload))) + payload


class ServerWebSocket:
    """The server end of one WebSocket after the upgrade (no extensions).

    ``max_frame`` bounds one frame's payload (larger: close 1009);
    ``validate_utf8`` checks text messages across fragments (1007), for
    endpoints that hand text to applications without parsing it themselves.
    """

    __slots__ = (
        "_buf",
        "_events",
        "_in_message",
        "_out",
        "_text",
        "_utf8",
        "close_received",
        "close_sent",
        "closing",
        "failure",
        "max_frame",
    )

    def __init__(self, max_frame: int, validate_utf8: bool = False) -> None:
        self.max_frame = max_frame
        #: an incomplete frame kept for the next read (None: nothing pending, the usual case)
        self._buf: bytearray | None = None
        self._events: list[Event] = []
        self._out: list[bytes] = []
        self._in_message = False
        self._text = False
        self._utf8: codecs.IncrementalDecoder | None = (
            codecs.getincrementaldecoder("utf-8")() if validate_utf8 else None
        )
        #: a Close was received or a protocol error seen: no more input is taken
        self.closing = False
        #: our Close frame is queued (nothing may follow it)
        self.close_sent = False
        #: the peer's valid Close frame arrived (a clean close, as opposed to a protocol error)
        self.close_received = False
        #: the close code of a protocol error, if one happened
        self.failure: int | None = None

    # -- input ---------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Parse every complete frame in what arrived so far."""
        if self.closing:
            return
        buf: bytes | bytearray = data
        if self._buf is not None:
            self._buf += data
            buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2 and not self.closing:
            used = self._frame(buf, pos, size)
            if used == 0:
                break
            pos += used
        self._buf = bytearray(buf[pos:]) if pos < size and not self.closing else None

    def _frame(self, buf: bytes | bytearray, pos: int, size: int) -> int:
        """Parse the frame at ``pos``: bytes used, or 0 when it is incomplete (or input ended)."""
        b0, b1 = buf[pos], buf[pos + 1]
        if b0 & 0x70 or not b1 & 0x80:  # reserved bits (no extension) or an unmasked client frame
            return self.fail(CLOSE_PROTOCOL_ERROR)
        length = b1 & 0x7F
        head = 2
        if length == 126:
            if size - pos < 4:
                return 0
            length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            head = 4
        elif length == 127:
            if size - pos < 10:
                return 0
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            head = 10
        if length > self.max_frame:
            return self.fail(CLOSE_TOO_BIG)
        end = pos + head + 4 + length
        if size < end:
            return 0
        mask = bytes(buf[pos + head : pos + head + 4])
        payload = apply_mask(bytes(buf[pos + head + 4 : end]), mask) if length else b""
        self._handle(b0 & 0x0F, bool(b0 & 0x80), payload)
        return end - pos

    def _handle(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_TEXT, _BINARY, _CONT):
            if self.close_sent:
                return  # we are closing: data is read past (to find the peer's Close) and dropped
            if (opcode == _CONT) != self._in_message:  # a new message inside one, or a stray continuation
                self.fail(CLOSE_PROTOCOL_ERROR)
                return
            if opcode != _CONT:
                self._text = opcode == _TEXT
            self._in_message = not fin
            if self._utf8 is not None and self._text and not self._valid_text(payload, fin):
                return
            if payload:
                self._events.append(DataReceived(payload))
        elif opcode in (_CLOSE, _PING, _PONG):
            if not fin or len(payload) > 125:
                self.fail(CLOSE_PROTOCOL_ERROR)
            elif opcode == _CLOSE:
                self._close_received(payload)
            elif opcode == _PING:
                self._events.append(PingReceived(payload))
        else:  # reserved opcodes 3-7 and 0xB-0xF
            self.fail(CLOSE_PROTOCOL_ERROR)

    def _valid_text(self, payload: bytes, fin: bool) -> bool:
        decoder = self._utf8
        assert decoder is not None
        try:
            decoder.decode(payload, final=fin)
        except UnicodeDecodeError:
            self.fail(CLOSE_INVALID_DATA)
            return False
        if fin:
            decoder.reset()
        return True

    def _close_received(self, payload: bytes) -> None:
        if len(payload) == 1:
            self.fail(CLOSE_PROTOCOL_ERROR)
            return
        code, reason = CLOSE_NORMAL, ""
        if payload:
            code = struct.unpack("!H", payload[:2])[0]
            if code not in _VALID_CLOSE and not 3000 <= code < 5000:
                self.fail(CLOSE_PROTOCOL_ERROR)
                return
            try:
                reason = payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(CLOSE_INVALID_DATA)
                return
        self.closing = True
        self.close_received = True
        self._events.append(CloseReceived(code, reason))
        # the reply: the peer's code where it is a normal one, else 1000
        self.send_close(code if code in (1000, 1001) or 3000 <= code < 5000 else CLOSE_NORMAL)

    def fail(self, code: int) -> int:
        """A protocol error: queue a Close with ``code`` and take no more input. Returns 0."""
        self.closing = True
        self.failure = code
        self.send_close(code)
        return 0

    # -- output --------------------------------------------------------------------------------

    def send_close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Queue our Close frame (once); nothing is sent after it."""
        if not self.close_sent:
            self.close_sent = True
            self._out.append(close_frame(code, reason))

    def send_pong(self, payload: bytes) -> None:
        if not self.close_sent:
            self._out.append(pong_frame(payload))

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        if not self._out:
            return b""
        out, self._out = self._out, []
        return b"".join(out)
