"""Check the backplane between two instances of the blog: does a post published on A reach B's clients?

    python -m examples.blog.verify http://127.0.0.1:8001 http://127.0.0.1:8002

1. connect a SignalR client to instance A and one to instance B (``/hubs/blog``, WebSockets, JSON)
2. create and publish a post through A's REST API
3. both clients receive its ``PostPublished``

Prints PASS or FAIL for each step and a final RESULT; exits 0 when every step passed, 1 otherwise
(2 for bad arguments). Give the instances' own URLs, not a load balancer's, or you do not know which
instances you tested. Without a backplane (two in-memory instances) step 3 fails for client B.

The client is a few lines of the SignalR protocol (negotiate, handshake, records ending in 0x1E)
over ``httpx`` and ``websockets``, so this runs anywhere the demo's Python packages are installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

RS = "\x1e"
HUB = "/hubs/blog"


@dataclass
class HubClient:
    """One SignalR connection: invocations answered by completions, server calls collected by target."""

    name: str
    ws: ClientConnection
    received: dict[str, list[list[Any]]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    pending: dict[str, asyncio.Future[Any]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, name: str, base: str, token: str, timeout: float) -> HubClient:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(timeout=timeout) as http:
            response = await http.post(f"{base}{HUB}/negotiate?negotiateVersion=1", headers=headers)
            response.raise_for_status()
            negotiated = response.json()
        if "error" in negotiated:
            raise RuntimeError(f"negotiate: {negotiated['error']}")
        ws_base = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        url = f"{ws_base}{HUB}?id={negotiated['connectionToken']}"
        ws = await connect(url, additional_headers=headers, open_timeout=timeout, compression=None)
        await ws.send(json.dumps({"protocol": "json", "version": 1}) + RS)
        handshake = await asyncio.wait_for(ws.recv(), timeout)
        reply = json.loads(str(handshake).split(RS, 1)[0])
        if reply.get("error"):
            await ws.close()
            raise RuntimeError(f"handshake: {reply['error']}")
        client = cls(name, ws)
        client.reader = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in self.ws:
                for record in str(frame).split(RS):
                    if record:
                        self._dispatch(json.loads(record))
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("connection closed"))

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == 1:
            self.received.setdefault(str(message.get("target")), []).append(message.get("arguments") or [])
            self.arrived.set()
        elif kind == 3:
            future = self.pending.pop(str(message.get("invocationId")), None)
            if future is not None and not future.done():
                if message.get("error"):
                    future.set_exception(RuntimeError(message["error"]))
                else:
                    future.set_result(message.get("result"))

    async def invoke(self, target: str, *args: Any, timeout: float) -> Any:
        invocation_id = str(next(self.ids))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[invocation_id] = future
        message = {"type": 1, "invocationId": invocation_id, "target": target, "arguments": list(args)}
        await self.ws.send(json.dumps(message) + RS)
        return await asyncio.wait_for(future, timeout)

    def calls(self, target: str) -> list[list[Any]]:
        """The arguments of every ``target`` call received so far."""
        return self.received.get(target, [])

    async def wait_for(self, target: str, match: Callable[[list[Any]], bool], timeout: float) -> bool:
        """True once a ``target`` call whose arguments satisfy ``match`` arrived (bounded by ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(match(args) for args in self.calls(target)):
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)
        return True

    async def wait_published(self, post_id: int, timeout: float) -> bool:
        """True once this client got ``PostPublished`` for ``post_id``."""
        return await self.wait_for("PostPublished", lambda args: _post_id(args) == post_id, timeout)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.reader


def _post_id(args: list[Any]) -> Any:
    return args[0].get("id") if args and isinstance(args[0], dict) else None


class Report:
    def __init__(self) -> None:
        self.failed = False

    def step(self, number: int, text: str, ok: bool, detail: str = "") -> bool:
        self.failed |= not ok
        print(
            f"[{number}] {text} ... {'PASS' if ok else 'FAIL'}{f' ({detail})' if detail else ''}", flush=True
        )
        return ok


async def login(http: httpx.AsyncClient, base: str, user: str) -> str:
    response = await http.post(f"{base}/api/login", json={"user": user, "admin": False})
    response.raise_for_status()
    return str(response.json()["token"])


async def verify(url_a: str, url_b: str, timeout: float = 5.0) -> bool:
    """Run the steps against two instance URLs; True when all passed."""
    report = Report()
    bases = {"A": url_a.rstrip("/"), "B": url_b.rstrip("/")}
    user = f"verify-{uuid.uuid4().hex[:8]}"
    clients: dict[str, HubClient] = {}
    instances: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(timeout=timeout) as http:
            # 1. one client on each instance
            for name, base in bases.items():
                try:
                    token = await login(http, base, user)
                    clients[name] = await HubClient.open(name, base, token, timeout)
                    info = await clients[name].invoke("Instance", timeout=timeout)
                    instances[name] = str(info.get("name")) if isinstance(info, dict) else str(info)
                    report.step(1, f"client {name} connected to {base}", True, f"instance {instances[name]}")
                except Exception as exc:
                    report.step(
                        1, f"client {name} connected to {base}", False, f"{type(exc).__name__}: {exc}"
                    )
            if len(clients) < 2:
                print("RESULT: FAIL (could not connect both clients)", flush=True)
                return False
            if instances["A"] == instances["B"]:
                print(f"warning: A and B are the same instance ({instances['A']}): this proves nothing")

            # 2. publish through A's REST API
            post_id: int | None = None
            try:
                token = await login(http, bases["A"], user)
                auth = {"Authorization": f"Bearer {token}"}
                created = await http.post(
                    f"{bases['A']}/api/posts", json={"title": f"backplane check {user}"}, headers=auth
                )
                created.raise_for_status()
                post_id = int(created.json()["id"])
                published = await http.post(f"{bases['A']}/api/posts/{post_id}/publish", headers=auth)
                published.raise_for_status()
                report.step(2, f"published post #{post_id} through A's REST API", True)
            except Exception as exc:
                report.step(2, "publish a post through A's REST API", False, f"{type(exc).__name__}: {exc}")

            # 3. both clients receive it
            if post_id is not None:
                got = await asyncio.gather(*(c.wait_published(post_id, timeout) for c in clients.values()))
                for (name, client), ok in zip(clients.items(), got, strict=True):
                    detail = "" if ok else f"nothing within {timeout:g} s"
                    if not ok and name == "B":
                        detail += ": is the backplane (Redis) on, with one channel prefix on both?"
                    report.step(
                        3, f"client {client.name} ({instances[name]}) received PostPublished", ok, detail
                    )
            else:
                report.step(3, "both clients receive PostPublished", False, "nothing was published")
    finally:
        for client in clients.values():
            await client.close()
    print(f"RESULT: {'FAIL' if report.failed else 'PASS'}", flush=True)
    return not report.failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.blog.verify", description=__doc__.split("\n")[0]
    )
    parser.add_argument("url_a", help="instance A, e.g. http://127.0.0.1:8001")
    parser.add_argument("url_b", help="instance B, e.g. http://127.0.0.1:8002")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each step")
    args = parser.parse_args(argv)
    ok = asyncio.run(verify(args.url_a, args.url_b, args.timeout))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
