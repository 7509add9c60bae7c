"""The sans-I/O WebSocket core (``hubwire.protocol.websocket``): frames in any chunking, RFC 6455 errors.

No sockets: bytes go in, events and bytes to send come out, so every case is exact.
"""

from __future__ import annotations

import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.protocol.websocket import (
    CloseReceived,
    DataReceived,
    PingReceived,
    ServerWebSocket,
    close_frame,
    encode_frame,
)


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, masked: bool = True) -> bytes:
    """A frame as a client sends it (masked)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    mask_bit = 0x80 if masked else 0
    if size < 126:
        head = bytes((first, mask_bit | size))
    elif size < 65536:
        head = bytes((first, mask_bit | 126)) + struct.pack("!H", size)
    else:
        head = bytes((first, mask_bit | 127)) + struct.pack("!Q", size)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


def feed(ws: ServerWebSocket, data: bytes) -> tuple[list[object], bytes]:
    ws.receive_data(data)
    return ws.events_received(), ws.data_to_send()


def data_of(events: list[object]) -> bytes:
    return b"".join(e.payload for e in events if isinstance(e, DataReceived))


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.tuples(st.booleans(), st.binary(max_size=300), st.integers(1, 3)), max_size=6),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
)
def test_any_chunking_gives_the_same_byte_stream(
    messages: list[tuple[bool, bytes, int]], cuts: list[int]
) -> None:
    wire = bytearray()
    expected = bytearray()
    for binary, payload, parts in messages:
        pieces = [payload[i::parts] for i in range(parts)]  # fragmented into up to 3 frames
        for index, piece in enumerate(pieces):
            opcode = (2 if binary else 1) if index == 0 else 0
            wire += client_frame(opcode, piece, fin=index == len(pieces) - 1)
            expected += piece
    ws = ServerWebSocket(max_frame=1 << 20)
    received = bytearray()
    start = 0
    for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
        events, out = feed(ws, bytes(wire[start:cut]))
        received += data_of(events)
        assert out == b""
        start = cut
    assert bytes(received) == bytes(expected)
    assert not ws.closing


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_and_end_in_at_most_one_close(data: bytes) -> None:
    ws = ServerWebSocket(max_frame=1000)
    ws.receive_data(data)
    events = ws.events_received()
    out = ws.data_to_send()
    assert len(data_of(events)) <= len(data)
    # nothing is sent but a single Close frame, and only when the input ended the connection
    assert ws.closing == ws.close_sent
    assert out == b"" if not ws.closing else (out[0] == 0x88 and len(out) == 2 + out[1])
    if ws.closing:
        ws.receive_data(data)  # nothing more is taken once closing
        assert ws.events_received() == [] and ws.data_to_send() == b""


def test_ping_is_reported_and_answered_with_a_pong() -> None:
    ws = ServerWebSocket(max_frame=100)
    events, out = feed(ws, client_frame(9, b"hi"))
    assert events == [PingReceived(b"hi")] and out == b""
    ws.send_pong(b"hi")
    assert ws.data_to_send() == b"\x8a\x02hi"


def test_protocol_errors_close_with_1002() -> None:
    cases = {
        "unmasked": client_frame(1, b"x", masked=False),
        "reserved bit": client_frame(1, b"x", rsv=1),
        "reserved data opcode": client_frame(3, b"x"),
        "reserved control opcode": client_frame(0xB, b""),
        "stray continuation": client_frame(0, b"x"),
        "new message inside one": client_frame(1, b"a", fin=False) + client_frame(1, b"b"),
        "fragmented ping": client_frame(9, b"", fin=False),
        "one-byte close": client_frame(8, b"\x03"),
        "close code 1005": client_frame(8, close_payload(1005)),
        "close code 999": client_frame(8, close_payload(999)),
        "close code 1016": client_frame(8, close_payload(1016)),
        "close code 2999": client_frame(8, close_payload(2999)),
    }
    for name, wire in cases.items():
        ws = ServerWebSocket(max_frame=1000)
        _, out = feed(ws, wire)
        assert out.endswith(close_frame(1002)), name
        assert ws.closing and ws.failure == 1002, name


def test_close_is_answered_and_ends_input() -> None:
    ws = ServerWebSocket(max_frame=1000)
    events, out = feed(ws, client_frame(1, b"before") + client_frame(8, close_payload(1001)) + b"\x81")
    assert data_of(events) == b"before"
    assert CloseReceived(1001, "") in events
    assert out == close_frame(1001)
    assert ws.closing and ws.failure is None
    # application codes are echoed; other valid codes get 1000
    for code, reply in ((4000, 4000), (1011, 1000)):
        other = ServerWebSocket(max_frame=1000)
        _, out = feed(other, client_frame(8, close_payload(code)))
        assert out == close_frame(reply)


def test_too_big_and_bad_text() -> None:
    ws = ServerWebSocket(max_frame=10)
    _, out = feed(ws, client_frame(2, b"x" * 11))
    assert out == close_frame(1009)
    strict = ServerWebSocket(max_frame=100, validate_utf8=True)
    events, out = feed(strict, client_frame(1, "é".encode()[:1], fin=False) + client_frame(0, b"\xff"))
    assert out == close_frame(1007)
    # valid UTF-8 split inside a character across fragments is fine
    ok = ServerWebSocket(max_frame=100, validate_utf8=True)
    text = "é".encode()
    events, out = feed(ok, client_frame(1, text[:1], fin=False) + client_frame(0, text[1:]))
    assert out == b"" and data_of(events) == text
    # a close reason that is not UTF-8
    _, out = feed(ServerWebSocket(max_frame=100), client_frame(8, close_payload(1000, b"\xff")))
    assert out == close_frame(1007)


def test_server_frames() -> None:
    assert encode_frame(b"hi", binary=False) == b"\x81\x02hi"
    assert encode_frame(b"x" * 200, binary=True)[:4] == b"\x82\x7e\x00\xc8"
    assert encode_frame(b"x" * 70000, binary=True)[:10] == b"\x82\x7f" + struct.pack("!Q", 70000)


def test_client_frames_are_unmasked_by_websockets_c_extension() -> None:
    """Every client frame is unmasked: the pure-Python fallback costs ~10x per frame."""
    import websockets.speedups

    from hubwire.protocol import websocket

    assert websocket.apply_mask is websockets.speedups.apply_mask
