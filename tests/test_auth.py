"""JWT bearer authentication and authorization, end to end on a real server and as a unit.

The interop app's ``/authorizedhub`` must refuse a missing, expired, wrongly signed or malformed
token with ``401`` and an EMPTY body on negotiate and on every transport request (WebSocket
upgrade, SSE GET, long-poll GET, POST, DELETE), whether the token travels in the
``Authorization`` header or the ``access_token`` query; method-level ``@authorize`` answers with
the SignalR completion error instead; policies (roles, claims) are plain callables.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from urllib.parse import quote

import httpx
import jwt
import pytest
import websockets
from examples.interop.app import JWT_KEY, generate_token

from hubwire import Principal, RequestInfo
from hubwire.auth import NAME_IDENTIFIER, JwtBearerAuthenticator, bearer_token, require_claim, require_role
from tests.conftest import ServerProcess
from tests.interop.raw import (
    JSON_HANDSHAKE,
    SSE,
    SseReader,
    invocation,
    negotiate,
    poll_records,
    post,
    records,
    start_long_polling,
)

HUB = "/authorizedhub"
WRONG_KEY = "definitely-not-the-server-key-0123456789"

BAD_TOKENS: dict[str, Callable[[], str]] = {
    "expired": lambda: generate_token(lifetime=-60),
    "wrongly_signed": lambda: generate_token(key=WRONG_KEY),
    "malformed": lambda: "not.a.jwt",
    "unsigned": lambda: jwt.encode(
        {NAME_IDENTIFIER: "testuser", "exp": int(time.time()) + 600}, None, "none"
    ),
    "without_expiry": lambda: jwt.encode({NAME_IDENTIFIER: "testuser"}, JWT_KEY, "HS256"),
}
KINDS = ("negotiate", "websocket", "sse", "poll", "post", "delete")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess("tests.interop.apps:app")
    yield proc
    proc.close()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def attempt(
    server: ServerProcess, client: httpx.AsyncClient, kind: str, token: str | None, in_query: bool
) -> tuple[int, bytes, httpx.Headers | None]:
    """Issue one request of ``kind`` to ``/authorizedhub`` presenting ``token``; (status, body, headers).

    Whatever the request needs first (a negotiated or long-polling connection) is set up with
    a valid token, so only the request under test carries ``token``.
    """
    good = bearer(generate_token())
    headers = bearer(token) if token is not None and not in_query else {}
    query = f"&access_token={quote(token)}" if token is not None and in_query else ""
    if kind == "negotiate":
        r = await client.post(f"{HUB}/negotiate?negotiateVersion=1{query}", headers=headers)
        return r.status_code, r.content, r.headers
    if kind in ("websocket", "sse"):
        _, conn_token = await negotiate(client, HUB, good)
    else:
        _, conn_token = await start_long_polling(client, HUB, good)
    url = f"{HUB}?id={conn_token}{query}"
    if kind == "websocket":
        try:
            async with websockets.connect(
                server.url.replace("http", "ws") + url, additional_headers=headers, open_timeout=5
            ):
                return 101, b"", None
        except websockets.InvalidStatus as refused:
            return refused.response.status_code, refused.response.body or b"", None
    if kind == "sse":
        async with client.stream("GET", url, headers={**SSE, **headers}) as response:
            if response.status_code == 200:
                await SseReader(response).read_until(b":\r\n")
                return 200, b"", response.headers
            return response.status_code, await response.aread(), response.headers
    if kind == "poll":
        # something to deliver, so an accepted poll answers at once instead of waiting 90 s
        await post(client, HUB, conn_token, invocation("Echo", "x", invocation_id="1"), good)
        r = await client.get(url, headers=headers)
    elif kind == "post":
        r = await client.post(url, content=invocation("Echo", "x", invocation_id="1"), headers=headers)
    else:
        r = await client.delete(url, headers=headers)
    return r.status_code, r.content, r.headers


SUCCESS = {"negotiate": 200, "websocket": 101, "sse": 200, "poll": 200, "post": 200, "delete": 202}


@pytest.mark.parametrize("in_query", [False, True], ids=["header", "query"])
@pytest.mark.parametrize("kind", KINDS)
async def test_valid_token_accepted(
    server: ServerProcess, client: httpx.AsyncClient, kind: str, in_query: bool
) -> None:
    status, _, _ = await attempt(server, client, kind, generate_token(), in_query)
    assert status == SUCCESS[kind]


@pytest.mark.parametrize("kind", KINDS)
async def test_missing_token_401_empty(server: ServerProcess, client: httpx.AsyncClient, kind: str) -> None:
    status, body, headers = await attempt(server, client, kind, None, False)
    assert (status, body) == (401, b"")
    if headers is not None:
        assert headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize("in_query", [False, True], ids=["header", "query"])
@pytest.mark.parametrize("problem", sorted(BAD_TOKENS))
@pytest.mark.parametrize("kind", KINDS)
async def test_bad_token_401_empty(
    server: ServerProcess, client: httpx.AsyncClient, kind: str, problem: str, in_query: bool
) -> None:
    status, body, _ = await attempt(server, client, kind, BAD_TOKENS[problem](), in_query)
    assert (status, body) == (401, b"")


async def test_contract_token_lives_at_least_60_seconds(client: httpx.AsyncClient) -> None:
    token = (await client.get("/generateJwtToken")).text
    claims = jwt.decode(token, JWT_KEY, algorithms=["HS256"])
    assert claims[NAME_IDENTIFIER] == "testuser"
    assert claims["exp"] - time.time() >= 60
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def _long_poll_call(
    client: httpx.AsyncClient, path: str, target: str, headers: dict[str, str] | None = None
) -> dict[str, object]:
    """Connect over long polling and invoke ``target``; returns the Completion."""
    _, token = await start_long_polling(client, path, headers)
    await post(client, path, token, invocation(target, invocation_id="1"), headers)
    (completion,) = await poll_records(client, path, token, headers=headers)
    return completion


async def test_user_identifier_from_sub_then_name_identifier(client: httpx.AsyncClient) -> None:
    both = bearer(generate_token(user="from-nameidentifier", sub="from-sub"))
    assert (await _long_poll_call(client, "/target", "WhoAmI", both))["result"] == "from-sub"
    only_dotnet = bearer(generate_token(user="from-nameidentifier"))
    assert (await _long_poll_call(client, "/target", "WhoAmI", only_dotnet))[
        "result"
    ] == "from-nameidentifier"


async def test_hub_policy_requires_role(client: httpx.AsyncClient) -> None:
    plain = await client.post("/admin/negotiate", headers=bearer(generate_token()))
    assert (plain.status_code, plain.content) == (401, b"")
    admin = bearer(generate_token(role="admin"))
    assert (await client.post("/admin/negotiate", headers=admin)).status_code == 200
    listed = bearer(generate_token(roles=["reader", "admin"]))
    assert (await _long_poll_call(client, "/admin", "Transport", listed))["result"] == "LongPolling"


@pytest.mark.parametrize(
    ("target", "token", "expected"),
    [
        ("Secret", None, {"error": "Failed to invoke 'Secret' because user is unauthorized"}),
        ("secret", None, {"error": "Failed to invoke 'secret' because user is unauthorized"}),
        ("Secret", {}, {"result": "secret"}),
        ("AdminOnly", {}, {"error": "Failed to invoke 'AdminOnly' because user is unauthorized"}),
        ("AdminOnly", {"role": "admin"}, {"result": "admin"}),
        ("Writer", {"scope": ["read"]}, {"error": "Failed to invoke 'Writer' because user is unauthorized"}),
        ("Writer", {"scope": ["read", "write"]}, {"result": "written"}),
    ],
    ids=["anonymous", "anonymous_target_as_sent", "user", "not_admin", "admin", "no_scope", "scope"],
)
async def test_method_authorization(
    client: httpx.AsyncClient, target: str, token: dict[str, object] | None, expected: dict[str, object]
) -> None:
    headers = bearer(generate_token(**token)) if token is not None else None
    completion = await _long_poll_call(client, "/methods", target, headers)
    assert {k: v for k, v in completion.items() if k in ("error", "result")} == expected


async def test_method_authorization_over_websocket(server: ServerProcess, client: httpx.AsyncClient) -> None:
    _, token = await negotiate(client, "/methods")
    async with websockets.connect(
        f"{server.url.replace('http', 'ws')}/methods?id={token}", open_timeout=5
    ) as ws:
        await ws.send(JSON_HANDSHAKE.decode())
        assert await asyncio.wait_for(ws.recv(), 5) == "{}\x1e"
        await ws.send(invocation("Secret", invocation_id="7").decode())
        reply = records((await asyncio.wait_for(ws.recv(), 5)).encode())
        assert reply == [
            {
                "type": 3,
                "invocationId": "7",
                "error": "Failed to invoke 'Secret' because user is unauthorized",
            }
        ]


# -- the authenticator as a unit ------------------------------------------------------------------


def request(headers: dict[str, str] | None = None, query: dict[str, str] | None = None) -> RequestInfo:
    return RequestInfo("/hub", {k.lower(): v for k, v in (headers or {}).items()}, query or {}, {})


def test_bearer_token_sources() -> None:
    assert bearer_token(request({"Authorization": "Bearer abc"})) == "abc"
    assert bearer_token(request({"Authorization": "bearer  abc "})) == "abc"
    assert bearer_token(request(query={"ACCESS_TOKEN": "q"})) == "q"
    assert bearer_token(request({"Authorization": "Bearer h"}, {"access_token": "q"})) == "h"
    assert bearer_token(request({"Authorization": "Basic xyz"})) is None
    assert bearer_token(request(query={"access_token": "q"}), query_parameter=None) is None


def test_authenticator_validation_options() -> None:
    now = int(time.time())
    auth = JwtBearerAuthenticator("k" * 32, audience="hubs", issuer="me", user_claim="uid", leeway=30)
    token = jwt.encode({"uid": "u1", "aud": "hubs", "iss": "me", "exp": now - 10}, "k" * 32, "HS256")
    principal = auth(request({"Authorization": f"Bearer {token}"}))
    assert principal is not None and principal.identifier == "u1"  # within the leeway
    wrong_aud = jwt.encode({"uid": "u1", "aud": "other", "iss": "me", "exp": now + 60}, "k" * 32, "HS256")
    assert auth(request(query={"access_token": wrong_aud})) is None
    wrong_iss = jwt.encode({"uid": "u1", "aud": "hubs", "iss": "you", "exp": now + 60}, "k" * 32, "HS256")
    assert auth(request(query={"access_token": wrong_iss})) is None
    # no audience configured: a token that carries one is still fine (issuer/audience free)
    loose = JwtBearerAuthenticator("k" * 32)
    assert loose(request(query={"access_token": wrong_aud})) is not None


def test_policies() -> None:
    admin = Principal("a", {"role": "admin"})
    reader = Principal("r", {"roles": ["reader"], "scope": "read"})
    assert require_role("admin")(admin) and not require_role("admin")(reader)
    assert require_role("admin", "reader")(reader)
    assert not require_role("admin")(None)
    assert require_claim("scope")(reader) and require_claim("scope", "read")(reader)
    assert not require_claim("scope", "write")(reader) and not require_claim("scope")(admin)


async def test_post_token_does_not_change_the_connection_user(client: httpx.AsyncClient) -> None:
    """The user is the transport request's; a POST with another (valid) token only authorizes itself."""
    reader = bearer(generate_token(user="reader"))
    _, token = await start_long_polling(client, "/methods", reader)
    admin = bearer(generate_token(user="root", role="admin"))
    await post(client, "/methods", token, invocation("AdminOnly", invocation_id="1"), admin)
    (completion,) = await poll_records(client, "/methods", token, headers=reader)
    assert completion["error"] == "Failed to invoke 'AdminOnly' because user is unauthorized"
