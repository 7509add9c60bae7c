"""A small chat on hubwire's in-memory default: one page, one hub."""

from __future__ import annotations

from hubwire import Hub, HubServer


class ChatHub(Hub):
    async def on_connected(self) -> None:
        await self.clients.others.send("UserJoined", self.context.connection_id)

    async def send_message(self, user: str, message: str) -> None:
        await self.clients.all.send("ReceiveMessage", user, message)

    async def join_room(self, room: str) -> None:
        await self.groups.add(self.context.connection_id, room)

    async def send_to_room(self, room: str, user: str, message: str) -> None:
        await self.clients.group(room).send("ReceiveMessage", user, f"[{room}] {message}")


server = HubServer()
server.add_hub("/chat", ChatHub)
