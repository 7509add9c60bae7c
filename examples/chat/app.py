"""A small chat on hubwire's in-memory default: one page, one hub, zero configuration.

Run: ``./run demo`` (or ``hubwire run examples.chat.app:app``) and open http://127.0.0.1:8000.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from hubwire import Hub, HubServer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SIGNALR_JS = ROOT / "node_modules" / "@microsoft" / "signalr" / "dist" / "browser" / "signalr.min.js"


class ChatHub(Hub):
    """Everyone in one room, plus named rooms (groups)."""

    async def on_connected(self) -> None:
        await self.clients.others.send("System", f"{self.context.connection_id[:6]} joined")

    async def on_disconnected(self, exception: BaseException | None) -> None:
        await self.clients.others.send("System", f"{self.context.connection_id[:6]} left")

    async def send_message(self, user: str, message: str) -> None:
        await self.clients.all.send("ReceiveMessage", user, message)

    async def join_room(self, room: str) -> None:
        await self.groups.add(self.context.connection_id, room)
        await self.clients.group(room).send("System", f"{self.context.connection_id[:6]} entered {room}")

    async def send_to_room(self, room: str, user: str, message: str) -> None:
        await self.clients.group(room).send("ReceiveMessage", user, f"[{room}] {message}")


async def index(request: object) -> FileResponse:
    return FileResponse(HERE / "index.html")


async def signalr_js(request: object) -> Response:
    if not SIGNALR_JS.exists():
        return Response("run `npm ci` in the repository first", status_code=404)
    return FileResponse(SIGNALR_JS, media_type="application/javascript")


server = HubServer(app=Starlette(routes=[Route("/", index), Route("/lib/signalr.min.js", signalr_js)]))
server.add_hub("/chat", ChatHub)
app = server
