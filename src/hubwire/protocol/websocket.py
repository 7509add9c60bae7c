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

permessage-deflate (RFC 7692) is negotiated without per-socket state:
:func:`negotiate_deflate` always answers ``server_no_context_takeover`` and
``client_no_context_takeover``, so every message either way is a stand-alone
DEFLATE stream (and, where the client allows it, a 4 KB client window, so a
compressed message still arriving holds a small decompressor). Outbound,
:func:`compress_frame` builds one frame that is valid for every compressing
socket (a broadcast is compressed once, not once per recipient); inbound, each
compressed message is inflated by a decompressor made for it alone and dropped
at its end, bounded like an uncompressed frame.
"""

from __future__ import annotations

import codecs
import re
import struct
import zlib
from dataclasses import dataclass

try:
    # websockets' C unmasking: ~10x the pure-Python fallback (0.9 vs 9.8 us for 250 bytes), and
    # every client frame goes through it. websockets.utils holds only the fallback.
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets built without its C extension
    from websockets.utils import apply_mask

__all__ = [
    "CLIENT_WINDOW_BITS",
    "CLOSE_INVALID_DATA",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_TOO_BIG",
    "DEFLATE_RESPONSE",
    "CloseReceived",
    "DataReceived",
    "PingReceived",
    "ServerWebSocket",
    "close_frame",
    "compress_frame",
    "encode_frame",
    "negotiate_deflate",
]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011

_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0, 1, 2, 8, 9, 10
_TEXT_HEAD, _BINARY_HEAD = 0x81, 0x82
_RSV1 = 0x40
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


def encode_frame(payload: bytes, binary: bool, compressed: bool = False) -> bytes:
    """One unmasked, final data frame (server to client); ``compressed`` sets RSV1 (RFC 7692)."""
    first = (_BINARY_HEAD if binary else _TEXT_HEAD) | (_RSV1 if compressed else 0)
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


# -- permessage-deflate (RFC 7692) ------------------------------------------------------------------

#: what hubwire answers to an acceptable offer: no context kept between messages, either way
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
#: the client window asked for when the offer allows it (``client_max_window_bits``): with no context
#: takeover a window larger than a message gains nothing, and it sizes the decompressor a message
#: that arrives in several reads holds meanwhile (zlib allocates 2 ** bits)
CLIENT_WINDOW_BITS = 12
_EMPTY_BLOCK = b"\x00\x00\xff\xff"
#: an extension header's tokens (RFC 7230 token, quoted-string, separators); anything else: malformed
_TOKENS = re.compile(r"""\s*(?:([!#$%&'*+\-.^_`|~0-9A-Za-z]+)|"((?:[^"\\]|\\.)*)"|([,;=]))""")


def _parse_extensions(header: str) -> list[tuple[str, list[tuple[str, str | None]]]] | None:
    """``Sec-WebSocket-Extensions`` as (name, [(param, value)]) in order, or None if malformed."""
    tokens: list[tuple[str, str]] = []  # (kind, text): kind "t" token, "q" quoted, or the separator
    pos, end = 0, len(header.rstrip())
    while pos < end:
        match = _TOKENS.match(header, pos)
        if match is None:
            return None
        token, quoted, sep = match.groups()
        if token is not None:
            tokens.append(("t", token))
        elif quoted is not None:
            tokens.append(("q", re.sub(r"\\(.)", r"\1", quoted)))
        else:
            tokens.append((sep, sep))
        pos = match.end()
    offers: list[tuple[str, list[tuple[str, str | None]]]] = []
    i, n = 0, len(tokens)
    while i < n:
        if tokens[i][0] == ",":  # empty list elements are allowed (RFC 7230 7)
            i += 1
            continue
        if tokens[i][0] != "t":
            return None
        name, params = tokens[i][1].lower(), []
        i += 1
        while i < n and tokens[i][0] == ";":
            if i + 1 >= n or tokens[i + 1][0] != "t":
                return None
            param, value = tokens[i + 1][1].lower(), None
            i += 2
            if i < n and tokens[i][0] == "=":
                if i + 1 >= n or tokens[i + 1][0] not in ("t", "q"):
                    return None
                value = tokens[i + 1][1]
                i += 2
            params.append((param, value))
        if i < n and tokens[i][0] != ",":
            return None
        offers.append((name, params))
    return offers


def _window_bits(value: str | None) -> int | None:
    """A ``*_max_window_bits`` value (8 to 15, no leading zero), or None when invalid."""
    if value is None or not (value.isascii() and value.isdigit()) or value.startswith("0") or len(value) > 2:
        return None
    bits = int(value)
    return bits if 8 <= bits <= 15 else None


def _accept_offer(params: list[tuple[str, str | None]]) -> tuple[str, int] | None:
    """Our response to one permessage-deflate offer and the client's window bits, or None to decline.

    ``server_max_window_bits`` below 15 is declined: outbound frames are
    compressed once with a 32 KB window for every socket. ``client_max_window_bits``
    (the client accepts a limit) gets :data:`CLIENT_WINDOW_BITS` or the client's
    own smaller value.
    """
    seen: set[str] = set()
    response = DEFLATE_RESPONSE
    client_bits = 15
    for name, value in params:
        if name in seen:
            return None
        seen.add(name)
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            if _window_bits(value) != 15:
                return None
            response += "; server_max_window_bits=15"
        elif name == "client_max_window_bits":
            bits = _window_bits(value) if value is not None else 15
            if bits is None:
                return None
            client_bits = min(bits, CLIENT_WINDOW_BITS)
            response += f"; client_max_window_bits={client_bits}"
        else:
            return None
    return response, client_bits


def negotiate_deflate(header: str | None) -> tuple[str, int] | None:
    """The ``Sec-WebSocket-Extensions`` response to a client's offers and the window bits the client
    compresses with (for :class:`ServerWebSocket`'s ``deflate``), or None (no compression).

    The first acceptable permessage-deflate offer wins; a malformed header or
    offer is declined (the WebSocket then works uncompressed), never an error.
    """
    if not header:
        return None
    offers = _parse_extensions(header)
    if offers is None:
        return None
    for name, params in offers:
        if name == "permessage-deflate":
            response = _accept_offer(params)
            if response is not None:
                return response
    return None


def compress_frame(payload: bytes, binary: bool, level: int = 6) -> bytes:
    """A final data frame with ``payload`` compressed as one stand-alone message (RSV1 set).

    Stand-alone (``server_no_context_takeover``): the same bytes are valid on
    every socket that negotiated permessage-deflate. memLevel 5 (as the
    ``websockets`` library uses): a compressor is made per message, and a
    smaller one costs less to set up for about the same ratio on messages of
    a few KB.
    """
    compressor = zlib.compressobj(level, zlib.DEFLATED, -15, 5)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    if data.endswith(_EMPTY_BLOCK):
        data = data[:-4]
    return encode_frame(data or b"\x00", binary, compressed=True)


class ServerWebSocket:
    """The server end of one WebSocket after the upgrade.

    ``max_frame`` bounds one frame's payload (larger: close 1009), and the
    inflated size of one compressed message, so a decompression bomb ends the
    same way; ``validate_utf8`` checks text messages across fragments (1007),
    for endpoints that hand text to applications without parsing it themselves;
    ``deflate``: permessage-deflate was negotiated with this client window
    (:func:`negotiate_deflate`), so a message whose first frame has RSV1 set
    is inflated; None: not negotiated.
    """

    __slots__ = (
        "_buf",
        "_deflate",
        "_events",
        "_in_message",
        "_inflated",
        "_inflater",
        "_out",
        "_text",
        "_utf8",
        "close_received",
        "close_sent",
        "closing",
        "compressed_received",
        "failure",
        "max_frame",
    )

    def __init__(self, max_frame: int, validate_utf8: bool = False, deflate: int | None = None) -> None:
        self.max_frame = max_frame
        #: raw-DEFLATE window bits of inbound messages (0: no permessage-deflate). At least 9: zlib
        #: compresses with 9 when asked for 8, so a client told 8 may send that
        self._deflate = -max(9, deflate) if deflate is not None else 0
        #: the decompressor of the compressed message being received (None: none or uncompressed)
        self._inflater: zlib._Decompress | None = None
        #: bytes inflated so far for that message
        self._inflated = 0
        #: compressed messages received whole (the runtime reads and resets it for its statistics)
        self.compressed_received = 0
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
        rsv = b0 & 0x70
        # RSV2/3 are never used, RSV1 only with permessage-deflate; client frames are masked
        if (rsv and (rsv != _RSV1 or not self._deflate)) or not b1 & 0x80:
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
        self._handle(b0 & 0x0F, bool(b0 & 0x80), payload, bool(rsv))
        return end - pos

    def _handle(self, opcode: int, fin: bool, payload: bytes, compressed: bool = False) -> None:
        if compressed and opcode != _TEXT and opcode != _BINARY:
            # RSV1 marks a message's first frame only: never a continuation or a control frame
            self.fail(CLOSE_PROTOCOL_ERROR)
            return
        if opcode in (_TEXT, _BINARY, _CONT):
            if self.close_sent:
                return  # we are closing: data is read past (to find the peer's Close) and dropped
            if (opcode == _CONT) != self._in_message:  # a new message inside one, or a stray continuation
                self.fail(CLOSE_PROTOCOL_ERROR)
                return
            if opcode != _CONT:
                self._text = opcode == _TEXT
                # client_no_context_takeover: every compressed message is a DEFLATE stream of its own
                self._inflater = zlib.decompressobj(self._deflate) if compressed else None
                self._inflated = 0
            self._in_message = not fin
            if self._inflater is not None:
                inflated = self._inflate(payload, fin)
                if inflated is None:
                    return
                payload = inflated
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

    def _inflate(self, payload: bytes, fin: bool) -> bytes | None:
        """One frame of a compressed message, inflated no further than the size bound allows."""
        inflater = self._inflater
        assert inflater is not None
        budget = self.max_frame - self._inflated
        try:
            # max_length budget + 1 (never 0, which would mean unbounded): more than budget = too big
            data = inflater.decompress(payload, budget + 1)
            if fin and len(data) <= budget:
                data += inflater.decompress(_EMPTY_BLOCK, budget + 1 - len(data))
        except zlib.error:
            self.fail(CLOSE_PROTOCOL_ERROR)
            return None
        if len(data) > budget:
            self.fail(CLOSE_TOO_BIG)
            return None
        self._inflated += len(data)
        if fin:
            self._inflater = None
            self.compressed_received += 1
        return data

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
