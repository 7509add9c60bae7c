"""The service's REST data plane (hubwire.service.rest): sends and group membership over HTTP.

One real server process serves two hubs beside ``ServiceRestApi`` (tests/apps/service_rest.py);
raw SignalR clients (JSON and MessagePack, tests/rawhub.py) and pysignalr connect to it, and
httpx calls the REST API with tokens minted by ``rest_token``. "Nothing was delivered" is shown
without sleeping: after the request, an accepted broadcast of a fresh marker is sent, and each
client's next message must be that marker (a connection's messages keep their order).

Path parsing, tokens and audiences are unit-tested in process, and Hypothesis drives random
requests through the ASGI app over a real in-memory lifetime manager: it never raises and
answers only 200/202 or a 4xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pysignalr.client import SignalRClient
from pysignalr.protocol.json import JSONProtocol

from hubwire.hubs.lifetime import InMemoryLifetimeManager
from hubwire.protocol.json_protocol import JsonHubProtocol
from hubwire.protocol.messagepack_protocol import MessagePackHubProtocol
from hubwire.service.rest import (
    RestError,
    RestRoute,
    ServiceRestApi,
    parse_route,
    request_paths,
    request_urls,
    rest_token,
    token_user,
)
from tests.apps.service_rest import ACCESS_KEY
from tests.pyclients import stop_pysignalr

from .conftest import ServerProcess
from .rawhub import RawHub

APP = "tests.apps.service_rest:app"
WAIT = 10.0
VERSIONS = ["v1", "2022-06-01"]
_markers = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(APP)
    yield proc
    proc.close()


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def send_path(version: str, hub: str, kind: str = "all", name: str = "") -> str:
    """The send path of ``kind`` (all, users, connections, groups) in one API version."""
    if version == "v1":
        return f"/api/v1/hubs/{hub}" if kind == "all" else f"/api/v1/hubs/{hub}/{kind}/{name}"
    return f"/api/hubs/{hub}/:send" if kind == "all" else f"/api/hubs/{hub}/{kind}/{name}/:send"


def member_path(version: str, hub: str, group: str, connection_id: str) -> str:
    prefix = "/api/v1/hubs" if version == "v1" else "/api/hubs"
    return f"{prefix}/{hub}/groups/{group}/connections/{connection_id}"


async def rest(
    server: ServerProcess,
    method: str,
    path: str,
    body: Any = None,
    *,
    query: str = "",
    token: str | None = "auto",
    content: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One REST call; ``token="auto"`` mints a valid one for the URL (without the query)."""
    url = server.url + path
    if token == "auto":
        token = rest_token(ACCESS_KEY, url)
    sent = dict(headers or {})
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    async with httpx.AsyncClient(timeout=WAIT) as client:
        return await client.request(
            method, url + (f"?{query}" if query else ""), json=body, content=content, headers=sent
        )


@dataclass
class Client:
    raw: RawHub
    connection_id: str
    hub: str

    async def received(self, timeout: float = WAIT) -> tuple[str, list[Any]]:
        """(target, arguments) of the next message, which must be an Invocation."""
        message = await self.raw.next_message(timeout)
        if self.raw.binary:
            assert message[0] == 1, message
            return message[3], message[4]
        assert message["type"] == 1, message
        return message["target"], message["arguments"]


Connect = Callable[..., Awaitable[Client]]


@pytest.fixture
async def connect(server: ServerProcess) -> AsyncIterator[Connect]:
    """``await connect(hub="chat", user=None, protocol="json")`` -> a connected Client."""
    opened: list[RawHub] = []

    async def open_client(hub: str = "chat", user: str | None = None, protocol: str = "json") -> Client:
        query = f"user={quote(user, safe='')}" if user is not None else ""
        raw = await RawHub.open(server.url, f"/{hub}", protocol, query)
        opened.append(raw)
        return Client(raw, await raw.invoke("get_connection_id"), hub)

    yield open_client
    for raw in opened:
        with contextlib.suppress(Exception):
            await raw.close()


