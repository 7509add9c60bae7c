"""The docs' FastAPI recipe (``examples/fastapi_recipe/app.py``) works as written, served by ``hubwire run``.

One process: FastAPI's login issues a JWT; the ``current_user`` dependency accepts it (200) and refuses
its absence (401); the hub, fronting FastAPI (``HubServer(app=api)``), refuses anonymous negotiate and
admits the token; the role-gated ``Publish`` runs for an editor and is refused to a user without the role.
The docs include the file itself (pymdownx.snippets), so what this tests is what readers copy.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import ServerProcess
from tests.rawhub import RawHub

APP = "examples.fastapi_recipe.app:server"
HUB = "/hubs/news"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    proc = ServerProcess(APP)
    yield proc
    proc.close()


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
        yield c


async def login(client: httpx.AsyncClient, user: str, password: str) -> str:
    r = await client.post("/api/login", json={"user": user, "password": password})
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert isinstance(token, str)
    return token


async def connect(server: ServerProcess, client: httpx.AsyncClient, token: str) -> RawHub:
    """Negotiate with the bearer header, then open the WebSocket with ``access_token`` as browsers do."""
    r = await client.post(f"{HUB}/negotiate?negotiateVersion=1", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    query = f"id={quote(r.json()['connectionToken'])}&access_token={quote(token)}"
    return await RawHub.open(server.url, HUB, query=query)


async def test_login_issues_a_token_the_current_user_dependency_accepts(client: httpx.AsyncClient) -> None:
    token = await login(client, "ada", "ada-password")
    r = await client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.json() == {"user": "ada", "editor": True}
    r = await client.get("/api/me", params={"access_token": token})
    assert r.json() == {"user": "ada", "editor": True}


async def test_current_user_refuses_no_token_a_bad_token_and_a_wrong_password(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/api/me")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    r = await client.get("/api/me", headers={"Authorization": "Bearer not.a.jwt"})
    assert r.status_code == 401
    r = await client.post("/api/login", json={"user": "ada", "password": "bob-password"})
    assert r.status_code == 401


async def test_the_hub_refuses_anonymous_negotiate(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{HUB}/negotiate?negotiateVersion=1")
    assert r.status_code == 401


async def test_an_editor_publishes_through_the_hub_and_everyone_hears_it(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    ada = await connect(server, client, await login(client, "ada", "ada-password"))
    bob = await connect(server, client, await login(client, "bob", "bob-password"))
    try:
        assert await ada.invoke("WhoAmI") == "ada"
        assert await bob.invoke("WhoAmI") == "bob"
        assert await ada.invoke("Publish", "hubwire has docs") is None
        for hub in (ada, bob):
            message = await hub.next_message()
            assert message["target"] == "Headline", message
            assert message["arguments"] == ["hubwire has docs", "ada"]
    finally:
        await ada.close()
        await bob.close()


async def test_a_user_without_the_role_is_refused_the_role_gated_method(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    bob = await connect(server, client, await login(client, "bob", "bob-password"))
    try:
        completion = await bob.invoke_raw("Publish", "not allowed")
        assert completion["error"] == "Failed to invoke 'Publish' because user is unauthorized", completion
    finally:
        await bob.close()


async def test_a_route_sends_through_the_hub_context(
    server: ServerProcess, client: httpx.AsyncClient
) -> None:
    ada_token = await login(client, "ada", "ada-password")
    bob_token = await login(client, "bob", "bob-password")
    bob = await connect(server, client, bob_token)
    try:
        r = await client.post(
            "/api/headlines",
            params={"headline": "from a route"},
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        assert r.status_code == 403
        r = await client.post(
            "/api/headlines",
            params={"headline": "from a route"},
            headers={"Authorization": f"Bearer {ada_token}"},
        )
        assert r.status_code == 202, r.text
        message = await bob.next_message()
        assert message["target"] == "Headline", message
        assert message["arguments"] == ["from a route", "ada"]
    finally:
        await bob.close()
