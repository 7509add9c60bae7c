"""The Redis backplane envelopes, byte for byte as ASP.NET Core's StackExchangeRedis backplane writes them."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hubwire.protocol import InvalidDataError, InvocationMessage, JsonHubProtocol, MessagePackHubProtocol
from hubwire.protocol.backplane import (
    GROUP_ADD,
    GROUP_REMOVE,
    BackplaneChannels,
    GroupCommand,
    RedisInvocation,
    decode_ack,
    decode_completion,
    decode_group_command,
    decode_invocation,
    encode_ack,
    encode_completion,
    encode_group_command,
    encode_invocation,
    is_from,
    origin_marker,
)

JSON_SEND = b'{"type":1,"target":"Send","arguments":["hi"]}\x1e'
MSGPACK_SEND = bytes.fromhex("0e 96 01 80 c0 a4 53 65 6e 64 91 a2 68 69 90")
# SendAll("Send", ["hi"]) with json + messagepack: 85 bytes (digest 6.3)
SEND_ALL = (
    bytes.fromhex("92 90 82 a4 6a 73 6f 6e c4 2e")
    + JSON_SEND
    + bytes.fromhex("ab 6d 65 73 73 61 67 65 70 61 63 6b c4 0f")
    + MSGPACK_SEND
)
GROUP_ADD_BYTES = bytes.fromhex("95 07 a9 77 65 62 31 5f 30 31 32 33 01 a4 72 6f 6f 6d a3 61 62 63")
COMPLETION = bytes.fromhex("92 a4 6a 73 6f 6e c4 2c") + b'{"type":3,"invocationId":"AbC","result":10}\x1e'


def test_send_all_envelope_is_85_bytes_and_matches_dotnet() -> None:
    assert len(SEND_ALL) == 85
    # the framed messages come from our own codecs, exactly as .NET frames them
    message = InvocationMessage("Send", ["hi"])
    assert JsonHubProtocol().write_message(message) == JSON_SEND
    assert MessagePackHubProtocol().write_message(message) == MSGPACK_SEND
    encoded = encode_invocation(RedisInvocation({"json": JSON_SEND, "messagepack": MSGPACK_SEND}))
    assert encoded == SEND_ALL


def test_send_all_envelope_decodes() -> None:
    inv = decode_invocation(SEND_ALL)
    assert inv.excluded == []
    assert inv.serializations == {"json": JSON_SEND, "messagepack": MSGPACK_SEND}
    assert inv.invocation_id is None and inv.return_channel is None


def test_client_result_request_envelope_both_ways() -> None:
    sers = {"json": JSON_SEND}
    encoded = encode_invocation(RedisInvocation(sers, ["x1"], "id22", "chan"))
    assert encoded.startswith(bytes.fromhex("94 91 a2 78 31 81"))
    assert encoded.endswith(bytes.fromhex("a4 69 64 32 32 a4 63 68 61 6e"))
    inv = decode_invocation(encoded)
    assert (inv.excluded, inv.invocation_id, inv.return_channel) == (["x1"], "id22", "chan")


def test_decoder_ignores_unknown_protocols_and_extra_elements() -> None:
    import msgspec

    data = msgspec.msgpack.encode([[], {"blazorpack": b"x", "json": JSON_SEND}, None])
    inv = decode_invocation(data)
    assert inv.serializations["json"] == JSON_SEND
    assert inv.invocation_id is None


def test_group_command_bytes_both_ways() -> None:
    command = GroupCommand(7, "web1_0123", GROUP_ADD, "room", "abc")
    assert encode_group_command(command) == GROUP_ADD_BYTES
    assert decode_group_command(GROUP_ADD_BYTES) == command
    remove = GroupCommand(70000, "s", GROUP_REMOVE, "g", "c")
    assert decode_group_command(encode_group_command(remove)) == remove


def test_ack_bytes_both_ways() -> None:
    assert encode_ack(7) == bytes.fromhex("91 07")
    assert decode_ack(bytes.fromhex("91 07")) == 7
    assert decode_ack(bytes.fromhex("91 ce 00 01 00 00")) == 65536  # any int width is accepted


def test_completion_bytes_both_ways() -> None:
    framed = b'{"type":3,"invocationId":"AbC","result":10}\x1e'
    assert encode_completion("json", framed) == COMPLETION
    assert decode_completion(COMPLETION) == ("json", framed)


def test_channel_names_follow_signalr() -> None:
    ch = BackplaneChannels("MyApp", "MyApp.Hubs.ChatHub")
    assert ch.all == "MyAppMyApp.Hubs.ChatHub:all"
    assert ch.group("room") == "MyAppMyApp.Hubs.ChatHub:group:room"
    assert ch.user("u") == "MyAppMyApp.Hubs.ChatHub:user:u"
    assert ch.connection("c") == "MyAppMyApp.Hubs.ChatHub:connection:c"
    assert ch.group_management == "MyAppMyApp.Hubs.ChatHub:internal:groups"
    assert ch.ack("srv") == "MyAppMyApp.Hubs.ChatHub:internal:ack:srv"
    assert ch.return_results("srv") == "MyAppMyApp.Hubs.ChatHub:internal:return:srv"


@pytest.mark.parametrize("decoder", [decode_invocation, decode_group_command, decode_ack, decode_completion])
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_decoders_raise_only_invalid_data(decoder: object, data: bytes) -> None:
    with contextlib.suppress(InvalidDataError):
        decoder(data)  # type: ignore[operator]


# ------------------------------------------------------------------------------------------------
# ASP.NET Core's own test vectors
# ------------------------------------------------------------------------------------------------
# Byte for byte from dotnet/aspnetcore, src/SignalR/server/StackExchangeRedis/test/RedisProtocolTests.cs
# (_ackTestData, _groupCommandTestData and _invocationTestData, the same in the stored revisions
# 062aa732634389652c6d431d40244484032a1a00 and 6df502e2cba25d45f4208d872dfeae2de3780259;
# _completionMessageTestData from a later revision of the same file, which added client results).
# Their invocation vectors use two dummy hub protocols, "p1" and "p2", that serialize any message to
# the single byte 0x2A: the envelope around the serializations is what they pin.

DOTNET_ACKS = {
    0: bytes([0x91, 0x00]),
    42: bytes([0x91, 0x2A]),
    180: bytes([0x91, 0xCC, 0xB4]),
    384: bytes([0x91, 0xCD, 0x01, 0x80]),
    70_000: bytes([0x91, 0xCE, 0x00, 0x01, 0x11, 0x70]),
}
DOTNET_GROUP_COMMANDS = {
    GROUP_ADD: bytes([0x95, 0x2A, 0xA1, ord("S"), 0x01, 0xA1, ord("G"), 0xA1, ord("C")]),
    GROUP_REMOVE: bytes([0x95, 0x2A, 0xA1, ord("S"), 0x02, 0xA1, ord("G"), 0xA1, ord("C")]),
}
_DUMMY_SERIALIZATIONS = bytes([0x82, 0xA2, ord("p"), ord("1"), 0xC4, 0x01, 0x2A, 0xA2, ord("p"), ord("2")])
_DUMMY_SERIALIZATIONS += bytes([0xC4, 0x01, 0x2A])
DOTNET_INVOCATIONS = {
    "NoExcludedIds": ([], bytes([0x92, 0x90]) + _DUMMY_SERIALIZATIONS),
    "OneExcludedId": (["a"], bytes([0x92, 0x91, 0xA1, ord("a")]) + _DUMMY_SERIALIZATIONS),
    "ManyExcludedIds": (
        ["a", "b", "c", "d", "e", "f"],
        bytes([0x92, 0x96]) + b"".join(bytes([0xA1, ord(c)]) for c in "abcdef") + _DUMMY_SERIALIZATIONS,
    ),
}
_JSON_COMPLETION = b'{"type":3,"invocationId":"1","result":1}'
_MSGPACK_COMPLETION = bytes([0x95, 0x03, 0x80, 0xA3, ord("x"), ord("y"), ord("z"), 0x03, 0x2A])
DOTNET_COMPLETIONS = {
    "JsonMessageForwarded": ("json", _JSON_COMPLETION, bytes([0x92, 0xA4]) + b"json" + bytes([0xC4, 0x28])),
    "MsgPackMessageForwarded": (
        "messagepack",
        _MSGPACK_COMPLETION,
        bytes([0x92, 0xAB]) + b"messagepack" + bytes([0xC4, 0x09]),
    ),
}


@pytest.mark.parametrize("ack_id", list(DOTNET_ACKS))
def test_dotnet_ack_vectors(ack_id: int) -> None:
    assert encode_ack(ack_id) == DOTNET_ACKS[ack_id]
    assert decode_ack(DOTNET_ACKS[ack_id]) == ack_id


@pytest.mark.parametrize("action", [GROUP_ADD, GROUP_REMOVE], ids=["GroupAdd", "GroupRemove"])
def test_dotnet_group_command_vectors(action: int) -> None:
    command = GroupCommand(42, "S", action, "G", "C")
    assert encode_group_command(command) == DOTNET_GROUP_COMMANDS[action]
    assert decode_group_command(DOTNET_GROUP_COMMANDS[action]) == command


@pytest.mark.parametrize("name", list(DOTNET_INVOCATIONS))
def test_dotnet_invocation_vectors(name: str) -> None:
    excluded, encoded = DOTNET_INVOCATIONS[name]
    serializations = {"p1": b"\x2a", "p2": b"\x2a"}
    assert encode_invocation(RedisInvocation(serializations, excluded)) == encoded
    decoded = decode_invocation(encoded)
    assert decoded.excluded == excluded
    assert decoded.serializations == serializations
    assert decoded.invocation_id is None and decoded.return_channel is None


@pytest.mark.parametrize("name", list(DOTNET_COMPLETIONS))
def test_dotnet_completion_vectors(name: str) -> None:
    protocol, message, head = DOTNET_COMPLETIONS[name]
    assert encode_completion(protocol, message) == head + message
    assert decode_completion(head + message) == (protocol, message)


SERVER = "host-1_0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40])
def test_own_envelopes_are_recognised_from_their_tail(seq: int) -> None:
    data = encode_invocation(RedisInvocation({"json": JSON_SEND}, ["c1"], origin=SERVER, seq=seq))
    assert is_from(data, origin_marker(SERVER))
    assert not is_from(data, origin_marker(SERVER[:-1] + "0"))
    assert not is_from(data, origin_marker("x" + SERVER))


def test_envelopes_without_that_origin_are_not_taken_for_own() -> None:
    marker = origin_marker(SERVER)
    plain = encode_invocation(RedisInvocation({"messagepack": marker + b"\x05"}))
    assert not is_from(plain, marker)  # a payload ending like an origin: not the 6-element envelope
    result_request = encode_invocation(
        RedisInvocation({"json": JSON_SEND}, invocation_id="1", return_channel=f"p:internal:return:{SERVER}")
    )
    assert not is_from(result_request, marker)
    # a client-result request of this origin: still its own envelope
    both = RedisInvocation({"json": JSON_SEND}, origin=SERVER, seq=7)
    both.invocation_id, both.return_channel = "1", f"p:internal:return:{SERVER}"
    assert is_from(encode_invocation(both), marker)
    assert not is_from(b"", marker) and not is_from(marker, marker)


@settings(max_examples=300, deadline=None)
@given(
    sers=st.dictionaries(st.sampled_from(["json", "messagepack"]), st.binary(max_size=80)),
    excluded=st.lists(st.text(max_size=12), max_size=3),
    origin=st.one_of(st.none(), st.sampled_from([SERVER, SERVER[:-1] + "1", "other", SERVER + "x"])),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_is_from_agrees_with_decoding(
    sers: dict[str, bytes], excluded: list[str], origin: str | None, seq: int
) -> None:
    data = encode_invocation(RedisInvocation(sers, excluded, origin=origin, seq=seq if origin else None))
    assert is_from(data, origin_marker(SERVER)) == (decode_invocation(data).origin == SERVER)
