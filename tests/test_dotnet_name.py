"""Sharing one Redis with ASP.NET Core instances: a hub registered under the .NET type's full name.

Two hubwire instances serve ``ScaleHub`` as ``name="BlogApp.Hubs.ChatHub"``: every target kind
reaches clients on the other instance through channels named ``{prefix}BlogApp.Hubs.ChatHub:...``
(Redis' own channel list is checked), and messages a .NET instance would publish, built here
independently of hubwire's encoders in the layout of ASP.NET Core's RedisProtocol (see the vectors
in tests/test_backplane_protocol.py), are delivered: an invocation on the ``all`` channel, and a group
command from a .NET server, acknowledged on that server's ack channel, then a send to that group.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis

from .conftest import RedisServer, ServerProcess
from .rawhub import RawHub

APP = "tests.apps.dotnet_named:app"
PREFIX = "DotnetShare:"
HUB = f"{PREFIX}BlogApp.Hubs.ChatHub"
JSON_SEND = b'{"type":1,"target":"Send","arguments":["from dotnet"]}\x1e'


def _msgpack_send() -> bytes:
    body = msgspec.msgpack.encode([1, {}, None, "Send", ["from dotnet"], []])
    assert len(body) < 128
    return bytes([len(body)]) + body


async def _expect(hub: RawHub, target: str, args: list[Any]) -> None:
    """The next message is a call of ``target`` with ``args`` (either protocol)."""
    message = await hub.next_message()
    if hub.binary:
        assert message[0] == 1 and message[3:5] == [target, args], message
    else:
        assert (message["type"], message["target"], message["arguments"]) == (1, target, args), message


async def test_dotnet_named_hub_shares_redis(start_server: Any, redis_server: RedisServer) -> None:
    args = ["--redis", redis_server.url, "--channel-prefix", PREFIX]
    one: ServerProcess = start_server(APP, args=args)
    two: ServerProcess = start_server(APP, args=args)
    alice = await RawHub.open(one.url, query="user=alice")
    bob = await RawHub.open(two.url, protocol="messagepack", query="user=bob")
    alice_id = (await alice.invoke("whoami"))["connectionId"]
    bob_id = (await bob.invoke("whoami"))["connectionId"]
    for hub in (alice, bob):
        assert await hub.invoke("join_group", "room") is None

    # every target kind, from one instance to the other
    await alice.invoke("send_all", "a")
    for hub in (alice, bob):
        await _expect(hub, "Message", ["all", "a"])
    await alice.invoke("send_group", "room", "g")
    for hub in (alice, bob):
        await _expect(hub, "Message", ["group", "g"])
    await alice.invoke("send_user", "bob", "u")
    await _expect(bob, "Message", ["user", "u"])
    await alice.invoke("send_client", bob_id, "c")
    await _expect(bob, "Message", ["client", "c"])
    assert await bob.invoke("add_to_group", alice_id, "remote") == "ok"  # a remote group command, acked
    await bob.invoke("send_group", "remote", "r")
    await _expect(alice, "Message", ["group", "r"])

    r = redis.Redis.from_url(redis_server.url)
    try:
        channels = {c.decode() for c in r.pubsub_channels(f"{PREFIX}*")}
        expected = {
            f"{HUB}:all",
            f"{HUB}:group:room",
            f"{HUB}:group:remote",
            f"{HUB}:user:alice",
            f"{HUB}:user:bob",
            f"{HUB}:connection:{alice_id}",
            f"{HUB}:connection:{bob_id}",
            f"{HUB}:internal:groups",
        }
        assert expected <= channels, expected - channels
        # every hub channel carries the full type name: none is named after the Python class
        assert not [c for c in channels if not c.startswith((f"{HUB}:", f"{PREFIX}hubwire:internal:"))]

        # what a .NET instance publishes: an invocation envelope [excluded ids, {protocol: framed}]
        envelope = msgspec.msgpack.encode([[], {"json": JSON_SEND, "messagepack": _msgpack_send()}])
        assert r.publish(f"{HUB}:all", envelope) == 2  # both instances listen
        for hub in (alice, bob):
            await _expect(hub, "Send", ["from dotnet"])

        # a .NET server ("dotnet-1") adds alice to a group: [id, server name, action (1 = add), group,
        # connection id] on the internal groups channel; the instance holding alice acks with [id]
        acks = r.pubsub()
        acks.subscribe(f"{HUB}:internal:ack:dotnet-1")
        assert acks.get_message(timeout=5)["type"] == "subscribe"
        command = msgspec.msgpack.encode([7, "dotnet-1", 1, "dotnet", alice_id])
        assert r.publish(f"{HUB}:internal:groups", command) == 2
        deadline = time.monotonic() + 10
        ack = None
        while ack is None:
            assert time.monotonic() < deadline, "no ack from the instance holding the connection"
            ack = acks.get_message(timeout=0.5)
        assert (ack["channel"], ack["data"]) == (f"{HUB}:internal:ack:dotnet-1".encode(), bytes([0x91, 0x07]))
        acks.close()
        assert r.publish(f"{HUB}:group:dotnet", envelope) == 1  # only alice's instance has a member
        await _expect(alice, "Send", ["from dotnet"])
    finally:
        r.close()
    # nothing else reached either client: a send to both after everything above comes next
    await bob.invoke("send_all", "barrier")
    for hub in (alice, bob):
        await _expect(hub, "Message", ["all", "barrier"])
    await alice.close()
    await bob.close()
    for server in (one, two):
        assert "Traceback" not in server.output(), server.output()[-3000:]
