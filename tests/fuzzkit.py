"""Fuzzing a live hubwire server: strategies and checks shared by tests/test_fuzz.py and tests/fuzz_long.py.

Everything talks to a real ``hubwire run tests.apps.hardening:app`` process over loopback sockets:

* :class:`RawWS`: a minimal synchronous WebSocket client on a plain socket, so any frame can be sent
  (bad opcodes, unmasked frames, lying lengths, invalid UTF-8 in Text frames);
* strategies for hub traffic after a valid handshake (JSON and MessagePack: random bytes, invalid
  UTF-8, deep nesting, huge varints, unknown stream ids, completions for unknown invocations,
  Ack/Sequence abuse, structurally random messages), for handshakes, for raw WebSocket frames, for
  upgrade requests and for every HTTP endpoint (negotiate, SSE, long polling, POST, DELETE);
* ``check_*`` functions that send one generated case and assert what the server must do: answer
  with the protocol's error or a 4xx, never a 5xx, never hang; :class:`Bystander` is a well-behaved
  client that must keep being served throughout.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec
from hypothesis import strategies as st

from .hwtools import APP, options_env, upgrade_request

RS = b"\x1e"
WAIT = 5.0

#: server-side texts that must never appear in the log of a fuzzed server
BAD_LOG_MARKERS = ("Traceback", "Exception in ASGI application", "Task exception was never retrieved")

TARGETS = [
    "echo",
    "Echo",
    "whoami",
    "context_dump",
    "join_group",
    "leave_group",
    "send_to_group",
    "broadcast",
    "slow",
    "fail",
    "counter",
    "upload_sum",
    "hold_upload",
    "no_such_method",
    "",
    "on_connected",
    "__init__",
    "_hub",
]


# ------------------------------------------------------------------------------------------------
# a raw synchronous WebSocket client
# ------------------------------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the socket (close frame, EOF or reset)."""


