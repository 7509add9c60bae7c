"""permessage-deflate (RFC 7692) in the sans-I/O WebSocket core: the offer, compressed frames out,
compressed messages in (any fragmentation and chunking), misuse of RSV1, and the inflation bound.

No sockets. The ``websockets`` library's own permessage-deflate implementation is the independent
other side: it decodes what hubwire compresses and compresses what hubwire inflates.
"""

from __future__ import annotations

import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from hubwire.protocol.websocket import (
    DEFLATE_RESPONSE,
    ServerWebSocket,
    compress_frame,
    encode_frame,
    negotiate_deflate,
)
from tests.test_websocket_frames import client_frame, data_of, feed

# -- the offer ----------------------------------------------------------------------------------


W12 = "; client_max_window_bits=12"


@pytest.mark.parametrize(
    ("offer", "response", "bits"),
    [
        # Chromium, the websockets library, Node's ws: the client accepts a window limit
        ("permessage-deflate; client_max_window_bits", DEFLATE_RESPONSE + W12, 12),
        # Firefox
        ("permessage-deflate", DEFLATE_RESPONSE, 15),
        ("permessage-deflate; client_max_window_bits=15", DEFLATE_RESPONSE + W12, 12),
        (
            "permessage-deflate; client_max_window_bits=10",
            DEFLATE_RESPONSE + "; client_max_window_bits=10",
            10,
        ),
        (
            'permessage-deflate; client_max_window_bits="9"',
            DEFLATE_RESPONSE + "; client_max_window_bits=9",
            9,
        ),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", DEFLATE_RESPONSE, 15),
        ("Permessage-Deflate; Server_No_Context_Takeover", DEFLATE_RESPONSE, 15),
        (
            "permessage-deflate; server_max_window_bits=15",
            DEFLATE_RESPONSE + "; server_max_window_bits=15",
            15,
        ),
        # a smaller server window is declined (one compressed frame serves every socket), the next offer taken
        ("permessage-deflate; server_max_window_bits=10, permessage-deflate", DEFLATE_RESPONSE, 15),
        ("x-webkit-deflate-frame, permessage-deflate; client_max_window_bits", DEFLATE_RESPONSE + W12, 12),
        (" , permessage-deflate ,", DEFLATE_RESPONSE, 15),
        ("permessage-deflate; server_max_window_bits=10", None, None),
        ("permessage-deflate; server_max_window_bits", None, None),
        ("permessage-deflate; client_max_window_bits=16", None, None),
        ("permessage-deflate; client_max_window_bits=08", None, None),
        ("permessage-deflate; client_max_window_bits=\u00b9\u00b2", None, None),
        ("permessage-deflate; server_no_context_takeover=1", None, None),
        ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None, None),
        ("permessage-deflate; unknown", None, None),
        ("permessage-deflate;", None, None),
        ("permessage-deflate; =", None, None),
        ('permessage-deflate; client_max_window_bits="10', None, None),
        ("permessage-deflate client_max_window_bits", None, None),
        ("x-webkit-deflate-frame", None, None),
        ("", None, None),
        (None, None, None),
    ],
)
def test_offers(offer: str | None, response: str | None, bits: int | None) -> None:
    assert negotiate_deflate(offer) == (None if response is None else (response, bits))


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list(' ,;="\\\tabcdefgilmnoprstwxkv_-0123456789\u00e9')), max_size=80)
)
def test_any_header_is_accepted_or_declined_never_an_error(header: str) -> None:
    agreed = negotiate_deflate(header)
    assert agreed is None or (agreed[0].startswith(DEFLATE_RESPONSE) and 8 <= agreed[1] <= 15)


_PARAMS = st.sampled_from(
    [
        ("server_no_context_takeover", None, True),
        ("client_no_context_takeover", None, True),
        ("client_max_window_bits", None, True),
        ("client_max_window_bits", "9", True),
        ("client_max_window_bits", "15", True),
        ("server_max_window_bits", "15", True),
        ("server_max_window_bits", "9", False),
        ("client_max_window_bits", "7", False),
        ("server_no_context_takeover", "x", False),
        ("mystery", None, False),
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PARAMS, max_size=5), st.booleans())
def test_an_offer_is_accepted_exactly_when_every_parameter_is_known_valid_and_single(
    params: list[tuple[str, str | None, bool]], spaces: bool
) -> None:
    sep = "; " if spaces else ";"
    header = sep.join(["permessage-deflate"] + [n if v is None else f"{n}={v}" for n, v, _ in params])
    names = [n for n, _, _ in params]
    acceptable = all(ok for _, _, ok in params) and len(set(names)) == len(names)
    agreed = negotiate_deflate(header)
    assert (agreed is not None) == acceptable, (header, agreed)
    if agreed is not None:
        response, bits = agreed
        assert response.startswith(DEFLATE_RESPONSE)
        assert ("server_max_window_bits=15" in response) == ("server_max_window_bits" in names)
        # a window limit the client accepts is used; the client's own value when smaller
        offered = dict((n, v) for n, v, _ in params).get("client_max_window_bits", "none")
        expected = 15 if offered == "none" else min(12, int(offered or 15))
        assert bits == expected
        assert (f"client_max_window_bits={bits}" in response) == (offered != "none")


