"""Hub app of tests/test_compression.py: permessage-deflate on natively served WebSockets.

Run it: ``hubwire run tests.apps.compression:app --port N``. ``/hub`` compresses (the default,
threshold 256 bytes), ``/plain`` has compression turned off; ``POST /broadcast/{count}/{size}``
sends ``count`` broadcasts of a JSON-like list of about ``size`` bytes to every client of ``/hub``;
``/page`` is a page with the official client's browser bundles (from node_modules) for
tests/compression_browser.cjs.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from hubwire import Hub, HubOptions, HubServer


def items(size: int, seed: int = 0) -> list[dict[str, object]]:
    """Realistic JSON: objects with repeated keys, about ``size`` bytes serialized."""
    out: list[dict[str, object]] = []
    total = 0
    while total < size:
        n = seed * 1000 + len(out)
        item = {"id": n, "user": f"user{n % 13}", "text": f"message number {n}", "read": n % 2 == 0}
        out.append(item)
        total += 60
    return out


class ChatHub(Hub):
    async def echo(self, message: str) -> str:
        return message

    async def length(self, message: str) -> int:
        return len(message)

    async def mixed(self, sizes: list[int]) -> None:
        """Messages of these sizes to the caller, back to back (one outbox flush, as a rule)."""
        for n, size in enumerate(sizes):
            await self.clients.caller.send("Mixed", n, "x" * size)

    async def broadcast(self, count: int, size: int) -> None:
        for seed in range(count):
            await self.clients.all.send("Items", seed, items(size, seed))


class PlainHub(ChatHub):
    """Compression off."""


class SmallHub(ChatHub):
    """A threshold no message reaches."""


server = HubServer(stats_path="/debug/stats", metrics_path="/metrics")
server.add_hub("/hub", ChatHub)
server.add_hub("/plain", PlainHub, options=HubOptions(websocket_compression=False))
server.add_hub("/small", SmallHub, options=HubOptions(websocket_compression_threshold=100_000))


async def broadcast(request: Request) -> JSONResponse:
    count, size = int(request.path_params["count"]), int(request.path_params["size"])
    context = server.hub_context(ChatHub)
    for seed in range(count):
        await context.clients.all.send("Items", seed, items(size, seed))
    return JSONResponse({"sent": count})


_DIST = Path(__file__).resolve().parents[2] / "node_modules" / "@microsoft"
BUNDLES = {
    "signalr.js": _DIST / "signalr" / "dist" / "browser" / "signalr.js",
    "signalr-protocol-msgpack.js": _DIST
    / "signalr-protocol-msgpack"
    / "dist"
    / "browser"
    / "signalr-protocol-msgpack.js",
}
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>compression</title>
<script src="/lib/signalr.js"></script><script src="/lib/signalr-protocol-msgpack.js"></script>
</head><body>permessage-deflate checks</body></html>"""


async def page(request: Request) -> Response:
    return HTMLResponse(PAGE)


async def bundle(request: Request) -> Response:
    path = BUNDLES.get(request.path_params["name"])
    if path is None:
        return Response(status_code=404)
    return FileResponse(path, media_type="text/javascript")


server.app = Starlette(
    routes=[
        Route("/broadcast/{count}/{size}", broadcast, methods=["POST"]),
        Route("/page", page),
        Route("/lib/{name}", bundle),
    ]
)
app = server