class RawWS:
    """One WebSocket on a plain socket: send any frame, read server frames with a deadline."""

    def __init__(self, port: int, query: str = "", path: str = "/hub", rcvbuf: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.sendall(upgrade_request(port, path, query))
        self.buf = b""
        self.status = self._read_status()
        self.closed = False

    def _read_status(self) -> int:
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                return 0
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0

    def send_frame(
        self,
        payload: bytes,
        opcode: int = 0x1,
        fin: bool = True,
        rsv: int = 0,
        mask: bool = True,
        length: int | None = None,
    ) -> None:
        """Send one frame; ``length`` lies about the payload length when given."""
        first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
        size = len(payload) if length is None else length
        flag = 0x80 if mask else 0
        if size < 126:
            head = bytes((first, flag | size))
        elif size < 65536:
            head = bytes((first, flag | 126)) + struct.pack("!H", size)
        else:
            head = bytes((first, flag | 127)) + struct.pack("!Q", size & 0xFFFFFFFFFFFFFFFF)
        if mask:
            key = os.urandom(4)
            body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        else:
            body = payload
        try:
            self.sock.sendall(head + body)
        except OSError as exc:  # the server already closed: fine for a fuzz case
            raise Closed(str(exc)) from None

    def send_text(self, data: bytes) -> None:
        self.send_frame(data, 0x1)

    def recv_frame(self, timeout: float) -> tuple[int, bytes]:
        """The next server frame ``(opcode, payload)``; raises Closed or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._parse()
            if frame is not None:
                opcode, payload = frame
                if opcode == 0x8:
                    self.closed = True
                    raise Closed(f"close frame {payload[:2].hex()}")
                if opcode == 0x9:  # uvicorn's keep-alive ping (ASGI mode): answer, not data
                    self.send_frame(payload, 0xA)
                    continue
                if opcode == 0xA:
                    continue
                return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.closed = True
                raise Closed(str(exc)) from None
            except TimeoutError:
                raise TimeoutError("no frame from the server") from None
            if not chunk:
                self.closed = True
                raise Closed("EOF")
            self.buf += chunk

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        opcode, size, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
        assert not buf[1] & 0x80, "the server sent a masked frame"
        if size == 126:
            if len(buf) < 4:
                return None
            size, pos = struct.unpack("!H", buf[2:4])[0], 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size, pos = struct.unpack("!Q", buf[2:10])[0], 10
        if len(buf) < pos + size:
            return None
        self.buf = buf[pos + size :]
        return opcode, buf[pos : pos + size]

    def close(self) -> None:
        try:
            if not self.closed:
                self.send_frame(struct.pack("!H", 1000), 0x8)
        except Closed:
            pass
        finally:
            self.sock.close()


class HubStream:
    """Splits what a RawWS receives into hub records (JSON or MessagePack)."""

    def __init__(self, ws: RawWS, binary: bool) -> None:
        self.ws = ws
        self.binary = binary
        self.data = b""

    def records(self, timeout: float) -> list[Any]:
        """Whatever whole messages arrive within ``timeout`` (at least one, else TimeoutError)."""
        while True:
            out = self._split()
            if out:
                return out
            _, payload = self.ws.recv_frame(timeout)
            self.data += payload

    def _split(self) -> list[Any]:
        out: list[Any] = []
        if not self.binary:
            while RS in self.data:
                record, _, self.data = self.data.partition(RS)
                out.append(json.loads(record))
            return out
        while self.data:
            length = shift = used = 0
            for byte in self.data[:5]:
                used += 1
                length |= (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            if len(self.data) < used + length:
                break
            out.append(msgspec.msgpack.decode(self.data[used : used + length]))
            self.data = self.data[used + length :]
        return out


def open_hub(port: int, protocol: str = "json", query: str = "") -> tuple[RawWS, HubStream]:
    """A RawWS with a completed hub handshake."""
    ws = RawWS(port, query)
    assert ws.status == 101, ws.status
    ws.send_text(json.dumps({"protocol": protocol, "version": 1}).encode() + RS)
    stream = HubStream(ws, protocol == "messagepack")
    deadline = time.monotonic() + WAIT
    while RS not in stream.data:
        _, payload = ws.recv_frame(max(0.01, deadline - time.monotonic()))
        stream.data += payload
    handshake, _, stream.data = stream.data.partition(RS)
    assert json.loads(handshake) == {}, handshake
    return ws, stream


def _is_completion(message: Any, invocation_id: str) -> bool:
    if isinstance(message, dict):
        return message.get("type") == 3 and message.get("invocationId") == invocation_id
    return isinstance(message, list) and len(message) > 2 and message[0] == 3 and message[2] == invocation_id


def probe(ws: RawWS, stream: HubStream, timeout: float = WAIT, terminate: bool = False) -> str:
    """Is the connection answering? ``answered``, ``closed`` or ``silent`` (within ``timeout``).

    The probe is a stream invocation (it needs no invocation slot, so a hub method still running
    does not delay it). For JSON, ``terminate`` first sends a record separator that ends the
    partial record a case left behind.
    """
    if stream.binary:
        body = msgspec.msgpack.encode([4, {}, "probe", "counter", [1], []])
        data = bytes([len(body)]) + body
        opcode = 0x2
    else:
        data = json.dumps(
            {"type": 4, "invocationId": "probe", "target": "counter", "arguments": [1]}
        ).encode()
        data = (RS if terminate else b"") + data + RS
        opcode = 0x1
    deadline = time.monotonic() + timeout
    try:
        ws.send_frame(data, opcode)
        while True:
            for message in stream.records(max(0.01, deadline - time.monotonic())):
                if _is_completion(message, "probe"):
                    return "answered"
    except (Closed, json.JSONDecodeError, msgspec.DecodeError):
        return "closed"
    except TimeoutError:
        return "silent"


class Bystander:
    """A well-behaved JSON client that must be served throughout the fuzzing."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ws, self.stream = open_hub(port)
        self.calls = 0

    def check(self) -> None:
        self.calls += 1
        invocation_id = f"b{self.calls}"
        message = {"type": 1, "invocationId": invocation_id, "target": "echo", "arguments": [self.calls]}
        self.ws.send_text(json.dumps(message).encode() + RS)
        deadline = time.monotonic() + WAIT
        while True:
            for record in self.stream.records(max(0.01, deadline - time.monotonic())):
                if _is_completion(record, invocation_id):
                    assert record.get("result") == self.calls, record
                    return

    def close(self) -> None:
        self.ws.close()


# ------------------------------------------------------------------------------------------------
# strategies: hub traffic
# ------------------------------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    _scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
_ids = st.one_of(st.sampled_from(["1", "s", "u", "c", "probe", "s1", ""]), st.text(max_size=10))
_types = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9]), st.integers(-3, 300), json_values)


