"""Hub app and node of the connection-service tests (``tests/test_service.py``).

App server: ``hubwire run tests.apps.service_app:app --service URL[,URL] --access-key K``.
Node: ``hubwire service --access-key K --redis URL`` (or ``tests.apps.service_app:node``).
``GET /debug/lifecycle`` shows ``on_connected`` / ``on_disconnected`` runs per connection id on
this app server; ``POST /broadcast?n=N`` sends ``Tick(N)`` to everyone from an HTTP handler.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hubwire import Hub, HubServer

SERVER = os.environ.get("HUBWIRE_SERVICE_SERVER_ID", "app")
LIFECYCLE: dict[str, dict[str, int]] = {}
#: a file that gets a line per on_disconnected (``SERVICE_APP_EVENTS``)
EVENTS = os.environ.get("SERVICE_APP_EVENTS")


class ChatHub(Hub):
    async def on_connected(self) -> None:
        entry = LIFECYCLE.setdefault(self.context.connection_id, {"connected": 0, "disconnected": 0})
        entry["connected"] += 1
        self.context.items["joined_at"] = SERVER
        group = self.context.query.get("group")
        if group:
            await self.groups.add(self.context.connection_id, group)

    async def on_disconnected(self, exception: BaseException | None) -> None:
        entry = LIFECYCLE.setdefault(self.context.connection_id, {"connected": 0, "disconnected": 0})
        entry["disconnected"] += 1
        if EVENTS:  # outlives this process (a test reads it after a SIGTERM); a test app: one small write
            with Path(EVENTS).open("a") as out:  # noqa: ASYNC230
                out.write(f"disconnected {self.context.connection_id}\n")

    async def echo(self, value: Any) -> Any:
        return value

    async def where(self) -> dict[str, Any]:
        return {
            "server": SERVER,
            "connectionId": self.context.connection_id,
            "user": self.context.user_identifier,
            "migratedFrom": self.context.migrated_from,
            "items": {str(k): v for k, v in self.context.items.items()},
            "transport": self.context.transport,
        }

    async def set_item(self, key: str, value: Any) -> None:
        self.context.items[key] = value

    async def join(self, group: str) -> None:
        await self.groups.add(self.context.connection_id, group)

    async def leave(self, group: str) -> None:
        await self.groups.remove(self.context.connection_id, group)

    async def to_group(self, group: str, value: Any) -> None:
        await self.clients.group(group).send("Group", group, value)

    async def tick(self, n: int) -> None:
        await self.clients.all.send("Tick", n)

    async def to_others(self, value: Any) -> None:
        await self.clients.others.send("Other", value)

    async def to_me(self, value: Any) -> None:
        await self.clients.caller.send("Me", value)

    async def to_user(self, user: str, value: Any) -> None:
        await self.clients.user(user).send("User", value)

    async def me_then_group(self, group: str) -> None:
        """Joins ``group``, then sends to the caller and to the group: the client gets them in order."""
        await self.groups.add(self.context.connection_id, group)
        await self.clients.caller.send("Me", 1)
        await self.clients.group(group).send("Group", group, 2)

    async def slow(self, ms: int) -> str:
        await asyncio.sleep(ms / 1000)
        return SERVER


async def lifecycle(request: Request) -> JSONResponse:
    return JSONResponse(LIFECYCLE)


async def links(request: Request) -> JSONResponse:
    """The app server's links to the nodes (how many are up) and the connections it runs."""
    return JSONResponse(server.backplane.health())


async def ask(request: Request) -> JSONResponse:
    """A client result of any connection, whichever app server runs it (``clients.client(id).invoke``)."""
    try:
        value = (
            await server.hub_context(ChatHub)
            .clients.client(request.path_params["cid"])
            .invoke("Result", timeout=10)
        )
    except Exception as exc:
        return JSONResponse({"error": str(exc), "server": SERVER})
    return JSONResponse({"value": value, "server": SERVER})


async def broadcast(request: Request) -> JSONResponse:
    await server.hub_context(ChatHub).clients.all.send("Tick", int(request.query_params["n"]))
    return JSONResponse({"sent": True})


web = Starlette(
    routes=[
        Route("/debug/lifecycle", lifecycle),
        Route("/debug/links", links),
        Route("/ask/{cid}", ask),
        Route("/broadcast", broadcast, methods=["POST"]),
    ]
)
server = HubServer(app=web, health_path="/health", metrics_path="/metrics")
server.add_hub("/chat", ChatHub)
app = server
