"""The key of connection tokens: per app from HUBWIRE_SECRET (never stored), agreed through Redis
otherwise (not ready until agreed, healing by itself), and rotated without refusing connections."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import RedisServer, ServerProcess, free_port
from tests.hwtools import wait_for
from tests.rawhub import RawHub, ws_url

APP = "tests.apps.structure:app"


def _start(request: pytest.FixtureRequest, redis_url: str, prefix: str, **env: str) -> ServerProcess:
    proc = ServerProcess(APP, env=env, args=["--redis", redis_url, "--channel-prefix", prefix])
    request.addfinalizer(proc.close)
    return proc


async def _negotiate(server: ServerProcess) -> str:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        response = await client.post("/hub/negotiate?negotiateVersion=1")
        response.raise_for_status()
        token: str = response.json()["connectionToken"]
        return token


async def _starts(server: ServerProcess, token: str) -> int:
    """101 when ``server`` accepts a WebSocket for ``token``, else the refusal's status."""
    try:
        async with connect(ws_url(server.url, "/hub", f"id={token}"), open_timeout=10, close_timeout=1):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


async def test_a_secret_gives_each_app_its_own_key_and_is_never_stored(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> None:
    secret = "shared-secret-for-two-apps"
    a1 = _start(request, redis_server.url, "keys-app1:", HUBWIRE_SECRET=secret)
    a2 = _start(request, redis_server.url, "keys-app1:", HUBWIRE_SECRET=secret)
    b = _start(request, redis_server.url, "keys-app2:", HUBWIRE_SECRET=secret)
    assert await _starts(a2, await _negotiate(a1)) == 101  # same app: accepted anywhere
    assert await _starts(b, await _negotiate(a1)) == 404  # same secret, other app: refused
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        stored = [k.decode() for k in await client.keys("keys-app*")]
    finally:
        await client.aclose()
    assert not [k for k in stored if "token-key" in k], stored


async def test_without_a_secret_an_instance_is_not_ready_until_redis_answers(
    request: pytest.FixtureRequest,
) -> None:
    port = free_port()
    server = _start(request, f"redis://127.0.0.1:{port}/0", "keys-late:")
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["ready"] is False
        assert "cannot agree on a token key through Redis" in health.json()["reason"]
        refused = await client.post("/hub/negotiate?negotiateVersion=1")
        assert refused.status_code == 503
        assert refused.text.startswith("The server is not ready")
        redis = RedisServer(port=port)
        request.addfinalizer(redis.close)

        async def ready() -> bool:
            return (await client.get("/health")).status_code == 200

        await wait_for(ready, 15, "the instance to agree on the key once Redis answers")
        assert (await client.post("/hub/negotiate?negotiateVersion=1")).status_code == 200


async def test_rotation_accepts_the_previous_secret(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> None:
    url, prefix = redis_server.url, "keys-rotation:"
    # step 1 of 3: everyone still signs with the old secret and already accepts the new one
    old = _start(request, url, prefix, HUBWIRE_SECRET="old-secret", HUBWIRE_PREVIOUS_SECRET="new-secret")
    # step 2: the new secret signs, the old one is still accepted
    new = _start(request, url, prefix, HUBWIRE_SECRET="new-secret", HUBWIRE_PREVIOUS_SECRET="old-secret")
    assert await _starts(new, await _negotiate(old)) == 101
    assert await _starts(old, await _negotiate(new)) == 101
    # step 3: the old secret is dropped; what it signed is refused from now on
    done = _start(request, url, prefix, HUBWIRE_SECRET="new-secret")
    assert await _starts(done, await _negotiate(new)) == 101
    assert await _starts(done, await _negotiate(old)) == 404


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
#: the README's least-privilege ACL line for an app whose channel prefix is "BlogApp:SignalR:"
README_ACL = (
    "ACL SETUSER blogapp on >blog-password resetkeys ~BlogApp:SignalR:* resetchannels "
    "&BlogApp:SignalR:* -@all +publish +subscribe +unsubscribe +ping +set +get +exists +del +pttl +hset "
    "+hgetall +hexists +hdel +client|setname +select"
)


async def test_the_readme_acl_line_confines_an_app_to_its_prefix(
    request: pytest.FixtureRequest, private_redis: RedisServer
) -> None:
    assert README_ACL in README
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        await admin.execute_command(*README_ACL.split())
    finally:
        await admin.aclose()
    url = f"redis://blogapp:blog-password@127.0.0.1:{private_redis.port}/0"
    a = _start(request, url, "BlogApp:SignalR:")
    b = _start(request, url, "BlogApp:SignalR:")
    assert await _starts(b, await _negotiate(a)) == 101  # the token key was agreed under the prefix
    hub = await RawHub.open(b.url, "/js")
    async with httpx.AsyncClient(base_url=a.url, timeout=10) as client:
        (await client.post("/broadcast/through-acl")).raise_for_status()
    assert await hub.next_message(timeout=5) == {"type": 1, "target": "Msg", "arguments": ["through-acl"]}
    await hub.close()
    # the instances hold their leases, and nothing hubwire sends was refused
    admin = aioredis.Redis.from_url(private_redis.url)
    try:
        leases = [k async for k in admin.scan_iter("BlogApp:SignalR:hubwire:internal:lease:*")]
        assert len(leases) == 2, leases
        log = await admin.execute_command("ACL", "LOG")
        denied = {dict(zip(e[::2], e[1::2], strict=True))[b"object"] for e in log}
        assert denied <= {b"client|setinfo"}, denied
    finally:
        await admin.aclose()
    # the same user cannot touch another prefix
    other = aioredis.Redis.from_url(url)
    try:
        with pytest.raises(aioredis.ResponseError, match="no permissions"):
            await other.publish("OtherApp:SignalR:Hub:all", b"x")
    finally:
        await other.aclose()