def _json_message() -> st.SearchStrategy[dict[str, Any]]:
    optional = {
        "invocationId": st.one_of(_ids, json_values),
        "target": st.one_of(st.sampled_from(TARGETS), json_values),
        "arguments": st.one_of(st.lists(json_values, max_size=4), json_values),
        "streamIds": st.one_of(st.lists(_ids, max_size=3), json_values),
        "item": json_values,
        "result": json_values,
        "error": st.one_of(st.text(max_size=20), json_values),
        "sequenceId": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), json_values),
        "headers": st.one_of(
            st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3), json_values
        ),
        "allowReconnect": json_values,
    }
    return st.fixed_dictionaries({"type": _types}, optional=optional)


def _abuse() -> st.SearchStrategy[dict[str, Any]]:
    """Messages the issue names explicitly, so every run has them."""
    return st.one_of(
        st.builds(
            lambda i, v: {"type": 2, "invocationId": i, "item": v}, _ids, json_values
        ),  # no such stream
        st.builds(
            lambda i, v: {"type": 3, "invocationId": i, "result": v}, _ids, json_values
        ),  # no such call
        st.builds(lambda i, e: {"type": 3, "invocationId": i, "error": e}, _ids, st.text(max_size=10)),
        st.builds(lambda i: {"type": 5, "invocationId": i}, _ids),  # cancel of nothing
        st.builds(
            lambda t, s: {"type": t, "sequenceId": s},
            st.sampled_from([8, 9]),
            st.one_of(st.integers(min_value=-(2**80), max_value=2**80), json_values),
        ),  # Ack / Sequence abuse
        st.builds(
            lambda ids: {
                "type": 1,
                "invocationId": "u",
                "target": "upload_sum",
                "arguments": [],
                "streamIds": ids,
            },
            st.lists(_ids, max_size=3),
        ),
        st.builds(
            lambda n: {"type": 4, "invocationId": "s1", "target": "counter", "arguments": [n]},
            st.integers(-5, 50),
        ),
        st.builds(
            lambda t, a: {"type": 1, "invocationId": "1", "target": t, "arguments": a},
            st.sampled_from(TARGETS),
            st.lists(json_values, max_size=3),
        ),
    )


def _deep(n: int, kind: str) -> bytes:
    inner = "[" * n + "]" * n if kind == "list" else '{"a":' * n + "1" + "}" * n
    return ('{"type":1,"invocationId":"d","target":"echo","arguments":[' + inner + "]}").encode()


@dataclass
class HubCase:
    """Frames to send after the handshake; ``may_block``: the case may legitimately leave the
    connection unable to answer (an upload stream left open holds the invocation slot)."""

    frames: list[tuple[int, bytes]] = field(default_factory=list)
    may_block: bool = False


def _blocks(message: Any) -> bool:
    if isinstance(message, dict):
        ids = message.get("streamIds")
        return isinstance(ids, list) and bool(ids)
    return True


