"""Hub app for the multi-instance (Redis backplane) tests.

Run N copies: ``hubwire run tests.apps.scaleout:app --port P --redis URL --channel-prefix X``.
Users come from the ``user`` query parameter (a test authenticator only).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from hubwire import Hub, HubException, HubOptions, HubServer, Principal, RequestInfo
from hubwire.hubs.presence import PresenceResult


class ScaleHub(Hub):
    async def whoami(self) -> dict[str, Any]:
        return {"connectionId": self.context.connection_id, "pid": os.getpid()}

    async def join_group(self, group: str) -> None:
        await self.groups.add(self.context.connection_id, group)

    async def leave_group(self, group: str) -> None:
        await self.groups.remove(self.context.connection_id, group)

    async def add_to_group(self, connection_id: str, group: str) -> str:
        try:
            await self.groups.add(connection_id, group)
        except HubException as exc:
            return f"error: {exc}"
        return "ok"

    async def send_all(self, value: str) -> None:
        await self.clients.all.send("Message", "all", value)

    async def send_others(self, value: str) -> None:
        await self.clients.others.send("Message", "others", value)

    async def send_all_except(self, excluded: list[str], value: str) -> None:
        await self.clients.all_except(excluded).send("Message", "all_except", value)

    async def send_client(self, connection_id: str, value: str) -> None:
        await self.clients.client(connection_id).send("Message", "client", value)

    async def send_clients(self, connection_ids: list[str], value: str) -> None:
        await self.clients.clients(connection_ids).send("Message", "clients", value)

    async def send_group(self, group: str, value: str) -> None:
        await self.clients.group(group).send("Message", "group", value)

    async def send_groups(self, groups: list[str], value: str) -> None:
        await self.clients.groups(groups).send("Message", "groups", value)

    async def send_group_except(self, group: str, excluded: list[str], value: str) -> None:
        await self.clients.group_except(group, excluded).send("Message", "group_except", value)

    async def send_others_in_group(self, group: str, value: str) -> None:
        await self.clients.others_in_group(group).send("Message", "others_in_group", value)

    async def send_user(self, user: str, value: str) -> None:
        await self.clients.user(user).send("Message", "user", value)

    async def send_users(self, users: list[str], value: str) -> None:
        await self.clients.users(users).send("Message", "users", value)

    async def join_groups(self, prefix: str, count: int) -> int:
        """Join ``count`` groups ``{prefix}{i}`` (the many-channels test); how many were joined."""
        for i in range(count):
            await self.groups.add(self.context.connection_id, f"{prefix}{i}")
        return count

    async def presence_group(self, group: str) -> dict[str, Any]:
        """Cluster-wide presence from hub code: the group's connections as [id, user, instance]."""
        return _presence(await self.clients.group(group).connections())

    async def presence_user(self, user: str) -> dict[str, Any]:
        return _presence(await self.clients.user(user).connections())

    async def presence_count(self, group: str) -> int:
        return await self.clients.group(group).count()

    async def presence_connection(self, connection_id: str) -> dict[str, Any] | None:
        found = await hubs.hub_context(ScaleHub).presence.connection(connection_id)
        return None if found is None else msgspec.to_builtins(found)

    async def ask_client(self, connection_id: str) -> str:
        try:
            timeout = float(os.environ.get("SCALEOUT_ASK_TIMEOUT", "10"))
            return str(await self.clients.client(connection_id).invoke("Result", timeout=timeout))
        except HubException as exc:
            return f"error: {exc}"


def _presence(found: PresenceResult) -> dict[str, Any]:
    return {
        "connections": sorted([c.connection_id, c.user, c.instance] for c in found),
        "missing": list(found.missing),
        "complete": found.complete,
    }


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


#: SCALEOUT_MAX_GROUPS: groups one connection may join (the many-channels test needs 20,000)
_max_groups = os.environ.get("SCALEOUT_MAX_GROUPS")
hubs = HubServer(
    authenticator=authenticate,
    options=HubOptions(max_groups_per_connection=int(_max_groups)) if _max_groups else None,
)
hubs.add_hub("/hub", ScaleHub)


async def publish(request: Request) -> JSONResponse:
    """The seed's check: an HTTP handler broadcasting through the hub context."""
    value = request.path_params["value"]
    await hubs.hub_context(ScaleHub).clients.all.send("Message", "http", value)
    return JSONResponse({"sent": value, "pid": os.getpid()})


async def burst(request: Request) -> JSONResponse:
    """``count`` broadcasts ``{prefix}-{i}`` made back to back: nothing in between lets the backplane's
    publisher run, so they go to Redis as one pipelined batch."""
    count, prefix = int(request.path_params["count"]), request.path_params["prefix"]
    clients = hubs.hub_context(ScaleHub).clients
    for i in range(count):
        await clients.all.send("Message", "http", f"{prefix}-{i}")
    return JSONResponse({"sent": count})


async def group_send(request: Request) -> JSONResponse:
    group, value = request.path_params["group"], request.path_params["value"]
    await hubs.hub_context(ScaleHub).clients.group(group).send("Message", "group", value)
    return JSONResponse({"sent": value})


async def health(request: Request) -> JSONResponse:
    backplane = hubs.backplane
    info = backplane.health() if hasattr(backplane, "health") else {"state": "in-memory"}
    return JSONResponse(info)


async def whoami(request: Request) -> PlainTextResponse:
    return PlainTextResponse(str(os.getpid()))


async def instance(request: Request) -> PlainTextResponse:
    """This instance's server name (what presence and ``hubwire inspect`` call it)."""
    return PlainTextResponse(hubs.inspection.name)


async def presence(request: Request) -> JSONResponse:
    """Presence from outside hub code: ``hub_context(...).presence``, by group or user, and the count."""
    kind, key = request.path_params["kind"], request.path_params["key"]
    context = hubs.hub_context(ScaleHub)
    found = await (context.presence.group(key) if kind == "group" else context.presence.user(key))
    count = await context.presence.count(key) if kind == "group" else None
    return JSONResponse({**_presence(found), "count": count})


web = Starlette(
    routes=[
        Route("/publish/{value}", publish, methods=["POST"]),
        Route("/group/{group}/{value}", group_send, methods=["POST"]),
        Route("/burst/{count}/{prefix}", burst, methods=["POST"]),
        Route("/health", health),
        Route("/whoami", whoami),
        Route("/instance", instance),
        Route("/presence/{kind}/{key}", presence),
    ]
)
hubs.app = web
app = hubs