async def nothing_then_marker(server: ServerProcess, *clients: Client) -> None:
    """Each client's next message is a fresh marker sent to it now: nothing came before it.

    The marker goes to each connection alone (a connection send), so other clients get nothing.
    """
    for client in clients:
        marker = f"marker-{next(_markers)}"
        path = f"/api/v1/hubs/{client.hub}/connections/{client.connection_id}"
        response = await rest(server, "POST", path, {"target": "Marker", "arguments": [marker]})
        assert response.status_code == 202, response.text
        assert await client.received() == ("Marker", [marker])


ARGS = ["text", 42, 1.5, True, None, {"nested": [1, "two", {"three": 3}]}, "ünïcødé ✓"]


# ------------------------------------------------------------------------------------------------
# delivery
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
async def test_broadcast_reaches_every_client_of_the_hub_only(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    a = await connect(protocol="json")
    b = await connect(protocol="messagepack")
    elsewhere = await connect(hub="other")
    response = await rest(server, "POST", send_path(version, "chat"), {"target": "Hello", "arguments": ARGS})
    assert response.status_code == 202
    assert response.text == "Accepted"
    assert await a.received() == ("Hello", ARGS)
    assert await b.received() == ("Hello", ARGS)
    await nothing_then_marker(server, elsewhere)


@pytest.mark.parametrize("version", VERSIONS)
async def test_excluded_connections_get_nothing(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    a, b, c = [await connect(protocol=p) for p in ("json", "messagepack", "json")]
    query = f"excluded={a.connection_id}&excluded={b.connection_id}&api-version=2022-06-01"
    response = await rest(
        server, "POST", send_path(version, "chat"), {"target": "All", "arguments": [1]}, query=query
    )
    assert response.status_code == 202
    assert await c.received() == ("All", [1])
    await nothing_then_marker(server, a, b)
    for client in (a, b, c):
        join = await rest(server, "PUT", member_path(version, "chat", "ex", client.connection_id))
        assert join.is_success
    response = await rest(
        server,
        "POST",
        send_path(version, "chat", "groups", "ex"),
        {"target": "G", "arguments": []},
        query=query,
    )
    assert response.status_code == 202
    assert await c.received() == ("G", [])
    await nothing_then_marker(server, a, b)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_user_send_reaches_each_connection_of_that_user(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    alice1 = await connect(user="alice", protocol="json")
    alice2 = await connect(user="alice", protocol="messagepack")
    bob = await connect(user="bob")
    anonymous = await connect()
    response = await rest(
        server, "POST", send_path(version, "chat", "users", "alice"), {"target": "U", "arguments": ARGS}
    )
    assert response.status_code == 202
    assert await alice1.received() == ("U", ARGS)
    assert await alice2.received() == ("U", ARGS)
    await nothing_then_marker(server, bob, anonymous)


@pytest.mark.parametrize("version", VERSIONS)
async def test_a_connection_send_reaches_that_connection(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    a = await connect(protocol="messagepack")
    b = await connect()
    path = send_path(version, "chat", "connections", a.connection_id)
    response = await rest(server, "POST", path, {"target": "C", "arguments": ["only a"]})
    assert response.status_code == 202
    assert await a.received() == ("C", ["only a"])
    await nothing_then_marker(server, b)


@pytest.mark.parametrize("version", VERSIONS)
async def test_group_membership_put_then_delete(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    member = await connect(protocol="messagepack")
    outsider = await connect()
    changed = 202 if version == "v1" else 200  # what each version's swagger documents
    put = await rest(server, "PUT", member_path(version, "chat", "room", member.connection_id))
    assert put.status_code == changed, put.text
    to_group = send_path(version, "chat", "groups", "room")
    response = await rest(server, "POST", to_group, {"target": "G", "arguments": ["in"]})
    assert response.status_code == 202
    assert await member.received() == ("G", ["in"])
    await nothing_then_marker(server, outsider)
    delete = await rest(server, "DELETE", member_path(version, "chat", "room", member.connection_id))
    assert delete.status_code == changed, delete.text
    response = await rest(server, "POST", to_group, {"target": "G", "arguments": ["out"]})
    assert response.status_code == 202
    await nothing_then_marker(server, member, outsider)


async def test_a_hub_exception_of_the_manager_is_400(server: ServerProcess, connect: Connect) -> None:
    """The chat hub allows 3 groups per connection and 64-character names (its HubOptions)."""
    a = await connect()
    for group in ("g1", "g2", "g3"):
        assert (
            await rest(server, "PUT", member_path("v1", "chat", group, a.connection_id))
        ).status_code == 202
    fourth = await rest(server, "PUT", member_path("v1", "chat", "g4", a.connection_id))
    assert (fourth.status_code, fourth.text) == (
        400,
        "The connection is already in 3 groups, the most allowed.",
    )
    long_name = await rest(server, "PUT", member_path("2022-06-01", "chat", "x" * 65, a.connection_id))
    assert (long_name.status_code, long_name.text) == (400, "Group names are limited to 64 characters.")
    response = await rest(
        server, "POST", send_path("v1", "chat", "groups", "g4"), {"target": "G", "arguments": []}
    )
    assert response.status_code == 202
    await nothing_then_marker(server, a)


async def test_hub_names_are_case_insensitive(server: ServerProcess, connect: Connect) -> None:
    a = await connect()
    response = await rest(server, "POST", "/API/V1/Hubs/CHAT", {"target": "Case", "arguments": []})
    assert response.status_code == 202
    assert await a.received() == ("Case", [])
    put = await rest(server, "PUT", f"/api/hubs/Chat/groups/Room/connections/{a.connection_id}")
    assert put.status_code == 200
    # group names keep their case: "room" is another group
    for group in ("room", "Room"):
        response = await rest(
            server, "POST", send_path("v1", "chat", "groups", group), {"target": "G", "arguments": [group]}
        )
        assert response.status_code == 202
    assert await a.received() == ("G", ["Room"])


async def test_names_are_percent_decoded_segment_by_segment(server: ServerProcess, connect: Connect) -> None:
    """``%2F`` is part of a name; the token names the URL as sent (encoded)."""
    odd = await connect(user="al ice/ü")
    plain = await connect(user="al ice")
    encoded = quote("al ice/ü", safe="")
    response = await rest(
        server, "POST", f"/api/hubs/chat/users/{encoded}/:send", {"target": "U", "arguments": []}
    )
    assert response.status_code == 202, response.text
    assert await odd.received() == ("U", [])
    await nothing_then_marker(server, plain)


async def test_arguments_may_be_left_out(server: ServerProcess, connect: Connect) -> None:
    a = await connect()
    response = await rest(server, "POST", send_path("v1", "chat"), {"target": "NoArgs"})
    assert response.status_code == 202
    assert await a.received() == ("NoArgs", [])


async def test_a_third_party_client_receives_rest_sends(server: ServerProcess) -> None:
    """pysignalr (PyPI) as the receiving client."""
    got: asyncio.Queue[list[Any]] = asyncio.Queue()
    opened = asyncio.Event()
    client = SignalRClient(
        f"{server.url}/chat", protocol=JSONProtocol(), retry_count=1, connection_timeout=int(WAIT)
    )

    async def on_rest(args: list[Any]) -> None:
        await got.put(args)

    async def on_open() -> None:
        opened.set()

    client.on("Rest", on_rest)
    client.on_open(on_open)
    task = asyncio.get_running_loop().create_task(client.run())
    try:
        await asyncio.wait_for(opened.wait(), WAIT)
        response = await rest(
            server, "POST", send_path("2022-06-01", "chat"), {"target": "Rest", "arguments": [1, "a"]}
        )
        assert response.status_code == 202
        assert await asyncio.wait_for(got.get(), WAIT) == [1, "a"]
    finally:
        await stop_pysignalr(task, WAIT)


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------


def _claims(url: str, **extra: Any) -> dict[str, Any]:
    return {"aud": url, "exp": int(time.time()) + 600, **extra}


def refused_tokens(url: str) -> dict[str, str | None]:
    """Tokens the API must refuse for a request to ``url`` (on 127.0.0.1)."""
    return {
        "missing": None,
        "garbage": "not-a-jwt",
        "expired": rest_token(ACCESS_KEY, url, lifetime=-30),
        "wrong key": rest_token("another-access-key-" + "0123456789abcdef" * 3, url),
        "other path": rest_token(ACCESS_KEY, url.replace("/chat", "/other")),
        "other host": rest_token(ACCESS_KEY, url.replace("127.0.0.1", "localhost")),
        "other scheme": rest_token(ACCESS_KEY, url.replace("http://", "https://")),
        "no exp": jwt.encode({"aud": url}, ACCESS_KEY, algorithm="HS256"),
        "no aud": jwt.encode({"exp": int(time.time()) + 600}, ACCESS_KEY, algorithm="HS256"),
        "HS512": jwt.encode(_claims(url), ACCESS_KEY, algorithm="HS512"),
        "alg none": jwt.encode(_claims(url), None, algorithm="none"),
        "not yet valid": jwt.encode(_claims(url, nbf=int(time.time()) + 600), ACCESS_KEY, algorithm="HS256"),
    }


@pytest.mark.parametrize("version", VERSIONS)
async def test_refused_tokens_are_401_and_deliver_nothing(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    a = await connect(user="alice")
    path = send_path(version, "chat")
    url = server.url + path
    for name, token in refused_tokens(url).items():
        response = await rest(server, "POST", path, {"target": "Leak", "arguments": [name]}, token=token)
        assert response.status_code == 401, (name, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
        assert token is None or token not in response.text
    basic = await rest(
        server,
        "POST",
        path,
        {"target": "Leak", "arguments": []},
        token=None,
        headers={"authorization": "Basic YTpi"},
    )
    assert basic.status_code == 401
    member = member_path(version, "chat", "g", a.connection_id)
    for name, token in refused_tokens(server.url + member).items():
        assert (await rest(server, "PUT", member, token=token)).status_code == 401, name
    response = await rest(
        server, "POST", send_path(version, "chat", "groups", "g"), {"target": "Leak", "arguments": []}
    )
    assert response.status_code == 202
    await nothing_then_marker(server, a)


BAD_BODIES = {
    "not JSON": b"{target: 1}",
    "empty": b"",
    "a list": b'["Hello", []]',
    "a string": b'"Hello"',
    "no target": b'{"arguments": []}',
    "target not a string": b'{"target": 5, "arguments": []}',
    "empty target": b'{"target": "", "arguments": []}',
    "arguments an object": b'{"target": "Leak", "arguments": {"a": 1}}',
    "arguments a string": b'{"target": "Leak", "arguments": "abc"}',
    "arguments null": b'{"target": "Leak", "arguments": null}',
    "number out of range": b'{"target": "Leak", "arguments": [1e999]}',
    "deep nesting": b'{"target": "Leak", "arguments": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    "not UTF-8": b'{"target": "Le\xffak", "arguments": []}',
    "lone surrogate": b'{"target": "Leak", "arguments": ["\\ud800"]}',
}


@pytest.mark.parametrize("version", VERSIONS)
async def test_bad_bodies_are_400_and_deliver_nothing(
    server: ServerProcess, connect: Connect, version: str
) -> None:
    a = await connect(protocol="messagepack")
    b = await connect(protocol="json")
    for name, body in BAD_BODIES.items():
        for path in (send_path(version, "chat"), send_path(version, "nohub")):
            response = await rest(
                server, "POST", path, content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, (name, path, response.text)
            assert 0 < len(response.text) < 200
    # what the hub's protocols cannot write (MessagePack: ints past 64 bits) is refused for a served
    # hub before anyone gets anything; for a hub not served here it is dropped like any send
    too_big = b'{"target": "Leak", "arguments": [123456789012345678901234567890]}'
    response = await rest(server, "POST", send_path(version, "chat"), content=too_big)
    assert (response.status_code, response.text) == (400, "The arguments cannot be written as messagepack.")
    assert (await rest(server, "POST", send_path(version, "nohub"), content=too_big)).status_code == 202
    await nothing_then_marker(server, a, b)


async def test_bodies_past_the_bound_are_413(server: ServerProcess, connect: Connect) -> None:
    a = await connect()
    limit = 1 << 20
    head, tail = b'{"target": "Big", "arguments": ["', b'"]}'
    exact = head + b"a" * (limit - len(head) - len(tail)) + tail
    assert len(exact) == limit
    response = await rest(server, "POST", send_path("v1", "chat"), content=exact)
    assert response.status_code == 202
    target, args = await a.received()
    assert (target, len(args[0])) == ("Big", limit - len(head) - len(tail))
    over = exact[: -len(tail)] + b"a" + tail
    response = await rest(server, "POST", send_path("v1", "chat"), content=over)
    assert (response.status_code, response.text) == (413, "The body is too large.")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the bound applies while reading
        for i in range(0, len(over), 65536):
            yield over[i : i + 65536]

    response = await rest(server, "POST", send_path("2022-06-01", "chat"), content=chunks())
    assert response.status_code == 413
    await nothing_then_marker(server, a)


async def test_paths_methods_and_hubs_not_served(server: ServerProcess, connect: Connect) -> None:
    a = await connect()
    for path in (
        "/",
        "/api",
        "/api/v1/hubs",
        "/api/v2/hubs/chat",
        "/api/v1/hubs/chat/users",
        "/api/v1/hubs/chat/users//x",
        "/api/hubs/chat",
        "/api/hubs/chat/:sendit",
        "/api/hubs/chat/groups/g/:send/x",
        "/api/v1/hubs/chat/groups/g/connections",
    ):
        response = await rest(server, "POST", path, {"target": "Leak", "arguments": []}, token=None)
        assert (response.status_code, response.text) == (404, "Not Found"), path
    for method, path, allow in (
        ("GET", "/api/v1/hubs/chat", "POST"),
        ("DELETE", "/api/hubs/chat/users/u/:send", "POST"),
        ("POST", f"/api/v1/hubs/chat/groups/g/connections/{a.connection_id}", "PUT, DELETE"),
    ):
        response = await rest(server, method, path, token=None)
        assert response.status_code == 405, path
        assert response.headers["allow"] == allow
    unknown = await rest(server, "POST", send_path("v1", "nohub"), {"target": "Dropped", "arguments": []})
    assert unknown.status_code == 202  # accepted and dropped: nobody serves that hub here
    assert (await rest(server, "PUT", member_path("2022-06-01", "nohub", "g", "c"))).status_code == 404
    for bad_hub in ("1chat", "ch-at", "ch%20at", "%C3%BCber"):
        response = await rest(server, "POST", f"/api/v1/hubs/{bad_hub}", {"target": "Leak", "arguments": []})
        assert response.status_code == 400, bad_hub
    long_group = await rest(server, "POST", send_path("v1", "chat", "groups", "g" * 1025), {"target": "L"})
    assert long_group.status_code == 400
    await nothing_then_marker(server, a)


async def test_the_server_log_is_clean(server: ServerProcess) -> None:
    """Every refusal above was answered, none was an error of the server."""
    assert "Traceback" not in server.output()


# ------------------------------------------------------------------------------------------------
# unit: paths, tokens, audiences
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("POST", "/api/v1/hubs/Chat", RestRoute("broadcast", "v1", "chat")),
        ("post", "/api/v1/hubs/chat/", RestRoute("broadcast", "v1", "chat")),
        ("POST", "/api/v1/hubs/chat/users/a%20b", RestRoute("user", "v1", "chat", user="a b")),
        (
            "POST",
            "/api/v1/hubs/chat/connections/c1",
            RestRoute("connection", "v1", "chat", connection_id="c1"),
        ),
        ("POST", "/api/v1/hubs/chat/groups/G%2F1", RestRoute("group", "v1", "chat", group="G/1")),
        (
            "PUT",
            "/api/v1/hubs/chat/groups/g/connections/c",
            RestRoute("add_to_group", "v1", "chat", connection_id="c", group="g"),
        ),
        (
            "DELETE",
            "/api/v1/hubs/chat/groups/g/connections/c",
            RestRoute("remove_from_group", "v1", "chat", connection_id="c", group="g"),
        ),
        ("POST", "/api/hubs/chat/:send", RestRoute("broadcast", "2022-06-01", "chat")),
        ("POST", "/api/hubs/chat/%3Asend", RestRoute("broadcast", "2022-06-01", "chat")),
        ("POST", "/API/HUBS/chat/:SEND", RestRoute("broadcast", "2022-06-01", "chat")),
        ("POST", "/api/hubs/chat/users/%C3%BC/:send", RestRoute("user", "2022-06-01", "chat", user="ü")),
        ("POST", "/api/hubs/chat/users/:send/:send", RestRoute("user", "2022-06-01", "chat", user=":send")),
        (
            "POST",
            "/api/hubs/chat/connections/c/:send",
            RestRoute("connection", "2022-06-01", "chat", connection_id="c"),
        ),
        (
            "POST",
            "/api/hubs/chat/groups/users/:send",
            RestRoute("group", "2022-06-01", "chat", group="users"),
        ),
        (
            "PUT",
            "/api/hubs/a_1/groups/g/connections/c",
            RestRoute("add_to_group", "2022-06-01", "a_1", connection_id="c", group="g"),
        ),
        (
            "DELETE",
            "/api/hubs/chat/groups/g/connections/c%2Fd",
            RestRoute("remove_from_group", "2022-06-01", "chat", connection_id="c/d", group="g"),
        ),
    ],
)
def test_parse_route(method: str, path: str, route: RestRoute) -> None:
    assert parse_route(method, path) == route


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "", 404),
        ("POST", "/", 404),
        ("POST", "/api/v1/hubs/", 404),
        ("POST", "/api/v1/hubs//users/u", 404),
        ("POST", "/api/v1/hubs/chat//", 404),
        ("POST", "/api/v1/hub/chat", 404),
        ("POST", "/api/hubs/chat/send", 404),
        ("POST", "/api/hubs/chat/users/u", 404),
        ("POST", "/api/v1/hubs/chat/users/u/:send", 404),
        ("GET", "/api/v1/hubs/chat", 405),
        ("HEAD", "/api/hubs/chat/:send", 405),
        ("POST", "/api/hubs/chat/groups/g/connections/c", 405),
        ("POST", "/api/v1/hubs/9chat", 400),
        ("POST", "/api/v1/hubs/_chat", 400),
        ("POST", "/api/v1/hubs/ch.at", 400),
        ("POST", "/api/v1/hubs/%C3%BC", 400),
        ("POST", "/api/v1/hubs/chat/users/%FF", 400),
        ("POST", "/api/v1/hubs/chat/groups/" + "g" * 1025, 400),
    ],
)
def test_parse_route_refusals(method: str, path: str, status: int) -> None:
    with pytest.raises(RestError) as caught:
        parse_route(method, path)
    assert caught.value.status == status


def test_a_group_of_1024_characters_is_taken() -> None:
    assert parse_route("POST", "/api/v1/hubs/h/groups/" + "g" * 1024).group == "g" * 1024


def test_rest_token_is_a_standard_hs256_jwt() -> None:
    token = rest_token(
        ACCESS_KEY, "https://svc.example:8443/api/v1/hubs/chat/?api-version=1#x", 120, user="u1"
    )
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(
        token, ACCESS_KEY, algorithms=["HS256"], audience="https://svc.example:8443/api/v1/hubs/chat"
    )
    assert claims["nameid"] == "u1"
    assert 115 <= claims["exp"] - time.time() <= 121
    assert token_user(claims) == "u1"
    assert token_user({"nameid": 5}) is None
    assert token_user({}) is None
    assert "nameid" not in jwt.decode(
        rest_token(ACCESS_KEY, "http://h/"), options={"verify_signature": False}
    )


def _scope(
    path: str, raw: bytes | None = None, root: str = "", host: str = "h:1", **more: Any
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "root_path": root,
        "query_string": b"",
        "headers": [(b"host", host.encode())],
        "server": ("127.0.0.1", 1),
        **more,
    }
    if raw is not None:
        scope["raw_path"] = raw
    return scope


def test_request_paths_and_urls() -> None:
    plain = _scope("/api/v1/hubs/chat/users/a b", b"/api/v1/hubs/chat/users/a%20b")
    assert request_paths(plain) == ("/api/v1/hubs/chat/users/a%20b", "/api/v1/hubs/chat/users/a b")
    assert set(request_urls(plain)) == {
        "http://h:1/api/v1/hubs/chat/users/a%20b",
        "http://h:1/api/v1/hubs/chat/users/a b",
    }
    slash = _scope("/api/v1/hubs/chat/users/a/b", b"/api/v1/hubs/chat/users/a%2Fb")
    assert request_paths(slash) == ("/api/v1/hubs/chat/users/a%2Fb", None)  # decoded: ambiguous
    assert request_urls(slash) == ["http://h:1/api/v1/hubs/chat/users/a%2Fb"]
    mounted = _scope("/svc/api/v1/hubs/chat", b"/svc/api/v1/hubs/chat", root="/svc")
    assert request_paths(mounted) == ("/api/v1/hubs/chat", "/api/v1/hubs/chat")
    assert set(request_urls(mounted)) == {"http://h:1/api/v1/hubs/chat", "http://h:1/svc/api/v1/hubs/chat"}
    old_style = _scope("/api/v1/hubs/chat", None, root="/svc")  # path without root_path, no raw_path
    assert set(request_urls(old_style)) == {"http://h:1/api/v1/hubs/chat", "http://h:1/svc/api/v1/hubs/chat"}
    no_host = _scope("/x", b"/x")
    no_host["headers"] = []
    assert request_urls(no_host) == ["http://127.0.0.1:1/x"]


def _manager() -> InMemoryLifetimeManager:
    manager = InMemoryLifetimeManager()
    manager.protocols = (JsonHubProtocol(), MessagePackHubProtocol())
    return manager


async def _call(api: ServiceRestApi, scope: dict[str, Any], body: bytes = b"") -> tuple[int, bytes]:
    pending = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await api(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    return sent[0]["status"], sent[1]["body"]


def _authorized(scope: dict[str, Any], aud: str) -> dict[str, Any]:
    scope["headers"] = [
        *scope["headers"],
        (b"authorization", f"Bearer {rest_token(ACCESS_KEY, aud)}".encode()),
    ]
    return scope


async def test_audiences_in_process() -> None:
    """Mounted under a root path, behind a default port, with the scheme's and host's case."""
    api = ServiceRestApi(ACCESS_KEY, lambda name: _manager() if name == "chat" else None)
    body = b'{"target": "T", "arguments": []}'
    accepted = [
        (
            _scope("/svc/api/v1/hubs/chat", b"/svc/api/v1/hubs/chat", root="/svc"),
            "http://h:1/svc/api/v1/hubs/chat",
        ),
        (
            _scope("/svc/api/v1/hubs/chat", b"/svc/api/v1/hubs/chat", root="/svc"),
            "http://h:1/api/v1/hubs/chat",
        ),
        (
            _scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat", host="H.example"),
            "HTTP://h.EXAMPLE:80/api/v1/hubs/chat",
        ),
        (
            _scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat", host="[::1]:8"),
            "http://[::1]:8/api/v1/hubs/chat/",
        ),
    ]
    for scope, aud in accepted:
        assert await _call(api, _authorized(scope, aud), body) == (202, b"Accepted"), aud
    refused = [
        (
            _scope("/svc/api/v1/hubs/chat", b"/svc/api/v1/hubs/chat", root="/svc"),
            "http://h:1/other/api/v1/hubs/chat",
        ),
        (_scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat"), "http://h:1/api/v1/hubs/CHAT"),
        (_scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat"), "http://h:2/api/v1/hubs/chat"),
        (_scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat"), "/api/v1/hubs/chat"),
        (_scope("/api/v1/hubs/chat", b"/api/v1/hubs/chat"), "http://h:bad/api/v1/hubs/chat"),
    ]
    for scope, aud in refused:
        assert (await _call(api, _authorized(scope, aud), body))[0] == 401, aud
    websocket: list[MutableMapping[str, Any]] = []

    async def ws_receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def ws_send(message: MutableMapping[str, Any]) -> None:
        websocket.append(message)

    await api({"type": "websocket", "path": "/x", "headers": []}, ws_receive, ws_send)
    assert websocket == [{"type": "websocket.close", "code": 1008}]


def test_an_empty_access_key_is_refused() -> None:
    with pytest.raises(ValueError, match="access_key"):
        ServiceRestApi("", lambda name: None)


# ------------------------------------------------------------------------------------------------
# property: random requests never raise
# ------------------------------------------------------------------------------------------------

_segment = st.one_of(
    st.sampled_from(
        ["api", "v1", "hubs", "chat", "CHAT", "nohub", "users", "connections", "groups", ":send", ""]
    ),
    st.text(max_size=12).map(lambda s: quote(s, safe="")),
    st.text(alphabet="%2FfAZ09:/", max_size=8),
)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_body = st.one_of(
    st.binary(max_size=200),
    st.builds(
        lambda target, args: b'{"target": %s, "arguments": %s}' % (target, args),
        st.sampled_from([b'"T"', b'""', b"5", b"null", b'"\\ud800"']),
        st.sampled_from([b"[]", b"[1, 2]", b"{}", b"null", b"[18446744073709551616]", b'["x"]']),
    ),
    _json_value.map(lambda v: json.dumps({"target": "T", "arguments": [v]}).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["POST", "PUT", "DELETE", "GET", "HEAD", "PATCH", "OPTIONS", "post", ""]),
    segments=st.lists(_segment, max_size=9),
    body=_body,
    query=st.binary(max_size=40),
    auth=st.sampled_from(["valid", "none", "garbage", "other key"]),
    max_body=st.sampled_from([16, 1 << 20]),
)
def test_random_requests_never_raise(
    method: str, segments: list[str], body: bytes, query: bytes, auth: str, max_body: int
) -> None:
    manager = _manager()
    api = ServiceRestApi(ACCESS_KEY, lambda name: manager if name == "chat" else None, max_body_size=max_body)
    path = "/" + "/".join(segments)
    raw = path.encode("utf-8")
    scope = _scope(path, raw, method=method, query_string=query)
    url = "http://h:1" + path
    tokens = {
        "valid": rest_token(ACCESS_KEY, url),
        "garbage": "x.y.z",
        "other key": rest_token("k" * 40, url),
    }
    if auth in tokens:
        scope["headers"].append((b"authorization", f"Bearer {tokens[auth]}".encode()))
    status, text = asyncio.run(_call(api, scope, body))
    assert status in (200, 202, 400, 401, 404, 405, 413), (status, text)
    assert len(text) < 200
    assert tokens["valid"].encode() not in text
