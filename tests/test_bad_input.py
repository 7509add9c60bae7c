"""Bad input over a live server: the offending connection is closed the SignalR way, others keep working.

Every test runs a real ``hubwire run tests.apps.foundation:app`` process and talks to it with raw
``websockets`` clients (see tests/rawhub.py), so what is checked is exactly what goes over the wire.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
from websockets.exceptions import InvalidStatus

from .rawhub import RS, RawHub, frame_msgpack, open_ws, varint, ws_url

APP = "tests.apps.foundation:app"
CONNECTION_ERROR = {"type": 7, "error": "Connection closed with an error.", "allowReconnect": True}
CONNECTION_ERROR_TEXT = '{"type":7,"error":"Connection closed with an error.","allowReconnect":true}'
MAX = 32768


@pytest.fixture
def server(start_server: Callable[..., Any]) -> Any:
    return start_server(APP)


@pytest.fixture
async def bystander(server: Any) -> AsyncIterator[RawHub]:
    """A well-behaved client connected before the misbehaving one; must be unaffected."""
    hub = await RawHub.open(server.url)
    assert await hub.invoke("echo", "before") == "before"
    yield hub
    # the server is still serving it after the bad client is gone
    assert await hub.invoke("echo", "after") == "after"
    assert await hub.invoke("add", 2, 3) == 5
    await hub.close()


async def bad_json_connection(server: Any) -> RawHub:
    return await RawHub.open(server.url)


async def assert_closed_with_error(hub: RawHub) -> None:
    record = await hub.next_record()
    while hub.decode(record).get("type") == 6:
        record = await hub.next_record()
    assert record.decode() == CONNECTION_ERROR_TEXT
    await hub.expect_closed()


async def assert_msgpack_closed_with_error(hub: RawHub) -> None:
    message = await hub.expect_close_message()
    assert message == [7, "Connection closed with an error.", True]
    await hub.expect_closed()


# ------------------------------------------------------------------------------------------------
# after the handshake
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        '{"type":1,"invocationId":"1","target":"echo"' + RS,  # truncated JSON
        "not json at all" + RS,
        "[1,2,3]" + RS,  # not an object
        '{"target":"echo","arguments":[]}' + RS,  # no type
        '{"type":1,"invocationId":"1","target":"echo"}' + RS,  # no arguments
        '{"type":3,"invocationId":"1","result":1,"error":"x"}' + RS,  # result and error
        b"\xff\xfe\xfd" + RS.encode(),  # invalid UTF-8 (Binary frame)
    ],
    ids=["truncated", "garbage", "array", "no-type", "no-arguments", "result-and-error", "bad-utf8"],
)
async def test_malformed_json_after_handshake(server: Any, bystander: RawHub, payload: str | bytes) -> None:
    bad = await bad_json_connection(server)
    assert await bad.invoke("echo", "ok") == "ok"
    await bad.send_raw(payload)
    await assert_closed_with_error(bad)


async def test_malformed_json_after_good_record_in_same_frame(server: Any, bystander: RawHub) -> None:
    bad = await bad_json_connection(server)
    good = '{"type":1,"invocationId":"7","target":"echo","arguments":["first"]}'
    await bad.send_raw(good + RS + "{oops" + RS)
    # .NET dispatches the good record before it parses the bad one, so its Completion may come first
    message = await bad.next_message()
    if message.get("type") == 3:
        assert message == {"type": 3, "invocationId": "7", "result": "first"}
        message = await bad.next_message()
    assert message == CONNECTION_ERROR
    await bad.expect_closed()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x03\xc1\xc1\xc1",  # 0xc1 is never valid MessagePack
        frame_msgpack("not an array"),
        frame_msgpack([]),
        frame_msgpack([1, {}, None, "echo"]),  # too short
        frame_msgpack([1, [], None, "echo", ["x"]]),  # headers not a map
        frame_msgpack([3, {}, "1", 9, None]),  # unknown result kind
        b"\x03\x94\x01\x80",  # truncated array inside a complete record
        b"\xff\xff\xff\xff\x0f",  # length prefix over 2 GB
    ],
    ids=["c1", "string", "empty", "short", "headers", "result-kind", "truncated", "huge-prefix"],
)
async def test_malformed_messagepack(server: Any, bystander: RawHub, payload: bytes) -> None:
    bad = await RawHub.open(server.url, protocol="messagepack")
    assert await bad.invoke("echo", "ok") == "ok"
    await bad.send_raw(payload)
    await assert_msgpack_closed_with_error(bad)


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_unknown_message_type_is_ignored(server: Any, bystander: RawHub, protocol: str) -> None:
    hub = await RawHub.open(server.url, protocol=protocol)
    unknown: Any = [99, {}, "x"] if protocol == "messagepack" else {"type": 99, "future": {"a": [1]}}
    await hub.send(unknown)
    assert await hub.invoke("echo", "still") == "still"
    # also when batched in one frame with a real invocation
    invocation = hub.invocation("echo", ["batched"], "b1")
    data = hub.encode(unknown)
    frame = data + hub.encode(invocation)
    await hub.send_raw(frame)
    message = await hub.next_message()
    if protocol == "messagepack":
        assert message == [3, {}, "b1", 3, "batched"]
    else:
        assert message == {"type": 3, "invocationId": "b1", "result": "batched"}
    await hub.close()


def _json_invocation_of_size(total: int) -> str:
    """A JSON echo invocation whose record plus separator is exactly ``total`` bytes."""
    base = '{"type":1,"invocationId":"1","target":"echo","arguments":[""]}' + RS
    return base.replace('[""]', '["' + "x" * (total - len(base)) + '"]')


async def test_oversized_json_message(server: Any, bystander: RawHub) -> None:
    bad = await bad_json_connection(server)
    await bad.send_raw('{"type":1,"target":"echo","arguments":["' + "x" * 40000 + '"]}' + RS)
    await assert_closed_with_error(bad)


async def test_json_message_at_the_limit(server: Any, bystander: RawHub) -> None:
    hub = await bad_json_connection(server)
    exact = _json_invocation_of_size(MAX)
    assert len(exact.encode()) == MAX
    await hub.send_raw(exact)
    message = await hub.next_message()
    assert message["invocationId"] == "1" and len(message["result"]) > 32000
    # one byte more and the same message is refused
    await hub.send_raw(_json_invocation_of_size(MAX + 1))
    await assert_closed_with_error(hub)


async def test_oversized_json_message_before_it_is_complete(server: Any, bystander: RawHub) -> None:
    bad = await bad_json_connection(server)
    # no record separator ever arrives: the server must not wait for it
    await bad.send_raw('{"type":1,"target":"echo","arguments":["' + "x" * 20000)
    await bad.send_raw("x" * 20000)
    await assert_closed_with_error(bad)


async def test_oversized_messagepack_message(server: Any, bystander: RawHub) -> None:
    bad = await RawHub.open(server.url, protocol="messagepack")
    await bad.send_raw(frame_msgpack([1, {}, "1", "echo", ["x" * 40000], []]))
    await assert_msgpack_closed_with_error(bad)


async def test_oversized_messagepack_announced_by_prefix(server: Any, bystander: RawHub) -> None:
    bad = await RawHub.open(server.url, protocol="messagepack")
    await bad.send_raw(varint(1_000_000) + b"\x96\x01")  # only the length prefix so far
    await assert_msgpack_closed_with_error(bad)


async def test_client_close_message(server: Any, bystander: RawHub) -> None:
    hub = await bad_json_connection(server)
    await hub.send({"type": 7})
    message = await hub.next_message()
    assert message == {"type": 7}
    await hub.expect_closed()


# ------------------------------------------------------------------------------------------------
# handshake
# ------------------------------------------------------------------------------------------------


async def _raw_handshake(server: Any, data: str | bytes, path: str = "/hub") -> RawHub:
    hub = RawHub(await open_ws(ws_url(server.url, path)), "json")
    await hub.send_raw(data)
    return hub


async def _assert_handshake_error(hub: RawHub, error: str) -> None:
    response = await hub.handshake_response()
    assert response == {"error": error}
    await hub.expect_closed()


async def test_unknown_protocol(server: Any, bystander: RawHub) -> None:
    hub = await _raw_handshake(server, '{"protocol":"xyz","version":1}' + RS)
    await _assert_handshake_error(hub, "The protocol 'xyz' is not supported.")


@pytest.mark.parametrize("protocol", ["json", "messagepack"])
async def test_handshake_version_too_high(server: Any, bystander: RawHub, protocol: str) -> None:
    hub = await _raw_handshake(server, json.dumps({"protocol": protocol, "version": 3}) + RS)
    await _assert_handshake_error(hub, f"The server does not support version 3 of the '{protocol}' protocol.")


@pytest.mark.parametrize("version", [0, 1, 2])
async def test_handshake_versions_accepted(server: Any, version: int) -> None:
    hub = await RawHub.open(server.url, version=version)
    assert await hub.invoke("echo", "v") == "v"
    await hub.close()


@pytest.mark.parametrize(
    "data",
    [
        "hello" + RS,
        b"\x00\xff\xfe" + RS.encode(),
        '{"type":6}' + RS,  # a hub message before the handshake
        '{"protocol":"json"}' + RS,  # no version
        '{"version":1}' + RS,  # no protocol
        '{"protocol":"json","version":"1"}' + RS,
        "[]" + RS,
    ],
    ids=["text", "binary", "hub-message", "no-version", "no-protocol", "string-version", "array"],
)
async def test_garbage_before_handshake(server: Any, bystander: RawHub, data: str | bytes) -> None:
    hub = await _raw_handshake(server, data)
    await _assert_handshake_error(hub, "An unexpected error occurred during connection handshake.")


async def test_garbage_before_handshake_detailed(server: Any) -> None:
    hub = await _raw_handshake(server, '{"protocol":"json"}' + RS, path="/detailed")
    response = await hub.handshake_response()
    assert response["error"].startswith(
        "An unexpected error occurred during connection handshake. InvalidDataException: "
    )
    assert "version" in response["error"]
    await hub.expect_closed()


@pytest.mark.parametrize("terminated", [False, True])
async def test_oversized_handshake(server: Any, bystander: RawHub, terminated: bool) -> None:
    data = '{"protocol":"json","version":1,"pad":"' + "x" * 40000 + '"}' + (RS if terminated else "")
    hub = await _raw_handshake(server, data)
    await _assert_handshake_error(hub, "Handshake was canceled.")


async def test_handshake_split_across_frames_and_followed_by_messages(server: Any) -> None:
    hub = RawHub(await open_ws(ws_url(server.url)), "json")
    await hub.send_raw('{"protocol":"js')
    first = '{"type":1,"invocationId":"1","target":"echo","arguments":["a"]}'
    await hub.send_raw('on","version":1}' + RS + first)
    await hub.send_raw(RS + '{"type":1,"invocationId":"2","target":"add","arguments":[1,2]}' + RS)
    assert await hub.handshake_response() == {}
    assert await hub.next_message() == {"type": 3, "invocationId": "1", "result": "a"}
    assert await hub.next_message() == {"type": 3, "invocationId": "2", "result": 3}
    await hub.close()


async def test_messagepack_handshake_followed_by_messages_in_one_frame(server: Any) -> None:
    hub = RawHub(await open_ws(ws_url(server.url)), "messagepack")
    frame = (
        b'{"protocol":"messagepack","version":1}'
        + RS.encode()
        + frame_msgpack([1, {}, "1", "echo", ["m"], []])
    )
    await hub.send_raw(frame)  # handshake and first message in one Binary frame
    assert await hub.handshake_response() == {}
    assert await hub.next_message() == [3, {}, "1", 3, "m"]
    await hub.close()


# ------------------------------------------------------------------------------------------------
# transport-level requests
# ------------------------------------------------------------------------------------------------


async def _negotiate(server: Any, query: str = "negotiateVersion=1") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{server.url}/hub/negotiate?{query}")
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, dict)
    return body


async def test_websocket_unknown_id_is_404(server: Any, bystander: RawHub) -> None:
    with pytest.raises(InvalidStatus) as info:
        await open_ws(ws_url(server.url, query="id=doesnotexist"))
    assert info.value.response.status_code == 404
    assert info.value.response.body == b"No Connection with that ID"


async def test_second_websocket_on_same_token_is_409(server: Any, bystander: RawHub) -> None:
    body = await _negotiate(server)
    token = body["connectionToken"]
    first = await RawHub.open(server.url, query=f"id={token}")
    assert await first.invoke("get_connection_id") == body["connectionId"]
    with pytest.raises(InvalidStatus) as info:
        await open_ws(ws_url(server.url, query=f"id={token}"))
    assert info.value.response.status_code == 409
    # the first transport is untouched
    assert await first.invoke("echo", "mine") == "mine"
    await first.close()


async def test_negotiate_v0_id_is_the_token(server: Any) -> None:
    body = await _negotiate(server, query="")
    assert body["negotiateVersion"] == 0
    assert "connectionToken" not in body
    hub = await RawHub.open(server.url, query=f"id={body['connectionId']}")
    assert await hub.invoke("get_connection_id") == body["connectionId"]
    await hub.close()


async def test_skip_negotiation(server: Any) -> None:
    hub = await RawHub.open(server.url)  # no id: a connection created on the fly
    connection_id = await hub.invoke("get_connection_id")
    assert isinstance(connection_id, str) and len(connection_id) == 22
    assert await hub.invoke("echo", "skip") == "skip"
    await hub.close()


async def test_negotiate_get_is_405(server: Any) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{server.url}/hub/negotiate?negotiateVersion=1")
    assert response.status_code == 405


async def test_negotiate_non_integer_version(server: Any) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(f"{server.url}/hub/negotiate?negotiateVersion=abc")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"error": "The client requested a non-integer protocol version."}


# ------------------------------------------------------------------------------------------------
# frame types (digest 9.3)
# ------------------------------------------------------------------------------------------------


async def test_json_frames_are_text(server: Any) -> None:
    hub = await RawHub.open(server.url)
    assert await hub.invoke("echo", "t") == "t"
    await hub.invoke("send_to_caller", "Method", "value")
    assert hub.frame_types and all(t is str for t in hub.frame_types), hub.frame_types
    await hub.close()


async def test_messagepack_frames_are_binary(server: Any) -> None:
    hub = await RawHub.open(server.url, protocol="messagepack")  # handshake sent as a Text frame
    assert await hub.invoke("echo", "b") == "b"
    await hub.send([1, {}, "2", "send_to_caller", ["Method", "value"], []])
    received = [await hub.next_message(), await hub.next_message()]
    assert [1, {}, None, "Method", ["value"], []] in received
    assert [3, {}, "2", 3, None] in received
    # every frame, the handshake response included, was Binary
    assert len(hub.frame_types) >= 3 and all(t is bytes for t in hub.frame_types), hub.frame_types
    await hub.close()


async def test_messagepack_handshake_response_is_binary(server: Any) -> None:
    ws = await open_ws(ws_url(server.url))
    await ws.send('{"protocol":"messagepack","version":1}' + RS)
    response = await ws.recv()
    assert isinstance(response, bytes)
    assert response == b"{}" + RS.encode()
    await ws.send(frame_msgpack([1, {}, "1", "echo", ["x"], []]))
    reply = await ws.recv()
    assert isinstance(reply, bytes)
    assert msgspec.msgpack.decode(reply[1:]) == [3, {}, "1", 3, "x"]
    await ws.close()
