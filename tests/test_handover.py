"""WebSocket paths that are not hubs reach the wrapped app in both serving modes.

In native mode hubwire parses the upgrade itself and hands other paths to uvicorn's implementation;
in ASGI mode every upgrade goes to uvicorn's implementation after hubwire's request checks. Either
way the app's own WebSocket route must see every frame (uvicorn re-installs the handing protocol
on the transport after the hand-over, so the hand-over must forward).
"""

from __future__ import annotations

import asyncio

import pytest

from .conftest import ServerProcess
from .hwtools import APP
from .rawhub import RawHub, open_ws


@pytest.mark.parametrize("serving", ["native", "asgi"])
async def test_plain_websocket_route_and_hub_side_by_side(start_server: object, serving: str) -> None:
    server: ServerProcess = start_server(APP, args=["--serving", serving])  # type: ignore[operator]
    ws = await open_ws(server.url.replace("http", "ws", 1) + "/ws-echo")
    for text in ("one", "two", "three"):
        await ws.send(text)
        assert await asyncio.wait_for(ws.recv(), 5) == f"echo {text}"
    hub = await RawHub.open(server.url)
    assert await hub.invoke("echo", "hub") == "hub"
    await ws.send("after")
    assert await asyncio.wait_for(ws.recv(), 5) == "echo after"
    await ws.close()
    await hub.close()
    assert "Traceback" not in server.output()