@st.composite
def json_cases(draw: st.DrawFn) -> HubCase:
    """JSON hub traffic: records of every kind, joined and split into frames at random."""
    record = st.one_of(
        _json_message().map(lambda m: (json.dumps(m).encode(), _blocks(m))),
        _abuse().map(lambda m: (json.dumps(m).encode(), _blocks(m))),
        st.binary(max_size=200).map(lambda b: (b.replace(RS, b""), False)),
        st.text(max_size=200).map(lambda t: (t.encode().replace(RS, b""), False)),
        st.builds(_deep, st.integers(10, 20000), st.sampled_from(["list", "dict"])).map(lambda b: (b, False)),
        st.builds(
            lambda v, junk: (
                json.dumps({"type": 1, "target": "echo", "arguments": [v]}).encode()[:-3] + junk + b'"]}',
                False,
            ),
            st.text(max_size=10),
            st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00"]),
        ),  # invalid UTF-8 inside a string
        st.just((b'{"type":1,"target":"echo","arguments":["' + b"x" * 40000 + b'"]}', False)),  # oversized
    )
    records = draw(st.lists(record, min_size=1, max_size=5))
    data = b"".join(r + RS for r, _ in records)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # a partial record at the end
    return HubCase(_split(draw, data, 0x1), any(block for _, block in records))


_ext = st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=12))
_mp_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=20),
    _ext,
)
_mp_values = st.recursive(
    _mp_scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)
_mp_types = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9]), st.integers(-3, 300), _mp_values)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@st.composite
def msgpack_cases(draw: st.DrawFn) -> HubCase:
    """MessagePack hub traffic: random arrays, lying or huge length prefixes, garbage."""
    arrays = st.lists(st.one_of(_mp_types, _mp_values, st.sampled_from(TARGETS), _ids), max_size=7)
    templated = st.builds(
        lambda t, h, i, target, args, ids, cut: [t, h, i, target, args, ids][:cut],
        _mp_types,
        st.one_of(st.just({}), _mp_values),
        st.one_of(_ids, st.none(), _mp_values),
        st.one_of(st.sampled_from(TARGETS), _mp_values),
        st.one_of(st.lists(_mp_values, max_size=3), _mp_values),
        st.one_of(st.lists(_ids, max_size=2), _mp_values),
        st.integers(1, 6),
    )
    body = st.one_of(arrays, templated, _mp_values).map(msgspec.msgpack.encode)
    framed = st.one_of(
        body.map(lambda b: _varint(len(b)) + b),
        st.tuples(st.integers(0, 2**35), body).map(lambda t: _varint(t[0]) + t[1]),  # lying prefix
        st.sampled_from(
            [
                b"\xff\xff\xff\xff\x0f",
                b"\x80\x80\x80\x80\x80\x01",
                b"\xff\xff\xff\xff\xff\xff\xff",
                b"\xff\xff\xff\x7f",
            ]
        ),  # huge varints
        st.binary(max_size=200),
    )
    records = draw(st.lists(framed, min_size=1, max_size=5))
    data = b"".join(records)
    return HubCase(_split(draw, data, 0x2), _msgpack_may_block(data))


#: the hub's largest message (HubOptions.maximum_receive_message_size, default; FUZZ_OPTIONS keep it)
_MAX_MESSAGE = 32 * 1024


