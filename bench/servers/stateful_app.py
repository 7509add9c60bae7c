"""The hub of ``bench/stateful_memory.py``: ``hubwire run bench.servers.stateful_app:app --port P``.

Hub at ``/hub`` (nothing to call); ``POST /broadcast?count=N&size=S`` sends N messages of S
characters to every client (``clients.all``); ``GET /gc`` runs a garbage collection and answers the
server's RSS in KB, so the measurement reads a settled process.
"""

from __future__ import annotations

import gc
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from hubwire import Hub, HubServer


class MemoryHub(Hub):
    async def ping(self) -> int:
        return 1


server = HubServer(stats_path="/debug/stats")
server.add_hub("/hub", MemoryHub)


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def broadcast(request: Request) -> JSONResponse:
    count = int(request.query_params.get("count", "1"))
    size = int(request.query_params.get("size", "100"))
    hub = server.hub_context(MemoryHub)
    for i in range(count):
        await hub.clients.all.send("Num", i, "x" * size)
    return JSONResponse({"sent": count})


async def settle(request: Request) -> JSONResponse:
    gc.collect()
    return JSONResponse({"rss_kb": rss_kb(), "connections": len(server.connections)})


server.app = Starlette(routes=[Route("/broadcast", broadcast, methods=["POST"]), Route("/gc", settle)])
app = server
