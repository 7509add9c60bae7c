"""A HubServer mounted inside a Starlette app (``Mount("/hubs", app=server)``), for
``tests/test_drain.py``: run by plain uvicorn, the server says its WebSockets take the ASGI path
and how to keep the native one."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount

from hubwire import Hub, HubServer


class EchoHub(Hub):
    async def echo(self, value: str) -> str:
        return value


server = HubServer()
server.add_hub("/hub", EchoHub)


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    async with server.lifespan():
        yield


app = Starlette(routes=[Mount("/hubs", app=server)], lifespan=lifespan)