def _msgpack_may_block(data: bytes) -> bool:
    """Whether the server may legitimately go quiet after ``data``: the last record is incomplete
    (it waits for the rest, and the probe only adds to it), or a record carries ``streamIds`` (an
    upload left open holds the invocation slot). Anything else must be answered or closed.

    Reads the stream the way the server frames it (varint length prefix, at most 5 bytes, the
    message size limit counting prefix and body); where the server would close (a bad prefix, an
    oversized or undecodable record) nothing after it matters.
    """
    pos = 0
    while pos < len(data):
        length = shift = 0
        for used in range(1, 6):
            if pos + used > len(data):
                return True  # the prefix itself is incomplete
            byte = data[pos + used - 1]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        else:
            return False  # a 6th prefix byte: closed
        if length > 2**31 - 1 or used + length > _MAX_MESSAGE:
            return False  # too large: closed
        if pos + used + length > len(data):
            return True  # the last record is incomplete
        try:
            message = msgspec.msgpack.decode(data[pos + used : pos + used + length])
        except msgspec.DecodeError:
            return False  # undecodable: closed
        if isinstance(message, list) and len(message) > 5 and message[5]:
            return True  # streamIds (only invocations read them; any non-empty value counts)
        pos += used + length
    return False


def _split(draw: st.DrawFn, data: bytes, opcode: int) -> list[tuple[int, bytes]]:
    """``data`` as 1-4 frames of the given (or sometimes the other) data opcode."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    other = 0x2 if opcode == 0x1 else 0x1
    return [(draw(st.sampled_from([opcode, opcode, other])), p) for p in pieces if p]


def check_hub_case(port: int, protocol: str, case: HubCase) -> str:
    """Send a case after a valid handshake; the connection must answer or close, never wedge."""
    ws, stream = open_hub(port, protocol)
    try:
        for opcode, payload in case.frames:
            ws.send_frame(payload, opcode)
        sent = b"".join(payload for _, payload in case.frames)
        # a case that may legitimately leave the connection quiet gets a short probe
        timeout = 0.5 if case.may_block else WAIT
        outcome = probe(ws, stream, timeout, terminate=bool(sent) and not sent.endswith(RS))
    except Closed:
        outcome = "closed"
    finally:
        ws.close()
    assert outcome != "silent" or case.may_block, f"connection neither answered nor closed: {case}"
    return outcome


# ------------------------------------------------------------------------------------------------
# strategies: handshakes, frames, upgrade requests
# ------------------------------------------------------------------------------------------------


@st.composite
def handshakes(draw: st.DrawFn) -> bytes:
    obj = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "protocol": st.one_of(st.sampled_from(["json", "messagepack", "JSON", ""]), json_values),
                "version": st.one_of(st.integers(-2, 3), json_values),
                "extra": json_values,
            },
        )
    )
    data = draw(
        st.one_of(
            st.just(json.dumps(obj).encode()), st.binary(max_size=100), st.text(max_size=100).map(str.encode)
        )
    )
    return data + (RS if draw(st.booleans()) else b"")


def check_handshake(port: int, data: bytes) -> str:
    """A handshake record: answered (success or error record) or closed, within the bound."""
    ws = RawWS(port)
    try:
        assert ws.status == 101, ws.status
        ws.send_frame(data, 0x1)
        if RS not in data:
            ws.send_frame(RS, 0x1)
        try:
            _, payload = ws.recv_frame(WAIT)
        except Closed:
            return "closed"
        assert payload.endswith(RS), payload
        return "error" if b"error" in payload else "accepted"
    finally:
        ws.close()


@dataclass
class Frame:
    payload: bytes
    opcode: int
    fin: bool
    rsv: int
    mask: bool
    length: int | None


frames = st.builds(
    Frame,
    st.binary(max_size=300),
    st.one_of(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]), st.integers(0, 15)),
    st.booleans(),
    st.one_of(st.just(0), st.integers(0, 7)),
    st.one_of(st.just(True), st.booleans()),
    st.one_of(
        st.none(), st.none(), st.sampled_from([0, 125, 126, 127, 65535, 65536, 2**31, 2**63 - 1, 2**64 - 1])
    ),
)


def check_frames(port: int, handshake_first: bool, sequence: list[Frame]) -> str:
    """Random WebSocket frames (native protocol); the server closes or keeps going, never errs."""
    ws = RawWS(port)
    try:
        assert ws.status == 101, ws.status
        if handshake_first:
            ws.send_text(b'{"protocol":"json","version":1}' + RS)
        for frame in sequence:
            ws.send_frame(frame.payload, frame.opcode, frame.fin, frame.rsv, frame.mask, frame.length)
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            ws.recv_frame(max(0.01, deadline - time.monotonic()))
        return "open"
    except Closed:
        return "closed"
    except TimeoutError:
        return "open"
    finally:
        ws.close()


_header_names = st.sampled_from(
    [
        "Upgrade",
        "Connection",
        "Sec-WebSocket-Key",
        "Sec-WebSocket-Version",
        "Origin",
        "Authorization",
        "Accept",
        "Cookie",
        "X-Random",
        "Content-Length",
        "Sec-WebSocket-Protocol",
        "Sec-WebSocket-Extensions",
    ]
)
_header_values = st.one_of(
    st.sampled_from(
        ["websocket", "Upgrade", "13", "8", "", "dGhlIHNhbXBsZSBub25jZQ==", "permessage-deflate", "x" * 9000]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
)


@st.composite
def upgrade_requests(draw: st.DrawFn) -> tuple[str, str, list[tuple[str, str]]]:
    path = draw(
        st.one_of(
            st.sampled_from(["/hub", "/HUB/", "/hub/", "/hub/negotiate", "/nohub", "/hub%00", "/"]),
            st.text(alphabet="/abcdhu%?&=.", max_size=20).map(lambda p: "/" + p),
        )
    )
    query = draw(
        st.one_of(
            st.just(""),
            st.sampled_from(["id=", "id=x", "id=" + "A" * 22, "id=" + "A" * 48]),
            st.text(alphabet="abcdi=&%xyz0", max_size=30),
        )
    )
    headers = draw(st.lists(st.tuples(_header_names, _header_values), max_size=6))
    return path, query, headers


def check_upgrade(port: int, request: tuple[str, str, list[tuple[str, str]]], token: str | None) -> int:
    """A (possibly broken) upgrade request: 101 or a 4xx, or the socket closed; never 5xx."""
    path, query, headers = request
    if token is not None:
        query = f"id={token}"
    base = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    for name, value in headers:
        base[name] = value
    target = f"{path}?{query}" if query else path
    head = f"GET {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in base.items()) + "\r\n"
    declared = base.get("Content-Length", "").strip()
    body = b"x" * int(declared) if declared.isdigit() and int(declared) < 100_000 else b""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(head.encode("latin-1") + body)  # a declared body is sent, or the server waits for it
        data = b""
        try:
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    return 0
                data += chunk
        except ConnectionResetError:
            return 0
        except TimeoutError:
            raise AssertionError(f"no answer to {head[:1000]!r}") from None
    parts = data.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    assert status < 500, data[:300]
    return status


# ------------------------------------------------------------------------------------------------
# strategies: HTTP endpoints
# ------------------------------------------------------------------------------------------------


@dataclass
class HttpCase:
    method: str
    path: str
    params: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    token: str  # "fresh", "fresh-lp" (long polling started), "random" or "none"


_printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip)
http_cases = st.builds(
    HttpCase,
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD", "GET", "POST"]),
    st.one_of(
        st.sampled_from(["/hub", "/hub/negotiate", "/HUB/Negotiate/", "/hub/negotiate/x", "/hub/", "/nohub"]),
        st.text(alphabet="/abcdehnotiu%.", max_size=20).map(lambda p: "/" + p),
    ),
    st.lists(
        st.tuples(st.sampled_from(["negotiateVersion", "id", "ID", "access_token", "x", ""]), _printable),
        max_size=4,
    ),
    st.dictionaries(
        st.sampled_from(
            [
                "accept",
                "content-type",
                "origin",
                "authorization",
                "cookie",
                "x-requested-with",
                "access-control-request-method",
                "access-control-request-headers",
            ]
        ),
        st.one_of(
            st.sampled_from(
                [
                    "text/event-stream",
                    "application/json",
                    "*/*",
                    "Bearer x",
                    "null",
                    "text/plain;charset=UTF-8",
                ]
            ),
            _printable,
        ),
        max_size=4,
    ),
    st.one_of(
        st.binary(max_size=300),
        st.just(b"x" * 200_000),
        st.just(b'{"type":6}\x1e'),
        st.just(b'{"protocol":"json","version":1}\x1e'),
    ),
    st.sampled_from(["fresh", "fresh-lp", "random", "none", "fresh"]),
)


def check_http(client: httpx.Client, case: HttpCase) -> int:
    """One request to any endpoint: answered with a status below 500 within the bound."""
    params = list(case.params)
    if case.token != "none":
        token = "A" * 48
        if case.token.startswith("fresh"):
            token = client.post("/hub/negotiate", params={"negotiateVersion": "1"}).json()["connectionToken"]
            if case.token == "fresh-lp":
                assert client.get("/hub", params={"id": token}).status_code == 200  # first poll starts it
        params = [(k, v) for k, v in params if k.lower() != "id"] + [("id", token)]
    with client.stream(
        case.method, case.path, params=params, headers=case.headers, content=case.body
    ) as response:
        status = response.status_code
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            pass  # an accepted SSE stream: do not wait for its end
        else:
            response.read()
    assert status < 500, (status, case)
    return status


def raw_http(port: int, data: bytes) -> int:
    """Bytes that may not even be HTTP: a 4xx or a closed socket, never 5xx or a hang."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            got = sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return 0
        except TimeoutError:
            raise AssertionError(f"no answer to {data[:100]!r}") from None
    parts = got.split(b"\r\n", 1)[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    assert status < 500, got[:300]
    return status


raw_requests = st.one_of(
    st.binary(max_size=400),
    st.builds(
        lambda m, t, v, h: f"{m} {t} {v}\r\n{h}\r\n\r\n".encode("latin-1", "replace"),
        st.sampled_from(["GET", "POST", "DELETE", "G\x00T", ""]),
        st.sampled_from(
            ["/hub", "/hub/negotiate?negotiateVersion=1", "*", "/hub?id=%zz", "http://x/hub", ""]
        ),
        st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2", "HTTP/1.1 x", ""]),
        st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=80),
    ),
)


