"""Connection tokens between instances: ``HUBWIRE_SECRET`` and the window in which a token starts a
connection.

Tokens are signed with a key the instances of one app share: agreed through Redis under the channel
prefix, or derived from ``HUBWIRE_SECRET`` and the prefix (HKDF). Instances of one prefix with one
secret take each other's tokens; another prefix with the same secret, or the same prefix with another
secret, refuses them. A token starts a connection (on any instance) only within 30 s of its issue time with
the default options (the disconnect timeout, 15 s, plus 15 s); the issue time is inside the token, so
tokens minted with the shared secret just inside and just outside the window pin it.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from hubwire.connections import TokenIssuer
from hubwire.connections.tokens import derive_key

from .conftest import RedisServer, ServerProcess
from .hwtools import APP, negotiate
from .rawhub import RawHub, open_ws, ws_url

SECRET = "issue-11-shared-secret-0123456789"
OTHER_SECRET = "issue-11-another-secret-987654321"
WINDOW = 30.0  # HubOptions().disconnect_timeout + 15 s


def _instance(start_server: Any, redis_server: RedisServer, prefix: str, secret: str) -> ServerProcess:
    proc: ServerProcess = start_server(
        APP,
        args=["--redis", redis_server.url, "--channel-prefix", prefix],
        env={"HUBWIRE_SECRET": secret},
    )
    return proc


async def _upgrade_status(server: ServerProcess, token: str) -> int:
    """101 and a working hub connection, or the status the upgrade was refused with."""
    try:
        hub = RawHub(await open_ws(ws_url(server.url, query=f"id={token}")), "json")
    except InvalidStatus as exc:
        return exc.response.status_code
    assert await hub.handshake("json") == {}
    assert (await hub.invoke("whoami"))["pid"] == server.proc.pid
    await hub.close()
    return 101


async def test_hubwire_secret_decides_which_instances_share_tokens(
    start_server: Any, redis_server: RedisServer
) -> None:
    home = _instance(start_server, redis_server, "SecretHome:", SECRET)
    sibling = _instance(start_server, redis_server, "SecretHome:", SECRET)
    other_app_same_secret = _instance(start_server, redis_server, "SecretElsewhere:", SECRET)
    same_app_other_secret = _instance(start_server, redis_server, "SecretHome:", OTHER_SECRET)
    tokens = [(await negotiate(home.url)).json()["connectionToken"] for _ in range(4)]
    # the same app and secret: the token starts the connection there (WebSockets, long polling)
    assert await _upgrade_status(sibling, tokens[0]) == 101
    async with httpx.AsyncClient(base_url=sibling.url, timeout=5) as client:
        assert (await client.get("/hub", params={"id": tokens[1]})).status_code == 200
        assert (await client.delete("/hub", params={"id": tokens[1]})).status_code == 202
    # another app (prefix) with the same secret derives another key: refused
    assert await _upgrade_status(other_app_same_secret, tokens[3]) == 404
    # the same prefix (so the same Redis-agreed key), another secret: refused everywhere
    assert await _upgrade_status(same_app_other_secret, tokens[2]) == 404
    async with httpx.AsyncClient(base_url=same_app_other_secret.url, timeout=5) as client:
        assert (await client.get("/hub", params={"id": tokens[2]})).status_code == 404
    # and that token is still good where it was issued (a refusal consumes nothing)
    assert await _upgrade_status(home, tokens[2]) == 101
    # tokens minted with the app's key (derived from the secret and the prefix) are the instances' own
    _, minted = TokenIssuer(derive_key(SECRET.encode(), "SecretHome:")).issue(1)
    assert await _upgrade_status(same_app_other_secret, minted) == 404
    assert await _upgrade_status(home, minted) == 101


@pytest.mark.parametrize("version", [1, 0], ids=["negotiate-v1", "negotiate-v0"])
async def test_a_token_starts_a_connection_only_within_30_s(
    start_server: Any, redis_server: RedisServer, version: int
) -> None:
    prefix = f"SecretWindow{version}:"
    server = _instance(start_server, redis_server, prefix, SECRET)
    issuer = TokenIssuer(derive_key(SECRET.encode(), prefix))

    def minted(age: float) -> str:
        """A token issued ``age`` seconds ago (negative: in the future); used at once."""
        return issuer.issue(version, now=time.time() - age)[1]

    # just inside: the issue time is stored in whole seconds (rounded down, so a token looks up to
    # 1 s older) and the upgrade follows within a moment; 3 s of margin each way
    assert await _upgrade_status(server, minted(WINDOW - 4)) == 101
    # just outside: older than the window, which a slower machine only makes older
    assert await _upgrade_status(server, minted(WINDOW + 3)) == 404
    # an issuing clock a little ahead (up to 5 s) is tolerated, one far ahead not
    assert await _upgrade_status(server, minted(-3)) == 101
    assert await _upgrade_status(server, minted(-12)) == 404
