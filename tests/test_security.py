"""Security properties against live servers.

* the connection token is a secret: never in the server log (debug level, JSON logs, both serving
  modes, every transport), never visible to hub code (``context.query["id"]`` is the connection id)
  so never sent to other clients, and not derivable from the connection id;
* a token of one app (channel prefix / secret) is useless in another;
* ``allowed_origins``: browser requests from other origins get 403 on negotiate, upgrade, SSE,
  long polling, POST and DELETE;
* no pickle / eval / exec anywhere in the package;
* group and user names are data: a ``*`` in a group name matches nothing else over Redis.

(JWT expiry and signature checks: tests/test_auth.py, every transport, header and query.)
"""

from __future__ import annotations

import ast
import base64
import json
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from websockets.exceptions import InvalidStatus

from .conftest import ROOT, RedisServer, ServerProcess
from .hwtools import APP, negotiate, options_env, stats, wait_stats
from .rawhub import RawHub, open_ws, ws_url

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# ------------------------------------------------------------------------------------------------
# the token is a secret
# ------------------------------------------------------------------------------------------------


async def _use_every_transport(url: str) -> tuple[list[str], list[str]]:
    """Open connections over every transport with v1 tokens; returns (tokens, connection ids)."""
    tokens: list[str] = []
    ids: list[str] = []

    async def fresh() -> tuple[str, str]:
        body = (await negotiate(url)).json()
        tokens.append(body["connectionToken"])
        ids.append(body["connectionId"])
        return body["connectionId"], body["connectionToken"]

    # WebSockets: a normal session, a bad message (logged), and a second upgrade on the token (409)
    _, token = await fresh()
    hub = await RawHub.open(url, query=f"id={token}&access_token=jwt-secret-value")
    assert await hub.invoke("echo", "hi") == "hi"
    with pytest.raises(InvalidStatus):
        await open_ws(ws_url(url, query=f"id={token}"))
    await hub.send_raw("{not json\x1e")
    await hub.expect_closed()
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        # long polling: start, handshake, invoke, poll, delete
        _, token = await fresh()
        assert (await client.get("/hub", params={"id": token})).status_code == 200
        handshake = b'{"protocol":"json","version":1}\x1e'
        call = b'{"type":1,"invocationId":"1","target":"echo","arguments":["lp"]}\x1e'
        assert (await client.post("/hub", params={"id": token}, content=handshake + call)).status_code == 200
        assert (await client.get("/hub", params={"id": token})).status_code == 200
        assert (await client.delete("/hub", params={"id": token})).status_code == 202
        # SSE: open the stream, send, close the stream
        _, token = await fresh()
        async with client.stream(
            "GET", "/hub", params={"id": token}, headers={"accept": "text/event-stream"}
        ) as response:
            assert response.status_code == 200
            post = await client.post("/hub", params={"id": token}, content=handshake + call)
            assert post.status_code == 200
        # refused requests carrying a token
        _, token = await fresh()
        assert (await client.post("/hub", params={"id": token + "x"}, content=b"x")).status_code == 404
        # a negotiated connection that is never used (disposed by the sweep)
        await fresh()
    return tokens, ids


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_token_never_in_the_log(start_server: Any, serving: str) -> None:
    server: ServerProcess = start_server(
        APP,
        args=["--serving", serving, "--log-level", "debug", "--log-format", "json"],
        env=options_env(disconnect_timeout=1),
    )
    tokens, ids = await _use_every_transport(server.url)
    # the last negotiated connection is never used: the sweep disposes of it after the disconnect
    # timeout (1 s here) and logs that at debug level, with its id; wait until it has
    await wait_stats(server.url, lambda s: s["connections"] == 0, 10, "the unused connection to be swept")
    unused = ids[-1]
    log = server.output()
    swept = [line for line in log.splitlines() if "disposing inactive connection" in line]
    assert any(unused in line for line in swept), swept
    # the log did record these requests (with connection ids), just never a token
    assert "/hub/negotiate" in log
    assert "[redacted]" in log
    assert any(cid in log for cid in ids), log[-2000:]
    for token in tokens:
        assert token not in log
    assert "jwt-secret-value" not in log
    for line in log.splitlines():  # every record is one JSON object
        if line.strip():
            json.loads(line)