#: what the app logs, by design, when a hub method raises: its ``fail`` method (in TARGETS) does
_EXPECTED_FAILURE = re.compile(r"ERROR: +hub method fail failed\nTraceback.*?\nRuntimeError: boom\n", re.S)


def assert_clean_log(output: str) -> None:
    output = _EXPECTED_FAILURE.sub("", output)
    for marker in BAD_LOG_MARKERS:
        assert marker not in output, output[-5000:]


# ------------------------------------------------------------------------------------------------
# a fuzzed server
# ------------------------------------------------------------------------------------------------

#: short timeouts so abandoned connections are disposed quickly and long polls return soon
FUZZ_OPTIONS = {
    "long_poll_timeout": 1,
    "websocket_close_timeout": 1,
    "handshake_timeout": 3,
    "disconnect_timeout": 3,
}


class Target:
    """A fuzzed server process and the bystander that must be served throughout."""

    #: every live target: while one is fuzzed, the others' bystanders are checked now and then too
    #: (in ASGI mode uvicorn pings and drops a client that does not answer within 40 s)
    live: list[Target] = []

    def __init__(self, serving: str) -> None:
        from .conftest import ServerProcess

        self.serving = serving
        self.server = ServerProcess(APP, env=options_env(**FUZZ_OPTIONS), args=["--serving", serving])
        self.bystander = Bystander(self.server.port)
        self.checked = time.monotonic()
        Target.live.append(self)

    @property
    def port(self) -> int:
        return self.server.port

    def after_example(self) -> None:
        assert self.server.proc.poll() is None, "the server died"
        self.check_bystander()
        for other in Target.live:
            if other is not self and time.monotonic() - other.checked > 10:
                other.check_bystander()

    def check_bystander(self) -> None:
        self.bystander.check()
        self.checked = time.monotonic()

    def finish(self, drain_timeout: float = 15.0) -> None:
        """A newcomer is served, every fuzzed connection is gone, and the log is clean."""
        ws, stream = open_hub(self.server.port)
        assert probe(ws, stream) == "answered"
        ws.close()
        self.bystander.check()
        # only the bystander is left once the fuzzed connections are disposed (negotiated but never
        # used ones expire after the disconnect timeout), and no hub method is left running
        deadline = time.monotonic() + drain_timeout
        while True:
            current = httpx.get(self.server.url + "/debug/stats", timeout=5).json()
            running = current["hubs"]["/hub"]["running_tasks"]
            if current["hub_connections"] == 1 and current["connections"] == 1 and running == 0:
                break
            assert time.monotonic() < deadline, f"connections left behind: {current}"
            time.sleep(0.2)
        assert_clean_log(self.server.output())

    def close(self) -> None:
        if self in Target.live:
            Target.live.remove(self)
        self.bystander.close()
        self.server.close()