# -- outbound: compress_frame ---------------------------------------------------------------------


def _parse(frame: bytes) -> tuple[int, bytes]:
    """(first byte, payload) of one unmasked server frame."""
    size = frame[1] & 0x7F
    head = 2 if size < 126 else 4 if size == 126 else 10
    return frame[0], frame[head:]


def _client_side() -> PerMessageDeflate:
    """The client's end of what hubwire negotiates (websockets' implementation)."""
    return PerMessageDeflate(True, True, 15, 15)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70_000) | st.text(max_size=3000).map(str.encode), st.booleans())
def test_compressed_frames_decode_with_an_independent_implementation(payload: bytes, binary: bool) -> None:
    frame = compress_frame(payload, binary)
    first, body = _parse(frame)
    assert first == (0xC2 if binary else 0xC1)  # FIN, RSV1, opcode
    opcode = Opcode.BINARY if binary else Opcode.TEXT
    decoded = _client_side().decode(Frame(opcode, body, rsv1=True), max_size=None)
    assert decoded.data == payload


def test_the_same_frame_decodes_on_many_sockets() -> None:
    """No context takeover: one compressed frame is valid on every socket, after any other."""
    frames = [compress_frame(b'{"id":%d,"user":"someone","text":"hello"}' % i * 20, False) for i in range(3)]
    sockets = [_client_side() for _ in range(3)]
    for n, side in enumerate(sockets):
        for frame in frames[n:] + frames[:n]:
            _, body = _parse(frame)
            assert side.decode(Frame(Opcode.TEXT, body, rsv1=True), max_size=None).data.startswith(b'{"id":')


def test_typical_json_is_at_least_halved() -> None:
    payload = (
        b"["
        + b",".join(
            b'{"id":%d,"user":"user%d","text":"message %d","read":false}' % (i, i % 7, i) for i in range(18)
        )
        + b"]"
    )
    assert 900 < len(payload) < 1200
    assert len(compress_frame(payload, False)) < len(payload) / 2


# -- inbound: compressed messages ----------------------------------------------------------------


def _compressed_fragments(payload: bytes, binary: bool, cuts: list[int]) -> list[bytes]:
    """A compressed message as a client sends it, fragmented at ``cuts`` of its compressed body."""
    encoded = _client_side().encode(Frame(Opcode.BINARY if binary else Opcode.TEXT, payload))
    body = encoded.data
    points = sorted({c % (len(body) + 1) for c in cuts})
    pieces = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    frames = []
    for n, piece in enumerate(pieces):
        opcode = (2 if binary else 1) if n == 0 else 0
        frames.append(client_frame(opcode, piece, fin=n == len(pieces) - 1, rsv=4 if n == 0 else 0))
    return frames


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.tuples(
            st.binary(max_size=3000), st.booleans(), st.booleans(), st.lists(st.integers(0, 5000), max_size=3)
        ),
        max_size=5,
    ),
    chunk=st.integers(1, 700),
)
def test_compressed_messages_in_any_fragmentation_and_chunking(
    messages: list[tuple[bytes, bool, bool, list[int]]], chunk: int
) -> None:
    """Compressed and uncompressed messages mixed, fragments split anywhere, bytes fed in any chunks."""
    wire = b""
    expected = b""
    compressed = 0
    for payload, binary, compress, cuts in messages:
        if compress:
            wire += b"".join(_compressed_fragments(payload, binary, cuts))
            compressed += 1
        else:
            wire += client_frame(2 if binary else 1, payload)
        expected += payload
    ws = ServerWebSocket(max_frame=1 << 20, deflate=15)
    got = b""
    for start in range(0, len(wire), chunk):
        events, out = feed(ws, wire[start : start + chunk])
        assert out == b"", out
        got += data_of(events)
    assert got == expected
    assert ws.compressed_received == compressed
    assert not ws.closing


def test_a_ping_between_compressed_fragments() -> None:
    first, last = _compressed_fragments(b"hello " * 100, False, [5])
    ws = ServerWebSocket(max_frame=1 << 16, deflate=15, validate_utf8=True)
    events, out = feed(ws, first + client_frame(9, b"p") + last)
    assert data_of(events) == b"hello " * 100
    assert out == b""  # (the runtime answers pings)
    assert not ws.closing


def _close_code(out: bytes) -> int:
    assert out[0] == 0x88, out
    return int.from_bytes(out[2:4], "big")


