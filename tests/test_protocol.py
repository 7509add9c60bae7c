"""Unit and property tests of the sans-I/O protocol core (codecs, framing, handshake, negotiate).

Byte examples come from the protocol digest (/work/shared/signalr-protocol.md, sections 1, 3 and 4).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubwire.protocol import (
    PING,
    AckMessage,
    CancelInvocationMessage,
    CloseMessage,
    CompletionMessage,
    HandshakeError,
    HandshakeRequest,
    HubMessage,
    HubProtocol,
    InvalidDataError,
    InvocationMessage,
    JsonHubProtocol,
    MessagePackHubProtocol,
    MessageTooLargeError,
    PingMessage,
    SequenceMessage,
    StreamInvocationMessage,
    StreamItemMessage,
    TransferFormat,
    handshake_response,
    parse_handshake,
    read_varint,
    write_varint,
)
from hubwire.protocol.handshake import HANDSHAKE_CANCELED
from hubwire.protocol.negotiate import (
    TRANSPORT_FORMATS,
    NegotiateError,
    negotiate_error,
    negotiate_response,
    new_id,
    redirect_response,
    select_negotiate_version,
)

BOUNDED = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = JsonHubProtocol()
MSGPACK = MessagePackHubProtocol()
PROTOCOLS = [JSON, MSGPACK]
PROTOCOL_IDS = ["json", "messagepack"]

# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------

# UTF-8 encodable text (no lone surrogates)
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
short_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
nonempty_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=12)
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
finite_float = st.floats(allow_nan=False, allow_infinity=False)


def _values(extra: list[st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.none(), st.booleans(), int64, finite_float, text, *extra)
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(short_text, inner, max_size=4)),
        max_leaves=12,
    )


json_values = _values([])
msgpack_values = _values([st.binary(max_size=16)])

headers = st.one_of(st.none(), st.dictionaries(short_text, short_text, min_size=1, max_size=3))
stream_ids = st.one_of(st.none(), st.lists(short_text, min_size=1, max_size=3))
sequence_ids = st.integers(min_value=0, max_value=2**63 - 1)


def messages(values: st.SearchStrategy[Any]) -> st.SearchStrategy[HubMessage]:
    """Every hub message type (1-9) with every optional field varied."""
    args = st.lists(values, max_size=4)
    return st.one_of(
        st.builds(
            InvocationMessage,
            target=text,
            arguments=args,
            invocation_id=st.one_of(st.none(), nonempty_text),
            stream_ids=stream_ids,
            headers=headers,
        ),
        st.builds(
            StreamInvocationMessage,
            invocation_id=text,
            target=text,
            arguments=args,
            stream_ids=stream_ids,
            headers=headers,
        ),
        st.builds(StreamItemMessage, invocation_id=text, item=values, headers=headers),
        st.builds(
            lambda i, r, h: CompletionMessage(i, result=r, has_result=True, headers=h), text, values, headers
        ),
        st.builds(lambda i, e, h: CompletionMessage(i, error=e, headers=h), text, text, headers),
        st.builds(lambda i, h: CompletionMessage(i, headers=h), text, headers),
        st.builds(CancelInvocationMessage, invocation_id=text, headers=headers),
        st.just(PingMessage()),
        st.builds(CloseMessage, error=st.one_of(st.none(), text), allow_reconnect=st.booleans()),
        st.builds(AckMessage, sequence_id=sequence_ids),
        st.builds(SequenceMessage, sequence_id=sequence_ids),
    )


json_messages = messages(json_values)
msgpack_messages = messages(msgpack_values)


def protocol_and_messages(min_size: int = 1, max_size: int = 12) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.tuples(st.just(JSON), st.lists(json_messages, min_size=min_size, max_size=max_size)),
        st.tuples(st.just(MSGPACK), st.lists(msgpack_messages, min_size=min_size, max_size=max_size)),
    )


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@BOUNDED
@given(json_messages)
def test_json_round_trip(message: HubMessage) -> None:
    data = JSON.write_message(message)
    assert data.endswith(b"\x1e") and data.count(b"\x1e") == 1
    assert JSON.parse_all(data) == [message]


@BOUNDED
@given(msgpack_messages)
def test_messagepack_round_trip(message: HubMessage) -> None:
    data = MSGPACK.write_message(message)
    length, used = read_varint(data)  # type: ignore[misc]
    assert used + length == len(data)
    assert MSGPACK.parse_all(data) == [message]


EXAMPLES: list[HubMessage] = [
    InvocationMessage("Send", ["hi", 1, None, {"a": [1.5, True]}]),
    InvocationMessage("Send", [], invocation_id="7", stream_ids=["1", "2"], headers={"traceparent": "x"}),
    StreamInvocationMessage("8", "Counter", [10, 50], stream_ids=["9"], headers={"h": "v"}),
    StreamItemMessage("8", None),
    StreamItemMessage("8", {"X": 1}, headers={"a": "b"}),
    CompletionMessage.with_result("1", None),
    CompletionMessage.with_result("1", [1, 2]),
    CompletionMessage.with_error("1", "boom"),
    CompletionMessage.empty("1"),
    CompletionMessage("1", result=3, has_result=True, headers={"k": "v"}),
    CancelInvocationMessage("3"),
    CancelInvocationMessage("3", headers={"k": "v"}),
    PING,
    CloseMessage(),
    CloseMessage("bad"),
    CloseMessage("bad", allow_reconnect=True),
    CloseMessage(None, allow_reconnect=True),
    AckMessage(0),
    AckMessage(2**63 - 1),
    SequenceMessage(1),
]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
@pytest.mark.parametrize("message", EXAMPLES, ids=[f"{type(m).__name__}-{i}" for i, m in enumerate(EXAMPLES)])
def test_round_trip_examples(protocol: HubProtocol, message: HubMessage) -> None:
    assert protocol.parse_all(protocol.write_message(message)) == [message]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_all_examples_in_one_buffer(protocol: HubProtocol) -> None:
    data = b"".join(protocol.write_message(m) for m in EXAMPLES)
    assert protocol.parse_all(data) == EXAMPLES


def test_completion_kinds_are_distinguished() -> None:
    for protocol in PROTOCOLS:
        void, null, err = (
            protocol.parse_all(protocol.write_message(m))[0]
            for m in (
                CompletionMessage.empty("1"),
                CompletionMessage.with_result("1", None),
                CompletionMessage.with_error("1", "e"),
            )
        )
        assert isinstance(void, CompletionMessage) and not void.has_result and void.error is None
        assert isinstance(null, CompletionMessage) and null.has_result and null.result is None
        assert isinstance(err, CompletionMessage) and err.error == "e" and not err.has_result


def test_messagepack_payload_types_round_trip() -> None:
    import datetime

    stamp = datetime.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.UTC)
    ext = msgspec.msgpack.Ext(42, b"\x01\x02")
    msg = InvocationMessage("T", [b"\x00\xff", stamp, ext])
    data = MSGPACK.write_message(msg)
    assert b"\xc4\x02\x00\xff" in data  # bin 8
    assert b"\xd7\xff" in data or b"\xc7\x0c\xff" in data  # timestamp extension (-1)
    parsed = MSGPACK.parse_all(data)[0]
    assert isinstance(parsed, InvocationMessage)
    assert parsed.arguments == [b"\x00\xff", stamp, ext]


# ------------------------------------------------------------------------------------------------
# exact bytes (digest 3.3 / 3.11)
# ------------------------------------------------------------------------------------------------


def test_json_invocation_bytes() -> None:
    data = JSON.write_message(InvocationMessage("Send", ["hi"]))
    assert data == b'{"type":1,"target":"Send","arguments":["hi"]}\x1e'
    assert len(data) == 46


def test_json_property_order() -> None:
    data = JSON.write_message(
        InvocationMessage("T", [1], invocation_id="5", stream_ids=["6"], headers={"a": "b"})
    )
    assert data == (
        b'{"type":1,"headers":{"a":"b"},"invocationId":"5","target":"T","arguments":[1],"streamIds":["6"]}\x1e'
    )


def test_json_writer_shapes() -> None:
    assert JSON.write_message(CompletionMessage.with_result("1", None)) == (
        b'{"type":3,"invocationId":"1","result":null}\x1e'
    )
    assert JSON.write_message(CompletionMessage.empty("1")) == b'{"type":3,"invocationId":"1"}\x1e'
    assert JSON.write_message(CompletionMessage.with_error("1", "x")) == (
        b'{"type":3,"invocationId":"1","error":"x"}\x1e'
    )
    assert JSON.write_message(StreamItemMessage("1", None)) == (
        b'{"type":2,"invocationId":"1","item":null}\x1e'
    )
    assert JSON.write_message(CloseMessage()) == b'{"type":7}\x1e'
    assert JSON.write_message(CloseMessage("Connection closed with an error.", allow_reconnect=True)) == (
        b'{"type":7,"error":"Connection closed with an error.","allowReconnect":true}\x1e'
    )
    assert JSON.write_message(AckMessage(5)) == b'{"type":8,"sequenceId":5}\x1e'
    assert JSON.write_message(SequenceMessage(6)) == b'{"type":9,"sequenceId":6}\x1e'
    # no empty headers / streamIds properties
    assert JSON.write_message(InvocationMessage("T", [], headers={}, stream_ids=[])) == (
        b'{"type":1,"target":"T","arguments":[]}\x1e'
    )


def test_messagepack_invocation_bytes() -> None:
    expected = bytes.fromhex("0e 96 01 80 c0 a4 53 65 6e 64 91 a2 68 69 90")
    assert MSGPACK.write_message(InvocationMessage("Send", ["hi"])) == expected
    assert MSGPACK.parse_all(expected) == [InvocationMessage("Send", ["hi"])]


def test_ping_bytes() -> None:
    assert JSON.write_message(PING) == b'{"type":6}\x1e'
    assert MSGPACK.write_message(PING) == bytes.fromhex("02 91 06")
    assert JSON.parse_all(b'{"type":6}\x1e') == [PingMessage()]
    assert MSGPACK.parse_all(bytes.fromhex("02 91 06")) == [PingMessage()]


def test_messagepack_completion_error_bytes() -> None:
    body = bytes.fromhex("95 03 80 a3 78 79 7a 01 a5 45 72 72 6f 72")
    framed = bytes([len(body)]) + body
    assert len(body) == 14
    assert MSGPACK.write_message(CompletionMessage.with_error("xyz", "Error")) == framed
    assert MSGPACK.parse_all(framed) == [CompletionMessage.with_error("xyz", "Error")]


def test_messagepack_other_shapes() -> None:
    def body(m: HubMessage) -> Any:
        data = MSGPACK.write_message(m)
        _, used = read_varint(data)  # type: ignore[misc]
        return msgspec.msgpack.decode(data[used:])

    assert body(CompletionMessage.empty("1")) == [3, {}, "1", 2]
    assert body(CompletionMessage.with_result("1", None)) == [3, {}, "1", 3, None]
    assert body(CloseMessage()) == [7, None, False]
    assert body(CloseMessage("e", allow_reconnect=True)) == [7, "e", True]
    assert body(StreamItemMessage("1", 5)) == [2, {}, "1", 5]
    assert body(CancelInvocationMessage("1")) == [5, {}, "1"]
    assert body(StreamInvocationMessage("1", "T", [])) == [4, {}, "1", "T", [], []]
    assert body(AckMessage(3)) == [8, 3]
    assert body(SequenceMessage(4)) == [9, 4]


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (1, "01"),
        (0x7F, "7f"),
        (0x80, "80 01"),
        (5248, "80 29"),
        (16383, "ff 7f"),
        (16384, "80 80 01"),
        (0x7FFFFFFF, "ff ff ff ff 07"),
    ],
)
def test_varint(value: int, encoded: str) -> None:
    raw = bytes.fromhex(encoded)
    assert write_varint(value) == raw
    assert read_varint(raw) == (value, len(raw))
    assert read_varint(b"\xaa" + raw + b"\x55", 1) == (value, len(raw))
    if len(raw) > 1:
        assert read_varint(raw[:-1]) is None  # incomplete prefix


@SMALL
@given(st.integers(min_value=0, max_value=2**31 - 1))
def test_varint_round_trip(value: int) -> None:
    raw = write_varint(value)
    assert 1 <= len(raw) <= 5
    assert read_varint(raw) == (value, len(raw))


def test_varint_too_large() -> None:
    with pytest.raises(InvalidDataError):
        read_varint(bytes.fromhex("80 80 80 80 08"))  # 2^31
    with pytest.raises(InvalidDataError):
        read_varint(bytes.fromhex("ff ff ff ff ff 01"))  # 6th byte needed


# ------------------------------------------------------------------------------------------------
# what the readers accept / reject (digest 3.3)
# ------------------------------------------------------------------------------------------------


def test_json_reader_details() -> None:
    # extra properties ignored, property order irrelevant
    assert JSON.parse_all(b'{"arguments":[1],"target":"T","type":1,"extra":{"x":[1]}}\x1e') == [
        InvocationMessage("T", [1])
    ]
    # an empty invocation id means fire-and-forget
    msg = JSON.parse_all(b'{"type":1,"invocationId":"","target":"T","arguments":[]}\x1e')[0]
    assert isinstance(msg, InvocationMessage) and msg.invocation_id is None
    # unknown message types are ignored, the following ones still parsed
    assert JSON.parse_all(b'{"type":99,"x":1}\x1e{"type":6}\x1e') == [PING]
    # Close without allowReconnect
    assert JSON.parse_all(b'{"type":7,"error":"e"}\x1e') == [CloseMessage("e")]


@pytest.mark.parametrize(
    "record",
    [
        b"not json",
        b"[1,2]",
        b'"str"',
        b"{}",
        b'{"type":"1"}',
        b'{"type":true}',
        b'{"type":1,"arguments":[]}',
        b'{"type":1,"target":"T"}',
        b'{"type":1,"target":5,"arguments":[]}',
        b'{"type":1,"target":"T","arguments":{}}',
        b'{"type":1,"target":"T","arguments":[],"streamIds":[1]}',
        b'{"type":1,"target":"T","arguments":[],"headers":{"a":1}}',
        b'{"type":2,"invocationId":"1"}',
        b'{"type":3}',
        b'{"type":3,"invocationId":"1","result":1,"error":"e"}',
        b'{"type":3,"invocationId":"1","error":5}',
        b'{"type":4,"target":"T","arguments":[]}',
        b'{"type":5}',
        b'{"type":7,"allowReconnect":"yes"}',
        b'{"type":8}',
        b'{"type":9,"sequenceId":-1}',
        b'{"type":8,"sequenceId":1.5}',
        b"\xff\xfe",
    ],
)
def test_json_reader_rejects(record: bytes) -> None:
    with pytest.raises(InvalidDataError):
        JSON.parse_all(record + b"\x1e")


def _framed(value: Any) -> bytes:
    body = msgspec.msgpack.encode(value)
    return write_varint(len(body)) + body


def test_messagepack_reader_details() -> None:
    # 5-element invocation (no streamIds) accepted
    assert MSGPACK.parse_all(_framed([1, {}, None, "T", [1]])) == [InvocationMessage("T", [1])]
    # "" invocation id treated as absent
    msg = MSGPACK.parse_all(_framed([1, {}, "", "T", []]))[0]
    assert isinstance(msg, InvocationMessage) and msg.invocation_id is None
    # JS writes Close as [7, nil]
    assert MSGPACK.parse_all(_framed([7, None])) == [CloseMessage()]
    # unknown types ignored
    assert MSGPACK.parse_all(_framed([42, "x"]) + _framed([6])) == [PING]
    # a Ping with extra elements is still a ping
    assert MSGPACK.parse_all(_framed([6, {}])) == [PING]
    # headers ignored when unknown but kept
    cancel = CancelInvocationMessage("1", headers={"a": "b"})
    assert MSGPACK.parse_all(_framed([5, {"a": "b"}, "1"])) == [cancel]
    # large unsigned sequence ids accepted
    assert MSGPACK.parse_all(_framed([8, 2**64 - 1])) == [AckMessage(2**64 - 1)]


@pytest.mark.parametrize(
    "value",
    [
        [],
        {},
        "x",
        ["1"],
        [True],
        [1, {}, None, "T"],
        [1, [], None, "T", []],
        [1, {1: "a"}, None, "T", []],
        [1, {"a": 1}, None, "T", []],
        [1, {}, 5, "T", []],
        [1, {}, None, None, []],
        [1, {}, None, "T", {}],
        [1, {}, None, "T", [], [1]],
        [4, {}, None, "T", []],
        [2, {}, "1"],
        [3, {}, "1"],
        [3, {}, "1", 1],
        [3, {}, "1", 1, 5],
        [3, {}, "1", 3],
        [3, {}, "1", 4, 1],
        [5, {}],
        [7],
        [7, 5],
        [7, None, "yes"],
        [8],
        [8, -1],
        [9, "1"],
    ],
)
def test_messagepack_reader_rejects(value: Any) -> None:
    with pytest.raises(InvalidDataError):
        MSGPACK.parse_all(_framed(value))


def test_messagepack_garbage_record() -> None:
    with pytest.raises(InvalidDataError):
        MSGPACK.parse_all(b"\x02\xc1\xc1")  # 0xc1 is never used
    with pytest.raises(InvalidDataError):
        MSGPACK.parse_all(b"\x03\x91\x06\x06")  # trailing data inside the record


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_parse_all_rejects_partial(protocol: HubProtocol) -> None:
    data = protocol.write_message(InvocationMessage("Send", ["hi"]))
    with pytest.raises(InvalidDataError):
        protocol.parse_all(data[:-1])


def test_protocol_metadata() -> None:
    assert (JSON.name, JSON.transfer_format, JSON.version) == ("json", TransferFormat.TEXT, 2)
    assert (MSGPACK.name, MSGPACK.transfer_format) == ("messagepack", TransferFormat.BINARY)
    assert MSGPACK.version == 2


# ------------------------------------------------------------------------------------------------
# incremental parsing under any chunking
# ------------------------------------------------------------------------------------------------


@BOUNDED
@given(protocol_and_messages(), st.data())
def test_any_chunking_gives_same_messages(
    pm: tuple[HubProtocol, list[HubMessage]], data: st.DataObject
) -> None:
    protocol, msgs = pm
    stream = b"".join(protocol.write_message(m) for m in msgs)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")))
    bounds = [0, *cuts, len(stream)]
    parser = protocol.parser(1 << 20)
    out: list[HubMessage] = []
    for start, end in itertools.pairwise(bounds):
        out.extend(parser.feed(stream[start:end]))
    assert out == msgs
    assert parser.buffered == 0


@BOUNDED
@given(protocol_and_messages(), st.data())
def test_framed_feeding_gives_each_message_with_its_own_bytes(
    pm: tuple[HubProtocol, list[HubMessage]], data: st.DataObject
) -> None:
    """What a relay passes on message by message is exactly what was written, under any chunking."""
    protocol, msgs = pm
    frames = [protocol.write_message(m) for m in msgs]
    stream = b"".join(frames)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")))
    parser = protocol.parser(1 << 20)
    out: list[tuple[HubMessage | None, bytes]] = []
    for start, end in itertools.pairwise([0, *cuts, len(stream)]):
        out.extend(parser.feed_framed(stream[start:end]))
    assert out == list(zip(msgs, frames, strict=True))


@SMALL
@given(protocol_and_messages(max_size=6))
def test_byte_by_byte(pm: tuple[HubProtocol, list[HubMessage]]) -> None:
    protocol, msgs = pm
    stream = b"".join(protocol.write_message(m) for m in msgs)
    parser = protocol.parser()
    out: list[HubMessage] = []
    for i in range(len(stream)):
        out.extend(parser.feed(memoryview(stream)[i : i + 1]))
    assert out == msgs
    assert parser.buffered == 0


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_parser_returns_nothing_until_complete(protocol: HubProtocol) -> None:
    data = protocol.write_message(InvocationMessage("Send", ["hello world"]))
    parser = protocol.parser(1000)
    assert parser.feed(data[:5]) == []
    assert parser.buffered == 5
    assert parser.feed(data[5:] + data[:3]) == [InvocationMessage("Send", ["hello world"])]
    assert parser.buffered == 3


# ------------------------------------------------------------------------------------------------
# maximum message size
# ------------------------------------------------------------------------------------------------

LIMIT = 100


def _json_record(size: int) -> bytes:
    """A valid JSON ping record (without separator) of exactly ``size`` bytes."""
    base = b'{"type":6,"p":""}'
    assert size >= len(base)
    return b'{"type":6,"p":"' + b"x" * (size - len(base)) + b'"}'


def _msgpack_framed(total: int) -> bytes:
    """A valid framed MessagePack ping whose length prefix + body is exactly ``total`` bytes."""
    for pad in range(total, -1, -1):
        body = msgspec.msgpack.encode([6, "x" * pad])
        framed = write_varint(len(body)) + body
        if len(framed) == total:
            return framed
    raise AssertionError(total)


def test_json_max_size_boundary() -> None:
    # SignalR applies the limit to the framed message (record + separator)
    ok = _json_record(LIMIT - 1) + b"\x1e"
    assert len(ok) == LIMIT
    assert JSON.parser(LIMIT).feed(ok) == [PING]
    too_big = _json_record(LIMIT) + b"\x1e"
    with pytest.raises(MessageTooLargeError) as info:
        JSON.parser(LIMIT).feed(too_big)
    assert str(info.value) == (
        f"The maximum message size of {LIMIT}B was exceeded. "
        "The message size can be configured in AddHubOptions."
    )
    assert info.value.limit == LIMIT
    assert isinstance(info.value, InvalidDataError)


def test_json_max_size_before_complete() -> None:
    parser = JSON.parser(LIMIT)
    assert parser.feed(b"{" + b" " * (LIMIT - 2)) == []
    with pytest.raises(MessageTooLargeError):
        parser.feed(b" " * 10)  # no separator yet, but already more than the limit


def test_json_max_size_per_message_not_per_chunk() -> None:
    many = (_json_record(LIMIT - 1) + b"\x1e") * 20
    assert JSON.parser(LIMIT).feed(many) == [PING] * 20
    parser = JSON.parser(LIMIT)
    out: list[HubMessage] = []
    for i in range(0, len(many), 37):
        out += parser.feed(many[i : i + 37])
    assert out == [PING] * 20


def test_messagepack_max_size_boundary() -> None:
    ok = _msgpack_framed(LIMIT)
    assert MSGPACK.parser(LIMIT).feed(ok) == [PING]
    too_big = _msgpack_framed(LIMIT + 1)
    with pytest.raises(MessageTooLargeError):
        MSGPACK.parser(LIMIT).feed(too_big)


def test_messagepack_max_size_before_complete() -> None:
    parser = MSGPACK.parser(LIMIT)
    with pytest.raises(MessageTooLargeError):
        parser.feed(write_varint(10_000) + b"\x92")  # only the prefix says it is too big
    parser = MSGPACK.parser(32768)
    with pytest.raises(MessageTooLargeError):
        parser.feed(write_varint(0x7FFFFFFF))


def test_messagepack_many_small_messages_under_limit() -> None:
    many = _msgpack_framed(LIMIT) * 20
    assert MSGPACK.parser(LIMIT).feed(many) == [PING] * 20


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=PROTOCOL_IDS)
def test_no_limit(protocol: HubProtocol) -> None:
    big = InvocationMessage("T", ["x" * 200_000])
    assert protocol.parser(None).feed(protocol.write_message(big)) == [big]


# ------------------------------------------------------------------------------------------------
# arbitrary input never raises anything but InvalidDataError
# ------------------------------------------------------------------------------------------------

any_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), text, st.binary(max_size=8)
)
any_value = st.recursive(
    any_scalar,
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(short_text, inner, max_size=4)),
    max_leaves=15,
)
json_any_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), text),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(short_text, inner, max_size=4)),
    max_leaves=15,
)
# arrays shaped like hub messages but with arbitrary element values
message_like = st.builds(
    lambda kind, rest: [kind, *rest],
    st.one_of(st.integers(-2, 12), any_scalar),
    st.lists(any_value, max_size=7),
)
json_field_names = st.sampled_from(
    [
        "type",
        "headers",
        "invocationId",
        "target",
        "arguments",
        "streamIds",
        "item",
        "result",
        "error",
        "allowReconnect",
        "sequenceId",
        "x",
    ]
)
json_object_like = st.dictionaries(
    json_field_names,
    st.one_of(st.integers(-2, 12), json_any_value),
    max_size=7,
)


def _check_parser(protocol: HubProtocol, data: bytes, cut: int, limit: int | None) -> None:
    parser = protocol.parser(limit)
    try:
        parser.feed(data[:cut])
        parser.feed(data[cut:])
    except InvalidDataError:
        pass


@BOUNDED
@given(st.binary(max_size=300), st.integers(0, 300), st.sampled_from([None, 16, 1000]))
def test_json_parser_random_bytes(data: bytes, cut: int, limit: int | None) -> None:
    _check_parser(JSON, data, cut, limit)
    _check_parser(JSON, data + b"\x1e", cut, limit)


@BOUNDED
@given(st.binary(max_size=300), st.integers(0, 300), st.sampled_from([None, 16, 1000]))
def test_messagepack_parser_random_bytes(data: bytes, cut: int, limit: int | None) -> None:
    _check_parser(MSGPACK, data, cut, limit)
    _check_parser(MSGPACK, write_varint(len(data)) + data, cut, limit)


@BOUNDED
@given(json_object_like, st.sampled_from([None, 64]))
def test_json_parser_structured_garbage(obj: dict[str, Any], limit: int | None) -> None:
    record = json.dumps(obj).encode() + b"\x1e"
    _check_parser(JSON, record, len(record) // 2, limit)


@BOUNDED
@given(st.one_of(message_like, any_value), st.sampled_from([None, 64]))
def test_messagepack_parser_structured_garbage(value: Any, limit: int | None) -> None:
    try:
        body = msgspec.msgpack.encode(value)
    except (OverflowError, msgspec.EncodeError):
        return
    framed = write_varint(len(body)) + body
    _check_parser(MSGPACK, framed, len(framed) // 2, limit)


@BOUNDED
@given(st.binary(max_size=80), st.integers(0, 8))
def test_read_varint_random_bytes(data: bytes, pos: int) -> None:
    try:
        result = read_varint(data, pos)
    except InvalidDataError:
        return
    if result is not None:
        value, used = result
        assert 0 <= value <= 2**31 - 1 and 1 <= used <= 5


@BOUNDED
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(lambda b: b + b"\x1e", st.binary(max_size=200)),
        st.builds(
            lambda o: json.dumps(o).encode() + b"\x1e",
            st.dictionaries(st.sampled_from(["protocol", "version", "x"]), json_any_value, max_size=3),
        ),
    ),
    st.sampled_from([None, 8, 64]),
)
def test_parse_handshake_random_bytes(data: bytes, limit: int | None) -> None:
    try:
        result = parse_handshake(data, limit)
    except InvalidDataError:
        return
    if result is not None:
        request, used = result
        assert isinstance(request.protocol, str) and isinstance(request.version, int)
        assert data[used - 1 : used] == b"\x1e"


def test_deep_nesting_is_invalid_data() -> None:
    deep_json = b'{"type":1,"target":"T","arguments":' + b"[" * 100_000 + b"]" * 100_000 + b"}\x1e"
    with pytest.raises(InvalidDataError):
        JSON.parse_all(deep_json)
    deep_msgpack = b"\x91" * 100_000 + b"\x06"
    with pytest.raises(InvalidDataError):
        MSGPACK.parse_all(write_varint(len(deep_msgpack)) + deep_msgpack)
    with pytest.raises(InvalidDataError):
        parse_handshake(b"[" * 100_000 + b"\x1e")


# ------------------------------------------------------------------------------------------------
# handshake (digest 3.2)
# ------------------------------------------------------------------------------------------------


def test_handshake_parses_and_reports_length() -> None:
    raw = b'{"protocol":"messagepack","version":1}\x1e'
    assert parse_handshake(raw) == (HandshakeRequest("messagepack", 1), len(raw))
    # bytes after the record are the first hub messages
    rest = bytes.fromhex("02 91 06")
    _, used = parse_handshake(raw + rest)  # type: ignore[misc]
    assert (raw + rest)[used:] == rest
    # extra fields ignored; version 0 (signalrcore) fine
    assert parse_handshake(b'{"version":0,"protocol":"json","x":[1]}\x1e') == (
        HandshakeRequest("json", 0),
        40,
    )


def test_handshake_incomplete() -> None:
    assert parse_handshake(b'{"protocol":"json",') is None
    assert parse_handshake(b"") is None
    assert parse_handshake(bytearray(b'{"protocol":"json","version":1}')) is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"version":1}', "Missing required property 'protocol'. Message content: {\"version\":1}"),
        (
            b'{"protocol":"json"}',
            'Missing required property \'version\'. Message content: {"protocol":"json"}',
        ),
        (b'{"protocol":1,"version":1}', "Expected 'protocol' to be of type String."),
        (b'{"protocol":"json","version":"1"}', "Expected 'version' to be of type Integer."),
        (b'{"protocol":"json","version":true}', "Expected 'version' to be of type Integer."),
        (b"[]", "Unexpected JSON Token Type. Expected a JSON Object."),
    ],
)
def test_handshake_errors(raw: bytes, message: str) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_handshake(raw + b"\x1e")
    assert str(info.value) == message
    assert isinstance(info.value, InvalidDataError)


def test_handshake_bad_json() -> None:
    with pytest.raises(HandshakeError) as info:
        parse_handshake(b"hello\x1e")
    assert str(info.value).startswith("Error reading JSON.")


def test_handshake_size_limit() -> None:
    raw = b'{"protocol":"json","version":1}\x1e'
    # the whole record including its separator must fit in the limit
    assert parse_handshake(raw, len(raw)) == (HandshakeRequest("json", 1), len(raw))
    with pytest.raises(HandshakeError) as info:
        parse_handshake(raw, len(raw) - 1)
    assert str(info.value) == HANDSHAKE_CANCELED == "Handshake was canceled."
    # incomplete but already too big
    assert parse_handshake(b"{" * 10, 10) is None
    with pytest.raises(HandshakeError) as info:
        parse_handshake(b"{" * 11, 10)
    assert str(info.value) == "Handshake was canceled."


def test_handshake_response() -> None:
    assert handshake_response() == b"{}\x1e"
    assert handshake_response("The protocol 'xyz' is not supported.") == (
        b'{"error":"The protocol \'xyz\' is not supported."}\x1e'
    )
    assert json.loads(handshake_response('quote " and \x1e')[:-1]) == {"error": 'quote " and \x1e'}
    assert handshake_response('quote " and \x1e').count(b"\x1e") == 1


# ------------------------------------------------------------------------------------------------
# negotiate (digest 1)
# ------------------------------------------------------------------------------------------------

ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")


def test_new_id_format() -> None:
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert ID_RE.match(value), value
        assert len(base64.urlsafe_b64decode(value + "==")) == 16


@pytest.mark.parametrize(
    ("raw", "expected"), [(None, 0), ("0", 0), ("1", 1), ("2", 1), ("100", 1), (" 1 ", 1)]
)
def test_negotiate_version_selection(raw: str | None, expected: int) -> None:
    assert select_negotiate_version(raw) == expected


@pytest.mark.parametrize("raw", ["abc", "", "1.0", "1x"])
def test_negotiate_version_non_integer(raw: str) -> None:
    with pytest.raises(NegotiateError) as info:
        select_negotiate_version(raw)
    assert str(info.value) == "The client requested a non-integer protocol version."


UNSUPPORTED = "The client requested version '{}', but the server does not support this version."


def test_negotiate_version_below_minimum() -> None:
    with pytest.raises(NegotiateError) as info:
        select_negotiate_version("-1")
    assert str(info.value) == UNSUPPORTED.format(-1)
    with pytest.raises(NegotiateError) as info:
        select_negotiate_version(None, minimum=1)
    assert str(info.value) == UNSUPPORTED.format(0)
    with pytest.raises(NegotiateError) as info:
        select_negotiate_version("0", minimum=1)
    assert str(info.value) == UNSUPPORTED.format(0)
    assert select_negotiate_version("1", minimum=1) == 1


def test_negotiate_response_v1() -> None:
    body = negotiate_response(1, "id" * 11, "tk" * 11, ["WebSockets", "ServerSentEvents", "LongPolling"])
    obj = json.loads(body)
    assert list(obj) == ["negotiateVersion", "connectionId", "connectionToken", "availableTransports"]
    assert obj["negotiateVersion"] == 1
    assert obj["connectionId"] == "id" * 11
    assert obj["connectionToken"] == "tk" * 11
    assert obj["availableTransports"] == [
        {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
        {"transport": "ServerSentEvents", "transferFormats": ["Text"]},
        {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
    ]
    assert "ProtocolVersion" not in obj and "useStatefulReconnect" not in obj


def test_negotiate_response_v0_has_no_token() -> None:
    obj = json.loads(negotiate_response(0, "abc", "abc", ["WebSockets"]))
    assert obj == {
        "negotiateVersion": 0,
        "connectionId": "abc",
        "availableTransports": [{"transport": "WebSockets", "transferFormats": ["Text", "Binary"]}],
    }


def test_negotiate_response_stateful_first() -> None:
    obj = json.loads(negotiate_response(1, "a", "b", [], use_stateful_reconnect=True))
    assert next(iter(obj)) == "useStatefulReconnect" and obj["useStatefulReconnect"] is True
    assert obj["availableTransports"] == []


def test_transport_formats_fixed() -> None:
    assert TRANSPORT_FORMATS == {
        "WebSockets": ["Text", "Binary"],
        "ServerSentEvents": ["Text"],
        "LongPolling": ["Text", "Binary"],
    }


def test_negotiate_error_and_redirect() -> None:
    assert json.loads(negotiate_error("This connection is not allowed.")) == {
        "error": "This connection is not allowed."
    }
    assert json.loads(redirect_response("http://x/hub", "tok")) == {
        "negotiateVersion": 0,
        "url": "http://x/hub",
        "accessToken": "tok",
        "availableTransports": [],
    }
    assert "accessToken" not in json.loads(redirect_response("http://x/hub"))
