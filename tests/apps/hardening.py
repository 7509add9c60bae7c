"""Hub app of the hardening tests (limits, hostile input, slow clients, instance death, soak, metrics).

Run it: ``hubwire run tests.apps.hardening:app --port N``. Options come from the environment so one
app serves every scenario:

* ``HW_OPTIONS``: JSON object of :class:`~hubwire.HubOptions` fields (lists become tuples);
* ``HUBWIRE_REDIS_URL`` / ``--redis``: the Redis backplane, as for any app;
* ``HW_TRACING=1``: a recording OpenTelemetry tracer provider, spans at ``GET /debug/spans``.

Users are taken from the ``user`` query parameter (a test authenticator, not for production). A
``group`` query parameter makes ``on_connected`` join that group: the rejoin pattern the README
documents (group membership belongs to a connection, so a reconnected client is re-added there).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from hubwire import Hub, HubOptions, HubServer, Principal, RequestInfo


def _options() -> HubOptions:
    raw: dict[str, Any] = json.loads(os.environ.get("HW_OPTIONS") or "{}")
    return HubOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


class HardHub(Hub):
    async def on_connected(self) -> None:
        for group in filter(None, (self.context.query.get("group") or "").split(",")):
            await self.groups.add(self.context.connection_id, group)

    async def echo(self, message: Any) -> Any:
        return message

    async def whoami(self) -> dict[str, Any]:
        return {"connectionId": self.context.connection_id, "pid": os.getpid()}

    async def context_dump(self) -> dict[str, Any]:
        """Everything hub code can see about its connection (to check that no token is in it)."""
        request = self.context.request
        return {
            "connectionId": self.context.connection_id,
            "query": self.context.query,
            "headers": self.context.headers,
            "requestQuery": request.query if request else None,
            "items": {str(k): str(v) for k, v in self.context.items.items()},
        }

    async def share_context(self) -> None:
        """Send this connection's context to every client (a careless app)."""
        await self.clients.all.send("Context", await self.context_dump())

    async def join_group(self, group: str) -> None:
        await self.groups.add(self.context.connection_id, group)

    async def leave_group(self, group: str) -> None:
        await self.groups.remove(self.context.connection_id, group)

    async def send_to_group(self, group: str, value: Any) -> None:
        await self.clients.group(group).send("Group", group, value)

    async def send_to_user(self, user: str, value: Any) -> None:
        await self.clients.user(user).send("User", user, value)

    async def broadcast(self, value: Any) -> None:
        await self.clients.all.send("Broadcast", value)

    async def slow(self, delay_ms: int) -> int:
        await asyncio.sleep(min(max(delay_ms, 0), 2000) / 1000)
        return delay_ms

    async def fail(self) -> None:
        raise RuntimeError("boom")

    async def counter(self, count: int) -> AsyncIterator[int]:
        for i in range(min(count, 1000)):
            yield i
            await asyncio.sleep(0)

    async def upload_sum(self, numbers: AsyncIterator[int]) -> int:
        return sum([n async for n in numbers])

    async def hold_upload(self, delay_ms: int, numbers: AsyncIterator[int]) -> int:
        """Read nothing of the upload for ``delay_ms``, then sum it (upload back-pressure)."""
        await asyncio.sleep(min(max(delay_ms, 0), 2000) / 1000)
        return sum([n async for n in numbers])


if os.environ.get("HW_TRACING"):
    from tests.apps import tracing

    tracing.install()


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


server = HubServer(_options(), authenticator=authenticate, metrics_path="/metrics", stats_path="/debug/stats")
server.add_hub("/hub", HardHub)


def _hub() -> Any:
    return server.hub_context(HardHub)


async def blast(request: Request) -> JSONResponse:
    """Broadcast ``count`` messages of ``size`` characters to every client (slow-consumer tests)."""
    count = int(request.query_params.get("count", "1"))
    size = int(request.query_params.get("size", "1000"))
    tag = request.query_params.get("tag", "b")
    filler = "x" * size
    for i in range(count):
        await _hub().clients.all.send("Blast", tag, i, filler)
    return JSONResponse({"sent": count})


async def broadcast(request: Request) -> JSONResponse:
    """``Broadcast(seq)`` to every client."""
    seq = int(request.path_params["seq"])
    await _hub().clients.all.send("Broadcast", seq)
    return JSONResponse({"sent": seq})


async def group_send(request: Request) -> JSONResponse:
    """``Group(group, seq)`` to one group."""
    group = request.path_params["group"]
    seq = int(request.path_params["seq"])
    await _hub().clients.group(group).send("Group", group, seq)
    return JSONResponse({"sent": seq})


async def spans(request: Request) -> JSONResponse:
    """Spans finished so far (HW_TRACING=1)."""
    from tests.apps import tracing

    return JSONResponse(tracing.FINISHED)


async def ws_echo(websocket: WebSocket) -> None:
    """A plain (non-hub) WebSocket route of the wrapped app: echoes text until closed."""
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        await websocket.send_text("echo " + (message.get("text") or ""))


web = Starlette(
    routes=[
        WebSocketRoute("/ws-echo", ws_echo),
        Route("/blast", blast, methods=["POST"]),
        Route("/debug/spans", spans),
        Route("/broadcast/{seq}", broadcast, methods=["POST"]),
        Route("/group/{group}/{seq}", group_send, methods=["POST"]),
    ]
)
server.app = web
app = server
