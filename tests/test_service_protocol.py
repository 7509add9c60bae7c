"""The connection service's link protocol and tokens, without I/O.

Frames: every kind survives encode -> parse however the bytes are cut; a few frames have golden
bytes worked out by hand from the MessagePack spec (so the encoder cannot drift with itself);
random bytes and random MessagePack values only ever give :class:`ServiceProtocolError`; a frame
over ``max_frame`` is refused from its length prefix alone. Tokens: each kind verifies only as
itself and for its hub; expired, foreign-key, foreign-algorithm and ``exp``-less tokens are refused.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jwt
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubwire.connections.connection import Principal, RequestInfo
from hubwire.protocol.messagepack_protocol import write_varint
from hubwire.protocol.service import (
    ACK_ERROR,
    ACK_OK,
    Ack,
    BroadcastData,
    ClientCompletion,
    ClientInvocation,
    CloseConnection,
    ConnectionData,
    ErrorCompletion,
    GroupBroadcastData,
    GroupCommand,
    HandshakeRequest,
    HandshakeResponse,
    MultiConnectionData,
    MultiGroupBroadcastData,
    MultiUserData,
    OpenConnection,
    Ping,
    ServiceFrame,
    ServiceFrameParser,
    ServiceProtocolError,
    UserData,
    encode_frame,
)
from hubwire.service.tokens import (
    CLAIMS,
    ClientAuthenticator,
    check_access_key,
    client_audience,
    client_token,
    link_token,
    verify,
)

KEY = "protocol-test-access-key-0123456789abcdef"
NODE = "http://node.example:8080"

PAYLOADS = {
    "json": b'{"type":1,"target":"m","arguments":[]}\x1e',
    "messagepack": b"\x05\x96\x01\x80\xc0\xa1m\x90",
}

EVERY_KIND: list[ServiceFrame] = [
    HandshakeRequest(1, {"server": "app-1"}),
    HandshakeResponse(None, {"node": "hubwire"}),
    HandshakeResponse("version 2 is not served", {}),
    Ping(),
    Ping({"shutdown": "fin"}),
    OpenConnection(
        "cid-1",
        {"sub": "alice", "roles": ["a", "b"], "n": 3},
        {"user-agent": "test"},
        {"hub": "chat", "x": "1"},
        {"transport": "WebSockets", "binary": True, "migrated": {"from": "app-1", "items": b"\x80"}},
    ),
    OpenConnection("cid-2", None, {}, {}, {}),
    CloseConnection("cid-1"),
    CloseConnection("cid-1", "bye", {"migrate": {"items": b"\x80"}}),
    CloseConnection("cid-1", None, {"released": True}),
    ConnectionData("cid-1", b'{"protocol":"json","version":1}\x1e'),
    ConnectionData("cid-1", b"", {"bounced": True}),
    MultiConnectionData(["a", "b"], PAYLOADS),
    UserData("alice", PAYLOADS),
    MultiUserData(["alice", "bob"], PAYLOADS),
    BroadcastData([], PAYLOADS),
    BroadcastData(["cid-1"], PAYLOADS),
    GroupBroadcastData("room", ["cid-1"], PAYLOADS),
    MultiGroupBroadcastData(["room", "hall"], PAYLOADS),
    MultiGroupBroadcastData(["room"], PAYLOADS, ["cid-1"]),
    GroupCommand(True, "cid-1", "room", 1),
    GroupCommand(False, "cid-1", "room", 2**40),
    Ack(1),
    Ack(2, ACK_ERROR, "no such group"),
    ClientInvocation("v1", "cid-1", "app-a", {"json": b"{}\x1e", "messagepack": b"\x01\x90"}),
    ClientCompletion("v1", "cid-1", "app-a", "json", b'{"type":3,"invocationId":"v1","result":1}\x1e'),
    ErrorCompletion("v1", "cid-1", "app-a", "Connection 'cid-1' does not exist.", {"absent": True}),
]


def _parse_all(data: bytes, cuts: list[int], max_frame: int = 1 << 20) -> list[ServiceFrame]:
    parser = ServiceFrameParser(max_frame)
    frames: list[ServiceFrame] = []
    last = 0
    for cut in sorted({min(c, len(data)) for c in cuts}):
        frames += parser.feed(data[last:cut])
        last = cut
    frames += parser.feed(data[last:])
    return frames


@pytest.mark.parametrize("frame", EVERY_KIND, ids=lambda f: type(f).__name__)
def test_every_frame_kind_round_trips(frame: ServiceFrame) -> None:
    assert ServiceFrameParser().feed(encode_frame(frame)) == [frame]


@given(st.lists(st.integers(min_value=0, max_value=4000), max_size=40))
def test_every_kind_round_trips_however_the_bytes_are_cut(cuts: list[int]) -> None:
    data = b"".join(encode_frame(f) for f in EVERY_KIND)
    assert _parse_all(data, cuts) == EVERY_KIND


def test_bytes_one_at_a_time() -> None:
    data = b"".join(encode_frame(f) for f in EVERY_KIND)
    parser = ServiceFrameParser()
    frames = [f for i in range(len(data)) for f in parser.feed(data[i : i + 1])]
    assert frames == EVERY_KIND


# -- golden bytes (MessagePack spec: fixarray 0x90|n, positive fixint, fixstr 0xa0|n, bin8 0xc4 n,
# fixmap 0x80|n, nil 0xc0; the length prefix is a little-endian base-128 varint) -----------------

GOLDEN: list[tuple[ServiceFrame, bytes]] = [
    (Ping(), b"\x02" + b"\x91\x03"),
    (Ping({"shutdown": "fin"}), b"\x0f" + b"\x93\x03" + b"\xa8shutdown" + b"\xa3fin"),
    (ConnectionData("c1", b"\x01\x02"), b"\x0a" + b"\x94\x06" + b"\xa2c1" + b"\xc4\x02\x01\x02" + b"\x80"),
    (Ack(7), b"\x05" + b"\x94\x14\x07\x01\xc0"),
    (ErrorCompletion("i", "c", "s", "e"), b"\x0b" + b"\x96\x25\xa1i\xa1c\xa1s\xa1e\x80"),
    (Ack(300, ACK_ERROR, "x"), b"\x08" + b"\x94\x14" + b"\xcd\x01\x2c" + b"\x04" + b"\xa1x"),
    (GroupCommand(True, "c", "g", 1), b"\x07" + b"\x94\x12\xa1c\xa1g\x01"),
    (GroupCommand(False, "c", "g", 1), b"\x07" + b"\x94\x13\xa1c\xa1g\x01"),
    (CloseConnection("c"), b"\x07" + b"\x95\x05\xa1c\xc0\x80\x80"),
    # 207-byte body: the prefix takes two bytes, 207 = 0x4f | 0x80, then 207 >> 7 = 1
    (ConnectionData("c", b"x" * 200), b"\xcf\x01" + b"\x94\x06\xa1c\xc4\xc8" + b"x" * 200 + b"\x80"),
]


@pytest.mark.parametrize(("frame", "golden"), GOLDEN, ids=lambda x: type(x).__name__)
def test_golden_bytes(frame: ServiceFrame, golden: bytes) -> None:
    assert encode_frame(frame) == golden
    assert ServiceFrameParser().feed(golden) == [frame]


# -- hostile input ----------------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5), inner, max_size=4)
    ),
    max_leaves=25,
)
_types = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 18, 19, 20, 21, -1, True, 2**40])


def _framed(body: bytes) -> bytes:
    return write_varint(len(body)) + body


def _feed_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(ServiceProtocolError):
        _parse_all(data, cuts, max_frame=4096)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=5))
def test_random_bytes_only_raise_protocol_errors(data: bytes, cuts: list[int]) -> None:
    _feed_only_protocol_errors(data, cuts)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_values, max_size=3), st.lists(st.integers(0, 300), max_size=5))
def test_random_msgpack_values_only_raise_protocol_errors(values: list[Any], cuts: list[int]) -> None:
    data = b"".join(_framed(msgspec.msgpack.encode(v)) for v in values)
    _feed_only_protocol_errors(data, cuts)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(_types, st.lists(_values, max_size=7))
def test_random_fields_of_every_type_only_raise_protocol_errors(kind: Any, fields: list[Any]) -> None:
    """Arrays that start like a frame, with random fields: a frame decodes with fields of the declared
    types, or is refused."""
    body = msgspec.msgpack.encode([kind, *fields])
    try:
        frames = ServiceFrameParser().feed(_framed(body))
    except ServiceProtocolError:
        return
    assert len(frames) == 1
    _check_types(frames[0])


def _check_types(frame: ServiceFrame) -> None:
    for name in ("connection_id", "user_id", "group"):
        if hasattr(frame, name):
            assert isinstance(getattr(frame, name), str)
    for name in ("connection_ids", "user_ids", "excluded", "groups"):
        if hasattr(frame, name):
            assert all(isinstance(v, str) for v in getattr(frame, name))
    if hasattr(frame, "payloads"):
        payloads = frame.payloads
        assert payloads and all(isinstance(k, str) and isinstance(v, bytes) for k, v in payloads.items())
    if isinstance(frame, ConnectionData):
        assert isinstance(frame.payload, bytes)
    if hasattr(frame, "ext"):
        assert all(isinstance(k, str) for k in frame.ext)
    if isinstance(frame, OpenConnection):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.headers.items())
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.query.items())
    if isinstance(frame, Ack | GroupCommand):
        assert type(frame.ack_id) is int
    if isinstance(frame, Ping):
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in frame.values.items())


@pytest.mark.parametrize(
    "body",
    [
        b"\x91" * 100_000 + b"\xc0",  # nested deeper than the decoder's recursion limit
        b"\xdd\xff\xff\xff\xff",  # an array announcing 4G elements in 5 bytes
        b"\xc7\x0c\xff" + b"\xff" * 12,  # an invalid timestamp extension
        b"\x92\xc3\xc0",  # [True, nil]: a bool is not frame type 1
        b"\x92\x14\x01",  # Ack with too few fields
        b"\x94\x14\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00\x01\xc0",  # Ack with a float id
        b"\x94\x06\xa1c\xa1x\x80",  # ConnectionData whose payload is a string
        b"\x93\x07\x91\xa1c\x81\xa4json\xa1x",  # payloads map to a string, not bytes
        b"\x93\x07\x91\xa1c\x80",  # no payload at all
        b"\x94\x06\xa1c\xc4\x00\x81\x01\x02",  # an ext map with an integer key
        b"\x92\xa1x\x01",  # the type is a string
        b"\x91\x63",  # unknown type 99
    ],
)
def test_malformed_frames_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser().feed(_framed(body))


def test_a_bool_is_not_a_frame_type() -> None:
    body = msgspec.msgpack.encode([True, 1, 0, None, 1, {}])  # would be a HandshakeRequest with type 1
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser().feed(_framed(body))
    body = msgspec.msgpack.encode([20, True, 1, None])  # nor an ack id
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser().feed(_framed(body))


def test_a_link_handshake_of_another_version_is_kept_for_the_acceptor_to_refuse() -> None:
    (frame,) = ServiceFrameParser().feed(encode_frame(HandshakeRequest(2, {})))
    assert isinstance(frame, HandshakeRequest) and frame.version == 2


# -- the frame bound --------------------------------------------------------------------------------


def test_an_oversized_frame_is_refused_from_its_length_prefix_alone() -> None:
    parser = ServiceFrameParser(max_frame=1000)
    with pytest.raises(ServiceProtocolError, match="1001 bytes exceeds 1000"):
        parser.feed(write_varint(1001))  # nothing of the body has come, nothing is waited for


def test_a_huge_length_prefix_is_refused_at_once() -> None:
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser().feed(b"\xff\xff\xff\xff\x07")  # 2**31 - 1 announced
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser().feed(b"\xff\xff\xff\xff\xff")  # a sixth varint byte would be needed


def test_a_frame_at_the_bound_is_buffered_and_parsed() -> None:
    frame = ConnectionData("c", b"x" * 900)
    data = encode_frame(frame)
    parser = ServiceFrameParser(max_frame=len(data) - 2)  # the body only; its prefix is 2 bytes
    assert parser.feed(data[:500]) == []
    assert parser.feed(data[500:]) == [frame]
    with pytest.raises(ServiceProtocolError):
        ServiceFrameParser(max_frame=len(data) - 3).feed(data[:2])


def test_the_bound_holds_after_frames_in_the_same_chunk() -> None:
    parser = ServiceFrameParser(max_frame=100)
    with pytest.raises(ServiceProtocolError):
        parser.feed(encode_frame(Ping()) + write_varint(101))


# -- tokens -----------------------------------------------------------------------------------------


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def test_a_link_token_verifies_only_as_a_link_token_for_its_hub() -> None:
    token = link_token(KEY, NODE, "chat")
    assert verify(KEY, token, "server", "chat") is not None
    assert verify(KEY, token, "client", "chat") is None
    assert verify(KEY, token, "server", "Chat") is None
    assert verify(KEY, token, "server", "hat") is None
    assert verify(KEY, token, "server", "chat2") is None
    # another node of the same service (another host name) accepts it: the key authenticates
    assert verify(KEY, link_token(KEY, "https://other:1/", "chat"), "server", "chat") is not None


def test_a_client_token_verifies_only_as_a_client_token_for_its_hub() -> None:
    token = client_token(KEY, client_audience(NODE, "chat"), Principal("alice", {"sub": "alice"}))
    assert verify(KEY, token, "client", "chat") is not None
    assert verify(KEY, token, "server", "chat") is None
    assert verify(KEY, token, "client", "other") is None


def test_a_hub_name_cannot_smuggle_another_audience() -> None:
    token = link_token(KEY, NODE, "x/server/?hub=chat")
    assert _claims(token)["aud"].endswith("x%2Fserver%2F%3Fhub%3Dchat")
    assert verify(KEY, token, "server", "chat") is None
    token = client_token(KEY, client_audience(NODE, "a&hub=chat"), None)
    assert verify(KEY, token, "client", "chat") is None


def _signed(claims: dict[str, Any], key: str = KEY, alg: str = "HS256") -> str:
    return jwt.encode(claims, key, alg)


@pytest.mark.filterwarnings("ignore:The HMAC key")
def test_expired_foreign_and_exp_less_tokens_are_refused() -> None:
    aud = NODE + "/server/?hub=chat"
    now = int(time.time())
    assert verify(KEY, _signed({"aud": aud, "exp": now + 60}), "server", "chat") is not None
    assert verify(KEY, _signed({"aud": aud, "exp": now - 5}), "server", "chat") is None
    assert verify(KEY, link_token(KEY, NODE, "chat", lifetime=-5), "server", "chat") is None
    assert verify(KEY, _signed({"aud": aud}), "server", "chat") is None  # no exp
    assert verify(KEY, _signed({"aud": aud, "exp": "soon"}), "server", "chat") is None
    assert verify(KEY, _signed({"aud": aud, "exp": now + 60}, KEY + "x"), "server", "chat") is None
    assert verify(KEY, _signed({"aud": aud, "exp": now + 60}, alg="HS512"), "server", "chat") is None
    assert verify(KEY, _signed({"exp": now + 60}), "server", "chat") is None  # no aud
    assert verify(KEY, _signed({"aud": [aud], "exp": now + 60}), "server", "chat") is None
    assert verify(KEY, _signed({"aud": aud, "exp": now + 60, "nbf": now + 60}), "server", "chat") is None


def test_an_unsigned_token_is_refused() -> None:
    aud = NODE + "/server/?hub=chat"
    unsigned = jwt.encode({"aud": aud, "exp": int(time.time()) + 60}, None, algorithm="none")
    assert verify(KEY, unsigned, "server", "chat") is None
    assert verify(KEY, "not a token", "server", "chat") is None
    assert verify(KEY, "", "server", "chat") is None


def _request(token: str | None, hub: str | None = "chat", header: bool = True) -> RequestInfo:
    headers = {"authorization": f"Bearer {token}"} if token is not None and header else {}
    query = {"hub": hub} if hub is not None else {}
    if token is not None and not header:
        query["access_token"] = token
    return RequestInfo("/client/", headers, query, {})


def test_the_client_authenticator_gives_the_user_the_app_server_vouched_for() -> None:
    auth = ClientAuthenticator(KEY)
    alice = Principal("alice", {"sub": "alice", "role": "admin"})
    token = client_token(KEY, client_audience(NODE, "chat"), alice)
    for header in (True, False):
        principal = auth(_request(token, header=header))
        assert principal is not None
        assert principal.identifier == "alice"
        assert principal.claims[CLAIMS] == {"sub": "alice", "role": "admin"}


def test_the_client_authenticator_keeps_anonymous_users_anonymous() -> None:
    auth = ClientAuthenticator(KEY)
    principal = auth(_request(client_token(KEY, client_audience(NODE, "chat"), None)))
    assert principal is not None and principal.identifier is None and CLAIMS not in principal.claims
    # a principal whose identifier is None carries its claims but no nameid
    principal = auth(_request(client_token(KEY, client_audience(NODE, "chat"), Principal(None, {"x": 1}))))
    assert principal is not None and principal.identifier is None


def test_the_client_authenticator_refuses_without_a_valid_token() -> None:
    auth = ClientAuthenticator(KEY)
    good = client_token(KEY, client_audience(NODE, "chat"), Principal("alice", {}))
    assert auth(_request(None)) is None
    assert auth(_request(good, hub=None)) is None
    assert auth(_request(good, hub="other")) is None
    assert auth(_request(link_token(KEY, NODE, "chat"))) is None
    assert auth(_request(client_token(KEY + "x", client_audience(NODE, "chat"), None))) is None
    assert auth(_request(client_token(KEY, client_audience(NODE, "chat"), None, lifetime=-5))) is None
    # a nameid that is not a string names no user
    odd = _signed({"aud": client_audience(NODE, "chat"), "exp": int(time.time()) + 60, "nameid": 5})
    principal = auth(_request(odd))
    assert principal is not None and principal.identifier is None


def test_ack_defaults() -> None:
    assert Ack(1).status == ACK_OK


def test_a_short_access_key_is_refused() -> None:
    """Every client sees a token signed with the key: a short key would be guessed offline."""
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ClientAuthenticator("secret")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        check_access_key("x" * 31)
    assert check_access_key("x" * 32) == "x" * 32


async def test_an_idle_link_sends_one_ping_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing queued: the writer gets a Ping after the keep-alive interval, and the next batch
    waits a whole interval again (not at once: a link must not spin on pings)."""
    import asyncio
    import time

    from hubwire.service import outgoing

    monkeypatch.setattr(outgoing, "LINK_PING", 0.2)
    out = outgoing.Outgoing()
    started = time.monotonic()
    first = await out.batch()
    out.sent(len(first))
    second = await out.batch()
    waited = time.monotonic() - started
    assert first == second == encode_frame(Ping())
    assert waited >= 0.35, waited  # two intervals, not one
    out.put(b"x")
    assert await asyncio.wait_for(out.batch(), 1) == b"x"  # a frame goes at once