@pytest.mark.parametrize(
    ("deflate", "wire"),
    [
        (None, client_frame(1, b"x", rsv=4)),  # RSV1 without the extension
        (15, client_frame(1, b"x", rsv=2)),  # RSV2 is never used
        (15, client_frame(1, b"x", rsv=6)),
        (15, client_frame(9, b"", rsv=4)),  # control frames are never compressed
        (15, client_frame(8, b"\x03\xe8", rsv=4)),
        (15, client_frame(1, b"", fin=False) + client_frame(0, b"", rsv=4)),  # RSV1 on a continuation
        (15, client_frame(1, b"\xff\xff\xff\xff garbage", rsv=4)),  # not DEFLATE data
    ],
)
def test_rsv1_misuse_and_bad_data_close_with_1002(deflate: int | None, wire: bytes) -> None:
    ws = ServerWebSocket(max_frame=1 << 16, deflate=deflate)
    events, out = feed(ws, wire)
    assert data_of(events) == b""
    assert ws.failure == 1002 and _close_code(out) == 1002


def _deflated(payload: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


@pytest.mark.parametrize("fragments", [1, 4])
def test_a_decompression_bomb_closes_with_1009_without_inflating_it(fragments: int) -> None:
    body = _deflated(b"\x00" * (50 * 1024 * 1024))  # 50 MB of zeros: about 50 KB compressed
    assert len(body) < 64 * 1024
    step = -(-len(body) // fragments)
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    ws = ServerWebSocket(max_frame=64 * 1024, deflate=15)
    wire = b"".join(
        client_frame(2 if n == 0 else 0, piece, fin=n == len(pieces) - 1, rsv=4 if n == 0 else 0)
        for n, piece in enumerate(pieces)
    )
    events, out = feed(ws, wire)
    assert len(data_of(events)) <= 64 * 1024
    assert ws.failure == 1009 and _close_code(out) == 1009


@pytest.mark.parametrize(("size", "ok"), [(4096, True), (4097, False)])
def test_the_inflated_bound_is_the_frame_bound(size: int, ok: bool) -> None:
    ws = ServerWebSocket(max_frame=4096, deflate=15)
    events, out = feed(ws, client_frame(2, _deflated(b"a" * size), rsv=4))
    if ok:
        assert data_of(events) == b"a" * size and out == b""
    else:
        assert ws.failure == 1009 and _close_code(out) == 1009


def test_inflated_text_is_checked_as_utf8() -> None:
    ws = ServerWebSocket(max_frame=4096, deflate=15, validate_utf8=True)
    events, out = feed(ws, client_frame(1, _deflated(b"caf\xc3\xa9 " * 50), rsv=4))
    assert data_of(events) == b"caf\xc3\xa9 " * 50
    events, out = feed(ws, client_frame(1, _deflated(b"bad \xff"), rsv=4))
    assert ws.failure == 1007 and _close_code(out) == 1007


def test_encode_frame_marks_compression_in_rsv1() -> None:
    assert encode_frame(b"ab", False, compressed=True)[0] == 0xC1
    assert encode_frame(b"ab", True)[0] == 0x82


def _deflated_with_window(payload: bytes, bits: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -bits)
    return (compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_a_client_over_its_agreed_window_closes_with_1002() -> None:
    """Agreed 4 KB: a back-reference 8 KB away, in a later fragment than what it refers to, is beyond
    the window kept between fragments (zlib: invalid distance too far back). (Within one frame zlib
    resolves it from its output, so only a client breaking the agreement can tell.)"""
    chunk = os.urandom(8192)
    body = _deflated_with_window(chunk + chunk, 15)
    ws = ServerWebSocket(max_frame=1 << 16, deflate=12)
    events, out = feed(ws, client_frame(2, _deflated_with_window(b"ab" * 2000, 12), rsv=4))
    assert data_of(events) == b"ab" * 2000 and out == b""
    cut = len(body) - 16  # the literal 8 KB, then the repeat
    events, out = feed(ws, client_frame(2, body[:cut], fin=False, rsv=4) + client_frame(0, body[cut:]))
    assert ws.failure == 1002 and _close_code(out) == 1002
    ws = ServerWebSocket(max_frame=1 << 16, deflate=15)  # the same with the full window: fine
    events, out = feed(ws, client_frame(2, body[:cut], fin=False, rsv=4) + client_frame(0, body[cut:]))
    assert data_of(events) == chunk + chunk and out == b""


def test_a_client_told_8_bits_may_use_zlibs_9() -> None:
    payload = os.urandom(300) * 3  # repeats 300 bytes back: within 512, beyond 256
    ws = ServerWebSocket(max_frame=1 << 16, deflate=8)
    events, out = feed(ws, client_frame(2, _deflated_with_window(payload, 9), rsv=4))
    assert data_of(events) == payload and out == b""
