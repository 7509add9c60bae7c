"""Hub app of tests/test_structure.py: connection lifetime order, per-path options, one hub at two paths.

Run it: ``hubwire run tests.apps.structure:app --port N [--redis URL]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hubwire import Hub, HubException, HubOptions, HubServer

#: what hub code saw, in order: [event, connection id, detail]
EVENTS: list[list[str]] = []


class OrderHub(Hub):
    async def on_disconnected(self, exception: BaseException | None) -> None:
        EVENTS.append(["disconnected", self.context.connection_id, ""])

    async def echo(self, message: str) -> str:
        EVENTS.append(["echo", self.context.connection_id, message[:20]])
        return message

    async def slow(self, delay_ms: int) -> str:
        await asyncio.sleep(min(delay_ms, 2000) / 1000)
        EVENTS.append(["slow", self.context.connection_id, ""])
        return "slow"

    async def length(self, message: str) -> int:
        return len(message)

    async def upload_sum(self, numbers: AsyncIterator[int]) -> int:
        return sum([n async for n in numbers])

    async def whoami(self) -> str:
        return self.context.connection_id

    async def join(self, group: str) -> str:
        try:
            await self.groups.add(self.context.connection_id, group)
        except HubException as exc:
            return f"error: {exc}"
        return "ok"

    async def ticks(self) -> AsyncIterator[int]:
        """A stream that runs until cancelled."""
        i = 0
        while True:
            yield i
            i += 1
            await asyncio.sleep(0.5)

    async def ask_client(self, connection_id: str) -> str:
        """A client result from another connection (on any instance)."""
        try:
            return str(await self.clients.client(connection_id).invoke("Question", timeout=10))
        except HubException as exc:
            return f"error: {exc}"


class TwoPathHub(Hub):
    async def ping(self) -> str:
        return "pong"


server = HubServer(stats_path="/debug/stats", health_path="/health")
server.add_hub("/hub", OrderHub)
#: a hub allowing messages far over the server-wide default (32 KB)
server.add_hub("/big", OrderHub, options=HubOptions(maximum_receive_message_size=512 * 1024))
#: small per-connection limits
LIMITS = HubOptions(max_groups_per_connection=3, max_group_name_length=10, max_streams_per_connection=2)
server.add_hub("/limited", OrderHub, options=LIMITS)
#: one hub at two paths, each with one protocol; the messagepack path is added first
server.add_hub("/mp", TwoPathHub, options=HubOptions(supported_protocols=("messagepack",)))
server.add_hub("/js", TwoPathHub, options=HubOptions(supported_protocols=("json",)))


async def events(request: Request) -> JSONResponse:
    return JSONResponse(EVENTS)


async def broadcast(request: Request) -> JSONResponse:
    value: Any = request.path_params["value"]
    await server.hub_context(TwoPathHub).clients.all.send("Msg", value)
    return JSONResponse({"sent": value})


server.app = Starlette(
    routes=[Route("/debug/events", events), Route("/broadcast/{value}", broadcast, methods=["POST"])]
)
app = server