async def test_hub_code_and_other_clients_never_see_the_token(start_server: Any) -> None:
    server: ServerProcess = start_server(APP)
    body = (await negotiate(server.url)).json()
    token, connection_id = body["connectionToken"], body["connectionId"]
    assert token != connection_id
    alice = await RawHub.open(server.url, query=f"id={token}")
    bob = await RawHub.open(server.url)
    seen = await alice.invoke("context_dump")
    assert seen["connectionId"] == connection_id
    assert seen["query"]["id"] == connection_id  # the id hub code sees is the public one
    assert token not in json.dumps(seen)
    await alice.invoke("share_context")  # a careless app sends its context to everyone
    message = await bob.next_message()
    assert message["target"] == "Context"
    assert token not in json.dumps(message)
    assert message["arguments"][0]["connectionId"] == connection_id
    await alice.close()
    await bob.close()


async def test_token_not_derivable_from_the_connection_id(start_server: Any) -> None:
    server: ServerProcess = start_server(APP)
    body = (await negotiate(server.url)).json()
    token, connection_id = body["connectionToken"], body["connectionId"]
    raw_id = _unb64(connection_id)
    raw_token = _unb64(token)
    assert len(raw_id) == 16 and len(raw_token) == 36
    now = struct.pack(">I", int(time.time()))
    issued = struct.unpack(">I", raw_token[16:20])[0]
    forged = [
        connection_id,  # the public id is no credential
        _b64(raw_id + now + bytes(16)),  # id + fresh timestamp + guessed MAC
        _b64(raw_id + raw_token[16:20] + bytes(16)),  # the real timestamp, still no MAC
        _b64(raw_token[:-1] + bytes([raw_token[-1] ^ 1])),  # one bit of the MAC flipped
        _b64(raw_id + struct.pack(">I", issued - 1) + raw_token[20:]),  # the real MAC, another time
    ]
    for candidate in forged:
        with pytest.raises(InvalidStatus) as err:
            await open_ws(ws_url(server.url, query=f"id={candidate}"))
        assert err.value.response.status_code == 404, candidate
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
        for candidate in forged:
            assert (await client.get("/hub", params={"id": candidate})).status_code == 404
    hub = await RawHub.open(server.url, query=f"id={token}")  # the real one works
    assert await hub.invoke("whoami") == {"connectionId": connection_id, "pid": server.proc.pid}
    await hub.close()


async def test_token_of_one_app_is_useless_in_another(start_server: Any, redis_server: RedisServer) -> None:
    def instance(prefix: str) -> ServerProcess:
        proc: ServerProcess = start_server(
            APP, args=["--redis", redis_server.url, "--channel-prefix", prefix]
        )
        return proc

    app_a1, app_a2, app_b = instance("SecA:"), instance("SecA:"), instance("SecB:")
    standalone: ServerProcess = start_server(APP)
    token = (await negotiate(app_a1.url)).json()["connectionToken"]
    for other in (app_b, standalone):
        with pytest.raises(InvalidStatus) as err:
            await open_ws(ws_url(other.url, query=f"id={token}"))
        assert err.value.response.status_code == 404
        async with httpx.AsyncClient(base_url=other.url, timeout=5) as client:
            assert (await client.get("/hub", params={"id": token})).status_code == 404
    # the same app's other instance takes it (no sticky sessions): the prefix is what isolates
    hub = await RawHub.open(app_a2.url, query=f"id={token}")
    assert (await hub.invoke("whoami"))["pid"] == app_a2.proc.pid
    await hub.close()
    # and a token of the standalone server means nothing to the app either
    lone = (await negotiate(standalone.url)).json()["connectionToken"]
    with pytest.raises(InvalidStatus) as err:
        await open_ws(ws_url(app_a1.url, query=f"id={lone}"))
    assert err.value.response.status_code == 404


# ------------------------------------------------------------------------------------------------
# allowed origins
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_allowed_origins(start_server: Any, serving: str) -> None:
    good, evil = "https://good.example", "https://evil.example"
    server: ServerProcess = start_server(
        APP, args=["--serving", serving], env=options_env(allowed_origins=[good])
    )
    url = server.url
    assert (await negotiate(url, origin=evil)).status_code == 403
    assert (await negotiate(url, origin=good.upper() + "/")).status_code == 200  # case, trailing slash
    plain = await negotiate(url)  # no Origin: not a browser, not checked
    assert plain.status_code == 200
    token = plain.json()["connectionToken"]
    with pytest.raises(InvalidStatus) as err:
        await open_ws(ws_url(url), origin=evil)  # type: ignore[arg-type]
    assert err.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as err:
        await open_ws(ws_url(url, query=f"id={token}"), origin=evil)  # type: ignore[arg-type]
    assert err.value.response.status_code == 403
    hub = RawHub(await open_ws(ws_url(url, query=f"id={token}"), origin=good), "json")  # type: ignore[arg-type]
    assert await hub.handshake("json") == {}
    assert await hub.invoke("echo", "ok") == "ok"
    await hub.close()
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        lp = (await negotiate(url)).json()["connectionToken"]
        bad = {"origin": evil}
        assert (await client.get("/hub", params={"id": lp}, headers=bad)).status_code == 403
        assert (await client.get("/hub", params={"id": lp}, headers={"origin": good})).status_code == 200
        assert (await client.post("/hub", params={"id": lp}, content=b"x", headers=bad)).status_code == 403
        assert (await client.delete("/hub", params={"id": lp}, headers=bad)).status_code == 403
        sse = {"origin": evil, "accept": "text/event-stream"}
        assert (await client.get("/hub", params={"id": lp}, headers=sse)).status_code == 403
        assert (await client.delete("/hub", params={"id": lp}, headers={"origin": good})).status_code == 202
    assert (await stats(url))["refused"]["origin"] == 7


