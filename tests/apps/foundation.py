"""The hub app the foundation tests drive with real clients (JS, pysignalr, signalrcore).

Run it: ``hubwire run tests.apps.foundation:app --port N``. Users are taken
from the ``user`` query parameter (a test authenticator, not for production).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from hubwire import Hub, HubException, HubOptions, HubServer, Principal, RequestInfo


@dataclass
class Point:
    x: int
    y: int


class Boom(Exception):
    pass


class TestHub(Hub):
    async def echo(self, message: str) -> str:
        return message

    async def add(self, a: int, b: int) -> int:
        return a + b

    async def add_points(self, a: Point, b: Point) -> Point:
        return Point(a.x + b.x, a.y + b.y)

    async def nothing(self) -> None:
        return None

    async def get_connection_id(self) -> str:
        return self.context.connection_id

    async def get_user(self) -> str | None:
        return self.context.user_identifier

    async def throw(self, message: str) -> None:
        raise Boom(message)

    async def throw_hub_exception(self, message: str) -> None:
        raise HubException(message)

    async def send_to_caller(self, method: str, value: str) -> None:
        await self.clients.caller.send(method, value)

    async def send_to_all(self, value: str) -> None:
        await self.clients.all.send("Message", "all", value)

    async def send_to_others(self, value: str) -> None:
        await self.clients.others.send("Message", "others", value)

    async def send_to_all_except(self, excluded: list[str], value: str) -> None:
        await self.clients.all_except(excluded).send("Message", "all_except", value)

    async def send_to_client(self, connection_id: str, value: str) -> None:
        await self.clients.client(connection_id).send("Message", "client", value)

    async def send_to_clients(self, connection_ids: list[str], value: str) -> None:
        await self.clients.clients(connection_ids).send("Message", "clients", value)

    async def send_to_user(self, user: str, value: str) -> None:
        await self.clients.user(user).send("Message", "user", value)

    async def send_to_users(self, users: list[str], value: str) -> None:
        await self.clients.users(users).send("Message", "users", value)

    async def join_group(self, group: str) -> None:
        await self.groups.add(self.context.connection_id, group)

    async def leave_group(self, group: str) -> None:
        await self.groups.remove(self.context.connection_id, group)

    async def send_to_group(self, group: str, value: str) -> None:
        await self.clients.group(group).send("Message", "group", value)

    async def send_to_groups(self, groups: list[str], value: str) -> None:
        await self.clients.groups(groups).send("Message", "groups", value)

    async def send_to_group_except(self, group: str, excluded: list[str], value: str) -> None:
        await self.clients.group_except(group, excluded).send("Message", "group_except", value)

    async def send_to_others_in_group(self, group: str, value: str) -> None:
        await self.clients.others_in_group(group).send("Message", "others_in_group", value)

    async def counter(self, count: int, delay_ms: int) -> AsyncIterator[int]:
        for i in range(count):
            yield i
            await asyncio.sleep(delay_ms / 1000)

    async def infinite(self) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.05)
        finally:
            await self.clients.caller.send("StreamCanceled")

    async def stream_fails(self, after: int) -> AsyncIterator[int]:
        for i in range(after):
            yield i
        raise Boom("stream broke")

    async def upload_concat(self, items: AsyncIterator[str]) -> str:
        return "".join([item async for item in items])

    async def upload_sum(self, prefix: str, numbers: AsyncIterator[int]) -> str:
        total = 0
        async for n in numbers:
            total += n
        return f"{prefix}{total}"

    async def get_header(self, name: str) -> str | None:
        return self.context.headers.get(name.lower())

    async def get_query(self, name: str) -> str | None:
        request = self.context.request
        return request.query_param(name) if request else None


class DetailedHub(TestHub):
    """The same methods with detailed errors on (served at /detailed)."""


def authenticate(request: RequestInfo) -> Principal | None:
    user = request.query_param("user")
    return Principal(user, {"sub": user}) if user else None


hubs = HubServer(authenticator=authenticate)
hubs.add_hub("/hub", TestHub)
hubs.add_hub("/detailed", DetailedHub, options=HubOptions(enable_detailed_errors=True))
hubs.add_connection_handler("/echo", lambda conn, data: conn.write(data))


async def client_result(request: Request) -> PlainTextResponse:
    """Invoke client method ``Result`` on a connection and answer with its result or error."""
    connection_id = request.path_params["connection_id"]
    method = request.query_params.get("method", "Result")
    try:
        value = await hubs.hub_context(TestHub).clients.client(connection_id).invoke(method, timeout=10)
    except HubException as exc:
        return PlainTextResponse(str(exc))
    return PlainTextResponse(str(value))


async def broadcast(request: Request) -> JSONResponse:
    """Send ``Message("http", value)`` to every client of TestHub from an HTTP handler."""
    value = request.path_params["value"]
    await hubs.hub_context(TestHub).clients.all.send("Message", "http", value)
    return JSONResponse({"sent": value})


web = Starlette(
    routes=[
        Route("/clientresult/{connection_id}", client_result),
        Route("/broadcast/{value}", broadcast, methods=["POST"]),
    ]
)
hubs.app = web
app = hubs