# ------------------------------------------------------------------------------------------------
# suites: one hypothesis run per target
# ------------------------------------------------------------------------------------------------

#: every suite; each runs against both serving modes (in native mode frames and upgrade requests
#: hit hubwire's own RFC 6455 code, in ASGI mode uvicorn's behind hubwire's request checks)
SUITES = ("hub_json", "hub_messagepack", "handshake", "frames", "upgrade", "http", "raw_http")


def run_suite(name: str, target: Target, examples: int) -> None:
    """Run one suite's hypothesis test against ``target`` (raises on the first failing example).

    No shrinking: against a live server a failing case can take seconds per attempt, and the run
    must stay bounded; the failing example is reported as generated.
    """
    from hypothesis import HealthCheck, Phase, given, settings

    config = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        report_multiple_bugs=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    port = target.port
    runner: Any
    if name in ("hub_json", "hub_messagepack"):
        protocol = "json" if name == "hub_json" else "messagepack"

        @config
        @given(case=json_cases() if protocol == "json" else msgpack_cases())
        def runner(case: HubCase) -> None:
            check_hub_case(port, protocol, case)
            target.after_example()

    elif name == "handshake":

        @config
        @given(data=handshakes())
        def runner(data: bytes) -> None:
            check_handshake(port, data)
            target.after_example()

    elif name == "frames":

        @config
        @given(handshake_first=st.booleans(), sequence=st.lists(frames, min_size=1, max_size=4))
        def runner(handshake_first: bool, sequence: list[Frame]) -> None:
            check_frames(port, handshake_first, sequence)
            target.after_example()

    elif name == "upgrade":
        client = httpx.Client(base_url=target.server.url, timeout=WAIT)

        @config
        @given(request=upgrade_requests(), fresh=st.booleans())
        def runner(request: tuple[str, str, list[tuple[str, str]]], fresh: bool) -> None:
            token = None
            if fresh:
                token = client.post("/hub/negotiate", params={"negotiateVersion": "1"}).json()[
                    "connectionToken"
                ]
            check_upgrade(port, request, token)
            target.after_example()

    elif name == "http":
        client = httpx.Client(base_url=target.server.url, timeout=WAIT)

        @config
        @given(case=http_cases)
        def runner(case: HttpCase) -> None:
            check_http(client, case)
            target.after_example()

    elif name == "raw_http":

        @config
        @given(data=raw_requests)
        def runner(data: bytes) -> None:
            raw_http(port, data)
            target.after_example()

    else:
        raise ValueError(f"unknown suite {name!r}")
    runner()
