"""A node's door for app servers: the ``/server/?hub=H`` WebSocket that becomes a link.

The app server shows a token signed with the access key; its first frame is the
handshake, then frames flow both ways until either side goes. Frames are bounded
(``max_frame``); a frame that breaks the protocol drops the link, and every client
connection pinned to it moves (``ServiceClients.link_closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..auth import bearer_token
from ..connections.connection import RequestInfo
from ..http import Receive, Scope, Send
from ..protocol.service import (
    HandshakeRequest,
    HandshakeResponse,
    ServiceFrameParser,
    ServiceProtocolError,
    encode_frame,
)
from ..transports.websocket import reject_websocket
from .node import NodeLink, ServiceClients
from .tokens import verify

__all__ = ["LinkAcceptor"]

log = logging.getLogger("hubwire.service")

#: an app server that sends nothing (not even its 5-second ping) for this long is gone
LINK_TIMEOUT = 30.0


class LinkAcceptor:
    """ASGI app for app-server links (WebSocket only)."""

    def __init__(self, clients: ServiceClients, access_key: str, max_frame: int = 16 * 1024 * 1024) -> None:
        self.clients = clients
        self.access_key = access_key
        self.max_frame = max_frame
        self.links = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = RequestInfo.from_scope(scope)
        hub = request.query_param("hub") or ""
        token = bearer_token(request)
        if not hub or token is None or verify(self.access_key, token, "server", hub) is None:
            await reject_websocket(scope, receive, send, 401, "Unauthorized")
            return
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        parser = ServiceFrameParser(self.max_frame)
        try:
            first = await self._handshake(receive, parser)
        except (ServiceProtocolError, TimeoutError) as exc:
            log.warning("app-server link refused: %s", exc)
            await send({"type": "websocket.close", "code": 1002})
            return
        if first is None:
            return
        await self._serve(first, hub, parser, receive, send)

    async def _handshake(self, receive: Receive, parser: ServiceFrameParser) -> HandshakeRequest | None:
        while True:
            message = await asyncio.wait_for(receive(), LINK_TIMEOUT)
            if message["type"] == "websocket.disconnect":
                return None
            frames = parser.feed(message.get("bytes") or b"")
            if frames:
                first = frames[0]
                if not isinstance(first, HandshakeRequest) or len(frames) > 1:
                    raise ServiceProtocolError("the first frame of a link is its handshake, alone")
                return first

    async def _serve(
        self, first: HandshakeRequest, hub_name: str, parser: ServiceFrameParser, receive: Receive, send: Send
    ) -> None:
        server = first.ext.get("server")
        server_id = server if isinstance(server, str) and server else "unnamed"

        async def write(data: bytes) -> None:
            await send({"type": "websocket.send", "bytes": data})

        hub = await self.clients.hub(hub_name)
        link = NodeLink(server_id, hub_name, write)
        await write(encode_frame(HandshakeResponse(None, {"node": "hubwire"})))
        hub.links.append(link)
        self.links += 1
        writer = asyncio.get_running_loop().create_task(link.writer(), name=f"link {server_id}")
        log.info("app server %s linked for hub %s", server_id, hub_name)
        try:
            await self._read(link, parser, receive)
        except (ServiceProtocolError, TimeoutError) as exc:
            log.warning("app-server link %s dropped: %s", server_id, exc)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1002})
        finally:
            self.links -= 1
            self.clients.link_closed(link)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer
            log.info("app server %s unlinked from hub %s", server_id, hub_name)

    async def _read(self, link: NodeLink, parser: ServiceFrameParser, receive: Receive) -> None:
        on_frame = self.clients.on_frame
        while True:
            message = await asyncio.wait_for(receive(), LINK_TIMEOUT)
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise ServiceProtocolError("a link carries binary frames only")
            for frame in parser.feed(data):
                on_frame(link, frame)