# ------------------------------------------------------------------------------------------------
# no code from data
# ------------------------------------------------------------------------------------------------

_FORBIDDEN_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "marshal",
    "shelve",
    "dill",
    "cloudpickle",
    "jsonpickle",
}
_FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}


def test_no_pickle_or_eval_in_the_package() -> None:
    problems = []
    sources = sorted((ROOT / "src" / "hubwire").rglob("*.py"))
    assert len(sources) > 20
    for path in sources:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{Path(path).relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
                problems += [f"{where} imports {n}" for n in names & _FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _FORBIDDEN_MODULES:
                problems.append(f"{where} imports from {node.module}")
            elif isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in _FORBIDDEN_CALLS:
                    problems.append(f"{where} calls {func.id}()")
                if (
                    isinstance(func, ast.Attribute)
                    and func.attr in ("load", "loads")
                    and (isinstance(func.value, ast.Name) and func.value.id in ("yaml", "pickle", "marshal"))
                ):
                    problems.append(f"{where} calls {func.value.id}.{func.attr}()")
    assert problems == []
    # the raw text too, for anything the AST walk would not name (getattr tricks, strings)
    for path in sources:
        text = path.read_text()
        for needle in ("pickle", "marshal.", "eval(", "exec("):
            assert needle not in text, f"{path.relative_to(ROOT)} contains {needle!r}"


# ------------------------------------------------------------------------------------------------
# group and user names are data
# ------------------------------------------------------------------------------------------------

GROUPS = ["a*", "ab", "a", "a?", "[ab]", "a\\*", "*", "a*b", "group:a*"]


async def test_group_names_are_not_patterns(start_server: Any, redis_server: RedisServer) -> None:
    prefix = "Glob:"
    one: ServerProcess = start_server(APP, args=["--redis", redis_server.url, "--channel-prefix", prefix])
    two: ServerProcess = start_server(APP, args=["--redis", redis_server.url, "--channel-prefix", prefix])
    members: dict[str, list[RawHub]] = {}
    for group in GROUPS:  # one member of every group on each instance
        members[group] = []
        for instance in (one, two):
            hub = await RawHub.open(instance.url)
            await hub.invoke("join_group", group)
            members[group].append(hub)
    users = {name: await RawHub.open(one.url, query=f"user={name}") for name in ("b*", "bob", "b")}
    sender = await RawHub.open(two.url)
    for target in ("a*", "*", "[ab]", "a?"):
        await sender.invoke("send_to_group", target, f"to {target}")
    await sender.invoke("send_to_user", "b*", "to b*")
    await sender.send({"type": 1, "target": "broadcast", "arguments": ["barrier"]})
    for group, hubs in members.items():
        for hub in hubs:
            got = []
            while True:
                message = await hub.next_message()
                if message.get("target") == "Broadcast":
                    break
                got.append(message["arguments"])
            expected = [[group, f"to {group}"]] if group in ("a*", "*", "[ab]", "a?") else []
            assert got == expected, (group, got)
    # users the same way: user "b*" is one user, not a pattern
    for name, hub in users.items():
        got = []
        while True:
            message = await hub.next_message()
            if message.get("target") == "Broadcast":
                break
            got.append(message["arguments"])
        assert got == ([["b*", "to b*"]] if name == "b*" else []), (name, got)
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.pubsub_numpat() == 0  # no pattern subscriptions at all
        channels = {c.decode() for c in r.pubsub_channels(f"{prefix}*")}
    assert f"{prefix}HardHub:group:a*" in channels
    assert f"{prefix}HardHub:user:b*" in channels
    await sender.close()
    for hub in [*users.values(), *(h for hubs in members.values() for h in hubs)]:
        await hub.close()
